--- Decoders of tokenizer.json: token strings back to text. M.build returns a function(tokens)
-- -> tokens (a decode chain step, as in tokenizers); the tokenizer joins the last result.
local components = require("moonload.tokenizers.components")
local U = require("moonload.tokenizers.unicode")
local P = require("moonload.tokenizers.pre_tokenizers")

local M = {}

local BUILDERS = {}

-- Byte-level characters back to bytes, then UTF-8 (malformed bytes become U+FFFD).
function BUILDERS.ByteLevel()
   return function(tokens)
      local bytes = {}
      for _, t in ipairs(tokens) do
         local cps, n = U.codepoints(t)
         for i = 1, n do
            local b = P.CHAR_BYTE[cps[i]]
            bytes[#bytes + 1] = b and string.char(b) or U.char(cps[i])
         end
      end
      return { U.lossy(table.concat(bytes)) }
   end
end

-- BERT's: continuation pieces glued to the word before, other tokens after a space, then the
-- per-token cleanup of spaces before punctuation and in contractions (tokenizers' order).
local CLEANUP = { { " .", "." }, { " ?", "?" }, { " !", "!" }, { " ,", "," }, { " ' ", "'" }, { " n't", "n't" },
   { " 'm", "'m" }, { " do not", " don't" }, { " 's", "'s" }, { " 've", "'ve" }, { " 're", "'re" } }

local function replace_all(s, from, to)
   local out, i = {}, 1
   while true do
      local a, b = s:find(from, i, true)
      if not a then break end
      out[#out + 1] = s:sub(i, a - 1)
      out[#out + 1] = to
      i = b + 1
   end
   out[#out + 1] = s:sub(i)
   return table.concat(out)
end

function BUILDERS.WordPiece(j)
   local prefix, cleanup = j.prefix or "##", j.cleanup ~= false
   return function(tokens)
      local out = {}
      for i, t in ipairs(tokens) do
         if i > 1 then
            if t:sub(1, #prefix) == prefix then t = t:sub(#prefix + 1) else t = " " .. t end
         end
         if cleanup then
            for _, r in ipairs(CLEANUP) do t = replace_all(t, r[1], r[2]) end
         end
         out[i] = t
      end
      return out
   end
end

function BUILDERS.Replace(j, who)
   local pat = j.pattern or {}
   if not pat.String then error(who .. ": only String patterns are supported in a Replace decoder", 0) end
   local from, to = pat.String, j.content or ""
   return function(tokens)
      local out = {}
      for i, t in ipairs(tokens) do out[i] = replace_all(t, from, to) end
      return out
   end
end

-- Runs of <0xXX> tokens become the text their bytes spell, or U+FFFD per byte when that is not
-- valid UTF-8.
function BUILDERS.ByteFallback()
   return function(tokens)
      local out, bytes = {}, {}
      local function flush()
         if #bytes == 0 then return end
         local s = table.concat(bytes)
         if pcall(U.codepoints, s) then out[#out + 1] = s
         else for _ = 1, #bytes do out[#out + 1] = "\239\191\189" end end
         bytes = {}
      end
      for _, t in ipairs(tokens) do
         local hex = #t == 6 and t:match("^<0x(%x%x)>$")
         if hex then bytes[#bytes + 1] = string.char(tonumber(hex, 16))
         else flush(); out[#out + 1] = t end
      end
      flush()
      return out
   end
end

function BUILDERS.Fuse()
   return function(tokens) return { table.concat(tokens) } end
end

-- Up to `start` leading and `stop` trailing occurrences of content removed from each token.
function BUILDERS.Strip(j)
   local c, start, stop = j.content or " ", j.start or 0, j["stop"] or 0
   return function(tokens)
      local out = {}
      for i, t in ipairs(tokens) do
         local a, b = 1, #t
         for _ = 1, start do if t:sub(a, a + #c - 1) == c then a = a + #c else break end end
         for _ = 1, stop do if b - #c + 1 >= a and t:sub(b - #c + 1, b) == c then b = b - #c else break end end
         out[i] = t:sub(a, b)
      end
      return out
   end
end

-- SentencePiece's word marker back to spaces; the first token loses the one prepended.
function BUILDERS.Metaspace(j)
   local rep = j.replacement or "\226\150\129"
   local scheme = j.prepend_scheme or (j.add_prefix_space == false and "never" or "always")
   return function(tokens)
      local out = {}
      for i, t in ipairs(tokens) do
         t = replace_all(t, rep, " ")
         if i == 1 and scheme ~= "never" and t:sub(1, 1) == " " then t = t:sub(2) end
         out[i] = t
      end
      return out
   end
end

function BUILDERS.BPEDecoder(j)
   local suffix = j.suffix or "</w>"
   return function(tokens)
      local out, n = {}, #tokens
      for i, t in ipairs(tokens) do out[i] = replace_all(t, suffix, i < n and " " or "") end
      return out
   end
end

function BUILDERS.Sequence(j, who)
   local steps = {}
   for i, sub in ipairs(j.decoders or {}) do steps[i] = M.build(sub, who) end
   return function(tokens)
      for _, step in ipairs(steps) do tokens = step(tokens) end
      return tokens
   end
end

--- The decoder of a tokenizer.json object (nil: tokens joined with spaces, as tokenizers does).
function M.build(j, who)
   return components.build(BUILDERS, "decoder", j, who, function(tokens) return { table.concat(tokens, " ") } end)
end

return M
