--- The one way tokenizer.json components are built: its "type" picks a builder from a table of
-- them; a type not in the table is an error listing the supported ones; a missing component
-- (JSON null) is the given default.
local M = {}

--- builders: type name -> function(json, who) -> component; what: "normalizer", "decoder", ...
function M.build(builders, what, j, who, default)
   if j == nil then return default end
   local b = builders[j.type]
   if not b then
      local names = {}
      for k in pairs(builders) do names[#names + 1] = k end
      table.sort(names)
      error(string.format("%s: %s %q is not supported (supported: %s)", who, what, tostring(j.type),
         table.concat(names, ", ")), 0)
   end
   return b(j, who)
end

--- A memo of at most `limit` entries (word -> tokens), so a long text with a huge vocabulary of
-- words does not keep growing it. Words over 256 bytes are not kept: a pipeline that does not
-- split its text (SentencePiece's) hands the model whole texts, which would fill it with documents.
function M.memo(limit)
   local store, n = {}, 0
   return function(key) return store[key] end, function(key, value)
      if n < limit and #key <= 256 then store[key] = value; n = n + 1 end
      return value
   end
end

return M
