--- device_overrides for infer_auto_device_map (llama.cpp's --override-tensor, e.g. `-ot exps=CPU`):
-- {[pattern] = device} pins the modules whose dotted names match a Lua pattern (string.find,
-- anywhere in the name) to a device, and the planner places the rest of the model under what the
-- budgets have left. The usual use: a mixture-of-experts model's experts in RAM or on disk, where
-- a token reads only the few it picks, and everything else (attention, norms, routers, embeddings)
-- on the GPU, or in RAM when the experts go to disk.
--
-- How: the pinned modules' bytes come off their devices' budgets; while the planner runs they are
-- set aside (an empty module in their place, so their bytes count nowhere else); in the plan, the
-- entry covering a pinned module is split down to it, its siblings keeping the entry's device.
local sizes = require("moonload.utils.sizes")
local modeling = require("moonload.utils.modeling")
local nn = require("moonload.nn")

local M = {}

local function starts_with(s, prefix) return s:sub(1, #prefix) == prefix end

-- A device value as maps hold it: a GPU index, "cpu" or "disk".
local function map_device(d, pattern, fn)
   if type(d) == "number" and d >= 0 and d % 1 == 0 then return d end
   if d == "cpu" or d == "disk" then return d end
   if type(d) == "string" then
      local n = tonumber(d:match("^cuda:(%d+)$"))
      if n then return n end
      if d == "cuda" then return 0 end
   end
   error(string.format('%s: device_overrides[%q] must be "cpu", "disk", a GPU index or "cuda:N", got %s', fn, pattern,
      tostring(d)), 4)
end

--- pinned(model, overrides, fn) -> {{name, module, device, pattern}, ...}: the outermost modules
-- whose names match a pattern, in module order. Errors name a pattern that is malformed, matches
-- nothing or only modules inside others pinned, and a module that patterns send to two devices.
function M.pinned(model, overrides, fn)
   if type(overrides) ~= "table" then
      error(string.format("%s: device_overrides must be a table {[pattern] = device}, got %s", fn, type(overrides)), 3)
   end
   local patterns = {}
   for pattern, d in pairs(overrides) do
      if type(pattern) ~= "string" then
         error(string.format("%s: device_overrides keys must be Lua patterns over module names, got %s", fn, type(pattern)), 3)
      end
      -- {pattern, device, modules pinned by it, a pattern pinning a module around one it matched}
      patterns[#patterns + 1] = { pattern, map_device(d, pattern, fn), 0, nil }
   end
   table.sort(patterns, function(a, b) return a[1] < b[1] end)
   local function matches(name, p)
      local ok, found = pcall(string.find, name, p[1])
      if not ok then error(string.format("%s: device_overrides pattern %q: %s", fn, p[1], tostring(found)), 5) end
      return found ~= nil
   end
   local out = {}
   for _, e in ipairs(model:named_modules_list()) do
      local name, module = e[1], e[2]
      local around
      for _, p in ipairs(out) do
         if starts_with(name, p[1] .. ".") then around = p; break end
      end
      if name ~= "" then
         local device, by
         for _, p in ipairs(patterns) do
            if matches(name, p) then
               if around then
                  p[4] = p[4] or around[4]
               else
                  if by and device ~= p[2] then
                     error(string.format("%s: device_overrides send %s to %s (pattern %q) and to %s (pattern %q)", fn, name,
                        tostring(device), by, tostring(p[2]), p[1]), 3)
                  end
                  device, by = p[2], p[1]
                  p[3] = p[3] + 1
               end
            end
         end
         if device ~= nil then out[#out + 1] = { name, module, device, by } end
      end
   end
   for _, p in ipairs(patterns) do
      if p[3] == 0 and p[4] then
         error(string.format("%s: device_overrides pattern %q matches only modules inside those pattern %q pins", fn,
            p[1], p[4]), 3)
      elseif p[3] == 0 then
         error(string.format("%s: device_overrides pattern %q matches no module", fn, p[1]), 3)
      end
   end
   return out
end

--- Takes the pinned modules' bytes off the budgets of their devices (a device with no budget,
-- disk included, takes them as they come).
function M.reserve(max_memory, pinned, module_sizes, reserve, fn)
   local per_device, order = {}, {}
   for _, p in ipairs(pinned) do
      local d = p[3]
      if per_device[d] == nil then order[#order + 1] = d end
      per_device[d] = (per_device[d] or 0) + module_sizes[p[1]]
   end
   for _, d in ipairs(order) do
      if d ~= "disk" and max_memory[d] ~= nil then
         reserve(max_memory, d, per_device[d], "modules device_overrides pins there", fn)
      end
   end
end

-- The parent module of a dotted name and the name's last part.
local function parent_of(model, name)
   local parent, leaf = name:match("^(.*)%.([^.]+)$")
   if parent == nil then return model, name end
   return model:get_submodule(parent), leaf
end

--- set_aside(model, pinned, fn) -> restore(): puts an empty module where each pinned module was.
function M.set_aside(model, pinned, fn)
   local swapped = {}
   for _, p in ipairs(pinned) do
      local parent, leaf = parent_of(model, p[1])
      local mods = rawget(parent, "_modules")
      mods:set(leaf, nn.Module())
      swapped[#swapped + 1] = { mods, leaf, p[2] }
   end
   return function()
      for i = #swapped, 1, -1 do
         local s = swapped[i]
         s[1]:set(s[2], s[3])
      end
   end
end

-- The entries a module splits into, in the planner's order: its own tensors, children, buffers.
local function split_names(name, module)
   local out = {}
   for _, e in ipairs(modeling.direct_params(module)) do out[#out + 1] = name .. "." .. e[1] end
   for _, e in ipairs(modeling.children_list(module)) do out[#out + 1] = name .. "." .. e[1] end
   for _, e in ipairs(modeling.direct_buffers(module)) do out[#out + 1] = name .. "." .. e[1] end
   return out
end

--- apply(model, device_map, keys, pinned) -> device_map, keys: each pinned module on its device;
-- an entry covering it on another device is split down to it, the rest keeping that device.
function M.apply(model, device_map, keys, pinned)
   for _, p in ipairs(pinned) do
      local name, device = p[1], p[3]
      -- the entry covering name: itself, an ancestor, or the whole model ("")
      local cover
      for _, k in ipairs(keys) do
         if k == name or k == "" or starts_with(name, k .. ".") then cover = k; break end
      end
      if cover == nil then
         device_map[name] = device
         keys[#keys + 1] = name
      elseif device_map[cover] ~= device then
         local from = device_map[cover]
         local current = cover
         while current ~= name do
            local module = current == "" and model or model:get_submodule(current)
            local parts = split_names(current, module)
            if current == "" then
               for i, n in ipairs(parts) do parts[i] = n:sub(2) end     -- ".x" -> "x"
            end
            local at
            for i, k in ipairs(keys) do if k == current then at = i; break end end
            table.remove(keys, at)
            device_map[current] = nil
            for i, n in ipairs(parts) do
               table.insert(keys, at + i - 1, n)
               device_map[n] = from
            end
            -- the next level down on the way to name
            local rest = current == "" and name or name:sub(#current + 2)
            local step = rest:match("^([^.]+)")
            current = current == "" and step or (current .. "." .. step)
         end
         device_map[name] = device
      end
   end
   return device_map, keys
end

--- plan(model, opts, place, reserve, fn) -> device_map, keys: infer_auto_device_map with
-- opts.device_overrides (place(model, opts) is the planner without them; reserve subtracts a
-- device's bytes naming what for).
function M.plan(model, opts, place, get_max_memory, reserve, fn)
   local pinned = M.pinned(model, opts.device_overrides, fn)
   local module_sizes = sizes.compute_module_sizes(model, { dtype = opts.dtype, special_dtypes = opts.special_dtypes })
   local max_memory = get_max_memory(opts.max_memory, fn)
   M.reserve(max_memory, pinned, module_sizes, reserve, fn)
   local rest = {}
   for k, v in pairs(opts) do rest[k] = v end
   rest.device_overrides, rest.max_memory = nil, max_memory
   local restore = M.set_aside(model, pinned, fn)
   local ok, device_map, keys = pcall(place, model, rest)
   restore()
   if not ok then error(device_map, 0) end
   return M.apply(model, device_map, keys, pinned)
end

return M
