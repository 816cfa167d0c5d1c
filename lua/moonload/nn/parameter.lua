--- nn.Parameter(t): marks a tensor as a module parameter.
--
-- A parameter is an ordinary ml.Tensor carrying the flag `_is_param` (tensors are Lua tables),
-- so `nn.Parameter(t)` returns t itself: assigning it to a module field registers it as a
-- parameter, and the same object shared by two modules is a tie. There is no autograd, so there
-- is nothing else to a parameter.
local Tensor = require("moonload.tensor")

local M = {}

--- Marks t as a parameter and returns it (the same object).
function M.Parameter(t)
   if not Tensor.is_tensor(t) then
      error("Parameter: a tensor is expected, got " .. type(t), 2)
   end
   rawset(t, "_is_param", true)
   return t
end

--- True when x is a tensor marked as a parameter.
function M.is_parameter(x)
   return Tensor.is_tensor(x) and rawget(x, "_is_param") == true
end

return M
