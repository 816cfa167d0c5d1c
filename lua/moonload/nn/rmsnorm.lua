--- nn.RMSNorm(d[, {eps = 1e-6}]): Llama's RMS normalisation over the last dim(s),
-- y = x / sqrt(mean(x^2) + eps) * weight, computed in float32; weight = 1.
local Module = require("moonload.nn.module")
local F = require("moonload.nn.functional")
local init = require("moonload.nn.weight_init")
local LayerNorm = require("moonload.nn.layernorm")

local RMSNorm = Module:extend("RMSNorm")

function RMSNorm:__init(normalized_shape, opts)
   opts = opts or {}
   self.normalized_shape = LayerNorm._shape_of("RMSNorm", normalized_shape)
   self.eps = opts.eps or 1e-6
   self.elementwise_affine = opts.elementwise_affine ~= false
   if self.elementwise_affine then
      self.weight = Module.new_parameter(self.normalized_shape, opts)
      init.ones_(self.weight)
   else
      self:register_parameter("weight", nil)
   end
end

function RMSNorm:forward(x)
   return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
end

function RMSNorm:extra_repr()
   return string.format("%s, eps=%s, elementwise_affine=%s", Module.py_repr(self.normalized_shape),
      Module.py_float(self.eps), Module.py_repr(self.elementwise_affine))
end

return RMSNorm
