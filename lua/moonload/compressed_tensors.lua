--- compressed_tensors: checkpoints in compressed-tensors' formats (config.json's quantization_config
-- with quant_method "compressed-tensors", as llm-compressor writes them: the hub's "w4a16",
-- "w8a16", "w8a8" and "FP8-dynamic" models, Kimi K2's int4 experts), read into moonload's own
-- quantized layers with the same numbers:
--   * int weights, symmetric, 4 or 8 bits, a scale per group (a multiple of 32 values), per
--     output channel or for the whole tensor: "pack-quantized" (weight_packed, int32 words) or
--     "int-quantized" / "naive-quantized" (weight, int8) -> nn.QuantizedLinear (4 or 8 bits);
--   * 4-bit int weights with zero points (asymmetric, weight_zero_point: AutoAWQ's models as
--     compressed-tensors converts them) -> the same int4 layer with an offset per group,
--     -zero * scale (weight_offset);
--   * float8_e4m3fn weights ("float-quantized" / "naive-quantized") with a scale per channel, for
--     the tensor or per block -> nn.Fp8Linear.
-- Which layers are quantized, and how, is read from the checkpoint's tensors (their names, shapes
-- and dtypes), as transformers finds FP8 layers by their scales; the config's groups are checked
-- for what moonload cannot compute exactly. The integers are rewritten into moonload's layouts
-- (F.unpack_int_words) and the scales repeated per block of 32 values (int) or per tile of 1 x 128
-- (float8, one quantization_config for a saved model), in float32: the weights the layers compute
-- with are the checkpoint's values times its scales, as compressed-tensors' decompression gives
-- them. Activations stay in the model's dtype (weight-only: a "w8a8" checkpoint's activation
-- quantization, and a kv_cache_scheme, are not applied; their scales are dropped).
local lib = require("moonload.C").lib
local F = require("moonload.nn.functional")
local QuantizedLinear = require("moonload.nn.quantized_linear")

local M = {}

local BLOCK = QuantizedLinear.BLOCK
M.FP8_TILE = { 1, 128 }

-- Formats whose tensors moonload reads ("mixed-precision": the groups give their own).
local FORMATS = { ["pack-quantized"] = true, ["int-quantized"] = true, ["float-quantized"] = true,
   ["naive-quantized"] = true, ["mixed-precision"] = true, dense = true }
local STRATEGIES = { tensor = true, channel = true, group = true, block = true }

-- Tensors of activation and cache quantization, which a weight-only runtime has no use for.
local DROPPED = { input_scale = true, input_zero_point = true, input_global_scale = true, output_scale = true,
   output_zero_point = true, k_scale = true, v_scale = true }

-- A checkpoint tensor's owner and field ("a.b.weight_packed" -> "a.b", "weight_packed").
local function split(name)
   return name:match("^(.*)%.([%w_]+)$")
end

local function fail(who, src, fmt, ...)
   error(string.format("%s: %s (compressed-tensors quantization_config in %s)", who, string.format(fmt, ...), src), 0)
end

-- A config value, nil for JSON's null (cjson.null, a userdata) as for absent.
local function value(v)
   if type(v) == "userdata" then return nil end
   return v
end

-- The config's groups, checked for schemes moonload computes exactly.
local function check_config(qc, src, who)
   local function field(k) return value(qc[k]) end
   local status = field("quantization_status")
   if status ~= nil and status ~= "compressed" then
      fail(who, src, 'quantization_status is "%s"; moonload reads compressed checkpoints ("compressed")', tostring(status))
   end
   if not FORMATS[field("format") or "pack-quantized"] then
      fail(who, src, 'format "%s" is not one moonload reads (pack-quantized, int-quantized, float-quantized, naive-quantized)',
         tostring(field("format")))
   end
   local transform = field("transform_config")
   if type(transform) == "table" and next(transform) ~= nil then
      fail(who, src, "transform_config rotates the weights (SpinQuant/QuIP), which moonload does not apply")
   end
   local sparsity = field("sparsity_config")
   if type(sparsity) == "table" and next(sparsity) ~= nil and sparsity.format ~= "dense" then
      fail(who, src, 'sparsity_config has format "%s"; moonload reads dense weights only', tostring(sparsity.format))
   end
   local groups = field("config_groups")
   if type(groups) ~= "table" or next(groups) == nil then
      fail(who, src, "config_groups is missing")
   end
   local block
   local names = {}
   for name in pairs(groups) do names[#names + 1] = name end
   table.sort(names)
   for _, gname in ipairs(names) do
      local g = groups[gname]
      local w = type(g) == "table" and value(g.weights) or nil
      if type(w) ~= "table" then fail(who, src, 'group "%s" quantizes no weights', gname) end
      if value(g.format) ~= nil and not FORMATS[g.format] then
         fail(who, src, 'group "%s" has format "%s" (moonload reads pack-quantized, int-quantized, float-quantized, naive-quantized)',
            gname, tostring(g.format))
      end
      local ok = (w.type == "int" and (w.num_bits == 4 or w.num_bits == 8)) or (w.type == "float" and w.num_bits == 8)
      if not ok then
         fail(who, src, 'group "%s" quantizes weights as %s-bit %s; moonload reads 4- and 8-bit int and 8-bit float (e4m3)',
            gname, tostring(w.num_bits), tostring(w.type))
      end
      if w.symmetric == false and w.num_bits ~= 4 then
         fail(who, src, 'group "%s" is asymmetric (zero points) at %s bits; moonload reads zero points of 4-bit weights only',
            gname, tostring(w.num_bits))
      end
      if not STRATEGIES[w.strategy] then
         fail(who, src, 'group "%s" has weight strategy "%s" (moonload reads tensor, channel, group and block)',
            gname, tostring(w.strategy))
      end
      if value(w.dynamic) == true then
         fail(who, src, 'group "%s" quantizes its weights dynamically, which leaves nothing to read', gname)
      end
      if w.strategy == "block" then
         local b = value(w.block_structure)
         if type(b) ~= "table" or #b ~= 2 then
            fail(who, src, 'group "%s" has strategy block without a block_structure of two sizes', gname)
         end
         block = { b[1], b[2] }
      end
      if type(g.output_activations) == "table" then
         fail(who, src, 'group "%s" quantizes output activations, which moonload does not do', gname)
      end
   end
   return block
end

-- One layer's scheme from its tensors: {bits, group} for an int layer, {tile} for a float8 one.
local function layer_scheme(owner, m, fields, info_of, block, who, src)
   local outf, inf = m.out_features, m.in_features
   local function bad(fmt, ...) fail(who, src, '"%s": ' .. fmt, owner, ...) end
   if fields.weight_g_idx then bad("has weight_g_idx (activation order); moonload reads weights in their own order") end
   if not fields.weight_scale then bad("has no weight_scale") end
   local scale = info_of(owner .. ".weight_scale")
   local sshape = scale.shape
   local numel = 1
   for _, d in ipairs(sshape) do numel = numel * d end
   local values, bits
   if fields.weight_packed then
      values = info_of(owner .. ".weight_packed")
      if values.dtype ~= "int32" or #values.shape ~= 2 or values.shape[1] ~= outf then
         bad("weight_packed is %s [%s]; expected int32 words [%d, ...]", tostring(values.dtype),
            table.concat(values.shape, ", "), outf)
      end
      bits = values.shape[2] * 32 / inf
      if bits ~= 4 and bits ~= 8 then
         bad("weight_packed [%s] holds %s bits a value for in_features %d (moonload reads 4 and 8)",
            table.concat(values.shape, ", "), tostring(bits), inf)
      end
      if fields.weight_zero_point and bits ~= 4 then
         bad("has weight_zero_point at %d bits; moonload reads zero points of 4-bit weights only", bits)
      end
   else
      values = info_of(owner .. ".weight")
      if values == nil then bad("has weight_scale but no weight or weight_packed") end
      if fields.weight_zero_point then bad("has weight_zero_point next to a plain weight; moonload reads zero points of packed 4-bit weights only") end
      if values.dtype == "int8" then
         bits = 8
      elseif values.dtype ~= "float8_e4m3fn" then
         bad("weight is %s next to weight_scale; expected int8 or float8_e4m3fn", tostring(values.dtype))
      end
   end
   if bits == nil then                                            -- float8
      if numel == 1 or (#sshape == 2 and sshape[1] == outf and sshape[2] == 1) then
         return { tile = M.FP8_TILE, repeat_scales = true }           -- per tensor or channel: spread over tiles
      end
      if block and #sshape == 2 and sshape[1] == math.ceil(outf / block[1]) and sshape[2] == math.ceil(inf / block[2]) then
         return { tile = block }                                       -- per block: the tiles themselves
      end
      bad("weight_scale [%s] is not per tensor, per channel or per block of the config's block_structure",
         table.concat(sshape, ", "))
   end
   if inf % BLOCK ~= 0 then
      bad("in_features %d is not a multiple of %d (moonload's int blocks)", inf, BLOCK)
   end
   local zeros = fields.weight_zero_point == true
   if numel == 1 then return { bits = bits, zeros = zeros, groups = 1, per_tensor = true } end
   local groups = #sshape == 2 and sshape[1] == outf and sshape[2] or nil
   if not groups or inf % groups ~= 0 or (inf / groups) % BLOCK ~= 0 then
      bad("weight_scale [%s] does not give groups of a multiple of %d values along in_features %d",
         table.concat(sshape, ", "), BLOCK, inf)
   end
   return { bits = bits, zeros = zeros, groups = groups }
end

--- repeat_scales(scale, rows, groups, cols) -> float32 (rows, cols): scale (rows, groups) of any
-- float dtype, or one value, each repeated over the cols / groups its group covers.
function M.repeat_scales(scale, rows, groups, cols)
   local s = scale:to("float32"):contiguous()
   if s:numel() == 1 then
      s = s:reshape(1, 1, 1):expand(rows, 1, cols)
   else
      s = s:reshape(rows, groups, 1):expand(rows, groups, cols / groups)
   end
   return s:contiguous():reshape(rows, cols)
end

--- zero_offsets(zeros, zero_offset, mid, scales) -> float32 (out, groups): each group's
-- (mid - (zero + zero_offset)) * scale, the offset that turns values stored as q - mid back into
-- (q - zero) * scale. zeros: raw zero points uint8 (out, groups); scales (out, groups), any float.
function M.zero_offsets(zeros, zero_offset, mid, scales)
   return ((zeros:to("float32") + zero_offset) * -1 + mid) * scales:to("float32")
end

-- One layer's tensors in the layout apply built it with: weight (moonload's int8 / int4 layout, or
-- the float8 values) and weight_scale (float32 per block of 32) or weight_scale_inv (float32 per
-- tile). (checkpoint_rewrite's convert_one)
local function convert_layer(owner, s, need, sd, who)
   local outf, inf = s.out_features, s.in_features
   local shape = sd[owner .. ".weight_shape"]
   if shape ~= nil then
      local v = shape:to("int64"):tolist()
      if #v ~= 2 or v[1] ~= outf or v[2] ~= inf then
         error(string.format('%s: "%s.weight_shape" is [%s]; the model\'s layer is [%d, %d]', who, owner,
            table.concat(v, ", "), outf, inf), 0)
      end
   end
   local values
   if s.packed then
      local words = need("weight_packed")
      values = F.unpack_int_words(words, s.bits)
      -- read once: the words' pages of a mapped file leave the process (the copy is what runs)
      lib.ml_tensor_drop_mapped_pages(words._c)
   else
      values = need("weight")
   end
   local scale = need("weight_scale")
   local out = { [owner .. ".weight"] = values }
   if s.zeros then
      -- (q - zero) * scale = q * scale - zero * scale, q as the symmetric layout holds it: the
      -- zero points (packed along out, stored + 8) become each group's offset
      local groups = s.per_tensor and 1 or s.groups
      local zeros = F.int_words_values(need("weight_zero_point"), 4, { along = "rows" })  -- (8 * ceil(out / 8), groups)
      zeros = zeros:narrow(1, 1, outf)                                                     -- (out, groups)
      if zeros.shape[2] ~= groups then
         error(string.format('%s: "%s.weight_zero_point" gives %d groups, the scales %d', who, owner,
            zeros.shape[2], groups), 0)
      end
      out[owner .. ".weight_offset"] = M.zero_offsets(zeros, 0, 8,
         s.per_tensor and scale:reshape(1, 1):expand(outf, 1) or scale)
   end
   if s.tile then
      out[owner .. ".weight_scale_inv"] = s.repeat_scales
         and M.repeat_scales(scale, math.ceil(outf / s.tile[1]), 1, math.ceil(inf / s.tile[2]))
         or scale:to("float32"):contiguous()
   else
      out[owner .. ".weight_scale"] = M.repeat_scales(scale, outf, s.per_tensor and 1 or s.groups, inf / BLOCK)
   end
   return out
end

local FIELDS = { weight_packed = true, weight_scale = true, weight_shape = true, weight = true,
   weight_zero_point = true }

--- linear_finder(model, fail) -> linear_for(owner) -> the model's name and nn.Linear for a
-- checkpoint's layer name (mapped as its weights' names are); fail(owner) when there is none.
function M.linear_finder(model, fail_for)
   local map_name = require("moonload.models").name_mapper(model)
   return function(owner)
      local target = map_name(owner .. ".weight"):match("^(.*)%.weight$")
      local ok, m = pcall(model.get_submodule, model, target)
      if not ok or type(m) ~= "table" or m.__name ~= "Linear" then fail_for(owner) end
      return target, m
   end
end

--- apply(model, qc, src, who, names, info_of): the linear layers a compressed-tensors checkpoint
-- quantizes become nn.QuantizedLinear or nn.Fp8Linear (on meta inside init_empty_weights), so that
-- convert_state_dict's tensors load into them. names: the checkpoint's tensor names; info_of(name)
-- -> {dtype, shape} from its header.
function M.apply(model, qc, src, who, names, info_of)
   local block = check_config(qc, src, who)
   local fields = {}                                    -- checkpoint owner -> {field = true}
   for _, name in ipairs(names) do
      local owner, field = split(name)
      if owner and (field == "weight_packed" or field == "weight_scale" or field == "weight_zero_point"
         or field == "weight_g_idx") then
         fields[owner] = fields[owner] or {}
         fields[owner][field] = true
      end
   end
   local linear_for = M.linear_finder(model, function(owner)
      fail(who, src, 'the checkpoint quantizes "%s", which is not a linear layer of this %s', owner, tostring(model.__name))
   end)
   local Fp8Linear = require("moonload.nn.fp8_linear")
   local schemes, tiles = {}, {}
   local owners = {}
   for owner in pairs(fields) do owners[#owners + 1] = owner end
   table.sort(owners)
   for _, owner in ipairs(owners) do
      local target, m = linear_for(owner)
      local s = layer_scheme(owner, m, fields[owner], info_of, block, who, src)
      s.packed = fields[owner].weight_packed == true
      s.out_features, s.in_features = m.out_features, m.in_features
      if s.tile then
         tiles[#tiles + 1] = s.tile
         model:set_submodule(target, Fp8Linear(m.in_features, m.out_features,
            { bias = m.bias ~= nil, block = s.tile, fmt = "e4m3" }))
      else
         model:set_submodule(target, QuantizedLinear(m.in_features, m.out_features,
            { bias = m.bias ~= nil, bits = s.bits, offset_groups = s.zeros and s.groups or nil }))
      end
      schemes[owner] = s
   end
   if #owners == 0 then fail(who, src, "the checkpoint holds no weight_packed or weight_scale tensors") end
   if #tiles > 0 then
      -- one tile for every float8 layer: the quantization_config ml.save_model writes for them
      local same = true
      for _, t in ipairs(tiles) do same = same and t[1] == tiles[1][1] and t[2] == tiles[1][2] end
      if same then
         rawset(model, "fp8_config", { quant_method = "fp8", fmt = "e4m3", activation_scheme = "dynamic",
            weight_block_size = { tiles[1][1], tiles[1][2] } })
      end
   end
   rawset(model, "rewrite_checkpoint", require("moonload.checkpoint_rewrite").new(schemes, FIELDS, convert_layer,
      "compressed-tensors, " .. src, DROPPED))
   return model
end

return M
