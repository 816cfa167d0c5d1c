--- nn.QuantizedLinear: a linear layer whose weight is int8 or int4 with a float32 scale per
-- block of 32 values along in_features (llama.cpp's Q8_0 and Q4_0 layouts; core/src/cpu/q8.c,
-- core/src/cuda/q8.cu), on the CPU or a GPU: y = x (q * scale)^T + b, computed in float32.
-- Decoding reads a quarter (int8) or an eighth (int4) of float32's weight bytes. Parameters (so
-- that device maps and offloading treat them as weights): weight (int8 (out, in), or uint8
-- (out, in / 2) holding two int4 values a byte), weight_scale (float32, out x in / 32); the bias
-- stays as it was. With offset_groups G (asymmetric checkpoints: AutoAWQ's, GPTQ's zero points),
-- also weight_offset (float32, out x G): w = q * scale + offset[group], in groups of in / G values,
-- computed as the int4 product plus each group's input sum times its offset (a G-wide product).
-- With input_order (GPTQ's act-order checkpoints, whose groups gather inputs from anywhere), a
-- buffer input_order (int64, in_features): the weight's columns are stored in that order, and the
-- input is gathered into it before the product. Made from a float layer with from_float (nn.Linear, or GPT-2's Conv1D, whose
-- weight is stored transposed), or for a whole model by ml.quantize.
local Module = require("moonload.nn.module")
local F = require("moonload.nn.functional")

local QuantizedLinear = Module:extend("QuantizedLinear")

QuantizedLinear.BLOCK = 32
-- model:to("bfloat16") converts the activations' dtype, not the scales (the kernel reads float32)
QuantizedLinear.keep_float32_buffers = { weight_scale = true, weight_offset = true }

-- What each width of weights is made and multiplied with, and its storage.
local KERNELS = {
   [8] = { quantize = F.quantize_q8, linear = F.q8_linear, dtype = "int8", per_byte = 1 },
   [4] = { quantize = F.quantize_q4, linear = F.q4_linear, dtype = "uint8", per_byte = 2 },
}

local function check_bits(bits, level)
   if not KERNELS[bits] then
      error(string.format("QuantizedLinear: bits must be 8 or 4, got %s", tostring(bits)), level + 1)
   end
end

--- QuantizedLinear(in_features, out_features[, {bias = true, bits = 8, offset_groups, input_order}]):
-- zero weights, unit scales (and zero offsets, the identity order).
function QuantizedLinear:__init(in_features, out_features, opts)
   opts = opts or {}
   if type(in_features) ~= "number" or in_features % QuantizedLinear.BLOCK ~= 0 or in_features <= 0 then
      error(string.format("QuantizedLinear: in_features must be a positive multiple of %d, got %s",
         QuantizedLinear.BLOCK, tostring(in_features)), 3)
   end
   local bits = opts.bits or 8
   check_bits(bits, 3)
   local k = KERNELS[bits]
   self.in_features, self.out_features, self.bits = in_features, out_features, bits
   -- (int4 zeros are the nibble 8: fill_(0x88) below)
   self.weight = Module.new_parameter({ out_features, in_features / k.per_byte }, { dtype = k.dtype })
   self.weight_scale = Module.new_parameter({ out_features, in_features / QuantizedLinear.BLOCK })
   if not self.weight:is_meta() then
      self.weight:fill_(bits == 8 and 0 or 0x88)
      self.weight_scale:fill_(1)
   end
   local groups = opts.offset_groups
   if groups ~= nil then
      if type(groups) ~= "number" or groups < 1 or in_features % groups ~= 0 then
         error(string.format("QuantizedLinear: offset_groups must divide in_features %d, got %s", in_features,
            tostring(groups)), 3)
      end
      self.weight_offset = Module.new_parameter({ out_features, groups })
      if not self.weight_offset:is_meta() then self.weight_offset:fill_(0) end
   end
   if opts.input_order then
      self:register_buffer("input_order", require("moonload").arange(0, in_features):to("int64"))
   end
   if opts.bias == nil or opts.bias then
      self.bias = Module.new_parameter({ out_features }, {})
   else
      self:register_parameter("bias", nil)
   end
end

--- from_float(m[, bits = 8]) -> a QuantizedLinear computing what the Linear, Conv1D or Fp8Linear m
-- computes, up to the rounding of its weights (int8: at most half a scale each; int4: half a
-- scale, a whole one for a value clamped at 7), on the device of m's weight.
function QuantizedLinear.from_float(m, bits)
   bits = bits or 8
   check_bits(bits, 2)
   local w = m.weight
   local out_features, in_features = m.out_features, m.in_features
   if m.nf then w, out_features, in_features = w:t(), m.nf, m.nx end             -- Conv1D: (nx, nf)
   if m.__name == "Fp8Linear" then w = m:dense_weight("float32") end             -- float8 times its tile scales
   local q, scales = KERNELS[bits].quantize(w)
   local ql = QuantizedLinear(in_features, out_features, { bias = false, bits = bits })
   ql.weight, ql.weight_scale = q, scales
   if m.bias ~= nil then ql.bias = m.bias end
   return ql
end

--- quantize_weight(w, bits) -> q, scales: a float (out, in) weight in the layout of a bits-wide layer.
function QuantizedLinear.quantize_weight(w, bits)
   check_bits(bits, 2)
   return KERNELS[bits].quantize(w)
end

--- The weight (out, in) dequantized into dtype (default float32), on its device.
function QuantizedLinear:dense_weight(dtype)
   local dequantize = (self.bits or 8) == 8 and F.dequantize_q8 or F.dequantize_q4
   local offset, order = self.weight_offset, self.input_order
   if offset == nil and order == nil then return dequantize(self.weight, self.weight_scale, dtype or "float32") end
   local w = dequantize(self.weight, self.weight_scale, "float32")
   local N, K = self.out_features, self.in_features
   if offset ~= nil then
      local G = offset.shape[2]
      w = (w:view(N, G, K / G) + offset:view(N, G, 1)):view(N, K)
   end
   if order ~= nil then
      -- column j holds input order[j]: put each back in its own place
      local o = order:to("int64"):contiguous():tolist()
      local back = {}
      for j, k in ipairs(o) do back[k + 1] = j - 1 end
      w = w:index_select(2, require("moonload").tensor(back, { dtype = "int64" }):to(w.device))
   end
   return (dtype or "float32") == "float32" and w or w:to(dtype)
end

function QuantizedLinear:forward(x)
   local order = self.input_order
   if order ~= nil then                                                    -- the columns' order
      -- (a hook running this layer in place on the CPU leaves its buffers on the GPU: K indices)
      if order.device ~= x.device then order = order:to(x.device) end
      x = x:index_select(#x.shape, order)
   end
   local y = KERNELS[self.bits or 8].linear(x, self.weight, self.weight_scale, self.bias)
   local offset = self.weight_offset
   if offset == nil then return y end
   -- + each group's input sum times its offset, in float32
   local G = offset.shape[2]
   local shape = x.shape
   local grouped = {}
   for i = 1, #shape - 1 do grouped[i] = shape[i] end
   grouped[#shape], grouped[#shape + 1] = G, shape[#shape] / G
   local sums = x:reshape(grouped):float():sum(#shape + 1)
   local extra = F.linear(sums, offset)
   return y + (extra.dtype == y.dtype and extra or extra:to(y.dtype))
end

function QuantizedLinear:extra_repr()
   local offset = self.weight_offset
   return string.format("in_features=%d, out_features=%d, bias=%s, int%d in blocks of %d%s", self.in_features,
      self.out_features, Module.py_repr(self.bias ~= nil), self.bits or 8, QuantizedLinear.BLOCK,
      offset and string.format(", offsets in %d groups", offset.shape[2]) or "")
      .. (self.input_order ~= nil and ", inputs reordered" or "")
end

return QuantizedLinear
