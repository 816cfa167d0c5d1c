--- ml.quantize(model[, {skip = {pattern, ...}}]) -> model, report: every linear layer (nn.Linear,
-- GPT-2's Conv1D) whose weight is in CPU memory becomes an nn.QuantizedLinear (int8, a float32
-- scale per block of 32 along in_features; core/src/cpu/q8.c), in place. Decoding is bound by
-- the weight bytes it reads, and these are a quarter of float32's, half of bfloat16's.
-- Left as they are, each with its reason in report.skipped[name]: layers whose name matches a
-- skip pattern (Lua patterns, string.find), whose weight is offloaded (on meta) or on a GPU
-- (int8 weights run on the CPU), tied to another module's (GPT-2's and tied Llamas' lm_head: the
-- embedding reads it as floats), or whose in_features is not a multiple of 32.
-- report.quantized lists the names changed; report.bytes_before and bytes_after their weights.
local QuantizedLinear = require("moonload.nn.quantized_linear")

local M = {}
local WHO = "quantize"

local function is_linear(m)
   local name = m.__name
   return (name == "Linear" or name == "Conv1D") and m.weight ~= nil
end

-- The skip option: a pattern or a list of them, each a valid Lua pattern.
local function check_skip(skip, level)
   skip = skip or {}
   if type(skip) == "string" then skip = { skip } end
   for _, p in ipairs(skip) do
      local ok, err = pcall(string.find, "", p)
      if type(p) ~= "string" or not ok then
         error(string.format("%s: skip patterns must be Lua patterns, got %s", WHO, tostring(err or p)), level)
      end
   end
   return skip
end

--- candidates(model[, skip]) -> {{name, module, reason}, ...}: every linear layer in module
-- order, reason nil when nothing but its placement could keep it in floats (skipped by name,
-- tied to another module's weight, in_features not a multiple of 32). Works on a meta skeleton:
-- the planner sizes a quantized model with it.
function M.candidates(model, skip)
   skip = check_skip(skip, 3)
   -- tensors held by more than one module (tied weights): left in floats
   local owners = {}
   for _, e in ipairs(model:named_modules_list("", false)) do
      for pname, p in e[2]:named_parameters("", false) do
         local list = owners[p] or {}
         list[#list + 1] = e[1] == "" and pname or (e[1] .. "." .. pname)
         owners[p] = list
      end
   end
   local out = {}
   for _, e in ipairs(model:named_modules_list()) do
      local name, m = e[1], e[2]
      if name ~= "" and is_linear(m) then
         local w = m.weight
         local in_features = m.nf and m.nx or m.in_features
         local reason
         for _, p in ipairs(skip) do
            if name:find(p) then reason = string.format("matches skip pattern %q", p) end
         end
         if not reason and owners[w] and #owners[w] > 1 then
            local others = {}
            for _, n in ipairs(owners[w]) do if n ~= name .. ".weight" then others[#others + 1] = n end end
            reason = "tied to " .. table.concat(others, ", ")
         elseif not reason and in_features % QuantizedLinear.BLOCK ~= 0 then
            reason = string.format("in_features %d is not a multiple of %d", in_features, QuantizedLinear.BLOCK)
         end
         out[#out + 1] = { name, m, reason }
      end
   end
   return out
end

--- Bytes of the float32 scales of a quantized linear layer m.
function M.scale_bytes(m)
   local out_features, in_features = m.out_features or m.nf, m.in_features or m.nx
   return out_features * in_features / QuantizedLinear.BLOCK * 4
end

function M.quantize(model, opts)
   opts = opts or {}
   if type(model) ~= "table" or type(model.named_modules_list) ~= "function" then
      error(WHO .. ": model must be an nn.Module, got " .. type(model), 2)
   end
   if type(opts) ~= "table" then error(WHO .. ": options must be a table {skip}, got " .. type(opts), 2) end
   for k in pairs(opts) do
      if k ~= "skip" then error(string.format('%s: unknown option "%s" (expected skip)', WHO, tostring(k)), 2) end
   end
   local report = { quantized = {}, skipped = {}, bytes_before = 0, bytes_after = 0 }
   for _, c in ipairs(M.candidates(model, opts.skip)) do
      local name, m, reason = c[1], c[2], c[3]
      local w = m.weight
      if reason then
      elseif w:is_meta() then
         reason = "offloaded (its weight is on meta)"
      elseif w.device ~= "cpu" then
         reason = "on " .. w.device .. " (int8 weights run on the CPU)"
      end
      if reason then
         report.skipped[name] = reason
      else
         local q = QuantizedLinear.from_float(m)
         local parent, leaf = name:match("^(.*)%.([^.]+)$")
         local owner = parent and model:get_submodule(parent) or model
         rawget(owner, "_modules"):set(leaf or name, q)
         report.quantized[#report.quantized + 1] = name
         report.bytes_before = report.bytes_before + w:nbytes()
         report.bytes_after = report.bytes_after + q.weight:nbytes() + q.weight_scale:nbytes()
      end
   end
   return model, report
end

return M
