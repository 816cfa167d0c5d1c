--- A tiny class helper shared by ml.nn, ml.hooks and friends.
--
--    local class = require("moonload.class")
--    local Animal = class("Animal")              -- or class("Animal", Parent)
--    function Animal:__init(name) self.name = name end
--    local Dog = Animal:extend("Dog")
--    function Dog:__init(name) Animal.__init(self, name); self.sound = "woof" end
--    local d = Dog("rex")                        -- d.__name == "Dog", class.is_a(d, Animal)
--
-- A class table is the metatable of its instances. Method lookup walks the parent chain through
-- the class tables' own metatables (`Dog` -> `Animal`), so methods added to a parent later are
-- seen by subclasses. Metamethods (__index, __newindex, __call, __tostring, ...) are copied from
-- the parent when a subclass is made, because Lua reads them raw from the metatable.
-- A class may define `__new(cls)` to allocate its instances (ml.nn.Module sets up its registries
-- there, so a subclass's __init need not call a parent constructor before assigning fields).
local class = {}

local METAMETHODS = {
   "__index", "__newindex", "__call", "__tostring", "__len", "__eq", "__lt", "__le",
   "__concat", "__unm", "__add", "__sub", "__mul", "__div", "__mod", "__pow", "__gc",
}

local function default_tostring(self)
   return getmetatable(self).__name .. "()"
end

local function construct(cls, ...)
   local new = cls.__new
   local obj = new and new(cls) or setmetatable({}, cls)
   local init = cls.__init
   if init then init(obj, ...) end
   return obj
end

local class_mt_cache = setmetatable({}, { __mode = "k" })

local function class_metatable(parent)
   local mt = class_mt_cache[parent or false]
   if mt then return mt end
   mt = {
      __index = parent,
      __call = construct,
      __tostring = function(cls) return "class " .. tostring(rawget(cls, "__name")) end,
   }
   class_mt_cache[parent or false] = mt
   return mt
end

--- Makes a new class named `name`, optionally deriving from `parent`.
function class.new(name, parent)
   if type(name) ~= "string" or name == "" then
      error("class: a class name (non-empty string) is expected, got " .. tostring(name), 2)
   end
   if parent ~= nil and (type(parent) ~= "table" or rawget(parent, "__name") == nil) then
      error("class: parent of " .. name .. " is not a class", 2)
   end
   local cls = { __name = name, super = parent }
   if parent then
      for _, k in ipairs(METAMETHODS) do
         if rawget(cls, k) == nil then cls[k] = parent[k] end
      end
      -- __index = the class itself is the plain-table default: point it at the new class.
      if parent.__index == parent then cls.__index = cls end
   else
      cls.__index = cls
      cls.__tostring = default_tostring
      cls.extend = class.extend
   end
   return setmetatable(cls, class_metatable(parent))
end

--- Derives a subclass: `local Dog = Animal:extend("Dog")`.
function class.extend(parent, name)
   return class.new(name, parent)
end

--- True when obj is an instance of cls or of one of its subclasses.
function class.is_a(obj, cls)
   if type(obj) ~= "table" then return false end
   local c = getmetatable(obj)
   while c do
      if c == cls then return true end
      c = rawget(c, "super")
   end
   return false
end

--- True when sub is cls or derives from it.
function class.is_subclass(sub, cls)
   local c = sub
   while c do
      if c == cls then return true end
      c = rawget(c, "super")
   end
   return false
end

--- The class of an instance (its metatable when that is a class), or nil.
function class.of(obj)
   if type(obj) ~= "table" then return nil end
   local c = getmetatable(obj)
   if type(c) == "table" and rawget(c, "__name") ~= nil then return c end
   return nil
end

return setmetatable(class, { __call = function(_, name, parent) return class.new(name, parent) end })
