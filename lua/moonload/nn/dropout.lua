--- nn.Dropout(p = 0.5): identity in eval mode (the default); in training mode zeroes elements
-- with probability p and scales the rest by 1/(1-p).
local Module = require("moonload.nn.module")
local F = require("moonload.nn.functional")

local Dropout = Module:extend("Dropout")

function Dropout:__init(p, opts)
   if type(p) == "table" then opts, p = p, p.p end
   opts = opts or {}
   if p == nil then p = 0.5 end
   if type(p) ~= "number" or p < 0 or p > 1 then
      error("Dropout: dropout probability has to be between 0 and 1, but got " .. tostring(p), 3)
   end
   self.p = p
   self.inplace = opts.inplace and true or false
end

function Dropout:forward(x)
   return F.dropout(x, self.p, self.training)
end

function Dropout:extra_repr()
   return string.format("p=%s, inplace=%s", Module.py_float(self.p), Module.py_repr(self.inplace))
end

return Dropout
