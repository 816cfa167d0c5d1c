--- nn.Fp8Linear: a linear layer whose weight is stored as float8 with a float32 scale per tile,
-- as FP8 checkpoints hold it (DeepSeek-V3, Kimi K2; transformers' quant_method "fp8" with
-- weight_block_size, usually 128 x 128): parameters weight (out, in) float8_e4m3fn (or
-- float8_e5m2) and weight_scale_inv (ceil(out / block_o), ceil(in / block_i)) float32, under
-- those names. The weight stays one byte a value wherever it lies (RAM, disk, a GPU). A few rows
-- on the CPU (decoding) are multiplied straight from the float8 bytes; a prompt, or a GPU,
-- expands the weight tile by tile into the input's dtype and runs the GEMM (weight-only: the
-- activations stay as they are, as transformers' dequantize = True computes).
local Module = require("moonload.nn.module")
local F = require("moonload.nn.functional")

local Fp8Linear = Module:extend("Fp8Linear")

-- model:to("bfloat16") converts activations, not the scales
Fp8Linear.keep_float32_buffers = { weight_scale_inv = true }

local FORMATS = { e4m3 = "float8_e4m3fn", e5m2 = "float8_e5m2", float8_e4m3fn = "float8_e4m3fn",
   float8_e5m2 = "float8_e5m2" }

--- Fp8Linear(in_features, out_features[, {bias = true, block = {128, 128}, fmt = "e4m3"}]):
-- zero weights, unit scales.
function Fp8Linear:__init(in_features, out_features, opts)
   opts = opts or {}
   local block = opts.block or { 128, 128 }
   local ok = type(block) == "table" and #block == 2
   for _, b in ipairs(ok and block or {}) do ok = ok and type(b) == "number" and b >= 1 and b == math.floor(b) end
   if not ok then
      error("Fp8Linear: block must be {block_o, block_i}, two positive integers, got " .. tostring(block), 3)
   end
   local dtype = FORMATS[opts.fmt or "e4m3"]
   if dtype == nil then
      error(string.format('Fp8Linear: fmt must be "e4m3" or "e5m2", got %s', tostring(opts.fmt)), 3)
   end
   self.in_features, self.out_features = in_features, out_features
   rawset(self, "block", { block[1], block[2] })
   self.weight = Module.new_parameter({ out_features, in_features }, { dtype = dtype })
   self.weight_scale_inv = Module.new_parameter({ math.ceil(out_features / block[1]), math.ceil(in_features / block[2]) })
   if not self.weight:is_meta() then
      self.weight:fill_(0)
      self.weight_scale_inv:fill_(1)
   end
   if opts.bias == nil or opts.bias then
      self.bias = Module.new_parameter({ out_features }, {})
   else
      self:register_parameter("bias", nil)
   end
end

local COMPUTE = { float32 = true, float16 = true, bfloat16 = true }

--- The weight as a (out, in) tensor of dtype (float32, float16 or bfloat16), on its device.
function Fp8Linear:dense_weight(dtype)
   return F.dequantize_fp8_blocks(self.weight, self.weight_scale_inv, self.block, dtype or "float32")
end

function Fp8Linear:forward(x)
   if not COMPUTE[x.dtype] then x = x:to("float32") end
   local b = self.bias
   if b ~= nil and b.dtype ~= x.dtype then b = b:to(x.dtype) end
   return F.fp8_linear(x, self.weight, self.weight_scale_inv, self.block, b)
end

function Fp8Linear:extra_repr()
   return string.format("in_features=%d, out_features=%d, bias=%s, %s in blocks of %d x %d", self.in_features,
      self.out_features, Module.py_repr(self.bias ~= nil), self.weight.dtype, self.block[1], self.block[2])
end

return Fp8Linear
