--- nn.Conv1D(nf, nx): GPT-2's "1-D convolution", a linear layer with a transposed weight
-- (transformers.pytorch_utils.Conv1D): weight (nx, nf), bias (nf), y = x @ W + b.
-- Initialisation as transformers': W ~ N(0, 0.02), b = 0.
local Module = require("moonload.nn.module")
local F = require("moonload.nn.functional")
local init = require("moonload.nn.weight_init")

local Conv1D = Module:extend("Conv1D")

function Conv1D:__init(nf, nx, opts)
   for _, a in ipairs({ { "nf", nf }, { "nx", nx } }) do
      if type(a[2]) ~= "number" or a[2] % 1 ~= 0 or a[2] < 0 then
         error(string.format("Conv1D: %s must be a non-negative integer, got %s", a[1], tostring(a[2])), 3)
      end
   end
   opts = opts or {}
   self.nf, self.nx = nf, nx
   self.weight = Module.new_parameter({ nx, nf }, opts)
   self.bias = Module.new_parameter({ nf }, opts)
   init.normal_(self.weight, 0, 0.02)
   init.zeros_(self.bias)
end

function Conv1D:forward(x)
   local shape = x.shape
   local n = #shape
   if n == 0 or shape[n] ~= self.nx then
      error(string.format("Conv1D: input of shape [%s] does not end in nx = %d", table.concat(shape, ", "), self.nx), 2)
   end
   -- One GEMM reading the (nx, nf) weight transposed, bias folded in: no copy of W, no extra add.
   return F.linear(x, self.weight:t(), self.bias)
end

-- transformers prints Conv1D(nf=..., nx=...).
function Conv1D:__tostring()
   return string.format("%s(nf=%d, nx=%d)", self.__name, self.nf, self.nx)
end

return Conv1D
