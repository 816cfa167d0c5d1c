--- SentencePiece's precompiled normalization (tokenizer.json's "Precompiled" normalizer: T5,
-- mT5, ALBERT, XLM-R, Pegasus, ... ship their spiece.model's nmt_nfkc rules this way).
-- The charsmap is base64 of [u32 trie size][a Darts double-array trie over UTF-8 bytes, u32
-- units][NUL-terminated replacement strings]; a trie hit's value is the offset of its replacement.
--
-- How the text is walked is tokenizers' (spm_precompiled), quirks included, as that decides the
-- ids: per grapheme cluster, a cluster shorter than 6 bytes whose bytes begin with a trie entry
-- is replaced whole by the shortest such entry's replacement; otherwise each character is
-- replaced by its own entry, or kept. The clusters follow UAX #29 where it matters here (marks,
-- joiners, emoji modifiers, CR LF, regional-indicator pairs, Hangul syllables); Prepend
-- characters are not joined to what follows.
local ffi = require("ffi")
local bit = require("bit")
local U = require("moonload.tokenizers.unicode")

local band, bor, bxor, rshift, lshift = bit.band, bit.bor, bit.bxor, bit.rshift, bit.lshift
local byte, sub = string.byte, string.sub

local M = {}

-- --- base64 ---------------------------------------------------------------------------------

local B64 = {}
do
   local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
   for i = 1, #alphabet do B64[byte(alphabet, i)] = i - 1 end
end

--- The bytes of a base64 string (padding optional; anything else outside the alphabet is an error).
function M.base64_decode(s, who)
   s = s:gsub("=+$", "")
   if #s % 4 == 1 then error(string.format("%s: the precompiled charsmap is not base64 (length %d)", who, #s), 0) end
   local out, acc, nbits = {}, 0, 0
   for i = 1, #s do
      local v = B64[byte(s, i)]
      if v == nil then
         error(string.format("%s: the precompiled charsmap is not base64 (byte %d)", who, i), 0)
      end
      acc, nbits = bor(lshift(band(acc, 0xFFFF), 6), v), nbits + 6
      if nbits >= 8 then
         nbits = nbits - 8
         out[#out + 1] = string.char(band(rshift(acc, nbits), 0xFF))
      end
   end
   return table.concat(out)
end

--- The base64 of bytes s (padded), as tokenizer.json stores a charsmap.
function M.base64_encode(s)
   local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
   local out = {}
   for i = 1, #s, 3 do
      local a, b, c = byte(s, i, i + 2)
      local n = lshift(a, 16) + lshift(b or 0, 8) + (c or 0)
      local k = #out
      for j = 1, 4 do
         local v = band(rshift(n, 24 - 6 * j), 63) + 1
         out[k + j] = sub(alphabet, v, v)
      end
      if c == nil then out[k + 4] = "=" end
      if b == nil then out[k + 3] = "=" end
   end
   return table.concat(out)
end

-- --- the double-array trie ------------------------------------------------------------------

local function has_leaf(unit) return band(rshift(unit, 8), 1) == 1 end
local function value(unit) return band(unit, 0x7FFFFFFF) end
local function label(unit) return band(unit, 0x800000FF) end
local function offset(unit) return lshift(rshift(unit, 10), rshift(band(unit, 0x200), 6)) end

--- The replacement for the bytes s[i..j], when a prefix of them is in the trie: the shortest.
local function transform(self, s, i, j)
   local units, n = self.units, self.n_units
   local pos = offset(units[0])
   for k = i, j do
      local c = byte(s, k)
      if c == 0 then return nil end
      pos = bxor(pos, c)
      if pos < 0 or pos >= n then return nil end
      local unit = units[pos]
      if label(unit) ~= c then return nil end
      pos = bxor(pos, offset(unit))
      if pos < 0 or pos >= n then return nil end
      if has_leaf(unit) then
         local start = value(units[pos]) + 1
         local stop = self.normalized:find("\0", start, true)
         return sub(self.normalized, start, (stop or #self.normalized + 1) - 1)
      end
   end
   return nil
end

--- The longest prefix of s[i..] in the trie: its replacement and byte length, or nil.
local function longest_prefix(self, s, i)
   local units, n = self.units, self.n_units
   local pos = offset(units[0])
   local best, best_len
   for k = i, #s do
      local c = byte(s, k)
      if c == 0 then break end
      pos = bxor(pos, c)
      if pos < 0 or pos >= n then break end
      local unit = units[pos]
      if label(unit) ~= c then break end
      pos = bxor(pos, offset(unit))
      if pos < 0 or pos >= n then break end
      if has_leaf(unit) then
         local start = value(units[pos]) + 1
         local stop = self.normalized:find("\0", start, true)
         best, best_len = sub(self.normalized, start, (stop or #self.normalized + 1) - 1), k - i + 1
      end
   end
   return best, best_len
end

-- SentencePiece's own walk (normalizer.cc, NormalizePrefix): at each position the longest trie
-- entry is replaced, else one character is kept (a byte that starts no UTF-8 character becomes
-- U+FFFD; encode has checked the text is UTF-8 by then). Kept characters are copied in runs.
local function sentencepiece_walk(self, text)
   local out, n, i, len = {}, 0, 1, #text
   local run                                       -- the first byte of the run being kept, or nil
   while i <= len do
      local rep, m = longest_prefix(self, text, i)
      if rep then
         if run then n = n + 1; out[n] = sub(text, run, i - 1); run = nil end
         n = n + 1; out[n] = rep
         i = i + m
      else
         local c = byte(text, i)
         local w = c < 0x80 and 1 or c >= 0xF0 and c < 0xF8 and 4 or c >= 0xE0 and c < 0xF0 and 3 or c >= 0xC2 and c < 0xE0 and 2 or 0
         local ok = w > 0 and i + w - 1 <= len
         for k = 1, ok and w - 1 or 0 do
            local b = byte(text, i + k)
            if b < 0x80 or b > 0xBF then ok = false break end
         end
         if ok then
            run = run or i
            i = i + w
         else
            if run then n = n + 1; out[n] = sub(text, run, i - 1); run = nil end
            n = n + 1; out[n] = "\239\191\189"
            i = i + 1
         end
      end
   end
   if run then n = n + 1; out[n] = sub(text, run, len) end
   return table.concat(out)
end

-- --- grapheme clusters ----------------------------------------------------------------------

local is_mark = function(cp) return U.is_mark_nonspacing(cp) or U.is_mark_other(cp) end

-- Grapheme_Extend and SpacingMark: marks, joiners, skin tones, emoji tags, and the letters
-- Unicode lists as extending (halfwidth kana voicing marks, Hangul tone marks)
local function is_extend(cp)
   return is_mark(cp) or cp == 0x200C or cp == 0x200D or (cp >= 0x1F3FB and cp <= 0x1F3FF)
      or (cp >= 0xE0020 and cp <= 0xE007F) or cp == 0xFF9E or cp == 0xFF9F or cp == 0x302E or cp == 0x302F
end

local function is_control(cp)
   return cp == 0x2028 or cp == 0x2029 or (U.is_control_category(cp) and cp ~= 0x200C and cp ~= 0x200D)
end

local function is_pictographic(cp)
   return cp == 0xA9 or cp == 0xAE or cp == 0x203C or cp == 0x2049 or cp == 0x2122 or cp == 0x2139
      or (cp >= 0x2194 and cp <= 0x21AA) or (cp >= 0x231A and cp <= 0x23FF) or (cp >= 0x25AA and cp <= 0x27BF)
      or (cp >= 0x2934 and cp <= 0x2935) or (cp >= 0x2B05 and cp <= 0x2B55) or cp == 0x3030 or cp == 0x303D
      or cp == 0x3297 or cp == 0x3299 or (cp >= 0x1F000 and cp <= 0x1FAFF and not (cp >= 0x1F1E6 and cp <= 0x1F1FF))
end

local function is_regional(cp) return cp >= 0x1F1E6 and cp <= 0x1F1FF end

-- Hangul syllable types: L, V, T jamo; LV and LVT syllables.
local function hangul(cp)
   if cp >= 0x1100 and cp <= 0x115F or cp >= 0xA960 and cp <= 0xA97C then return "L" end
   if cp >= 0x1160 and cp <= 0x11A7 or cp >= 0xD7B0 and cp <= 0xD7C6 then return "V" end
   if cp >= 0x11A8 and cp <= 0x11FF or cp >= 0xD7CB and cp <= 0xD7FB then return "T" end
   if cp >= 0xAC00 and cp <= 0xD7A3 then return (cp - 0xAC00) % 28 == 0 and "LV" or "LVT" end
end

local HANGUL_JOINS = { L = { L = true, V = true, LV = true, LVT = true }, LV = { V = true, T = true },
   V = { V = true, T = true }, LVT = { T = true }, T = { T = true } }

--- Whether a cluster ending in cps[i - 1] continues with cps[i] (no break between them).
local function joins(cps, i, first)
   local a, b = cps[i - 1], cps[i]
   if a == 13 then return b == 10 end
   if is_control(a) or is_control(b) then return false end
   if is_extend(b) then return true end
   local ha, hb = hangul(a), hangul(b)
   if ha and hb then return HANGUL_JOINS[ha][hb] == true end
   if a == 0x200D and is_pictographic(b) then                  -- emoji ZWJ sequences
      for k = i - 2, first, -1 do
         if not is_extend(cps[k]) then return is_pictographic(cps[k]) end
      end
      return false
   end
   if is_regional(a) and is_regional(b) then                   -- flags: regional indicators in pairs
      local run = 0
      for k = i - 1, first, -1 do
         if is_regional(cps[k]) then run = run + 1 else break end
      end
      return run % 2 == 1
   end
   return false
end

-- --- the normalizer -------------------------------------------------------------------------

--- new(charsmap_base64, who[, walk]) -> function(text) -> text. walk "sentencepiece": the
-- sentencepiece library's longest-match walk instead of tokenizers' per-cluster one (the two
-- differ where a rule spans a cluster of 6 bytes or more, as halfwidth kana with voicing marks).
function M.new(charsmap, who, walk)
   if type(charsmap) ~= "string" then
      error(who .. ': the Precompiled normalizer has no "precompiled_charsmap" string', 0)
   end
   local blob = M.base64_decode(charsmap, who)
   if #blob < 4 then error(who .. ": the precompiled charsmap is shorter than its header", 0) end
   local b1, b2, b3, b4 = byte(blob, 1, 4)
   local trie_size = b1 + b2 * 256 + b3 * 65536 + b4 * 16777216
   if trie_size % 4 ~= 0 or 4 + trie_size > #blob or trie_size == 0 then
      error(string.format("%s: the precompiled charsmap's trie size %d does not fit its %d bytes", who, trie_size, #blob), 0)
   end
   local n = trie_size / 4
   local units = ffi.new("uint32_t[?]", n)
   ffi.copy(units, sub(blob, 5, 4 + trie_size), trie_size)     -- (little-endian, as x86 and ARM are)
   local self = { units = units, n_units = n, normalized = sub(blob, 5 + trie_size), keep = units }
   if walk == "sentencepiece" then return function(text) return sentencepiece_walk(self, text) end end
   return function(text)
      local cps, count = U.codepoints(text)
      local out, i = {}, 1
      -- byte offsets of each codepoint, to cut clusters out of text as they are
      local at, pos = {}, 1
      for k = 1, count do
         at[k] = pos
         local cp = cps[k]
         pos = pos + (cp < 0x80 and 1 or cp < 0x800 and 2 or cp < 0x10000 and 3 or 4)
      end
      at[count + 1] = pos
      while i <= count do
         local j = i + 1
         while j <= count and joins(cps, j, i) do j = j + 1 end
         local from, to = at[i], at[j] - 1
         local whole = to - from + 1 < 6 and transform(self, text, from, to)
         if whole then
            out[#out + 1] = whole
         else
            for k = i, j - 1 do
               local a, b = at[k], at[k + 1] - 1
               out[#out + 1] = transform(self, text, a, b) or sub(text, a, b)
            end
         end
         i = j
      end
      return table.concat(out)
   end
end

return M
