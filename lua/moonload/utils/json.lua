--- JSON files as the loaders and ml.save_model read and write them.
local cjson = require("cjson")

local M = {}

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

function M.encode(v, indent)
   if v == M.EMPTY_LIST then return "[]" end
   if type(v) ~= "table" then return cjson.encode(v) end
   indent = indent or ""
   local inner, parts = indent .. "  ", {}
   local n = #v
   local count = 0
   for _ in pairs(v) do count = count + 1 end
   if n > 0 and n == count then
      local flat = true
      for i = 1, n do
         parts[i] = M.encode(v[i], inner)
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
      parts[i] = cjson.encode(k) .. ": " .. M.encode(x, inner)
   end
   return "{\n" .. inner .. table.concat(parts, ",\n" .. inner) .. "\n" .. indent .. "}"
end


return M
