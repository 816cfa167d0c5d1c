--- nn.QuantizedLinear: a linear layer whose weight is int8 with a float32 scale per block of 32
-- values along in_features (llama.cpp's Q8_0 layout; core/src/cpu/q8.c, core/src/cuda/q8.cu), on
-- the CPU or a GPU: y = x (q * scale)^T + b, computed in float32. Decoding reads a quarter of float32's weight
-- bytes and half of bfloat16's. Parameters (so that device maps and offloading treat them as
-- weights): weight (int8, out x in), weight_scale (float32, out x in / 32); the bias stays as it
-- was. Made from a float layer with from_float (nn.Linear, or
-- GPT-2's Conv1D, whose weight is stored transposed), or for a whole model by ml.quantize.
local Module = require("moonload.nn.module")
local F = require("moonload.nn.functional")

local QuantizedLinear = Module:extend("QuantizedLinear")

QuantizedLinear.BLOCK = 32
-- model:to("bfloat16") converts the activations' dtype, not the scales (the kernel reads float32)
QuantizedLinear.keep_float32_buffers = { weight_scale = true }

--- QuantizedLinear(in_features, out_features[, {bias = true}]): zero weights, unit scales.
function QuantizedLinear:__init(in_features, out_features, opts)
   opts = opts or {}
   if type(in_features) ~= "number" or in_features % QuantizedLinear.BLOCK ~= 0 or in_features <= 0 then
      error(string.format("QuantizedLinear: in_features must be a positive multiple of %d, got %s",
         QuantizedLinear.BLOCK, tostring(in_features)), 3)
   end
   self.in_features, self.out_features = in_features, out_features
   self.weight = Module.new_parameter({ out_features, in_features }, { dtype = "int8" })
   self.weight_scale = Module.new_parameter({ out_features, in_features / QuantizedLinear.BLOCK })
   if not self.weight:is_meta() then
      self.weight:fill_(0)
      self.weight_scale:fill_(1)
   end
   if opts.bias == nil or opts.bias then
      self.bias = Module.new_parameter({ out_features }, {})
   else
      self:register_parameter("bias", nil)
   end
end

--- from_float(m) -> a QuantizedLinear computing what the Linear or Conv1D m computes, up to the
-- rounding of its weights (at most half a scale each), on the device of m's weight.
function QuantizedLinear.from_float(m)
   local w = m.weight
   local out_features, in_features = m.out_features, m.in_features
   if m.nf then w, out_features, in_features = w:t(), m.nf, m.nx end             -- Conv1D: (nx, nf)
   local q, scales = F.quantize_q8(w)
   local ql = QuantizedLinear(in_features, out_features, { bias = false })
   ql.weight, ql.weight_scale = q, scales
   if m.bias ~= nil then ql.bias = m.bias end
   return ql
end

function QuantizedLinear:forward(x)
   return F.q8_linear(x, self.weight, self.weight_scale, self.bias)
end

function QuantizedLinear:extra_repr()
   return string.format("in_features=%d, out_features=%d, bias=%s, int8 in blocks of %d", self.in_features,
      self.out_features, Module.py_repr(self.bias ~= nil), QuantizedLinear.BLOCK)
end

return QuantizedLinear
