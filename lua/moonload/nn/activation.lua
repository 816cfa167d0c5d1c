--- Parameter-free layers: nn.Identity, nn.ReLU, nn.GELU({approximate = "none" | "tanh"}),
-- nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softmax(dim).
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

return M
