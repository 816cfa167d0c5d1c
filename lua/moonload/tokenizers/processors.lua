--- Post-processors of tokenizer.json: the special tokens added around an encoded text (BOS,
-- [CLS] ... [SEP]) when encode's add_special_tokens is on. M.build returns function(ids) -> ids.
local components = require("moonload.tokenizers.components")
local M = {}

local BUILDERS = {}

function BUILDERS.TemplateProcessing(j, who)
   local specials = j.special_tokens or {}
   local items = {}
   for i, item in ipairs(j.single or {}) do
      if item.SpecialToken then
         local name = item.SpecialToken.id
         local sp = specials[name]
         if not sp or type(sp.ids) ~= "table" then
            error(string.format("%s: TemplateProcessing names special token %q without its ids", who, tostring(name)), 0)
         end
         items[i] = sp.ids
      elseif item.Sequence then
         if item.Sequence.id ~= "A" then
            error(string.format("%s: TemplateProcessing's single template uses sequence %q", who, tostring(item.Sequence.id)), 0)
         end
         items[i] = "A"
      else
         error(who .. ": TemplateProcessing has a template item that is neither SpecialToken nor Sequence", 0)
      end
   end
   return function(ids)
      local out = {}
      for _, item in ipairs(items) do
         local src = item == "A" and ids or item
         for _, id in ipairs(src) do out[#out + 1] = id end
      end
      return out
   end
end

-- [CLS] A [SEP] (BERT) and <s> A </s> (RoBERTa): cls and sep are [token, id] pairs.
local function around(j, who)
   local cls, sep = j.cls, j.sep
   if type(cls) ~= "table" or type(sep) ~= "table" then error(who .. ": the post-processor needs cls and sep", 0) end
   return function(ids)
      local out = { cls[2] }
      for _, id in ipairs(ids) do out[#out + 1] = id end
      out[#out + 1] = sep[2]
      return out
   end
end
BUILDERS.BertProcessing = around
BUILDERS.RobertaProcessing = around

function BUILDERS.ByteLevel() return function(ids) return ids end end

function BUILDERS.Sequence(j, who)
   local steps = {}
   for i, sub in ipairs(j.processors or {}) do steps[i] = M.build(sub, who) end
   return function(ids)
      for _, step in ipairs(steps) do ids = step(ids) end
      return ids
   end
end

--- The post-processor of a tokenizer.json object (nil: none).
function M.build(j, who)
   return components.build(BUILDERS, "post-processor", j, who, function(ids) return ids end)
end

return M
