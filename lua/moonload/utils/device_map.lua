--- Device-map planning (accelerate.utils.modeling): max_memory normalisation, balanced budgets,
-- infer_auto_device_map, clean_device_map, check_device_map.
--
-- Device keys: integers are GPUs (cuda:N), then "cpu" and "disk". A device map is a plain
-- table name -> device; functions that build one return it together with its keys in order
-- (Accelerate's OrderedDict order; after cleaning, a merged entry takes the place of the first
-- entry it replaces, so keys follow module order). max_memory tables come back the same way:
-- the table and its keys (sorted GPUs, then "cpu", then "disk").
local C = require("moonload.C")
local log = require("moonload.utils.log")
local sizes = require("moonload.utils.sizes")
local modeling = require("moonload.utils.modeling")

local M = {}

local is_module, children_list, class_name = modeling.is_module, modeling.children_list, modeling.class_name

-- --- formatting as Python prints it ------------------------------------------------------------

local function num(v)
   if v == math.floor(v) and math.abs(v) < 2 ^ 63 then return string.format("%d", v) end
   return string.format("%.17g", v)
end
M.format_number = num

local function dev_str(d)
   if type(d) == "number" then return num(d) end
   return tostring(d)
end

local function pylist(list)
   local parts = {}
   for i, v in ipairs(list) do
      if type(v) == "table" then parts[i] = pylist(v) else parts[i] = "'" .. tostring(v) .. "'" end
   end
   return "[" .. table.concat(parts, ", ") .. "]"
end
M.pylist = pylist

-- --- memory -------------------------------------------------------------------------------------

local function meminfo_available()
   local f = io.open("/proc/meminfo", "r")
   if not f then return nil end
   local text = f:read("*a")
   f:close()
   local kb = text:match("MemAvailable:%s*(%d+)%s*kB")
   return kb and tonumber(kb) * 1024 or nil
end

--- Free bytes on GPU i, or nil. The seam for a CUDA backend: a library exporting
-- `ml_cuda_mem_get_info(int, int64_t*, int64_t*)` in its FFI region is used when present;
-- M.gpu_free_memory may also be replaced.
function M.gpu_free_memory(i)
   local lib, ffi = C.lib, C.ffi
   local ok, f = pcall(function() return lib.ml_cuda_mem_get_info end)
   if not ok or f == nil then return nil end
   local free, total = ffi.new("int64_t[1]"), ffi.new("int64_t[1]")
   if f(i, free, total) ~= 0 then return nil end
   return tonumber(free[0])
end

--- Number of visible GPUs (the library's ml_cuda_device_count; replaceable like gpu_free_memory).
function M.cuda_device_count()
   local ok, n = pcall(function() return C.lib.ml_cuda_device_count() end)
   return ok and tonumber(n) or 0
end
local function device_count() return M.cuda_device_count() end

local function is_gpu_key(k) return type(k) == "number" end

--- get_max_memory(max_memory) -> table, keys. nil: free memory of each GPU and
-- {cpu = MemAvailable}. A table: size strings converted, keys checked and ordered
-- (GPUs sorted, "cpu", "disk"); the input is not modified.
function M.get_max_memory(max_memory, fn)
   fn = fn or "get_max_memory"
   if max_memory == nil then
      local out, keys = {}, {}
      for i = 0, device_count() - 1 do
         local free = M.gpu_free_memory(i)
         if free ~= nil then
            out[i] = free; keys[#keys + 1] = i
         else
            log.info(string.format("Device %d seems unavailable, Proceeding to check subsequent devices.", i))
         end
      end
      out.cpu = meminfo_available() or 0
      keys[#keys + 1] = "cpu"
      return out, keys
   end
   if type(max_memory) ~= "table" then
      error(string.format("%s: max_memory must be a table like {[0] = \"10GiB\", cpu = \"30GiB\"}, got %s", fn, type(max_memory)), 3)
   end
   local out, gpus = {}, {}
   local n = nil
   for k, v in pairs(max_memory) do
      if is_gpu_key(k) then
         if k < 0 or k % 1 ~= 0 then
            error(string.format("%s: max_memory key %s is not a device (use an integer, \"cpu\" or \"disk\")", fn, num(k)), 3)
         end
         gpus[#gpus + 1] = k
         n = n or device_count()
         if k >= n then
            local avail = {}
            for i = 0, n - 1 do avail[#avail + 1] = tostring(i) end
            log.warn(string.format("Device %d is not available, available devices are [%s]", k, table.concat(avail, ", ")))
         end
      elseif k ~= "cpu" and k ~= "disk" then
         error(string.format("%s: max_memory key %s is not a device (use an integer, \"cpu\" or \"disk\")", fn,
            type(k) == "string" and ('"' .. k .. '"') or tostring(k)), 3)
      end
      out[k] = sizes.parse_size(v, fn)
   end
   table.sort(gpus)
   local keys = {}
   for i, g in ipairs(gpus) do keys[i] = g end
   if out.cpu ~= nil then keys[#keys + 1] = "cpu" end
   if out.disk ~= nil then keys[#keys + 1] = "disk" end
   return out, keys
end

local function normalize_no_split(v)
   if v == nil then return {} end
   if type(v) == "string" then return { v } end
   if v[1] == nil and next(v) ~= nil then
      local out = {}
      for k, flag in pairs(v) do if flag then out[#out + 1] = k end end
      table.sort(out)
      return out
   end
   return v
end

local function child_of(m, part)
   local mods = rawget(m, "_modules")
   if mods and mods.get then
      local c = mods:get(part)
      if c ~= nil then return c end
   end
   local ok, v = pcall(function() return m[part] end)
   if ok then return v end
   return nil
end

local function get_module_leaves(keys)
   local children = {}
   for _, name in ipairs(keys) do
      if name ~= "" and name:find(".", 1, true) then
         local parent = name:match("^(.*)%.[^.]*$")
         children[parent] = (children[parent] or 0) + 1
      end
   end
   local leaves = {}
   for _, name in ipairs(keys) do
      if (children[name] or 0) == 0 and name ~= "" then leaves[#leaves + 1] = name end
   end
   return leaves
end

-- --- memory beside the weights (runtime_sizes, workspace_size) ------------------------------

-- runtime_sizes: module name -> bytes the module holds on its execution device while the model
-- runs (a layer's key-value cache). Checked, and listed for the placement loop.
local function runtime_entries(runtime_sizes, fn)
   if runtime_sizes == nil then return {} end
   if type(runtime_sizes) ~= "table" then
      error(string.format("%s: runtime_sizes must be a table (module name -> bytes), got %s", fn, type(runtime_sizes)), 3)
   end
   local list = {}
   for name, bytes in pairs(runtime_sizes) do
      if type(name) ~= "string" or type(bytes) ~= "number" or bytes < 0 then
         error(string.format("%s: runtime_sizes[%s] = %s is not a byte count >= 0 for a module name", fn,
            tostring(name), tostring(bytes)), 3)
      end
      if bytes > 0 then list[#list + 1] = { name = name, bytes = bytes } end
   end
   table.sort(list, function(a, b) return a.name < b.name end)
   return list
end

-- workspace_size: bytes kept free on each device that computes, a number or {cpu = , gpu = }.
local function workspace_for(workspace_size, fn)
   if workspace_size == nil then return { cpu = 0, gpu = 0 } end
   if type(workspace_size) == "number" and workspace_size >= 0 then
      return { cpu = workspace_size, gpu = workspace_size }
   end
   if type(workspace_size) == "table" then
      local out = { cpu = 0, gpu = 0 }
      for k, v in pairs(workspace_size) do
         if (k ~= "cpu" and k ~= "gpu") or type(v) ~= "number" or v < 0 then
            error(string.format('%s: workspace_size[%s] = %s: expected keys "cpu" and "gpu" with byte counts >= 0', fn,
               tostring(k), tostring(v)), 3)
         end
         out[k] = v
      end
      return out
   end
   error(string.format("%s: workspace_size must be a byte count or {cpu = bytes, gpu = bytes}, got %s", fn,
      tostring(workspace_size)), 3)
end

--- get_balanced_memory(model, {max_memory, no_split_module_classes, dtype, special_dtypes,
-- low_zero, runtime_sizes, workspace_size}) -> max_memory, keys: budgets that spread the model
-- (and the memory it needs while it runs) evenly over the GPUs.
function M.get_balanced_memory(model, opts)
   opts = opts or {}
   local fn = "get_balanced_memory"
   local user_not_set = opts.max_memory == nil
   local max_memory, mm_keys = M.get_max_memory(opts.max_memory, fn)
   local low_zero = opts.low_zero == true
   local gpus = {}
   for _, k in ipairs(mm_keys) do
      if is_gpu_key(k) and max_memory[k] > 0 then gpus[#gpus + 1] = k end
   end
   local num_devices = #gpus
   if num_devices == 0 then return max_memory, mm_keys end
   if num_devices == 1 then
      low_zero = false
      if user_not_set then
         for _, k in ipairs(mm_keys) do
            if is_gpu_key(k) then
               max_memory[k] = max_memory[k] * 0.9
               log.info(string.format("We will use 90%% of the memory on device %d for storing the model, and 10%% for the buffer to avoid OOM. You can set `max_memory` in to a higher value to use more memory (at your own risk).", k))
               break
            end
         end
      end
   end
   local module_sizes, keys = sizes.compute_module_sizes(model, { dtype = opts.dtype, special_dtypes = opts.special_dtypes })
   -- memory beside the weights (infer_auto_device_map's runtime_sizes, workspace_size) is
   -- shared out with them
   local runtime_total = 0
   for _, e in ipairs(runtime_entries(opts.runtime_sizes, fn)) do runtime_total = runtime_total + e.bytes end
   local per_gpu = math.floor((module_sizes[""] + runtime_total) / (low_zero and (num_devices - 1) or num_devices))
      + workspace_for(opts.workspace_size, fn).gpu

   local no_split = normalize_no_split(opts.no_split_module_classes)
   local buffer = 0
   if #no_split > 0 then
      local wanted = sizes.class_set(no_split)
      local found, nfound, best = {}, 0, nil
      for _, name in ipairs(keys) do
         if name ~= "" then
            local sub = model
            for part in name:gmatch("[^.]+") do
               sub = sub and (is_module(sub) and child_of(sub, part) or nil)
            end
            local cls = class_name(sub)
            if cls and wanted[cls] and found[cls] == nil then
               found[cls] = module_sizes[name]
               nfound = nfound + 1
               best = math.max(best or 0, module_sizes[name])
            end
            if nfound == #no_split then break end
         end
      end
      buffer = best or 0
   end
   local leaves = get_module_leaves(keys)
   local leaf_set = {}
   for _, l in ipairs(leaves) do leaf_set[l] = true end
   local kept = {}
   for _, k in ipairs(keys) do if not leaf_set[k] then kept[#kept + 1] = k end end
   leaves = get_module_leaves(kept)
   local total = 0
   for _, l in ipairs(leaves) do total = total + module_sizes[l] end
   local mean = total / math.max(#leaves, 1)
   mean = mean >= 0 and math.floor(mean) or math.ceil(mean)
   buffer = math.floor(1.25 * math.max(buffer, mean))
   per_gpu = per_gpu + buffer

   table.sort(gpus)
   for i = 1, #gpus - 1 do
      local idx = gpus[i]
      max_memory[idx] = math.min((low_zero and idx == 0) and max_memory[0] or per_gpu, max_memory[idx])
   end
   if low_zero then
      local rest = 0
      for i = 1, num_devices - 1 do rest = rest + (max_memory[i] or 0) end
      local min_zero = math.max(0, module_sizes[""] - rest)
      max_memory[0] = math.min(min_zero, max_memory[0])
   end
   return max_memory, mm_keys
end

-- --- clean_device_map -----------------------------------------------------------------------------

local function starts_with(s, prefix) return s:sub(1, #prefix) == prefix end

-- Cleans in place over (map, keys); returns keys.
local function clean(map, keys, module_name)
   local prefix = module_name == "" and "" or (module_name .. ".")
   local values, first_pos = {}, nil
   local distinct, value = 0, nil
   for i, k in ipairs(keys) do
      if starts_with(k, prefix) then
         values[#values + 1] = map[k]
         if first_pos == nil then first_pos = i end
         if distinct == 0 then distinct, value = 1, map[k] elseif map[k] ~= value then distinct = 2 end
      end
   end
   if distinct == 1 and #values > 1 then
      local new_keys = {}
      for i, k in ipairs(keys) do
         if starts_with(k, prefix) then
            map[k] = nil
            if i == first_pos then new_keys[#new_keys + 1] = module_name end
         else
            new_keys[#new_keys + 1] = k
         end
      end
      map[module_name] = value
      keys = new_keys
   end
   local depth = module_name == "" and 1 or (select(2, module_name:gsub("%.", "")) + 2)
   local children, seen = {}, {}
   for _, k in ipairs(keys) do
      if starts_with(k, prefix) and #k > #module_name then
         local parts, n = {}, 0
         for part in k:gmatch("[^.]+") do
            n = n + 1
            if n > depth then break end
            parts[n] = part
         end
         local child = table.concat(parts, ".")
         if not seen[child] then seen[child] = true; children[#children + 1] = child end
      end
   end
   for _, child in ipairs(children) do keys = clean(map, keys, child) end
   return keys
end

--- clean_device_map(device_map[, {module_name = "", keys}]) -> device_map, keys: groups the
-- entries of a module that all go to one device into one entry (in place). `keys` gives the
-- order (default: sorted names); a plain list of keys is also accepted as the second argument.
function M.clean_device_map(device_map, opts, module_name)
   local keys
   if type(opts) == "table" and opts[1] ~= nil then
      keys = opts
   elseif type(opts) == "table" then
      keys, module_name = opts.keys, opts.module_name or module_name
   end
   if type(device_map) ~= "table" then
      error("clean_device_map: device_map must be a table (name -> device), got " .. type(device_map), 2)
   end
   if keys == nil then
      keys = {}
      for k in pairs(device_map) do keys[#keys + 1] = k end
      table.sort(keys)
   else
      local copy = {}
      for i, k in ipairs(keys) do copy[i] = k end
      keys = copy
   end
   keys = clean(device_map, keys, module_name or "")
   return device_map, keys
end

-- --- infer_auto_device_map -------------------------------------------------------------------------

local function tied_groups_for(name, tied_parameters)
   local inside = name .. "."
   local groups = {}
   for _, group in ipairs(tied_parameters) do
      local any, all = false, true
      for _, k in ipairs(group) do
         if (k .. "."):find(inside, 1, true) then any = true else all = false end
      end
      if any and not all then groups[#groups + 1] = group end
   end
   local params = {}
   for _, group in ipairs(groups) do
      for _, p in ipairs(group) do
         if not (p .. "."):find(inside, 1, true) then params[#params + 1] = p end
      end
   end
   return groups, params
end

local function size_with_ties(tied_params, module_size, module_sizes, modules_to_treat, fn)
   if #tied_params < 1 then return module_size, {}, {} end
   local names, mods = {}, {}
   for _, p in ipairs(tied_params) do
      local found
      for _, e in ipairs(modules_to_treat) do
         if starts_with(p, e[1] .. ".") then found = e; break end
      end
      if not found then
         error(string.format("%s: tied parameter %s is not inside any module left to place", fn, p), 3)
      end
      names[#names + 1] = found[1]
      mods[#mods + 1] = found[2]
   end
   local total = module_size
   for i, p in ipairs(tied_params) do total = total + module_sizes[names[i]] - module_sizes[p] end
   return total, names, mods
end

local function prefixed(name, list)
   local out = {}
   for i, e in ipairs(list) do out[i] = { name .. "." .. e[1], e[2] } end
   return out
end

local function split_entries(name, module)
   local out = prefixed(name, modeling.direct_params(module))
   for _, e in ipairs(children_list(module)) do out[#out + 1] = { name .. "." .. e[1], e[2] } end
   return out
end

local function concat(...)
   local out = {}
   for i = 1, select("#", ...) do
      for _, e in ipairs(select(i, ...)) do out[#out + 1] = e end
   end
   return out
end

local function slice(list, a, b)
   local out = {}
   for i = a, b or #list do out[#out + 1] = list[i] end
   return out
end

local function only_modules(list)
   local out = {}
   for _, e in ipairs(list) do if is_module(e[2]) then out[#out + 1] = e end end
   return out
end

local function fallback_allocate(modules, module_sizes, size_limit, no_split_module_classes, tied_parameters)
   if type(size_limit) == "string" then
      local ok, v = pcall(sizes.parse_size, size_limit, "fallback_allocate")
      size_limit = ok and v or nil
   end
   if type(size_limit) ~= "number" or size_limit < 0 then return nil, nil, modules end
   -- a list of class names or a set (name -> true)
   local no_split = no_split_module_classes or {}
   if no_split[1] ~= nil then no_split = sizes.class_set(no_split) end
   tied_parameters = tied_parameters or {}
   local search = slice(modules, 1)
   local found_name, found
   while #search > 0 do
      local e = table.remove(search, 1)
      local name, module = e[1], e[2]
      local _, tied_params = tied_groups_for(name, tied_parameters)
      local s = size_with_ties(tied_params, module_sizes[name], module_sizes, search, "fallback_allocate")
      if s <= size_limit then found_name, found = name, module; break end
      local children = children_list(module)
      if #children > 0 and not no_split[class_name(module)] then
         search = concat(split_entries(name, module), search)
      end
   end
   if found_name == nil then return nil, nil, modules end
   local function index_of(list, n)
      for i, x in ipairs(list) do if x[1] == n then return i end end
      return nil
   end
   local pos = 1
   while true do
      local dot = found_name:find(".", pos, true)
      if not dot then break end
      local parent = found_name:sub(1, dot - 1)
      local idx = index_of(modules, parent)
      if idx then
         modules = concat(slice(modules, 1, idx - 1), split_entries(parent, modules[idx][2]), slice(modules, idx + 1))
      end
      pos = dot + 1
   end
   local idx = index_of(modules, found_name)
   local entry = table.remove(modules, idx)
   return entry[1], entry[2], modules
end

--- fallback_allocate(modules, module_sizes, size_limit[, {no_split_module_classes,
-- tied_parameters}]) -> name, module, remaining: the first module (parents split as needed)
-- whose size with ties fits size_limit (bytes or a size string); nil, nil, modules when none.
function M.fallback_allocate(modules, module_sizes, size_limit, opts, tied_parameters)
   local no_split, tied = opts, tied_parameters
   if type(opts) == "table" and opts[1] == nil and (opts.no_split_module_classes or opts.tied_parameters) then
      no_split, tied = opts.no_split_module_classes, opts.tied_parameters
   end
   return fallback_allocate(modules, module_sizes, size_limit, normalize_no_split(no_split), tied)
end

-- The runtime entries a module placed under `name` takes along: its own, those of modules inside
-- it, and those of a module it is part of (split into its children, the first part placed carries it).
local function related(a, b) return a == b or starts_with(a, b .. ".") or starts_with(b, a .. ".") end
local function runtime_of(name, entries, charged)
   local bytes, list = 0, {}
   for _, e in ipairs(entries) do
      if not charged[e.name] and related(name, e.name) then
         bytes = bytes + e.bytes
         list[#list + 1] = e.name
      end
   end
   return bytes, list
end

-- Subtracts `bytes` from a device's budget, naming what it is for when the budget cannot hold it.
local function reserve(max_memory, device, bytes, what, fn)
   if bytes <= 0 then return end
   if max_memory[device] < bytes then
      error(string.format("%s: max_memory for %s (%s bytes) cannot hold the %s (%s bytes)", fn, dev_str(device),
         num(max_memory[device]), what, num(bytes)), 3)
   end
   max_memory[device] = max_memory[device] - bytes
end

--- infer_auto_device_map(model, {max_memory, no_split_module_classes, dtype, special_dtypes,
-- verbose, clean_result = true, offload_buffers, fallback_allocation, runtime_sizes,
-- workspace_size, device_overrides}) -> device_map, keys.
-- Fills GPUs in order, then "cpu", then "disk", keeping room on the main devices for the
-- largest remaining layer (Accelerate's algorithm, quirks included). verbose = true prints the
-- steps like Accelerate; verbose = function(line) receives them instead.
-- Beyond Accelerate, memory the model needs while it runs: runtime_sizes (module name -> bytes,
-- e.g. each layer's key-value cache) counts on the module's execution device, which is its own
-- GPU, or the main device (first GPU, else the CPU) for a module offloaded to "cpu" or "disk";
-- workspace_size (bytes, or {cpu = , gpu = }) stays free on each GPU, and on the CPU when no GPU
-- computes. ml.utils.runtime_memory_sizes computes both for a causal language model.
-- device_overrides {[pattern] = device} pins the modules whose names match a Lua pattern to a
-- device and places the rest around them (utils/device_overrides.lua).
function M.infer_auto_device_map(model, opts)
   opts = opts or {}
   local fn = "infer_auto_device_map"
   if not is_module(model) then error(fn .. ": model must be an nn.Module", 2) end
   if opts.device_overrides ~= nil then
      return require("moonload.utils.device_overrides").plan(model, opts, M.infer_auto_device_map, M.get_max_memory,
         reserve, fn)
   end
   local max_memory, devices = M.get_max_memory(opts.max_memory, fn)
   local no_split_list = normalize_no_split(opts.no_split_module_classes)
   local no_split = sizes.class_set(no_split_list)
   local clean_result = opts.clean_result ~= false
   local offload_buffers = opts.offload_buffers == true
   local say
   if type(opts.verbose) == "function" then
      say = opts.verbose
   elseif opts.verbose then
      say = print
   end
   local dtype, special = opts.dtype, opts.special_dtypes
   local runtime = runtime_entries(opts.runtime_sizes, fn)
   local workspace = workspace_for(opts.workspace_size, fn)

   local has_disk = false
   for _, d in ipairs(devices) do if d == "disk" then has_disk = true end end
   if not has_disk then devices[#devices + 1] = "disk" end
   local gpus = {}
   for _, d in ipairs(devices) do if d ~= "cpu" and d ~= "disk" then gpus[#gpus + 1] = d end end
   local main = {}
   if #gpus > 0 then main[gpus[1]] = true; main.cpu = true else main.cpu = true end

   local module_sizes = sizes.compute_module_sizes(model, { dtype = dtype, special_dtypes = special })
   local tied_parameters = modeling.find_tied_parameters(model)

   -- The workspace, and with the CPU as the only computing device, every module's runtime
   -- memory (whatever its placement, it runs there), come off the budgets first.
   for _, d in ipairs(gpus) do reserve(max_memory, d, workspace.gpu, "workspace_size", fn) end
   if #gpus == 0 then
      local total = 0
      for _, e in ipairs(runtime) do total = total + e.bytes end
      if max_memory.cpu ~= nil then
         reserve(max_memory, "cpu", workspace.cpu, "workspace_size", fn)
         reserve(max_memory, "cpu", total, "runtime_sizes (memory the modules need while they run)", fn)
         -- what is left must at least run the largest layer from disk (mapped whole meanwhile)
         local largest = sizes.get_max_layer_size(concat(modeling.direct_params(model), children_list(model),
            modeling.direct_buffers(model)), module_sizes, no_split)
         if (workspace.cpu > 0 or total > 0) and max_memory.cpu < largest then
            error(string.format("%s: max_memory for cpu leaves %s bytes beside the memory reserved for the run (%s bytes), less than the largest layer (%s bytes) needs while it runs",
               fn, num(max_memory.cpu), num(workspace.cpu + total), num(largest)), 2)
         end
      end
      runtime = {}
   end

   -- One pass of Accelerate's placement, with main_reserve bytes kept on the main GPU for the
   -- runtime memory of the modules that end up offloaded. Returns the map, its keys and that
   -- memory as this pass placed it.
   local function place(say)
      local device_map, keys = {}, {}
      local function assign(name, device)
         if device_map[name] == nil then keys[#keys + 1] = name end
         device_map[name] = device
      end
      local modules_to_treat = concat(modeling.direct_params(model), children_list(model), modeling.direct_buffers(model))
      local current = 1
      local used = {}
      for _, d in ipairs(devices) do used[d] = 0 end
      local buffer_sizes = {}
      local minimum, minimum_keys = {}, {}
      local charged, offloaded_runtime = {}, 0

      local max_layer_size, max_layer_names = sizes.get_max_layer_size(modules_to_treat, module_sizes, no_split)

      while #modules_to_treat > 0 do
         local entry = table.remove(modules_to_treat, 1)
         local name, module = entry[1], entry[2]
         if say then say("\nTreating module " .. name .. ".") end
         local kept = {}
         for _, n in ipairs(max_layer_names) do
            if n ~= name and not starts_with(n, name .. ".") then kept[#kept + 1] = n end
         end
         max_layer_names = kept
         if #max_layer_names == 0 then
            max_layer_size, max_layer_names = sizes.get_max_layer_size(only_modules(modules_to_treat), module_sizes, no_split)
         end
         local module_size = module_sizes[name]
         local groups, tied_params = tied_groups_for(name, tied_parameters)
         if say and #groups > 0 then say("  Found the relevant tied param groups " .. pylist(groups)) end
         if say and #tied_params > 0 then say("  So those parameters need to be taken into account " .. pylist(tied_params)) end

         local device = devices[current]
         local on_gpu = device ~= "cpu" and device ~= "disk"
         local current_max = device ~= "disk" and max_memory[device] or nil
         local reserved = 0
         if main[device] then
            current_max = current_max - max_layer_size
            reserved = max_layer_size
         end
         local with_ties, tied_names, tied_modules = size_with_ties(tied_params, module_size, module_sizes, modules_to_treat, fn)
         -- what the module needs on this device while it runs (on a GPU only: offloaded modules
         -- run on the main GPU, whose reserve holds theirs)
         local run_bytes, run_names = runtime_of(name, runtime, charged)
         for _, tn in ipairs(tied_names) do
            local b, l = runtime_of(tn, runtime, charged)
            run_bytes = run_bytes + b
            for _, n in ipairs(l) do run_names[#run_names + 1] = n end
         end
         local run_here = on_gpu and run_bytes or 0

         local placed = false
         if current_max == nil or used[device] + with_ties + run_here <= current_max then
            if say then
               local out = "Putting " .. name
               if #tied_names > 0 then out = out .. " and " .. pylist(tied_names) else out = out .. " (size=" .. num(module_size) .. ")" end
               if run_here > 0 then out = out .. " (runtime=" .. num(run_here) .. ")" end
               if current_max ~= nil then out = out .. " (available=" .. num(current_max - used[device]) .. ")" end
               say(out .. " on " .. dev_str(device) .. ".")
            end
            used[device] = used[device] + with_ties + run_here
            if not on_gpu then offloaded_runtime = offloaded_runtime + run_bytes end
            for _, n in ipairs(run_names) do charged[n] = true end
            assign(name, device)
            for _, tn in ipairs(tied_names) do
               for i, e in ipairs(modules_to_treat) do
                  if e[1] == tn then table.remove(modules_to_treat, i); break end
               end
               assign(tn, device)
            end
            if not offload_buffers and is_module(module) then
               buffer_sizes[device] = (buffer_sizes[device] or 0)
                  + sizes.compute_module_total_buffer_size(module, { dtype = dtype, special_dtypes = special })
            end
            placed = true
         end

         local continue = placed
         if not continue and #tied_params > 0 and used[device] + module_size + run_here <= current_max then
            if say then
               say(string.format("Not enough space on %s to put %s and %s (space available %s, needed size %s).",
                  dev_str(device), name, pylist(tied_names), num(current_max - used[device]), num(with_ties + run_here)))
            end
            for i, tn in ipairs(tied_names) do
               local tm = tied_modules[i]
               local tchildren = children_list(tm)
               if #tchildren > 0 and not no_split[class_name(tm)] then
                  if say then say("Splitting " .. tn .. ".") end
                  local idx
                  for j, e in ipairs(modules_to_treat) do if e[1] == tn then idx = j; break end end
                  modules_to_treat = concat({ { name, module } }, slice(modules_to_treat, 1, idx - 1),
                     split_entries(tn, tm), slice(modules_to_treat, idx + 1))
                  max_layer_size, max_layer_names = sizes.get_max_layer_size(only_modules(modules_to_treat), module_sizes, no_split)
                  continue = true
                  break
               end
            end
            if not continue and say then say("None of the tied module can be split, going to the next device.") end
         end

         if not continue and used[device] + module_size + run_here >= current_max then
            local mchildren = children_list(module)
            if say then
               say(string.format("Not enough space on %s to put %s (space available %s, module size %s).",
                  dev_str(device), name, num(current_max - used[device]), num(module_size + run_here)))
            end
            if #mchildren == 0 or no_split[class_name(module)] then
               if say then say("This module cannot be split, going to the next device.") end
            else
               if say then say("Splitting " .. name .. ".") end
               modules_to_treat = concat(split_entries(name, module), modules_to_treat)
               max_layer_size, max_layer_names = sizes.get_max_layer_size(only_modules(modules_to_treat), module_sizes, no_split)
               continue = true
            end
         end

         if not continue and used[device] == 0 and opts.fallback_allocation and device ~= "disk" then
            local limit = max_memory[device] - math.max(max_layer_size, with_ties)
            local fname, fmodule, remaining = fallback_allocate(modules_to_treat, module_sizes, limit - used[device],
               no_split, tied_parameters)
            if fmodule ~= nil then
               modules_to_treat = concat({ { fname, fmodule }, { name, module } }, remaining)
               continue = true
            end
         end

         if not continue then
            if used[device] == 0 then
               if minimum[device] == nil then minimum_keys[#minimum_keys + 1] = device end
               minimum[device] = with_ties + run_here + reserved
            end
            used[device] = used[device] + reserved
            current = current + 1
            table.insert(modules_to_treat, 1, { name, module })
            if current > #devices then
               error(string.format("%s: ran out of devices while placing %s", fn, name), 3)
            end
         end
      end
      return device_map, keys, offloaded_runtime, used, buffer_sizes, minimum, minimum_keys
   end

   -- The main GPU keeps room for the runtime memory of the offloaded modules. Which modules are
   -- offloaded depends on that room, so passes run until the room holds what the pass offloaded
   -- (the room only grows, so the offloaded set only grows: this ends).
   local device_map, keys, offloaded_runtime, used, buffer_sizes, minimum, minimum_keys
   if #gpus > 0 and #runtime > 0 then
      local budget, room = max_memory[gpus[1]], 0
      while true do
         device_map, keys, offloaded_runtime = place(nil)
         if offloaded_runtime <= room then break end
         room = offloaded_runtime
         max_memory[gpus[1]] = budget
         reserve(max_memory, gpus[1], room, "runtime memory of the offloaded modules (runtime_sizes)", fn)
      end
   end
   device_map, keys, offloaded_runtime, used, buffer_sizes, minimum, minimum_keys = place(say)

   if clean_result then
      keys = clean(device_map, keys, "")
   end

   local non_gpu = (buffer_sizes.cpu or 0) + (buffer_sizes.disk or 0)
   if non_gpu > 0 and not offload_buffers then
      local fits = false
      for _, d in ipairs(devices) do
         if d ~= "cpu" and d ~= "disk" and not fits and max_memory[d] ~= nil then
            if max_memory[d] >= non_gpu + (used[d] or 0) then fits = true end
         end
      end
      if #gpus > 0 and not fits then
         log.warn(string.format("Current model requires %s bytes of buffer for offloaded layers, which seems does not fit any GPU's remaining memory. If you are experiencing a OOM later, please consider using offload_buffers=True.", num(non_gpu)))
      end
   end
   if #minimum_keys > 0 then
      local lines = {}
      for _, d in ipairs(minimum_keys) do
         lines[#lines + 1] = string.format("  - %s: %s bytes required", dev_str(d), num(minimum[d]))
      end
      log.info("Based on the current allocation process, no modules could be assigned to the following devices due to insufficient memory:\n"
         .. table.concat(lines, "\n")
         .. "\nThese minimum requirements are specific to this allocation attempt and may vary. Consider increasing the available memory for these devices to at least the specified minimum, or adjusting the model config.")
   end
   return device_map, keys
end

--- device_map_keys(device_map, model) -> the map's keys in module order (a module before what
-- it holds), for maps written by hand. Within a module: direct parameters, children, direct buffers (the
-- planner's order). Keys naming nothing in the model come last, sorted.
function M.device_map_keys(device_map, model)
   local keys, seen = {}, {}
   local function visit(name)
      if device_map[name] ~= nil and not seen[name] then seen[name] = true; keys[#keys + 1] = name end
   end
   local function walk(m, prefix)
      visit(prefix)
      local dot = prefix == "" and "" or (prefix .. ".")
      for _, e in ipairs(modeling.direct_params(m)) do visit(dot .. e[1]) end
      for _, e in ipairs(children_list(m)) do walk(e[2], dot .. e[1]) end
      for _, e in ipairs(modeling.direct_buffers(m)) do visit(dot .. e[1]) end
   end
   walk(model, "")
   local rest = {}
   for k in pairs(device_map) do if not seen[k] then rest[#rest + 1] = tostring(k) end end
   table.sort(rest)
   for _, k in ipairs(rest) do keys[#keys + 1] = k end
   return keys
end

-- --- check_device_map ------------------------------------------------------------------------------

--- Names of model's state_dict in PyTorch's order (module by module: parameters, then
-- persistent buffers; tied aliases included).
function M.state_dict_keys(model)
   local out = {}
   local function walk(m, prefix)
      local np = modeling.get_non_persistent_buffers(m)
      for _, e in ipairs(modeling.direct_params(m)) do out[#out + 1] = prefix .. e[1] end
      for _, e in ipairs(modeling.direct_buffers(m)) do
         if not np[e[1]] then out[#out + 1] = prefix .. e[1] end
      end
      for _, e in ipairs(children_list(m)) do walk(e[2], prefix .. e[1] .. ".") end
   end
   walk(model, "")
   return out
end

--- check_device_map(model, device_map): errors when a state-dict tensor gets no device; warns
-- about keys naming no module (parameter and buffer names are accepted: Q6 fixed).
function M.check_device_map(model, device_map)
   local fn = "check_device_map"
   if type(device_map) ~= "table" then
      error(string.format("%s: device_map must be a table (name -> device), got %s", fn, type(device_map)), 2)
   end
   local known = {}
   for name in model:named_modules() do known[name] = true end
   for name in modeling.named_module_tensors(model, { recurse = true }) do known[name] = true end
   local invalid = {}
   for k, d in pairs(device_map) do
      if type(k) ~= "string" then
         error(string.format("%s: device_map key %s is not a module name", fn, tostring(k)), 2)
      end
      if not (type(d) == "number" or d == "cpu" or d == "disk" or d == "meta" or (type(d) == "string" and d:match("^cuda:%d+$"))) then
         error(string.format('%s: device_map["%s"] = %s is not a device (use an integer, "cpu" or "disk")', fn, k,
            type(d) == "string" and ('"' .. d .. '"') or tostring(d)), 2)
      end
      if k ~= "" and not known[k] then invalid[#invalid + 1] = k end
   end
   if #invalid > 0 then
      table.sort(invalid)
      log.warn("The following device_map keys do not match any submodules in the model: " .. pylist(invalid))
   end
   if device_map[""] ~= nil then return end
   local uncovered = {}
   for _, name in ipairs(M.state_dict_keys(model)) do
      if modeling.lookup_device(name, device_map) == nil then uncovered[#uncovered + 1] = name end
   end
   if #uncovered > 0 then
      error(string.format("%s: The device_map provided does not give any device for the following parameters: %s", fn,
         table.concat(uncovered, ", ")), 2)
   end
end

return M
