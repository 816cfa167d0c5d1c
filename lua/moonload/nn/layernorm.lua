--- nn.LayerNorm(normalized_shape[, {eps = 1e-5, elementwise_affine = true, bias = true}]):
-- normalises over the last dims; weight = 1, bias = 0.
local Module = require("moonload.nn.module")
local F = require("moonload.nn.functional")
local init = require("moonload.nn.weight_init")

local LayerNorm = Module:extend("LayerNorm")

local function shape_of(fn, s)
   if type(s) == "number" then s = { s } end
   if type(s) ~= "table" or #s == 0 then
      error(fn .. ": normalized_shape must be a positive integer or a list of them, got " .. tostring(s), 4)
   end
   local out = {}
   for i, v in ipairs(s) do
      if type(v) ~= "number" or v % 1 ~= 0 or v <= 0 then
         error(string.format("%s: normalized_shape entry %d must be a positive integer, got %s", fn, i, tostring(v)), 4)
      end
      out[i] = v
   end
   return out
end
LayerNorm._shape_of = shape_of

function LayerNorm:__init(normalized_shape, opts)
   opts = opts or {}
   self.normalized_shape = shape_of("LayerNorm", normalized_shape)
   self.eps = opts.eps or 1e-5
   self.elementwise_affine = opts.elementwise_affine ~= false
   if self.elementwise_affine then
      self.weight = Module.new_parameter(self.normalized_shape, opts)
      if opts.bias ~= false then
         self.bias = Module.new_parameter(self.normalized_shape, opts)
      else
         self:register_parameter("bias", nil)
      end
   else
      self:register_parameter("weight", nil)
      self:register_parameter("bias", nil)
   end
   self:reset_parameters()
end

function LayerNorm:reset_parameters()
   if self.weight ~= nil then init.ones_(self.weight) end
   if self.bias ~= nil then init.zeros_(self.bias) end
end

function LayerNorm:forward(x)
   return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
end

function LayerNorm:extra_repr()
   return string.format("%s, eps=%s, elementwise_affine=%s, bias=%s", Module.py_repr(self.normalized_shape),
      Module.py_float(self.eps), Module.py_repr(self.elementwise_affine), Module.py_repr(self.bias ~= nil))
end

return LayerNorm
