--- nn.Sequential(m1, m2, ...): runs its children in order, each on the previous one's output.
-- Children are named "0", "1", ... (add_module gives other names); s[1] is the first child
-- whatever its name, s[-1] the last, #s the count, ipairs(s) iterates them.
local Module = require("moonload.nn.module")
local OrderedDict = require("moonload.nn.ordered_dict")

local Sequential = Module:extend("Sequential")

function Sequential.__new(cls)
   local obj = Module.__new(cls)
   rawset(obj, "_modules", OrderedDict.new(obj))
   return obj
end

--- Sequential(m1, m2, ...) or Sequential({m1, m2, ...}).
function Sequential:__init(...)
   local mods = { ... }
   local n = select("#", ...)
   if n == 1 and type(mods[1]) == "table" and not Module.is_module(mods[1]) then
      mods = mods[1]
      n = #mods
   end
   for i = 1, n do
      local m = mods[i]
      if not Module.is_module(m) then
         error(string.format("Sequential: argument %d is %s, expected an nn.Module", i,
            type(m) == "table" and "a table" or type(m)), 3)
      end
      self:add_module(tostring(i - 1), m)
   end
end

--- Appends a module (named by its position) and returns the container.
function Sequential:append(m)
   self[#self._modules._keys + 1] = m
   return self
end

function Sequential:forward(x, ...)
   local n = #self._modules._keys
   if n == 0 then return x, ... end
   for i = 1, n do
      x = self[i](x)
   end
   return x
end

return Sequential
