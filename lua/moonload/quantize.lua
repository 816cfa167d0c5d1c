--- ml.quantize(model[, {dtype = "int8", skip = {pattern, ...}, offload_folder, embeddings}]) -> model, report:
-- every linear layer (nn.Linear, GPT-2's Conv1D) becomes an nn.QuantizedLinear (int8, or int4 with
-- dtype = "int4"; a float32 scale per block of 32 along in_features; core/src/cpu/q8.c,
-- core/src/cuda/q8.cu), in place. Decoding is bound by the weight bytes it reads, and these are a
-- quarter of float32's with int8, an eighth with int4 (scales aside). With embeddings = true, the
-- nn.Embedding tables become nn.QuantizedEmbedding too (rows widened as looked up; wherever they
-- are, as linear layers), and a head tied to one reads its quantized tensors (llama.cpp's way;
-- off by default, as in transformers' quantizers).
-- Where the weights are:
--  * in memory (CPU or GPU): quantized there;
--  * offloaded by the layer's own hook (dispatch_model, cpu_offload, disk_offload), for any
--    execution device: quantized into CPU memory when they were kept there (mapped to "cpu" in
--    the model's hf_device_map), into <offload_folder>/<name>.q8.safetensors (.q4.) when they were on
--    disk (or, with no device map to say, whenever offload_folder is given); the hook then
--    reads the int8 weights, so each forward moves fewer bytes from disk or over PCIe.
-- Left as they are, each with its reason in report.skipped[name]: layers whose name matches a
-- skip pattern (Lua patterns, string.find), offloaded to disk with no offload_folder, offloaded
-- with their block (no hook of their own), tied to another module's weight (GPT-2's and tied
-- Llamas' lm_head: the embedding reads it as floats), or whose in_features is not a multiple of 32.
-- report.quantized lists the names changed (report.reused those whose int8 file in the folder
-- was made from the same checkpoint bytes and used as it was); report.bytes_before and
-- bytes_after their weights.
local QuantizedLinear = require("moonload.nn.quantized_linear")
local QuantizedEmbedding = require("moonload.nn.quantized_embedding")
local Tensor = require("moonload.tensor")

local M = {}
local WHO = "quantize"

-- nn.Linear, GPT-2's Conv1D, and FP8 checkpoints' nn.Fp8Linear (expanded, then quantized again)
local function is_linear(m)
   local name = m.__name
   return (name == "Linear" or name == "Conv1D" or name == "Fp8Linear") and m.weight ~= nil
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

-- The reason skip keeps layer name in floats, or nil.
local function skip_reason(name, skip)
   for _, p in ipairs(skip) do
      local ok, found = pcall(string.find, name, p)
      if not ok then error(string.format("%s: skip pattern %q: %s", WHO, p, tostring(found)), 4) end
      if found then return string.format("matches skip pattern %q", p) end
   end
   return nil
end

--- candidates(model[, skip[, embeddings]]) -> {{name, module, reason, tied_to}, ...}: every linear
-- layer in module order (and with embeddings, every nn.Embedding first), reason nil when nothing
-- but its placement could keep it in floats (skipped by name, tied to another module's weight,
-- in_features not a multiple of 32). With embeddings, a linear layer tied to a candidate
-- embedding has no reason but tied_to, that embedding's name: it will share its quantized
-- tensors. Works on a meta skeleton: the planner sizes a quantized model with it.
function M.candidates(model, skip, embeddings)
   skip = check_skip(skip, 3)
   -- tensors held by more than one module (tied weights): left in floats, but for a head tied to
   -- an embedding that is quantized too
   local owners = {}
   for _, e in ipairs(model:named_modules_list("", false)) do
      for pname, p in e[2]:named_parameters("", false) do
         local list = owners[p] or {}
         list[#list + 1] = e[1] == "" and pname or (e[1] .. "." .. pname)
         owners[p] = list
      end
   end
   local out, embedding_of = {}, {}              -- embedding_of: float weight -> candidate embedding's name
   if embeddings then
      for _, e in ipairs(model:named_modules_list()) do
         local name, m = e[1], e[2]
         if name ~= "" and m.__name == "Embedding" and m.weight ~= nil then
            local reason = skip_reason(name, skip)
            if not reason and m.embedding_dim % QuantizedLinear.BLOCK ~= 0 then
               reason = string.format("embedding_dim %d is not a multiple of %d", m.embedding_dim, QuantizedLinear.BLOCK)
            end
            if not reason then embedding_of[m.weight] = name end
            out[#out + 1] = { name, m, reason }
         end
      end
   end
   for _, e in ipairs(model:named_modules_list()) do
      local name, m = e[1], e[2]
      if name ~= "" and is_linear(m) then
         local w = m.weight
         local in_features = m.nf and m.nx or m.in_features
         local reason, tied_to = skip_reason(name, skip), nil
         if not reason and owners[w] and #owners[w] > 1 then
            tied_to = not m.nf and embedding_of[w] or nil
            if not tied_to then
               local others = {}
               for _, n in ipairs(owners[w]) do if n ~= name .. ".weight" then others[#others + 1] = n end end
               reason = "tied to " .. table.concat(others, ", ")
            end
         elseif not reason and in_features % QuantizedLinear.BLOCK ~= 0 then
            reason = string.format("in_features %d is not a multiple of %d", in_features, QuantizedLinear.BLOCK)
         end
         out[#out + 1] = { name, m, reason, tied_to }
      end
   end
   return out
end

-- The weight widths by option name.
local BITS = { int8 = 8, int4 = 4 }

--- check_option(value, who, level[, embeddings]): from_pretrained's and load_checkpoint_and_dispatch's
-- quantize is nil, "int8" or "int4"; quantize_embeddings nil or a boolean, and only with quantize.
function M.check_option(value, who, level, embeddings)
   if value ~= nil and not BITS[value] then
      error(string.format('%s: quantize must be "int8" or "int4", got %s', who, tostring(value)), level + 1)
   end
   if embeddings ~= nil and (type(embeddings) ~= "boolean" or (embeddings and value == nil)) then
      error(string.format("%s: quantize_embeddings must be a boolean, with quantize set, got %s", who,
         tostring(embeddings)), level + 1)
   end
end

-- What an int8 file in the offload folder was made from: the float weight's file, offset, size
-- and modification time (a checkpoint replaced in place does not match), dtype and shape; nil
-- when the weight is not a view of a mapped file (then the file is always written again).
local FORMAT = {
   [8] = "moonload q8 v1: int8, a float32 scale per 32 along in_features",
   [4] = "moonload q4 v1: int4 two a byte (Q4_0 order), a float32 scale per 32 along in_features",
}
local function source_of(w, transposed, bits)
   local C = require("moonload.C")
   local ffi = C.ffi
   local path, off = ffi.new("const char*[1]"), ffi.new("uint64_t[1]")
   local size, mtime = ffi.new("uint64_t[1]"), ffi.new("int64_t[1]")
   if C.lib.ml_tensor_file_source(w._c, path, off, size, mtime) ~= 0 then return nil end
   local function int(v) return (tostring(v):gsub("U?LL$", "")) end
   return string.format("%s; %s [%s]%s at byte %s of %s (%s bytes, modified %s ns)", FORMAT[bits], w.dtype,
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

-- Where an offloaded layer's float weights were kept: "cpu" or "disk" by the model's device map
-- (the longest mapped prefix of its name), else by whether an offload folder was given.
local function offloaded_to(model, name, folder)
   local map = rawget(model, "hf_device_map")
   local best, where = -1, nil
   for key, dev in pairs(type(map) == "table" and map or {}) do
      if (key == "" or name == key or name:sub(1, #key + 1) == key .. ".") and #key > best then
         best, where = #key, dev
      end
   end
   if where == "cpu" or where == "disk" then return where end
   return folder and "disk" or "cpu"
end

-- The int8 (int4) file in folder for layer name, made from the float weight w (reused when it was
-- made from the same source): its mapped tensors and whether it was reused.
local function quantized_file(folder, name, w, source, bits)
   local path = string.format("%s/%s.q%d.safetensors", folder, name, bits)
   local mapped = reusable(path, source)
   if mapped then return mapped, true end
   local q, scales = QuantizedLinear.quantize_weight(w, bits)
   require("moonload.utils.offload").mkdir_p(folder, WHO)
   require("moonload.safetensors").save_file({ weight = q, weight_scale = scales }, path,
      source and { source = source } or nil)
   return require("moonload.safetensors").load_file(path), false
end

-- An offloaded linear layer m (weights on meta behind its own AlignDevicesHook) as a
-- QuantizedLinear offloaded the same way, its quantized weights in CPU memory or in folder (see
-- offloaded_to); nil and the reason when it cannot be.
local function quantize_offloaded(model, name, m, folder, bits)
   local hooks = require("moonload.hooks")
   local hook = hooks.offload_hook(m)
   if not hook then return nil, "offloaded with its block (no offloading hook of its own)" end
   local where = offloaded_to(model, name, folder)
   if where == "disk" and folder == nil then
      return nil, "offloaded to disk (give offload_folder to write its quantized weights there)"
   end
   local w = hooks.weights_map_get(hook.weights_map, "weight")
   if not Tensor.is_tensor(w) then return nil, "offloaded, and its hook's weights map has no weight" end
   local source = source_of(w, m.nf ~= nil, bits)
   if m.nf then w = w:t() end                                                   -- Conv1D: (nx, nf)
   local int8, reused
   if where == "disk" then
      int8, reused = quantized_file(folder, name, w, source, bits)
   else
      local q, scales = QuantizedLinear.quantize_weight(w, bits)
      if w:is_pinned() then q, scales = q:pin_memory(), scales:pin_memory() end     -- (cpu_offload's pin_memory)
      int8 = { weight = q, weight_scale = scales }
   end
   local ql = require("moonload.big_modeling").init_empty_weights(function()
      if m.__name == "Embedding" then return QuantizedEmbedding(m.num_embeddings, m.embedding_dim, { bits = bits }) end
      return QuantizedLinear(m.in_features or m.nx, m.out_features or m.nf, { bias = m.bias ~= nil, bits = bits })
   end)
   if m.__name == "Embedding" then ql.output_dtype = Tensor.zeros({ 0 }, { dtype = w.dtype }) end
   local wm = { weight = int8.weight, weight_scale = int8.weight_scale }
   if m.bias ~= nil then wm.bias = hooks.weights_map_get(hook.weights_map, "bias") end
   hooks.offload_like(ql, hook, wm)
   return ql, nil, int8.weight:nbytes() + int8.weight_scale:nbytes(), w:nbytes(), reused
end

-- The QuantizedLinear head m becomes when tied to the quantized embedding e: e's int8 / int4
-- tensors, in memory, or through a hook of the head's own over the same tensors when e is
-- offloaded (its hook holds them); nil and the reason when it cannot be.
local function tied_head(m, e, bits)
   local hooks = require("moonload.hooks")
   local q = require("moonload.big_modeling").init_empty_weights(function()
      return QuantizedLinear(m.in_features, m.out_features, { bias = m.bias ~= nil, bits = bits })
   end)
   if not e.weight:is_meta() then
      q.weight, q.weight_scale = e.weight, e.weight_scale
      if m.bias ~= nil then q.bias = m.bias end
      return q
   end
   local ehook = rawget(e, "_hf_hook")
   local wq, ws = hooks.weights_map_get(ehook.weights_map, "weight"), hooks.weights_map_get(ehook.weights_map, "weight_scale")
   if not m.weight:is_meta() then
      q.weight, q.weight_scale = wq:to(m.weight.device), ws:to(m.weight.device)
      if m.bias ~= nil then q.bias = m.bias end
      return q
   end
   local hook = hooks.offload_hook(m)
   if not hook then return nil, "offloaded with its block (no offloading hook of its own)" end
   local wm = { weight = wq, weight_scale = ws }
   if m.bias ~= nil then wm.bias = hooks.weights_map_get(hook.weights_map, "bias") end
   hooks.offload_like(q, hook, wm)
   return q
end

local FLOATING = { float32 = true, float16 = true, bfloat16 = true, float64 = true }

--- compute_dtype(module) -> the dtype a module computes in: its first floating parameter that is
-- not an int8 layer's float32 scales (nil when it has none).
function M.compute_dtype(module)
   for name, p in module:named_parameters() do
      if FLOATING[p.dtype] and not name:find("weight_scale$") then return p.dtype end
   end
   return nil
end

-- --- int8 checkpoints (ml.save_model, from_pretrained) --------------------------------------

-- quant_method by the width of most layers (int8 checkpoints keep the name they always had).
local METHOD = { [8] = "moonload_q8", [4] = "moonload_q4" }
local METHOD_BITS = { moonload_q8 = 8, moonload_q4 = 4 }

--- config_for(model) -> the quantization_config of a model with quantized layers (nil without):
-- {quant_method = "moonload_q8" or "moonload_q4", bits = 8 or 4, block_size = 32, modules = {names,
-- in module order}}; bits is the width of most layers, and a model that mixes widths lists the
-- others in bits_per_module = {name = bits}; layers with offsets per group (asymmetric checkpoints
-- read as they are) are listed in offset_groups = {name = groups}, and layers whose columns are
-- in another order (GPTQ's act-order) in input_order = {names}.
function M.config_for(model)
   local names, widths, count, offsets, ordered = {}, {}, { [8] = 0, [4] = 0 }, nil, nil
   local fp8, mxfp4
   for _, e in ipairs(model:named_modules_list()) do
      if e[2].__name == "Fp8Linear" then fp8 = fp8 or e[1] end
      if rawget(e[2], "mxfp4") == true then
         mxfp4 = mxfp4 or e[1]
         if rawget(e[2], "order") == "ggml" then
            error(string.format('"%s" holds MXFP4 experts in llama.cpp\'s layout (read from a GGUF file: gate and up apart, its nibble order), which no Hugging Face checkpoint has', e[1]), 0)
         end
      end
      if e[2].__name == "QuantizedLinear" or e[2].__name == "QuantizedEmbedding" then
         names[#names + 1] = e[1]
         widths[e[1]] = e[2].bits or 8
         if e[2].weight_offset ~= nil then
            offsets = offsets or {}
            offsets[e[1]] = e[2].weight_offset.shape[2]
         end
         if e[2].input_order ~= nil then
            ordered = ordered or {}
            ordered[#ordered + 1] = e[1]
         end
         count[widths[e[1]]] = count[widths[e[1]]] + 1
      end
   end
   if #names > 0 and fp8 then
      error(string.format('one quantization_config cannot describe both FP8 layers ("%s") and int8/int4 ones ("%s"): quantize the FP8 layers left (their in_features not a multiple of %d) or none',
         fp8, names[1], QuantizedLinear.BLOCK), 0)
   end
   if #names > 0 and mxfp4 then
      error(string.format('one quantization_config cannot describe both MXFP4 experts ("%s") and int8/int4 layers ("%s")',
         mxfp4, names[1]), 0)
   end
   if mxfp4 then            -- gpt-oss's experts as its checkpoints hold them: its own quantization_config
      return rawget(model, "mxfp4_config") or { quant_method = "mxfp4" }
   end
   if #names == 0 then
      -- an FP8 checkpoint's layers: its own quantization_config, as read
      for _, e in ipairs(model:named_modules_list()) do
         if e[2].__name == "Fp8Linear" then return rawget(model, "fp8_config") end
      end
      return nil
   end
   local bits = count[4] > count[8] and 4 or 8
   local others
   for _, name in ipairs(names) do
      if widths[name] ~= bits then
         others = others or {}
         others[name] = widths[name]
      end
   end
   return { quant_method = METHOD[bits], bits = bits, block_size = QuantizedLinear.BLOCK, modules = names,
            bits_per_module = others, offset_groups = offsets, input_order = ordered }
end

--- apply_config(model, qc, src, who[, names, info_of]): a model built from a config with
-- quantization_config qc gets its listed linear layers as QuantizedLinear ones (on meta inside
-- init_empty_weights), so the checkpoint's int8 weights and scales load into them; FP8, MXFP4,
-- compressed-tensors, AWQ and GPTQ configs go to their own readers (names: the checkpoint's tensor
-- names; info_of(name) -> its dtype and shape). Other quantization methods are an error.
function M.apply_config(model, qc, src, who, names, info_of)
   if qc == nil then return model end
   local method = type(qc) == "table" and qc.quant_method or nil
   if method == "fp8" then return M.apply_fp8_config(model, qc, src, who, names) end
   if method == "compressed-tensors" then
      return require("moonload.compressed_tensors").apply(model, qc, src, who, names, info_of)
   end
   if method == "awq" or method == "gptq" then
      return require("moonload.awq_gptq").apply(model, qc, src, who, names, info_of)
   end
   if method == "mxfp4" then return M.check_mxfp4_config(model, qc, src, who) end
   if not METHOD_BITS[method] then
      error(string.format('%s: quantization_config in %s has quant_method "%s"; moonload reads its own int8 and int4 checkpoints ("moonload_q8", "moonload_q4"), FP8 ones with block scales ("fp8"), gpt-oss\'s MXFP4 experts ("mxfp4"), llm-compressor\'s int4, int8 and FP8 ones ("compressed-tensors"), AutoAWQ\'s ("awq") and GPTQ\'s ("gptq"), and quantizes float ones itself (quantize = "int8" or "int4")',
         who, src, tostring(method)), 0)
   end
   local per_module, offset_groups = qc.bits_per_module, qc.offset_groups
   local ordered = {}
   for _, name in ipairs(type(qc.input_order) == "table" and qc.input_order or {}) do ordered[name] = true end
   if qc.block_size ~= QuantizedLinear.BLOCK or qc.bits ~= METHOD_BITS[method] or type(qc.modules) ~= "table"
      or (per_module ~= nil and type(per_module) ~= "table") or (offset_groups ~= nil and type(offset_groups) ~= "table") then
      error(string.format("%s: quantization_config in %s must have bits %d, block_size %d and a list of modules",
         who, src, METHOD_BITS[method], QuantizedLinear.BLOCK), 0)
   end
   for _, name in ipairs(qc.modules) do
      local ok, m = pcall(model.get_submodule, model, name)
      if not ok or type(m) ~= "table" or not (is_linear(m) or m.__name == "Embedding") then
         error(string.format('%s: quantization_config in %s lists "%s", which is not a linear layer or an embedding of the model',
            who, src, tostring(name)), 0)
      end
      local bits = per_module and per_module[name] or qc.bits
      if bits ~= 8 and bits ~= 4 then
         error(string.format('%s: quantization_config in %s gives "%s" %s bits (8 or 4)', who, src, name,
            tostring(bits)), 0)
      end
      if m.__name == "Embedding" then
         model:set_submodule(name, QuantizedEmbedding(m.num_embeddings, m.embedding_dim, { bits = bits }))
      else
         local groups = offset_groups and offset_groups[name]
         local inf = m.in_features or m.nx
         if groups ~= nil and (type(groups) ~= "number" or groups < 1 or inf % groups ~= 0) then
            error(string.format('%s: quantization_config in %s gives "%s" %s offset groups (a divisor of its %d in_features)',
               who, src, name, tostring(groups), inf), 0)
         end
         model:set_submodule(name, QuantizedLinear(inf, m.out_features or m.nf,
            { bias = m.bias ~= nil, bits = bits, offset_groups = groups, input_order = ordered[name] }))
      end
   end
   return model
end

-- --- MXFP4 checkpoints (gpt-oss, transformers' quant_method "mxfp4") -----------------------------

--- check_mxfp4_config(model, qc, src, who): MXFP4 is the format of gpt-oss's experts, which its
-- model class builds as blocks and scales from the config itself (models/gpt_oss.lua); a model
-- without such experts cannot read the checkpoint.
function M.check_mxfp4_config(model, qc, src, who)
   for _, e in ipairs(model:named_modules_list()) do
      if rawget(e[2], "mxfp4") == true then
         rawset(model, "mxfp4_config", qc)
         return model
      end
   end
   error(string.format('%s: quantization_config in %s has quant_method "mxfp4", which moonload reads for gpt-oss\'s experts (model_type "gpt_oss"); this %s has none',
      who, src, tostring(model.__name)), 0)
end

-- --- FP8 checkpoints (DeepSeek-V3, transformers' quant_method "fp8") ----------------------------

--- apply_fp8_config(model, qc, src, who[, names]): the linear layers an FP8 checkpoint stores as
-- float8 with block scales become nn.Fp8Linear, so its weights load as they are (one byte each).
-- Which layers: those whose "<name>.weight_scale_inv" the checkpoint holds (names: its tensor
-- names); without names, every nn.Linear but the output head and modules_to_not_convert
-- (matched as substrings, as transformers does). qc: {quant_method = "fp8", fmt = "e4m3",
-- weight_block_size = {128, 128}, activation_scheme = "dynamic"}.
function M.apply_fp8_config(model, qc, src, who, names)
   local block = qc.weight_block_size
   local ok = type(block) == "table" and #block == 2
   for _, b in ipairs(ok and block or {}) do ok = ok and type(b) == "number" and b >= 1 and b == math.floor(b) end
   if not ok then
      error(string.format("%s: quantization_config in %s must give weight_block_size as two positive integers (moonload reads FP8 checkpoints with block scales), got %s",
         who, src, require("moonload.utils.json").encode(block)), 0)
   end
   local fmt = qc.fmt or "e4m3"
   if fmt ~= "e4m3" and fmt ~= "e5m2" then
      error(string.format('%s: quantization_config in %s has fmt "%s" (expected "e4m3" or "e5m2")', who, src, tostring(fmt)), 0)
   end
   if qc.activation_scheme ~= nil and qc.activation_scheme ~= "dynamic" then
      error(string.format('%s: quantization_config in %s has activation_scheme "%s"; moonload reads FP8 checkpoints with dynamic activations (it computes them in the model dtype)',
         who, src, tostring(qc.activation_scheme)), 0)
   end
   local scaled
   if names then
      scaled = {}
      for _, n in ipairs(names) do
         local owner = n:match("^(.*)%.weight_scale_inv$")
         if owner then scaled[owner] = true end
      end
   end
   local skip = type(qc.modules_to_not_convert) == "table" and qc.modules_to_not_convert or {}
   local function converts(name)
      if scaled then return scaled[name] == true end
      if name == "lm_head" then return false end
      for _, k in ipairs(skip) do
         if name:find(k, 1, true) then return false end
      end
      return true
   end
   local Fp8Linear = require("moonload.nn.fp8_linear")
   for _, e in ipairs(model:named_modules_list()) do
      local name, m = e[1], e[2]
      if m.__name == "Linear" and converts(name) then
         model:set_submodule(name, Fp8Linear(m.in_features, m.out_features,
            { bias = m.bias ~= nil, block = block, fmt = fmt }))
      end
   end
   rawset(model, "fp8_config", qc)
   return model
end

function M.quantize(model, opts)
   opts = opts or {}
   if type(model) ~= "table" or type(model.named_modules_list) ~= "function" then
      error(WHO .. ": model must be an nn.Module, got " .. type(model), 2)
   end
   if type(opts) ~= "table" then error(WHO .. ": options must be a table {dtype, skip, offload_folder}, got " .. type(opts), 2) end
   for k in pairs(opts) do
      if k ~= "skip" and k ~= "offload_folder" and k ~= "dtype" and k ~= "embeddings" then
         error(string.format('%s: unknown option "%s" (expected dtype, skip, offload_folder, embeddings)', WHO, tostring(k)), 2)
      end
   end
   local bits = BITS[opts.dtype or "int8"]
   if not bits then
      error(string.format('%s: dtype must be "int8" or "int4", got %s', WHO, tostring(opts.dtype)), 2)
   end
   if opts.offload_folder ~= nil and type(opts.offload_folder) ~= "string" then
      error(WHO .. ": offload_folder must be a folder path, got " .. type(opts.offload_folder), 2)
   end
   local report = { quantized = {}, skipped = {}, reused = {}, bytes_before = 0, bytes_after = 0 }
   -- experts stacked in one tensor per projection (Qwen3.5-MoE, Qwen3-VL-MoE) become one module
   -- each, viewing their slices, so that their projections quantize as linear layers below
   for _, e in ipairs(model:named_modules_list()) do
      local name, m = e[1], e[2]
      if type(m.unstacked) == "function" and not skip_reason(name, check_skip(opts.skip, 2)) then
         local experts = m:unstacked()
         if experts then
            model:set_submodule(name, experts)
         else
            report.skipped[name] = "stacked experts offloaded by their hook (from_pretrained's quantize option quantizes them before they are placed)"
         end
      end
   end
   local quantized_embedding = {}               -- name -> the QuantizedEmbedding made here
   for _, c in ipairs(M.candidates(model, opts.skip, opts.embeddings)) do
      local name, m, reason, tied_to = c[1], c[2], c[3], c[4]
      local w = m.weight
      local q, after, before, reused
      if not reason and m.__name == "Embedding" then
         if w:is_meta() then
            q, reason, after, before, reused = quantize_offloaded(model, name, m, opts.offload_folder, bits)
         else
            q = QuantizedEmbedding.from_float(m, bits)
         end
         quantized_embedding[name] = q
      elseif not reason and tied_to then
         -- the head tied to a quantized embedding reads its int8 / int4 tensors: no bytes of its own
         local e = quantized_embedding[tied_to]
         if not e then
            reason = "tied to " .. tied_to .. ", which stays in floats"
         else
            q, reason = tied_head(m, e, bits)
            before, after = 0, 0
         end
      elseif not reason and w:is_meta() and m.__name == "Fp8Linear" then
         reason = "an FP8 layer offloaded by its hook (from_pretrained's quantize option requantizes FP8 layers before they are placed)"
      elseif not reason and w:is_meta() then
         q, reason, after, before, reused = quantize_offloaded(model, name, m, opts.offload_folder, bits)
      end
      if reason then
         report.skipped[name] = reason
      else
         q = q or QuantizedLinear.from_float(m, bits)
         model:set_submodule(name, q)
         report.quantized[#report.quantized + 1] = name
         if reused then report.reused[#report.reused + 1] = name end
         report.bytes_before = report.bytes_before + (before or w:nbytes() + (m.weight_scale_inv and m.weight_scale_inv:nbytes() or 0))
         report.bytes_after = report.bytes_after + (after or (q.weight:nbytes() + q.weight_scale:nbytes()))
      end
   end
   return model, report
end

return M
