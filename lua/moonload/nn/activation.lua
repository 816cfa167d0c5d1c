--- Activation layers: nn.Identity, nn.ReLU, nn.GELU({approximate = "none" | "tanh"}),
-- nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softmax(dim), nn.ReLUSquaredActivation, and one with learned
-- parameters, nn.XIELUActivation (transformers' names for the last two).
local Module = require("moonload.nn.module")

local M = {}

local Identity = Module:extend("Identity")
function Identity:__init() end
function Identity:forward(x, ...) return x end
M.Identity = Identity

local ReLU = Module:extend("ReLU")
function ReLU:__init(opts)
   self.inplace = type(opts) == "table" and opts.inplace and true or false
end
function ReLU:forward(x) return x:relu() end
function ReLU:extra_repr() return self.inplace and "inplace=True" or "" end
M.ReLU = ReLU

local GELU = Module:extend("GELU")
function GELU:__init(opts)
   local approx = opts
   if type(opts) == "table" then approx = opts.approximate end
   approx = approx or "none"
   if approx ~= "none" and approx ~= "tanh" then
      error('GELU: approximate must be "none" or "tanh", got ' .. tostring(approx), 3)
   end
   self.approximate = approx
end
function GELU:forward(x) return x:gelu(self.approximate) end
function GELU:extra_repr() return "approximate=" .. Module.py_repr(self.approximate) end
M.GELU = GELU

local SiLU = Module:extend("SiLU")
function SiLU:__init(opts)
   self.inplace = type(opts) == "table" and opts.inplace and true or false
end
function SiLU:forward(x) return x:silu() end
function SiLU:extra_repr() return self.inplace and "inplace=True" or "" end
M.SiLU = SiLU

local Tanh = Module:extend("Tanh")
function Tanh:forward(x) return x:tanh() end
M.Tanh = Tanh

local Sigmoid = Module:extend("Sigmoid")
function Sigmoid:forward(x) return x:sigmoid() end
M.Sigmoid = Sigmoid

--- Softmax(dim) (a Lua dim: 1-based, -1 = last).
local Softmax = Module:extend("Softmax")
function Softmax:__init(dim)
   if type(dim) == "table" then dim = dim.dim end
   if dim ~= nil and (type(dim) ~= "number" or dim % 1 ~= 0 or dim == 0) then
      error("Softmax: dim must be a non-zero integer (1-based, -1 = last), got " .. tostring(dim), 3)
   end
   self.dim = dim or -1
end
function Softmax:forward(x) return x:softmax(self.dim) end
function Softmax:extra_repr() return "dim=" .. self.dim end
M.Softmax = Softmax

--- relu(x)^2 (hidden_act "relu2").
local ReLUSquaredActivation = Module:extend("ReLUSquaredActivation")
function ReLUSquaredActivation:forward(x) return require("moonload.nn.functional").relu2(x) end
M.ReLUSquaredActivation = ReLUSquaredActivation

--- XIELUActivation([{alpha_p_init = 0.8, alpha_n_init = 0.8, beta = 0.5, eps = -1e-6, dtype}]):
-- xIELU (F.xielu) with transformers' parameters: alpha_p = log(expm1(alpha_p_init)) and alpha_n =
-- log(expm1(alpha_n_init - beta)), learned, of one value each; beta and eps 0-d buffers, saved
-- with them.
local XIELUActivation = Module:extend("XIELUActivation")
-- (planning: intermediate-wide tensors its forward holds at once beyond a plain activation's,
-- its two branches and their parts: utils/runtime_memory.lua)
XIELUActivation.extra_widths = 4
function XIELUActivation:__init(opts)
   opts = opts or {}
   local beta, eps = opts.beta or 0.5, opts.eps or -1e-6
   local function raw(v) return math.log(math.exp(v) - 1) end
   self.alpha_p = Module.new_parameter({ 1 }, opts)
   self.alpha_n = Module.new_parameter({ 1 }, opts)
   if not self.alpha_p:is_meta() then
      self.alpha_p:fill_(raw(opts.alpha_p_init or 0.8))
      self.alpha_n:fill_(raw((opts.alpha_n_init or 0.8) - beta))
   end
   self:register_buffer("beta", Module.new_buffer({}, beta, opts))
   self:register_buffer("eps", Module.new_buffer({}, eps, opts))
end
function XIELUActivation:forward(x)
   -- (on x's device: computing in place on the CPU, a hook may leave the buffers on the GPU)
   local function like(t)
      if t.device ~= x.device then t = t:to(x.device) end
      return t.dtype == x.dtype and t or t:to(x.dtype)
   end
   return require("moonload.nn.functional").xielu(x, like(self.alpha_p), like(self.alpha_n), like(self.beta), like(self.eps))
end
M.XIELUActivation = XIELUActivation

return M
