--- generate's stop_strings (transformers' StopStringCriteria): a row's generation ends with the
-- token that completes one of the strings in the text of its new tokens (the string stays in
-- the output, as in transformers). The text comes from the tokenizer given beside them; each step
-- decodes only the last tokens of a row, enough to hold the longest string.
local M = {}

local Stops = {}
Stops.__index = Stops

--- new(strings, tokenizer, rows, who) -> a checker for `rows` rows; strings: a string or a list of
-- them. Errors (at the caller's caller's level) name a missing tokenizer or a bad string.
function M.new(strings, tokenizer, rows, who)
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
   local new_ids = {}
   for r = 1, rows do new_ids[r] = {} end
   -- a token is at least one byte of text (a special token more), so this many hold the longest
   return setmetatable({ strings = strings, tokenizer = tokenizer, ids = new_ids, tail = longest + 1 }, Stops)
end

--- hit(row, id) -> whether the row's new text, with id appended, now holds a stop string.
function Stops:hit(row, id)
   local ids = self.ids[row]
   ids[#ids + 1] = id
   local tail = { unpack(ids, math.max(1, #ids - self.tail + 1)) }
   local text = self.tokenizer:decode(tail)
   for _, s in ipairs(self.strings) do
      if text:find(s, 1, true) then return true end
   end
   return false
end

return M
