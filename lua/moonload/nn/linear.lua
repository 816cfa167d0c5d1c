--- nn.Linear(in_features, out_features[, {bias = true, dtype, device}]): y = x W^T + b.
-- PyTorch's initialisation: W ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)),
-- b ~ U(-1/sqrt(in), 1/sqrt(in)).
local Module = require("moonload.nn.module")
local F = require("moonload.nn.functional")
local init = require("moonload.nn.weight_init")

local Linear = Module:extend("Linear")

local function check_size(fn, what, v)
   if type(v) ~= "number" or v % 1 ~= 0 or v < 0 then
      error(string.format("%s: %s must be a non-negative integer, got %s", fn, what, tostring(v)), 4)
   end
end

function Linear:__init(in_features, out_features, opts)
   check_size("Linear", "in_features", in_features)
   check_size("Linear", "out_features", out_features)
   if opts ~= nil and type(opts) ~= "table" then
      error("Linear: options must be a table like {bias = false}, got " .. type(opts), 3)
   end
   opts = opts or {}
   self.in_features, self.out_features = in_features, out_features
   self.weight = Module.new_parameter({ out_features, in_features }, opts)
   if opts.bias == nil or opts.bias then
      self.bias = Module.new_parameter({ out_features }, opts)
   else
      self:register_parameter("bias", nil)
   end
   self:reset_parameters()
end

--- The weight (out, in) as dtype on its device (Fp8Linear and QuantizedLinear expand theirs):
-- for code that reads a layer's weight as a tensor (DeepSeek's absorbed attention).
function Linear:dense_weight(dtype)
   local w = self.weight
   if dtype ~= nil and w.dtype ~= dtype then w = w:to(dtype) end
   return w
end

function Linear:reset_parameters()
   init.kaiming_uniform_(self.weight, { a = math.sqrt(5) })
   if self.bias ~= nil then
      local fan_in = self.in_features
      local bound = fan_in > 0 and 1 / math.sqrt(fan_in) or 0
      init.uniform_(self.bias, -bound, bound)
   end
end

function Linear:forward(x)
   return F.linear(x, self.weight, self.bias)
end

function Linear:extra_repr()
   return string.format("in_features=%d, out_features=%d, bias=%s", self.in_features, self.out_features,
      Module.py_repr(self.bias ~= nil))
end

return Linear
