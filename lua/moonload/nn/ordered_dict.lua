--- An insertion-ordered name -> value map: the registries behind m._parameters, m._buffers and
-- m._modules (PyTorch's OrderedDicts).
--
--    od[name]            the value (nil when absent or when the slot holds nil)
--    od[name] = v        sets the value; a new name is appended, a known one keeps its place
--    od:get(name) od:set(name, v) od:has(name) od:remove(name) od:keys() od:len()
--    for name, v in od:items() do ... end    (slots holding nil are skipped)
--
-- A slot may hold nil (PyTorch's `register_parameter("bias", None)`): the name keeps its place
-- and has(name) stays true until remove(name). Methods win over names in `od.x` lookups, so use
-- od:get(name) when a name could be a method's.
--
-- Values live in a position-indexed table (`_vals`). Containers (Sequential, ModuleList) pass
-- their own instance as that table, so their children sit in its array part and `#list`,
-- `ipairs(list)` and `list[i]` work on them directly.
local OrderedDict = { __name = "OrderedDict" }
local methods = {}

--- A new empty dict; `vals` is the positional value table to use (a fresh one by default).
function OrderedDict.new(vals)
   return setmetatable({ _keys = {}, _pos = {}, _vals = vals or {} }, OrderedDict)
end

function methods.get(od, name)
   local p = od._pos[name]
   if p then return od._vals[p] end
   return nil
end

function methods.has(od, name)
   return od._pos[name] ~= nil
end

--- Sets name to v (v may be nil: the slot stays). Returns the position.
function methods.set(od, name, v)
   local pos = od._pos
   local p = pos[name]
   if not p then
      local keys = od._keys
      p = #keys + 1
      keys[p] = name
      pos[name] = p
   end
   rawset(od._vals, p, v)
   return p
end

--- Removes the slot (later names move up one place). Returns the value it held.
function methods.remove(od, name)
   local p = od._pos[name]
   if not p then return nil end
   local keys, pos, vals = od._keys, od._pos, od._vals
   local n = #keys
   local v = rawget(vals, p)
   for i = p, n - 1 do
      keys[i] = keys[i + 1]
      pos[keys[i]] = i
      rawset(vals, i, rawget(vals, i + 1))
   end
   keys[n] = nil
   rawset(vals, n, nil)
   pos[name] = nil
   return v
end

--- Every name with a slot, in order (a fresh list).
function methods.keys(od)
   local out, keys = {}, od._keys
   for i = 1, #keys do out[i] = keys[i] end
   return out
end

--- The number of slots.
function methods.len(od)
   return #od._keys
end

--- The non-nil values in order (a fresh list).
function methods.values(od)
   local out, keys, vals = {}, od._keys, od._vals
   for i = 1, #keys do
      local v = rawget(vals, i)
      if v ~= nil then out[#out + 1] = v end
   end
   return out
end

--- Iterates name, value over slots holding a value, in order.
function methods.items(od)
   local keys, vals, i = od._keys, od._vals, 0
   return function()
      while true do
         i = i + 1
         local k = keys[i]
         if k == nil then return nil end
         local v = rawget(vals, i)
         if v ~= nil then return k, v end
      end
   end
end

--- The position (1-based) of a name, or nil.
function methods.index_of(od, name)
   return od._pos[name]
end

--- The name at a position, or nil.
function methods.key_at(od, i)
   return od._keys[i]
end

OrderedDict.methods = methods

OrderedDict.__index = function(od, k)
   local m = methods[k]
   if m then return m end
   local p = od._pos[k]
   if p then return rawget(od._vals, p) end
   return nil
end

OrderedDict.__newindex = function(od, k, v)
   methods.set(od, k, v)
end

OrderedDict.__tostring = function(od)
   local parts, keys = {}, od._keys
   for i = 1, #keys do
      local v = rawget(od._vals, i)
      parts[i] = string.format("%s=%s", tostring(keys[i]), v == nil and "nil" or (type(v) == "table" and (rawget(getmetatable(v) or {}, "__name") or "table") or tostring(v)))
   end
   return "OrderedDict(" .. table.concat(parts, ", ") .. ")"
end

return OrderedDict
