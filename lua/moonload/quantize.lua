--- ml.quantize(model[, {skip = {pattern, ...}, offload_folder}]) -> model, report: every linear
-- layer (nn.Linear, GPT-2's Conv1D) whose weight is in CPU memory becomes an nn.QuantizedLinear
-- (int8, a float32 scale per block of 32 along in_features; core/src/cpu/q8.c), in place.
-- Decoding is bound by the weight bytes it reads, and these are a quarter of float32's, half of
-- bfloat16's. With offload_folder, a layer offloaded to disk by its own hook (execution on the
-- CPU) is quantized too: its int8 weights are written to <offload_folder>/<name>.q8.safetensors
-- and its hook reads them from there (mapped), so each forward reads fewer bytes from disk.
-- Left as they are, each with its reason in report.skipped[name]: layers whose name matches a
-- skip pattern (Lua patterns, string.find), that are offloaded otherwise (no folder, a block's
-- hook, execution on a GPU) or on a GPU (int8 weights run on the CPU), tied to another
-- module's weight (GPT-2's and tied Llamas' lm_head: the embedding reads it as floats), or whose
-- in_features is not a multiple of 32.
-- report.quantized lists the names changed (report.reused those whose int8 file in the folder
-- was made from the same checkpoint bytes and used as it was); report.bytes_before and
-- bytes_after their weights.
local QuantizedLinear = require("moonload.nn.quantized_linear")
local F = require("moonload.nn.functional")
local Tensor = require("moonload.tensor")

local M = {}
local WHO = "quantize"

local function is_linear(m)
   local name = m.__name
   return (name == "Linear" or name == "Conv1D") and m.weight ~= nil
end

-- The skip option: a pattern or a list of them (checked as they are matched: Lua reports a
-- malformed pattern only when matching reaches the fault).
local function check_skip(skip, level)
   skip = skip or {}
   if type(skip) == "string" then skip = { skip } end
   for _, p in ipairs(skip) do
      if type(p) ~= "string" then
         error(string.format("%s: skip patterns must be Lua patterns (strings), got %s", WHO, type(p)), level)
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
            local ok, found = pcall(string.find, name, p)
            if not ok then error(string.format("%s: skip pattern %q: %s", WHO, p, tostring(found)), 3) end
            if found then reason = string.format("matches skip pattern %q", p) end
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

--- check_option(value, who, level): from_pretrained's and load_checkpoint_and_dispatch's
-- quantize is nil or "int8".
function M.check_option(value, who, level)
   if value ~= nil and value ~= "int8" then
      error(string.format('%s: quantize must be "int8", got %s', who, tostring(value)), level + 1)
   end
end

--- Bytes of the float32 scales of a quantized linear layer m.
function M.scale_bytes(m)
   local out_features, in_features = m.out_features or m.nf, m.in_features or m.nx
   return out_features * in_features / QuantizedLinear.BLOCK * 4
end

-- What an int8 file in the offload folder was made from: the float weight's file, offset, size
-- and modification time (a checkpoint replaced in place does not match), dtype and shape; nil
-- when the weight is not a view of a mapped file (then the file is always written again).
local FORMAT = "moonload q8 v1: int8, a float32 scale per 32 along in_features"
local function source_of(w, transposed)
   local C = require("moonload.C")
   local ffi = C.ffi
   local path, off = ffi.new("const char*[1]"), ffi.new("uint64_t[1]")
   local size, mtime = ffi.new("uint64_t[1]"), ffi.new("int64_t[1]")
   if C.lib.ml_tensor_file_source(w._c, path, off, size, mtime) ~= 0 then return nil end
   local function int(v) return (tostring(v):gsub("U?LL$", "")) end
   return string.format("%s; %s [%s]%s at byte %s of %s (%s bytes, modified %s ns)", FORMAT, w.dtype,
      table.concat(w.shape, ", "), transposed and " transposed" or "", int(off[0]), ffi.string(path[0]), int(size[0]),
      int(mtime[0]))
end

-- The int8 weights and scales in path when it was made from source, else nil.
local function reusable(path, source)
   if source == nil then return nil end
   local st = require("moonload.safetensors")
   local ok, f = pcall(st.safe_open, path)
   if not ok then return nil end
   local meta = f:metadata()
   f:close()
   if not meta or meta.source ~= source then return nil end
   local ok2, tensors = pcall(st.load_file, path)
   return ok2 and tensors or nil
end

-- An offloaded linear layer m (weights on meta behind its own AlignDevicesHook) as a
-- QuantizedLinear whose int8 weights live in folder (written once: a file made from the same
-- source is used as it is); nil and the reason when it cannot be.
local function quantize_offloaded(name, m, folder)
   local hooks = require("moonload.hooks")
   local hook = rawget(m, "_hf_hook")
   if folder == nil then return nil, "offloaded (its weight is on meta; give offload_folder to quantize it there)" end
   if hook == nil or not require("moonload.class").is_a(hook, hooks.AlignDevicesHook) or not hook.offload
      or hook.weights_map == nil then
      return nil, "offloaded with its block (no offloading hook of its own)"
   end
   local dev = hook.execution_device or "cpu"
   if dev ~= "cpu" then return nil, "offloaded to run on " .. dev .. " (int8 weights run on the CPU)" end
   local w = hooks.weights_map_get(hook.weights_map, "weight")
   if not Tensor.is_tensor(w) then return nil, "offloaded, and its hook's weights map has no weight" end
   local source = source_of(w, m.nf ~= nil)
   if m.nf then w = w:t() end                                                   -- Conv1D: (nx, nf)
   local path = folder .. "/" .. name .. ".q8.safetensors"
   local mapped = reusable(path, source)
   local reused = mapped ~= nil
   if not mapped then
      local q, scales = F.quantize_q8(w)
      require("moonload.utils.offload").mkdir_p(folder, WHO)
      require("moonload.safetensors").save_file({ weight = q, weight_scale = scales }, path,
         source and { source = source } or nil)
      mapped = require("moonload.safetensors").load_file(path)
   end
   local ql = require("moonload.big_modeling").init_empty_weights(function()
      return QuantizedLinear(m.in_features or m.nx, m.out_features or m.nf, { bias = m.bias ~= nil })
   end)
   local wm = { weight = mapped.weight, weight_scale = mapped.weight_scale }
   if m.bias ~= nil then wm.bias = hooks.weights_map_get(hook.weights_map, "bias") end
   hooks.add_hook_to_module(ql, hooks.AlignDevicesHook({ execution_device = dev, offload = true, weights_map = wm }))
   return ql, nil, mapped.weight:nbytes() + mapped.weight_scale:nbytes(), w:nbytes(), reused
end

function M.quantize(model, opts)
   opts = opts or {}
   if type(model) ~= "table" or type(model.named_modules_list) ~= "function" then
      error(WHO .. ": model must be an nn.Module, got " .. type(model), 2)
   end
   if type(opts) ~= "table" then error(WHO .. ": options must be a table {skip}, got " .. type(opts), 2) end
   for k in pairs(opts) do
      if k ~= "skip" and k ~= "offload_folder" then
         error(string.format('%s: unknown option "%s" (expected skip, offload_folder)', WHO, tostring(k)), 2)
      end
   end
   if opts.offload_folder ~= nil and type(opts.offload_folder) ~= "string" then
      error(WHO .. ": offload_folder must be a folder path, got " .. type(opts.offload_folder), 2)
   end
   local report = { quantized = {}, skipped = {}, reused = {}, bytes_before = 0, bytes_after = 0 }
   for _, c in ipairs(M.candidates(model, opts.skip)) do
      local name, m, reason = c[1], c[2], c[3]
      local w = m.weight
      local q, after, before, reused
      if reason then
      elseif w:is_meta() then
         q, reason, after, before, reused = quantize_offloaded(name, m, opts.offload_folder)
      elseif w.device ~= "cpu" then
         reason = "on " .. w.device .. " (int8 weights run on the CPU)"
      end
      if reason then
         report.skipped[name] = reason
      else
         q = q or QuantizedLinear.from_float(m)
         local parent, leaf = name:match("^(.*)%.([^.]+)$")
         local owner = parent and model:get_submodule(parent) or model
         rawget(owner, "_modules"):set(leaf or name, q)
         report.quantized[#report.quantized + 1] = name
         if reused then report.reused[#report.reused + 1] = name end
         report.bytes_before = report.bytes_before + (before or w:nbytes())
         report.bytes_after = report.bytes_after + (after or (q.weight:nbytes() + q.weight_scale:nbytes()))
      end
   end
   return model, report
end

return M
