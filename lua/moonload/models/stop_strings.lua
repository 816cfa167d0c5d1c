--- generate's stop_strings (transformers' StopStringCriteria): a row's generation ends with the
-- token that completes one of the strings (the string stays in the output, as in transformers).
-- As there, the string must end in the newest token's text and may begin before it, in the
-- prompt too, but a string that lies wholly before the newest token does not count. The text
-- comes from the tokenizer given beside them; each step decodes only the last tokens of a row,
-- enough to hold the longest string.
local M = {}

local Stops = {}
Stops.__index = Stops

--- new(strings, tokenizer, rows, who[, prompts]) -> a checker for `rows` rows; strings: a string or
-- a list of them; prompts: each row's prompt ids (Lua lists), whose end a string may begin in.
-- Errors (at the caller's caller's level) name a missing tokenizer or a bad string.
function M.new(strings, tokenizer, rows, who, prompts)
   if type(strings) == "string" then strings = { strings } end
   if type(strings) ~= "table" or #strings == 0 then
      error(string.format("%s: stop_strings must be a string or a non-empty list of strings, got %s", who, type(strings)), 4)
   end
   local longest = 0
   for i, s in ipairs(strings) do
      if type(s) ~= "string" or s == "" then
         error(string.format("%s: stop_strings[%d] must be a non-empty string, got %s", who, i, tostring(s)), 4)
      end
      longest = math.max(longest, #s)
   end
   if type(tokenizer) ~= "table" or type(tokenizer.decode) ~= "function" then
      error(string.format("%s: stop_strings needs the tokenizer that reads the ids (tokenizer = tok), got %s", who,
         type(tokenizer)), 4)
   end
   -- a token is at least one byte of text (a special token more), so this many hold the longest
   local tail = longest + 1
   local recent = {}
   for r = 1, rows do
      local p = prompts and prompts[r] or {}
      recent[r] = { unpack(p, math.max(1, #p - tail + 2)) }
   end
   return setmetatable({ strings = strings, tokenizer = tokenizer, ids = recent, tail = tail }, Stops)
end

--- hit(row, id) -> whether a stop string ends in the text of id, appended to the row.
function Stops:hit(row, id)
   local ids = self.ids[row]
   ids[#ids + 1] = id
   if #ids > self.tail then table.remove(ids, 1) end
   local text = self.tokenizer:decode(ids)
   local before = #self.tokenizer:decode({ unpack(ids, 1, #ids - 1) })   -- where id's text begins
   for _, s in ipairs(self.strings) do
      local from = math.max(1, before - #s + 2)                -- (an end past `before` starts here or later)
      local _, stop = text:find(s, from, true)
      if stop and stop > before then return true end
   end
   return false
end

return M
