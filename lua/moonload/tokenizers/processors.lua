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

-- --- pairs (a cross-encoder's query and passage) ------------------------------------------------
-- Each builder gives function(a, b) -> ids, type_ids: both sequences and the special tokens around
-- them, with each id's token type, as the tokenizers library joins a pair.

local function concat(parts)
   local ids, types = {}, {}
   for _, part in ipairs(parts) do
      for _, id in ipairs(part[1]) do ids[#ids + 1] = id; types[#types + 1] = part[2] end
   end
   return ids, types
end

local PAIR = {}

function PAIR.TemplateProcessing(j, who)
   if type(j.pair) ~= "table" or #j.pair == 0 then
      error(who .. ": TemplateProcessing has no pair template", 0)
   end
   local specials, items = j.special_tokens or {}, {}
   for i, item in ipairs(j.pair) do
      if item.SpecialToken then
         local sp = specials[item.SpecialToken.id]
         if not sp or type(sp.ids) ~= "table" then
            error(string.format("%s: TemplateProcessing names special token %q without its ids", who, tostring(item.SpecialToken.id)), 0)
         end
         items[i] = { ids = sp.ids, type_id = item.SpecialToken.type_id or 0 }
      elseif item.Sequence and (item.Sequence.id == "A" or item.Sequence.id == "B") then
         items[i] = { seq = item.Sequence.id, type_id = item.Sequence.type_id or 0 }
      else
         error(who .. ": TemplateProcessing's pair template has an item that is neither SpecialToken nor Sequence A or B", 0)
      end
   end
   return function(a, b)
      local parts = {}
      for i, item in ipairs(items) do
         parts[i] = { item.seq == "A" and a or item.seq == "B" and b or item.ids, item.type_id }
      end
      return concat(parts)
   end
end

-- [CLS] A [SEP] B [SEP], B's part of type 1 (BERT); <s> A </s> </s> B </s>, all of type 0 (RoBERTa,
-- whose models have one token type)
local function around_pair(doubled, second_type)
   return function(j, who)
      local cls, sep = j.cls, j.sep
      if type(cls) ~= "table" or type(sep) ~= "table" then error(who .. ": the post-processor needs cls and sep", 0) end
      return function(a, b)
         local parts = { { { cls[2] }, 0 }, { a, 0 }, { { sep[2] }, 0 } }
         if doubled then parts[#parts + 1] = { { sep[2] }, second_type } end
         parts[#parts + 1] = { b, second_type }
         parts[#parts + 1] = { { sep[2] }, second_type }
         return concat(parts)
      end
   end
end
PAIR.BertProcessing = around_pair(false, 1)
PAIR.RobertaProcessing = around_pair(true, 0)

local function juxtapose(a, b) return concat({ { a, 0 }, { b, 1 } }) end
function PAIR.ByteLevel() return juxtapose end

-- Steps that only adjust offsets (ByteLevel) leave the pair as it is; one step joins it.
function PAIR.Sequence(j, who)
   local join
   for _, sub in ipairs(j.processors or {}) do
      if sub.type ~= "ByteLevel" then
         if join then error(who .. ": a Sequence post-processor with two steps that join a pair is not supported", 0) end
         join = M.build_pair(sub, who)
      end
   end
   return join or juxtapose
end

--- The pair form of a tokenizer.json post-processor: function(a, b) -> ids, type_ids (nil j: the
-- two sequences one after the other, the second of type 1).
function M.build_pair(j, who)
   return components.build(PAIR, "post-processor", j, who, juxtapose)
end

return M
