--- awq: AutoAWQ checkpoints (config.json's quantization_config with quant_method "awq", version
-- "gemm": the hub's "-AWQ" models, such as Qwen2.5's) read into moonload's quantized layers with
-- the same numbers. Each quantized linear layer stores qweight int32 (in, out / 8) and, with
-- zero_point, qzeros int32 (groups, out / 8), 4-bit values in AutoAWQ's nibble order, and scales
-- (groups, out) float16; its weight is (q - zero) * scale per group of in / groups inputs (without
-- zero points, (q - 8) * scale), as compressed-tensors' AutoAWQConverter reads it.
-- q - zero spans -15..15, so a layer with zero points becomes an int8 nn.QuantizedLinear (a byte a
-- weight, half of bfloat16's), one without an int4 one; the scales are repeated per block of 32 in
-- float32. The layers are the checkpoint's qweight owners; their biases stay float.
local F = require("moonload.nn.functional")
local QuantizedLinear = require("moonload.nn.quantized_linear")
local ct = require("moonload.compressed_tensors")

local M = {}

local BLOCK = QuantizedLinear.BLOCK

local function fail(who, src, fmt, ...)
   error(string.format("%s: %s (AutoAWQ quantization_config in %s)", who, string.format(fmt, ...), src), 0)
end

local function check_config(qc, src, who)
   if qc.bits ~= nil and qc.bits ~= 4 then fail(who, src, "bits is %s; AutoAWQ's GEMM checkpoints hold 4", tostring(qc.bits)) end
   local version = type(qc.version) == "string" and qc.version:lower() or "gemm"
   if version ~= "gemm" then
      fail(who, src, 'version "%s" is not one moonload reads ("gemm": qweight (in, out / 8))', tostring(qc.version))
   end
   local g = qc.group_size or qc.q_group_size
   if g ~= nil and g ~= -1 and (type(g) ~= "number" or g <= 0 or g % BLOCK ~= 0) then
      fail(who, src, "group_size %s is not a multiple of %d (moonload's int blocks)", tostring(g), BLOCK)
   end
   return qc.zero_point ~= false
end

--- apply(model, qc, src, who, names, info_of): the layers whose qweight the checkpoint holds become
-- nn.QuantizedLinear (int8 with zero points, else int4), so that the rewritten tensors load into
-- them. names: the checkpoint's tensor names; info_of(name) -> {dtype, shape} from its header.
function M.apply(model, qc, src, who, names, info_of)
   local zero_point = check_config(qc, src, who)
   local linear_for = ct.linear_finder(model, function(owner)
      fail(who, src, 'the checkpoint quantizes "%s", which is not a linear layer of this %s', owner, tostring(model.__name))
   end)
   local schemes = {}
   for _, name in ipairs(names) do
      local owner = name:match("^(.*)%.qweight$")
      if owner then
         local target, m = linear_for(owner)
         local outf, inf = m.out_features, m.in_features
         local function bad(fmt, ...) fail(who, src, '"%s": ' .. fmt, owner, ...) end
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
         if inf % BLOCK ~= 0 or outf % 8 ~= 0 then
            bad("in_features %d and out_features %d must be multiples of %d and 8", inf, outf, BLOCK)
         end
         shape_of("qweight", "int32", inf, outf / 8)
         local groups = shape_of("scales", nil, nil, outf)[1]
         if inf % groups ~= 0 or (inf / groups) % BLOCK ~= 0 then
            bad("scales give %d groups of in_features %d, not groups of a multiple of %d", groups, inf, BLOCK)
         end
         if zero_point then shape_of("qzeros", "int32", groups, outf / 8) end
         local bits = zero_point and 8 or 4
         model:set_submodule(target, QuantizedLinear(inf, outf, { bias = m.bias ~= nil, bits = bits }))
         schemes[owner] = { bits = bits, groups = groups, out_features = outf, in_features = inf }
      end
   end
   if next(schemes) == nil then fail(who, src, "the checkpoint holds no qweight tensors") end
   rawset(model, "rewrite_checkpoint", function(sd, load_who)
      return M.convert_state_dict(schemes, zero_point, src, sd, load_who)
   end)
   return model
end

local FIELDS = { qweight = true, qzeros = true, scales = true }

--- convert_state_dict(schemes, zero_point, src, sd, who) -> a state dict (checkpoint names) whose
-- AWQ layers hold weight (moonload's int8 or int4 layout, out x in) and weight_scale (float32 per
-- block of 32) in place of qweight, qzeros and scales.
function M.convert_state_dict(schemes, zero_point, src, sd, who)
   local out = {}
   for name, t in pairs(sd) do
      local owner, field = name:match("^(.*)%.([%w_]+)$")
      if not (owner and schemes[owner] and FIELDS[field]) then out[name] = t end
   end
   for owner, s in pairs(schemes) do
      local function need(field)
         local t = sd[owner .. "." .. field]
         if t == nil then
            error(string.format('%s: the checkpoint lacks "%s.%s" (AutoAWQ, %s)', who, owner, field, src), 0)
         end
         return t
      end
      -- (in, out) raw values -> (out, in), the layout the layer multiplies with
      local values = F.int_words_values(need("qweight"), 4, "awq"):t():contiguous()
      local zeros = 8
      if zero_point then zeros = F.int_words_values(need("qzeros"), 4, "awq"):t():contiguous() end
      out[owner .. ".weight"] = F.int_values_to_q(values, zeros, s.bits)
      out[owner .. ".weight_scale"] = ct.repeat_scales(need("scales"):t(), s.out_features, s.groups,
         s.in_features / BLOCK)
   end
   return out
end

return M
