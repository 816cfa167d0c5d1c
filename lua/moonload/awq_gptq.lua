--- awq_gptq: AutoAWQ's and GPTQ's checkpoints (config.json's quantization_config with quant_method
-- "awq", version "gemm", or "gptq": the hub's "-AWQ" and "-GPTQ-Int4/Int8" models) read into
-- moonload's quantized layers with the same numbers. Each quantized linear layer stores qweight
-- (int32 words of 4- or 8-bit values), qzeros (the zero points, packed the same way) and scales
-- (groups, out), float16; its weight is (q - zero) * scale per group of in / groups inputs:
--   * AutoAWQ: qweight (in, out / 8) and qzeros (groups, out / 8), 4 bits, each word's 8 values in
--     AutoAWQ's nibble order; without zero_point the zero is 8 (as compressed-tensors'
--     AutoAWQConverter reads it);
--   * GPTQ: qweight (in / 8, out) packed along in, qzeros (groups, out / 8), 4 or 8 bits in order;
--     checkpoint_format "gptq" (v1, the default) stores each zero point - 1, "gptq_v2" as it is;
--     g_idx gives each input its group: k / group_size, or with desc_act any group (act-order), the
--     layer then holding its columns in group order and gathering its input into that order.
-- The layers become nn.QuantizedLinear of the same width (4 or 8 bits) holding q - 2^(bits - 1),
-- their scales repeated per block of 32 in float32; zero points of their own (AutoAWQ's, GPTQ's
-- sym = false) add an offset per group, (2^(bits - 1) - zero) * scale (weight_offset), exactly.
-- Biases stay float. The layers are the checkpoint's qweight owners.
local ffi = require("ffi")
local lib = require("moonload.C").lib
local F = require("moonload.nn.functional")
local QuantizedLinear = require("moonload.nn.quantized_linear")
local ct = require("moonload.compressed_tensors")

local M = {}

local BLOCK = QuantizedLinear.BLOCK

local NAMES = { awq = "AutoAWQ", gptq = "GPTQ" }

local function fail(method, who, src, fmt, ...)
   error(string.format("%s: %s (%s quantization_config in %s)", who, string.format(fmt, ...), NAMES[method], src), 0)
end

-- The config's format, checked: {bits, zero_point (false: all zeros 2^(bits - 1)), zero_offset,
-- symmetric (GPTQ's sym: zeros expected 2^(bits - 1))}.
local function read_config(method, qc, src, who)
   local function bad(fmt, ...) fail(method, who, src, fmt, ...) end
   local g = qc.group_size or qc.q_group_size
   if g ~= nil and g ~= -1 and (type(g) ~= "number" or g <= 0 or g % BLOCK ~= 0) then
      bad("group_size %s is not a multiple of %d (moonload's int blocks)", tostring(g), BLOCK)
   end
   if method == "awq" then
      if qc.bits ~= nil and qc.bits ~= 4 then bad("bits is %s; AutoAWQ's GEMM checkpoints hold 4", tostring(qc.bits)) end
      local version = type(qc.version) == "string" and qc.version:lower() or "gemm"
      if version ~= "gemm" then
         bad('version "%s" is not one moonload reads ("gemm": qweight (in, out / 8))', tostring(qc.version))
      end
      return { bits = 4, zero_point = qc.zero_point ~= false, zero_offset = 0, awq_order = true }
   end
   local bits = qc.bits
   if bits ~= 4 and bits ~= 8 then bad("bits is %s; moonload reads 4- and 8-bit GPTQ weights", tostring(bits)) end
   local fmt = qc.checkpoint_format or "gptq"
   if fmt ~= "gptq" and fmt ~= "gptq_v2" then
      bad('checkpoint_format "%s" is not one moonload reads ("gptq", "gptq_v2")', tostring(fmt))
   end
   return { bits = bits, zero_point = true, zero_offset = fmt == "gptq" and 1 or 0, symmetric = qc.sym ~= false,
      act_order = qc.desc_act == true }
end

-- GPTQ's g_idx: input k in group k / (in / groups), as without desc_act; else an error.
local function check_g_idx(g_idx, groups, bad)
   local t = g_idx:to("int32"):contiguous()
   local n, per = t:numel(), t:numel() / groups
   local p = ffi.cast("const int32_t *", lib.ml_tensor_data(t._c))
   for k = 0, n - 1 do
      if p[k] ~= math.floor(k / per) then
         bad("g_idx puts input %d in group %d, not %d, and desc_act is not set in the config", k, p[k],
            math.floor(k / per))
      end
   end
end

-- desc_act's g_idx (each group gathering in / groups inputs from anywhere) -> the inputs in group
-- order (int64, in; within a group, as they come): the columns' order of the layer.
local function group_order(g_idx, groups, bad)
   local t = g_idx:to("int32"):contiguous()
   local n = t:numel()
   local per = n / groups
   local p = ffi.cast("const int32_t *", lib.ml_tensor_data(t._c))
   local filled = {}
   for g = 0, groups - 1 do filled[g] = 0 end
   local order = require("moonload").zeros({ n }, { dtype = "int64" })
   local o = ffi.cast("int64_t *", lib.ml_tensor_data(order._c))
   for k = 0, n - 1 do
      local g = p[k]
      if g < 0 or g >= groups or filled[g] >= per then
         bad("g_idx puts input %d in group %d: not %d groups of %d inputs", k, g, groups, per)
      end
      o[g * per + filled[g]] = k
      filled[g] = filled[g] + 1
   end
   return order
end

-- One layer's weight (moonload's int8 or int4 layout, out x in) and weight_scale (float32 per
-- block of 32) from its qweight, qzeros, scales and g_idx. (checkpoint_rewrite's convert_one)
local function converter(method, format)
   local order = format.awq_order and "awq" or nil
   return function(owner, s, need, sd)
      -- raw values in (out, in), the layout the layer multiplies with
      local words = need("qweight")
      local values
      if method == "awq" then                      -- (in, out / 8) -> (out, in)
         values = F.int_words_values(words, format.bits, { order = order, transpose = true })
      else                                          -- (in / 8, out), packed along in -> (out, in)
         values = F.int_words_values(words, format.bits, { along = "rows", transpose = true })
      end
      lib.ml_tensor_drop_mapped_pages(words._c)         -- read once: the copy is what runs
      local columns
      if format.act_order then
         columns = group_order(need("g_idx"), s.groups, s.bad)
         values = values:index_select(2, columns)           -- the columns in group order
      elseif sd[owner .. ".g_idx"] ~= nil then
         check_g_idx(sd[owner .. ".g_idx"], s.groups, s.bad)
      end
      local mid = 2 ^ (format.bits - 1)
      local scales = need("scales"):t()                                     -- (out, groups)
      local out = { [owner .. ".weight_scale"] = ct.repeat_scales(scales, s.out_features, s.groups,
         s.in_features / BLOCK), [owner .. ".input_order"] = columns }
      if not format.zero_point then
         out[owner .. ".weight"] = F.int_values_to_q(values, mid, s.bits)
      elseif not s.offsets then                    -- GPTQ's sym: every zero point the middle, checked
         local zeros = F.int_words_values(need("qzeros"), format.bits, { order = order, transpose = true })
         out[owner .. ".weight"] = F.int_values_to_q(values, zeros, s.bits, format.zero_offset)
      else
         -- (q - zero) * scale = (q - mid) * scale + (mid - zero) * scale: the values as symmetric
         -- ones, and each group's (mid - zero) * scale as its offset
         local zeros = F.int_words_values(need("qzeros"), format.bits, { order = order, transpose = true })
         out[owner .. ".weight"] = F.int_values_to_q(values, mid, s.bits)
         out[owner .. ".weight_offset"] = ct.zero_offsets(zeros, format.zero_offset, mid, scales)
      end
      return out
   end
end

local FIELDS = { qweight = true, qzeros = true, scales = true, g_idx = true }

--- apply(model, qc, src, who, names, info_of): the layers whose qweight the checkpoint holds become
-- nn.QuantizedLinear, so that the rewritten tensors load into them. names: the checkpoint's
-- tensor names; info_of(name) -> {dtype, shape} from its header.
function M.apply(model, qc, src, who, names, info_of)
   local method = qc.quant_method
   local format = read_config(method, qc, src, who)
   local per_word = 32 / format.bits
   local linear_for = ct.linear_finder(model, function(owner)
      fail(method, who, src, 'the checkpoint quantizes "%s", which is not a linear layer of this %s', owner,
         tostring(model.__name))
   end)
   local schemes = {}
   for _, name in ipairs(names) do
      local owner = name:match("^(.*)%.qweight$")
      if owner then
         local target, m = linear_for(owner)
         local outf, inf = m.out_features, m.in_features
         local function bad(fmt, ...) fail(method, who, src, '"%s": ' .. fmt, owner, ...) end
         local function shape_of(field, dtype, rows, cols)
            local info = info_of(owner .. "." .. field)
            if info == nil then bad("has qweight but no %s", field) end
            local s = info.shape
            if (dtype and info.dtype ~= dtype) or #s ~= 2 or (rows and s[1] ~= rows) or (cols and s[2] ~= cols) then
               bad("%s is %s [%s]; expected %s [%s, %s]", field, tostring(info.dtype), table.concat(s, ", "),
                  dtype or "float", rows and tostring(rows) or "groups", tostring(cols))
            end
            return s
         end
         if inf % BLOCK ~= 0 or outf % per_word ~= 0 then
            bad("in_features %d and out_features %d must be multiples of %d and %d", inf, outf, BLOCK, per_word)
         end
         if method == "awq" then
            shape_of("qweight", "int32", inf, outf / per_word)
         else
            shape_of("qweight", "int32", inf / per_word, outf)
         end
         local groups = shape_of("scales", nil, nil, outf)[1]
         if inf % groups ~= 0 or (inf / groups) % BLOCK ~= 0 then
            bad("scales give %d groups of in_features %d, not groups of a multiple of %d", groups, inf, BLOCK)
         end
         if format.zero_point then shape_of("qzeros", "int32", groups, outf / per_word) end
         -- zero points of their own (not GPTQ's sym): an offset per group beside the values
         local offsets = format.zero_point and not format.symmetric
         model:set_submodule(target, QuantizedLinear(inf, outf, { bias = m.bias ~= nil, bits = format.bits,
            offset_groups = offsets and groups or nil, input_order = format.act_order }))
         schemes[owner] = { bits = format.bits, groups = groups, out_features = outf, in_features = inf, bad = bad,
            offsets = offsets }
      end
   end
   if next(schemes) == nil then fail(method, who, src, "the checkpoint holds no qweight tensors") end
   rawset(model, "rewrite_checkpoint", require("moonload.checkpoint_rewrite").new(schemes, FIELDS,
      converter(method, format), NAMES[method] .. ", " .. src))
   return model
end

return M
