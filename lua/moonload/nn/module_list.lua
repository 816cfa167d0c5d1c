--- nn.ModuleList({m1, m2, ...}): holds modules in a list. Lua indexing is 1-based (list[1] is
-- the child named "0"), #list is the count, ipairs(list) iterates, list:append(m) adds one.
-- It has no forward of its own: iterate it in the parent's forward.
local Module = require("moonload.nn.module")
local OrderedDict = require("moonload.nn.ordered_dict")

local ModuleList = Module:extend("ModuleList")

function ModuleList.__new(cls)
   local obj = Module.__new(cls)
   rawset(obj, "_modules", OrderedDict.new(obj))
   return obj
end

function ModuleList:__init(mods)
   if mods ~= nil then
      if type(mods) ~= "table" or Module.is_module(mods) then
         error("ModuleList: a list of modules is expected, got " .. (Module.is_module(mods) and mods.__name or type(mods)), 3)
      end
      self:extend(mods)
   end
end

--- Appends a module (named by its 0-based position) and returns the list.
function ModuleList:append(m)
   self[#self._modules._keys + 1] = m
   return self
end

--- Appends every module of a Lua list (or of another ModuleList) and returns the list.
function ModuleList:extend(mods)
   local n = #mods
   for i = 1, n do
      if not Module.is_module(mods[i]) then
         error(string.format("ModuleList: element %d is %s, expected an nn.Module", i, type(mods[i])), 2)
      end
   end
   for i = 1, n do self:append(mods[i]) end
   return self
end

--- Inserts a module before Lua position i (1-based); later modules are renamed.
function ModuleList:insert(i, m)
   local od = self._modules
   local n = #od._keys
   if type(i) ~= "number" or i % 1 ~= 0 or i < 1 or i > n + 1 then
      error(string.format("ModuleList.insert: position %s is out of range 1..%d", tostring(i), n + 1), 2)
   end
   if not Module.is_module(m) then
      error("ModuleList.insert: an nn.Module is expected, got " .. type(m), 2)
   end
   local mods = {}
   for j = 1, n do mods[j] = rawget(self, j) end
   table.insert(mods, i, m)
   for j = n, 1, -1 do OrderedDict.methods.remove(od, tostring(j - 1)) end
   for j = 1, #mods do self:add_module(tostring(j - 1), mods[j]) end
   return self
end

-- PyTorch prints runs of identical consecutive entries once: "(0-2): 3 x Block(...)".
function ModuleList:__tostring()
   local n = #self._modules._keys
   if n == 0 then return self.__name .. "()" end
   local reprs = {}
   for i = 1, n do reprs[i] = tostring(rawget(self, i)) end
   local blocks = { { 0, 0, reprs[1] } }
   for i = 2, n do
      local last = blocks[#blocks]
      if reprs[i] == last[3] then
         last[2] = i - 1
      else
         blocks[#blocks + 1] = { i - 1, i - 1, reprs[i] }
      end
   end
   local lines = {}
   for _, b in ipairs(blocks) do
      local s
      if b[1] == b[2] then
         s = string.format("(%d): %s", b[1], b[3])
      else
         s = string.format("(%d-%d): %d x %s", b[1], b[2], b[2] - b[1] + 1, b[3])
      end
      lines[#lines + 1] = Module._add_indent(s, 2)
   end
   return self.__name .. "(\n  " .. table.concat(lines, "\n  ") .. "\n)"
end

return ModuleList
