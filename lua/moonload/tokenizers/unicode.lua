--- Unicode for the tokenizers: UTF-8 to codepoints and back, the character classes their
-- regexes and normalizers test (letter, number, punctuation, whitespace, control), lowercase,
-- accent stripping (NFD without nonspacing marks) and canonical composition (NFC).
-- The tables come from tools/gen_unicode_tables.py (unicode_data.lua).
local data = require("moonload.tokenizers.unicode_data")
local bit = require("bit")

local M = {}

local band, bor, rshift, lshift = bit.band, bit.bor, bit.rshift, bit.lshift
local char = string.char

--- The codepoints of a UTF-8 string as an array (and its length). Raises an error naming the
-- byte offset of the first malformed sequence.
function M.codepoints(s, who)
   local cps, n, i, len = {}, 0, 1, #s
   local byte = string.byte
   while i <= len do
      local c = byte(s, i)
      local cp, extra
      if c < 0x80 then cp, extra = c, 0
      elseif c >= 0xC2 and c < 0xE0 then cp, extra = band(c, 0x1F), 1
      elseif c >= 0xE0 and c < 0xF0 then cp, extra = band(c, 0x0F), 2
      elseif c >= 0xF0 and c < 0xF5 then cp, extra = band(c, 0x07), 3
      else cp = nil end
      if cp and i + extra <= len then
         for k = 1, extra do
            local b = byte(s, i + k)
            if band(b, 0xC0) ~= 0x80 then cp = nil break end
            cp = bor(lshift(cp, 6), band(b, 0x3F))
         end
      else
         cp = nil
      end
      if cp and ((extra == 2 and (cp < 0x800 or (cp >= 0xD800 and cp <= 0xDFFF))) or (extra == 3 and (cp < 0x10000 or cp > 0x10FFFF))) then
         cp = nil
      end
      if not cp then
         error(string.format("%s: text is not valid UTF-8 (byte %d)", who or "tokenizer", i), 3)
      end
      n = n + 1
      cps[n] = cp
      i = i + extra + 1
   end
   return cps, n
end

--- The UTF-8 encoding of one codepoint.
function M.char(cp)
   if cp < 0x80 then return char(cp) end
   if cp < 0x800 then return char(bor(0xC0, rshift(cp, 6)), bor(0x80, band(cp, 0x3F))) end
   if cp < 0x10000 then
      return char(bor(0xE0, rshift(cp, 12)), bor(0x80, band(rshift(cp, 6), 0x3F)), bor(0x80, band(cp, 0x3F)))
   end
   return char(bor(0xF0, rshift(cp, 18)), bor(0x80, band(rshift(cp, 12), 0x3F)),
      bor(0x80, band(rshift(cp, 6), 0x3F)), bor(0x80, band(cp, 0x3F)))
end

--- UTF-8 of cps[i .. j] (whole array by default).
function M.encode(cps, i, j)
   local parts = {}
   for k = i or 1, j or #cps do parts[#parts + 1] = M.char(cps[k]) end
   return table.concat(parts)
end

--- A UTF-8 string from raw bytes where each maximal malformed subsequence becomes one U+FFFD
-- (Rust's String::from_utf8_lossy, which tokenizers' byte-level decoder uses; the Unicode
-- standard's "maximal subpart" practice).
function M.lossy(s)
   if pcall(M.codepoints, s) then return s end
   local out, i, len, byte = {}, 1, #s, string.byte
   while i <= len do
      local c = byte(s, i)
      local need, lo, hi = 0, 0x80, 0xBF
      if c >= 0xC2 and c <= 0xDF then need = 1
      elseif c == 0xE0 then need, lo = 2, 0xA0
      elseif c == 0xED then need, hi = 2, 0x9F
      elseif c >= 0xE1 and c <= 0xEF then need = 2
      elseif c == 0xF0 then need, lo = 3, 0x90
      elseif c == 0xF4 then need, hi = 3, 0x8F
      elseif c >= 0xF1 and c <= 0xF3 then need = 3
      elseif c >= 0x80 then need = -1 end                       -- not a lead byte
      if need == 0 then
         out[#out + 1] = string.char(c)
         i = i + 1
      elseif need < 0 then
         out[#out + 1] = "\239\191\189"
         i = i + 1
      else
         local j, ok = i + 1, true
         for k = 1, need do
            local b = byte(s, j)
            local a, z = k == 1 and lo or 0x80, k == 1 and hi or 0xBF
            if b and b >= a and b <= z then j = j + 1 else ok = false break end
         end
         out[#out + 1] = ok and s:sub(i, j - 1) or "\239\191\189"
         i = j
      end
   end
   return table.concat(out)
end

-- Membership in sorted flat range lists {first1, last1, first2, last2, ...}; ASCII from a table.
local function range_test(ranges)
   local n = #ranges / 2
   local ascii = {}
   for cp = 0, 127 do
      local hit = false
      for k = 1, #ranges, 2 do if cp >= ranges[k] and cp <= ranges[k + 1] then hit = true break end end
      ascii[cp] = hit
   end
   return function(cp)
      if cp < 128 then return ascii[cp] end
      local lo, hi = 1, n
      while lo <= hi do
         local mid = rshift(lo + hi, 1)
         local a, b = ranges[2 * mid - 1], ranges[2 * mid]
         if cp < a then hi = mid - 1 elseif cp > b then lo = mid + 1 else return true end
      end
      return false
   end
end

M.is_letter = range_test(data.letter)              -- \p{L}
M.is_number = range_test(data.number)              -- \p{N}
M.is_punctuation = range_test(data.punctuation)    -- \p{P}
M.is_mark_nonspacing = range_test(data.mark_nonspacing)
M.is_mark_other = range_test(data.mark_other)          -- Mc, Me
M.is_letter_upper = range_test(data.letter_upper)      -- Lu, Lt, Lm, Lo
M.is_letter_lower = range_test(data.letter_lower)      -- Ll, Lm, Lo
local is_control_category = range_test(data.control)
--- Categories Cc, Cf, Cn and Co, tab, newline and carriage return included.
M.is_control_category = is_control_category

-- White_Space: what Oniguruma's \s and Rust's char::is_whitespace match.
local WHITE = { [9] = true, [10] = true, [11] = true, [12] = true, [13] = true, [32] = true, [0x85] = true,
   [0xA0] = true, [0x1680] = true, [0x2028] = true, [0x2029] = true, [0x202F] = true, [0x205F] = true,
   [0x3000] = true }
for cp = 0x2000, 0x200A do WHITE[cp] = true end
function M.is_whitespace(cp) return WHITE[cp] == true end

--- BERT's control characters: categories Cc, Cf, Cn, Co, except tab, newline and carriage return.
function M.is_control(cp)
   if cp == 9 or cp == 10 or cp == 13 then return false end
   return is_control_category(cp)
end

--- The lowercase of a codepoint, as a UTF-8 string (Unicode's full mapping).
function M.lower(cp)
   return data.lower[cp] or M.char(cp)
end

-- Hangul syllables: decomposed and composed by formula (Unicode 3.12).
local S_BASE, L_BASE, V_BASE, T_BASE, N_COUNT, T_COUNT, S_COUNT = 0xAC00, 0x1100, 0x1161, 0x11A7, 588, 28, 11172

--- A codepoint's canonical decomposition with its nonspacing marks removed (UTF-8), as NFD then
-- dropping category Mn does; nil when nothing changes.
function M.strip_accents(cp)
   if cp >= S_BASE and cp < S_BASE + S_COUNT then
      local s = cp - S_BASE
      local l, v, t = L_BASE + math.floor(s / N_COUNT), V_BASE + math.floor((s % N_COUNT) / T_COUNT), T_BASE + s % T_COUNT
      return M.char(l) .. M.char(v) .. (t ~= T_BASE and M.char(t) or "")
   end
   if M.is_mark_nonspacing(cp) then return "" end
   return data.strip[cp]
end

--- NFC of a codepoint array: each character composed with the one before when Unicode has a
-- precomposed form (Hangul by formula). Text that arrives composed, as nearly all does, is
-- unchanged; combining marks in a non-canonical order are not reordered first.
function M.compose(cps, n)
   local out, m = {}, 0
   for i = 1, n do
      local cp = cps[i]
      local prev = out[m]
      local done = false
      if prev then
         if prev >= L_BASE and prev < L_BASE + 19 and cp >= V_BASE and cp < V_BASE + 21 then
            out[m] = S_BASE + ((prev - L_BASE) * 21 + (cp - V_BASE)) * T_COUNT
            done = true
         elseif prev >= S_BASE and prev < S_BASE + S_COUNT and (prev - S_BASE) % T_COUNT == 0
            and cp > T_BASE and cp < T_BASE + T_COUNT then
            out[m] = prev + (cp - T_BASE)
            done = true
         else
            local c = data.compose[prev .. " " .. cp]
            if c then out[m] = c; done = true end
         end
      end
      if not done then m = m + 1; out[m] = cp end
   end
   return out, m
end

--- The byte offsets where each UTF-8 character of s starts, and #s + 1 (no validation).
function M.char_starts(s)
   local out = {}
   for i = 1, #s do
      local b = s:byte(i)
      if b < 0x80 or b >= 0xC0 then out[#out + 1] = i end
   end
   out[#out + 1] = #s + 1
   return out
end

return M
