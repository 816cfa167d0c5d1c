--- JSON files as the loaders and ml.save_model read and write them.
local cjson = require("cjson")

local M = {}

--- Tables read from JSON text -> the set of key names whose numbers that text writes as floats
-- (1.0, 1e-05, [0.0, ...]): JSON gives Lua no way to tell 1.0 read from 1, and transformers' strict
-- configs refuse an integer where they type a float (a time_step_scale of 1, a time_step_limit of
-- [0, ...]), so encode writes those keys' integral numbers back with a decimal point.
M.float_keys = setmetatable({}, { __mode = "k" })

--- The names of the keys whose value in text is a number written as a float, or a list holding one.
function M.float_key_names(text)
   local names = {}
   for key, lexeme in text:gmatch('"([^"]+)"%s*:%s*(%-?%d[%d%.eE%+%-]*)') do
      if lexeme:find("[%.eE]") then names[key] = true end
   end
   for key, items in text:gmatch('"([^"]+)"%s*:%s*%[([^%]]*)%]') do
      if items:find("%d%.%d") or items:find("%d[eE][%+%-]?%d") then names[key] = true end
   end
   return names
end

--- read(path, who[, missing_ok]) -> the JSON object in path; nil when the file does not exist
-- and missing_ok. Errors name who, the path and what is wrong.
function M.read(path, who, missing_ok)
   local f, err = io.open(path, "rb")
   if not f then
      if missing_ok then return nil end
      error(string.format("%s: cannot read %s (%s)", who, path, tostring(err)), 0)
   end
   local text = f:read("*a")
   f:close()
   local ok, t = pcall(cjson.decode, text)
   if not ok or type(t) ~= "table" then
      error(string.format("%s: %s is not a valid JSON object (%s)", who, path, tostring(t)), 0)
   end
   M.float_keys[t] = M.float_key_names(text)
   return t
end

--- without_nulls(t) -> t with its top-level JSON nulls removed (absent, as Python's None reads).
function M.without_nulls(t)
   for k, v in pairs(t) do
      if v == cjson.null then t[k] = nil end
   end
   return t
end

--- encode(v) -> JSON text with sorted keys and two-space indents (as transformers writes
-- config.json): the same table gives the same bytes. Arrays of scalars stay on one line.
-- An empty list that encodes as [] (an empty Lua table encodes as {}).
M.EMPTY_LIST = setmetatable({}, { __newindex = function() error("json.EMPTY_LIST is read-only", 2) end })

local function float_text(x)
   local s = cjson.encode(x)
   return s:match("^%-?%d+$") and s .. ".0" or s
end

--- encode(v[, indent[, floats[, names]]]): floats writes v's numbers (a list's too) as floats;
-- names, the keys to write so (M.float_keys of v or of a table holding it).
function M.encode(v, indent, floats, names)
   if v == M.EMPTY_LIST then return "[]" end
   if type(v) ~= "table" then return floats and type(v) == "number" and float_text(v) or cjson.encode(v) end
   names = M.float_keys[v] or names
   indent = indent or ""
   local inner, parts = indent .. "  ", {}
   local n = #v
   local count = 0
   for _ in pairs(v) do count = count + 1 end
   if n > 0 and n == count then
      local flat = true
      for i = 1, n do
         parts[i] = M.encode(v[i], inner, floats, names)
         if type(v[i]) == "table" then flat = false end
      end
      if flat then return "[" .. table.concat(parts, ", ") .. "]" end
      return "[\n" .. inner .. table.concat(parts, ",\n" .. inner) .. "\n" .. indent .. "]"
   end
   if count == 0 then return "{}" end
   local keys = {}
   for k in pairs(v) do keys[#keys + 1] = tostring(k) end
   table.sort(keys)
   for i, k in ipairs(keys) do
      local x = v[k]
      if x == nil then x = v[tonumber(k)] end
      parts[i] = cjson.encode(k) .. ": " .. M.encode(x, inner, names ~= nil and names[k] == true, names)
   end
   return "{\n" .. inner .. table.concat(parts, ",\n" .. inner) .. "\n" .. indent .. "}"
end


return M
