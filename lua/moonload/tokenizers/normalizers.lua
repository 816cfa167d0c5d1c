--- Normalizers of tokenizer.json: text -> text before pre-tokenization. M.build turns a JSON
-- object into a function(text) -> text.
local components = require("moonload.tokenizers.components")
local U = require("moonload.tokenizers.unicode")

local M = {}

-- CJK ideographs BERT surrounds with spaces (tokenizers' is_chinese_char).
local function is_chinese(cp)
   return (cp >= 0x4E00 and cp <= 0x9FFF) or (cp >= 0x3400 and cp <= 0x4DBF) or (cp >= 0x20000 and cp <= 0x2A6DF)
      or (cp >= 0x2A700 and cp <= 0x2B73F) or (cp >= 0x2B740 and cp <= 0x2B81F) or (cp >= 0x2B920 and cp <= 0x2CEAF)
      or (cp >= 0xF900 and cp <= 0xFAFF) or (cp >= 0x2F800 and cp <= 0x2FA1F)
end

local function lowercase(text)
   local cps, n = U.codepoints(text)
   local out = {}
   for i = 1, n do out[i] = U.lower(cps[i]) end
   return table.concat(out)
end

local function strip_accents(text)
   local cps, n = U.codepoints(text)
   local out = {}
   for i = 1, n do out[i] = U.strip_accents(cps[i]) or U.char(cps[i]) end
   return table.concat(out)
end

local BUILDERS = {}

-- BERT: drop control characters and U+FFFD, whitespace to spaces, spaces around CJK ideographs,
-- then accents stripped (NFD without nonspacing marks) and lowercase; strip_accents null follows
-- lowercase, as in tokenizers.
function BUILDERS.BertNormalizer(j)
   local clean = j.clean_text ~= false
   local chinese = j.handle_chinese_chars ~= false
   local lower = j.lowercase ~= false
   local strip = j.strip_accents
   if strip == nil then strip = lower end
   return function(text)
      local cps, n = U.codepoints(text)
      local out = {}
      for i = 1, n do
         local cp = cps[i]
         if clean and (cp == 0 or cp == 0xFFFD or U.is_control(cp)) then
            -- dropped
         elseif clean and U.is_whitespace(cp) then
            out[#out + 1] = " "
         elseif chinese and is_chinese(cp) then
            out[#out + 1] = " " .. U.char(cp) .. " "
         else
            out[#out + 1] = U.char(cp)
         end
      end
      text = table.concat(out)
      if strip then text = strip_accents(text) end
      if lower then text = lowercase(text) end
      return text
   end
end

function BUILDERS.Lowercase() return lowercase end
function BUILDERS.StripAccents() return strip_accents end

function BUILDERS.NFC()
   return function(text)
      local cps, n = U.codepoints(text)
      local composed, m = U.compose(cps, n)
      return U.encode(composed, 1, m)
   end
end

function BUILDERS.Prepend(j)
   local p = j.prepend or ""
   return function(text) return text == "" and text or p .. text end
end

-- The regexes Replace normalizers use in the hub's files and in the pipelines built from
-- SentencePiece models (tokenizers/sentencepiece.lua), as functions(text, replacement): runs of two
-- or more spaces (XLM-R's, ALBERT's), spaces at either end, a U+2581 at the start.
local REPLACE_REGEXES = {
   [" {2,}"] = function(text, repl) return (text:gsub("  +", repl)) end,
   ["\\A +| +\\z"] = function(text, repl) return (text:gsub("^ +", repl):gsub(" +$", repl)) end,
   ["\\A\226\150\129"] = function(text, repl) return (text:gsub("^\226\150\129", repl)) end,
}

function BUILDERS.Replace(j, who)
   local pat = j.pattern or {}
   local to = j.content or ""
   local repl = to:gsub("%%", "%%%%")
   if pat.Regex then
      local replace = REPLACE_REGEXES[pat.Regex]
      if not replace then
         local known = {}
         for k in pairs(REPLACE_REGEXES) do known[#known + 1] = string.format("%q", k) end
         table.sort(known)
         error(string.format("%s: the Replace normalizer's regex %q is not supported (supported: %s)", who, pat.Regex,
            table.concat(known, ", ")), 0)
      end
      return function(text) return replace(text, repl) end
   end
   if not pat.String then error(who .. ": a Replace normalizer needs a String or Regex pattern", 0) end
   local escaped = pat.String:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")
   return function(text) return (text:gsub(escaped, repl)) end
end

function BUILDERS.Strip(j)
   local left, right = j.strip_left ~= false, j.strip_right ~= false
   return function(text)
      local cps, n = U.codepoints(text)
      local a, b = 1, n
      if left then while a <= b and U.is_whitespace(cps[a]) do a = a + 1 end end
      if right then while b >= a and U.is_whitespace(cps[b]) do b = b - 1 end end
      return U.encode(cps, a, b)
   end
end

-- SentencePiece's nmt_nfkc and other rules compiled into a trie (tokenizers/precompiled.lua)
-- (walk: moonload's own key, "sentencepiece" in pipelines built from a SentencePiece model file)
function BUILDERS.Precompiled(j, who) return require("moonload.tokenizers.precompiled").new(j.precompiled_charsmap, who, j.walk) end

function BUILDERS.Sequence(j, who)
   local steps = {}
   for i, sub in ipairs(j.normalizers or {}) do steps[i] = M.build(sub, who) end
   return function(text)
      for _, step in ipairs(steps) do text = step(text) end
      return text
   end
end

--- The normalizer of a tokenizer.json object (nil: none).
function M.build(j, who)
   return components.build(BUILDERS, "normalizer", j, who, function(text) return text end)
end

return M
