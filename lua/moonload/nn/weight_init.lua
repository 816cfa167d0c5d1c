--- nn.init: in-place initialisers with PyTorch's formulas. On a meta tensor (no data) each one
-- does nothing, so a model built under init_empty_weights allocates and computes nothing.
-- Random draws come from the library generator: ml.manual_seed(n) makes them reproducible.
local Tensor = require("moonload.tensor")

local M = {}

local function check(fn, t)
   if not Tensor.is_tensor(t) then error(fn .. ": a tensor is expected, got " .. type(t), 3) end
   return t.device ~= "meta"
end

--- fan_in, fan_out of a weight (out, in, *kernel), as torch.nn.init computes them.
function M.calculate_fan_in_and_fan_out(t)
   local shape = t.shape
   if #shape < 2 then
      error("calculate_fan_in_and_fan_out: fan in and fan out can not be computed for a tensor with fewer than 2 dimensions", 2)
   end
   local receptive = 1
   for i = 3, #shape do receptive = receptive * shape[i] end
   return shape[2] * receptive, shape[1] * receptive
end

function M.uniform_(t, a, b)
   if check("uniform_", t) then t:uniform_(a or 0, b or 1) end
   return t
end

function M.normal_(t, mean, std)
   if check("normal_", t) then t:normal_(mean or 0, std or 1) end
   return t
end

function M.constant_(t, v)
   if check("constant_", t) then t:fill_(v) end
   return t
end

function M.zeros_(t) return M.constant_(t, 0) end
function M.ones_(t) return M.constant_(t, 1) end

--- kaiming_uniform_(t[, {a = 0, mode = "fan_in", nonlinearity = "leaky_relu"}])
function M.kaiming_uniform_(t, opts)
   if type(opts) == "number" then opts = { a = opts } end
   opts = opts or {}
   local a = opts.a or 0
   if not check("kaiming_uniform_", t) then return t end
   local fan_in, fan_out = M.calculate_fan_in_and_fan_out(t)
   local fan = (opts.mode == "fan_out") and fan_out or fan_in
   local gain
   local nl = opts.nonlinearity or "leaky_relu"
   if nl == "leaky_relu" then gain = math.sqrt(2 / (1 + a * a))
   elseif nl == "relu" then gain = math.sqrt(2)
   elseif nl == "linear" or nl == "sigmoid" then gain = 1
   elseif nl == "tanh" then gain = 5 / 3
   else error("kaiming_uniform_: unsupported nonlinearity " .. tostring(nl), 2) end
   local bound = math.sqrt(3) * gain / math.sqrt(fan)
   if fan == 0 then return t end
   t:uniform_(-bound, bound)
   return t
end

return M
