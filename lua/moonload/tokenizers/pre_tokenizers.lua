--- Pre-tokenizers of tokenizer.json: split normalized text into the pieces the model encodes one
-- by one. Each is built from its JSON object by M.build and is a function(pieces, ctx) ->
-- pieces, pieces being a list of UTF-8 strings; ctx.first is true for the segment that starts
-- the text (Metaspace's prepend_scheme "first").
--
-- The split regexes of byte-level BPE tokenizers (GPT-2's, Llama 3's, Qwen2's, Qwen3.5's, o200k's:
-- gpt-oss and GPT-4o) are matched by hand-written scanners that follow Oniguruma's leftmost-alternative
-- semantics for exactly those patterns; another regex is an error naming it.
local components = require("moonload.tokenizers.components")
local U = require("moonload.tokenizers.unicode")

local M = {}

local is_L, is_N, is_space = U.is_letter, U.is_number, U.is_whitespace

local function is_other(cp) return cp ~= nil and not is_space(cp) and not is_L(cp) and not is_N(cp) end
local function is_newline(cp) return cp == 10 or cp == 13 end

-- The contractions 's 't 're 've 'm 'll 'd at i (optionally any case): the end of the match or nil.
local function contraction(cps, i, any_case)
   if cps[i] ~= 39 then return nil end
   local a, b = cps[i + 1], cps[i + 2]
   if any_case then
      if a and a >= 65 and a <= 90 then a = a + 32 end
      if b and b >= 65 and b <= 90 then b = b + 32 end
   end
   if a == 115 or a == 116 or a == 109 or a == 100 then return i + 2 end          -- s t m d
   if (a == 114 and b == 101) or (a == 118 and b == 101) or (a == 108 and b == 108) then return i + 3 end   -- re ve ll
   return nil
end

local function run(cps, i, n, pred)
   while i <= n and pred(cps[i]) do i = i + 1 end
   return i
end

-- Whitespace alternatives shared by the patterns: \s+(?!\S) then \s+ at a whitespace run.
local function trailing_space(cps, i, n)
   local j = run(cps, i, n, is_space)
   if j > n or j - i == 1 then return j end     -- to the end of the text, or a single one
   return j - 1                                 -- leave the last one to prefix the next word
end

-- GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
local function gpt2_match(cps, i, n)
   local e = contraction(cps, i, false)
   if e then return e end
   local c, s = cps[i], cps[i] == 32 and i + 1 or i
   if s <= n and is_L(cps[s]) then return run(cps, s, n, is_L) end
   if s <= n and is_N(cps[s]) then return run(cps, s, n, is_N) end
   if s <= n and is_other(cps[s]) then return run(cps, s, n, is_other) end
   if is_space(c) then return trailing_space(cps, i, n) end
   return i + 1
end

-- The alternatives Llama 3's, Qwen2's and o200k's patterns end with, at i (no word matched there):
-- \p{N}{1,max_digits}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+. (o200k's
-- [\r\n/]* after punctuation is the same: the run before it has taken every slash.) other: the
-- punctuation class, is_other unless given (Qwen3.5's also leaves out marks).
local function digits_punct_space(cps, i, n, max_digits, other)
   other = other or is_other
   local c = cps[i]
   if is_N(c) then
      local j = i
      while j <= n and j - i < max_digits and is_N(cps[j]) do j = j + 1 end
      return j
   end
   local s = c == 32 and i + 1 or i
   if s <= n and other(cps[s]) then
      return run(cps, run(cps, s, n, other), n, is_newline)
   end
   if is_space(c) then
      local j = run(cps, i, n, is_space)
      for k = j - 1, i, -1 do              -- \s*[\r\n]+: through the run's last newline
         if is_newline(cps[k]) then return k + 1 end
      end
      return trailing_space(cps, i, n)
   end
   return i + 1
end

-- Llama 3 (max_digits 3) and Qwen2 (1):
-- (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,k}| ?[^\s\p{L}\p{N}]+[\r\n]*
-- |\s*[\r\n]+|\s+(?!\S)|\s+
local function llama3_matcher(max_digits)
   return function(cps, i, n)
      local e = contraction(cps, i, true)
      if e then return e end
      local c = cps[i]
      if is_L(c) then return run(cps, i, n, is_L) end
      if not is_newline(c) and not is_N(c) and i < n and is_L(cps[i + 1]) then return run(cps, i + 1, n, is_L) end
      return digits_punct_space(cps, i, n, max_digits)
   end
end

-- Qwen3.5: Qwen2's with combining marks among the letters of a word and out of punctuation:
-- (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*
-- |\s*[\r\n]+|\s+(?!\S)|\s+
-- (A mark may be the optional first character too; then the run from it is the same match.)
local function is_LM(cp) return cp ~= nil and (is_L(cp) or U.is_mark_nonspacing(cp) or U.is_mark_other(cp)) end
local function is_other_not_mark(cp) return is_other(cp) and not is_LM(cp) end
local function qwen3_5_match(cps, i, n)
   local e = contraction(cps, i, true)
   if e then return e end
   local c = cps[i]
   if is_LM(c) then return run(cps, i, n, is_LM) end
   if not is_newline(c) and not is_N(c) and i < n and is_LM(cps[i + 1]) then return run(cps, i + 1, n, is_LM) end
   return digits_punct_space(cps, i, n, 1, is_other_not_mark)
end

-- o200k (gpt-oss, GPT-4o):
-- [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|...)?
-- |[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|...)?
-- |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
-- Its word alternatives overlap (Lm, Lo and marks are in both classes), so they run on a small
-- backtracking matcher: each is a list of {class, min, max} runs, tried longest first.
local is_mark = function(cp) return cp ~= nil and (U.is_mark_nonspacing(cp) or U.is_mark_other(cp)) end
local function is_up(cp) return cp ~= nil and (U.is_letter_upper(cp) or is_mark(cp)) end
local function is_low(cp) return cp ~= nil and (U.is_letter_lower(cp) or is_mark(cp)) end
local function is_prefix(cp) return cp ~= nil and not is_newline(cp) and not is_L(cp) and not is_N(cp) end
local CONTRACTION = {}          -- an optional (?i:'s|'t|'re|'ve|'m|'ll|'d)

-- The end of seq[k..] matched at i (the first way found, longest runs first), or nil.
local function match_seq(seq, k, cps, i, n)
   local e = seq[k]
   if e == nil then return i end
   if e == CONTRACTION then
      local c = contraction(cps, i, true)
      return c and match_seq(seq, k + 1, cps, c, n) or match_seq(seq, k + 1, cps, i, n)
   end
   local pred, min, max = e[1], e[2], e[3]
   local j = i
   while j <= n and j - i < max and pred(cps[j]) do j = j + 1 end
   for stop = j, i + min, -1 do
      local r = match_seq(seq, k + 1, cps, stop, n)
      if r then return r end
   end
   return nil
end

local O200K_WORDS = {
   { { is_prefix, 0, 1 }, { is_up, 0, math.huge }, { is_low, 1, math.huge }, CONTRACTION },
   { { is_prefix, 0, 1 }, { is_up, 1, math.huge }, { is_low, 0, math.huge }, CONTRACTION },
}

local function o200k_match(cps, i, n)
   for _, seq in ipairs(O200K_WORDS) do
      local e = match_seq(seq, 1, cps, i, n)
      if e and e > i then return e end
   end
   return digits_punct_space(cps, i, n, 3)
end

local GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
local LLAMA3_BODY = "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
local REGEXES = {
   [GPT2] = gpt2_match,
   ["(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*" .. LLAMA3_BODY] =
      llama3_matcher(3),
   ["(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*" .. LLAMA3_BODY] =
      llama3_matcher(1),
   ["(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*"
      .. LLAMA3_BODY] = qwen3_5_match,
   ["[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
      .. "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
      .. "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*" .. LLAMA3_BODY] = o200k_match,
}

--- The match spans of a known regex over a piece: a list of {first, past_last} codepoint
-- indices covering the whole piece (these patterns match every character).
local function regex_spans(match, cps, n)
   local spans, i = {}, 1
   while i <= n do
      local j = match(cps, i, n)
      spans[#spans + 1] = { i, j }
      i = j
   end
   return spans
end

-- Pieces from spans marking matches, per tokenizers' SplitDelimiterBehavior: the text between
-- matches is always a piece of its own; a match is kept alone (isolated), dropped (removed),
-- glued to the piece before (merged_with_previous) or after (merged_with_next), or runs of
-- adjacent matches are kept together (contiguous).
local function split_pieces(cps, n, spans, behavior)
   local out, pos = {}, 1              -- pos: the first codepoint not emitted yet
   local function emit(a, b)
      if b > a then out[#out + 1] = U.encode(cps, a, b - 1) end
   end
   if behavior == "Isolated" then
      for _, sp in ipairs(spans) do emit(pos, sp[1]); emit(sp[1], sp[2]); pos = sp[2] end
   elseif behavior == "Removed" then
      for _, sp in ipairs(spans) do emit(pos, sp[1]); pos = sp[2] end
   elseif behavior == "MergedWithPrevious" then
      for _, sp in ipairs(spans) do emit(pos, sp[2]); pos = sp[2] end
   elseif behavior == "MergedWithNext" then
      for _, sp in ipairs(spans) do emit(pos, sp[1]); pos = sp[1] end   -- the match opens the next piece
   elseif behavior == "Contiguous" then
      local k = 1
      while k <= #spans do
         local a, b = spans[k][1], spans[k][2]
         while spans[k + 1] and spans[k + 1][1] == b do k = k + 1; b = spans[k][2] end
         emit(pos, a); emit(a, b); pos = b
         k = k + 1
      end
   else
      error(string.format("tokenizer: split behavior %q is not supported", tostring(behavior)), 0)
   end
   emit(pos, n + 1)
   return out
end

-- Literal occurrences of pattern (codepoints) in cps, left to right without overlap.
local function literal_spans(cps, n, pat)
   local spans, m, i = {}, #pat, 1
   if m == 0 then return spans end
   while i <= n - m + 1 do
      local hit = true
      for k = 1, m do if cps[i + k - 1] ~= pat[k] then hit = false break end end
      if hit then spans[#spans + 1] = { i, i + m }; i = i + m else i = i + 1 end
   end
   return spans
end

-- Occurrences of any of the literals (lists of codepoints) in cps, left to right without overlap;
-- at a position the first literal that matches wins, as in a regex alternation.
local function alternation_spans(cps, n, literals)
   local spans, i = {}, 1
   while i <= n do
      local width
      for _, pat in ipairs(literals) do
         local m, hit = #pat, i + #pat - 1 <= n
         for k = 1, hit and m or 0 do if cps[i + k - 1] ~= pat[k] then hit = false break end end
         if hit and m > 0 then width = m break end
      end
      if width then spans[#spans + 1] = { i, i + width }; i = i + width else i = i + 1 end
   end
   return spans
end

-- A regex that is only escaped literals joined by "|" (transformers isolates SentencePiece's
-- user-defined pieces with one) as its literals' codepoint lists, or nil.
local function literal_alternation(regex)
   local literals, cur, i = {}, {}, 1
   while i <= #regex do
      local c = regex:sub(i, i)
      if c == "\\" then
         local nxt = regex:sub(i + 1, i + 1)
         if nxt == "" or nxt:match("[%w]") then return nil end       -- (\s, \d, ...: a class, not a literal)
         cur[#cur + 1] = nxt
         i = i + 2
      elseif c == "|" then
         literals[#literals + 1] = U.codepoints(table.concat(cur))
         cur, i = {}, i + 1
      elseif c:match("[%^%$%(%)%.%[%]%*%+%?%{%}]") then
         return nil
      else
         cur[#cur + 1] = c
         i = i + 1
      end
   end
   literals[#literals + 1] = U.codepoints(table.concat(cur))
   return literals
end

-- Spans of maximal runs (or single characters) satisfying pred.
local function class_spans(cps, n, pred, single)
   local spans, i = {}, 1
   while i <= n do
      if pred(cps[i]) then
         local j = single and i + 1 or run(cps, i, n, pred)
         spans[#spans + 1] = { i, j }
         i = j
      else
         i = i + 1
      end
   end
   return spans
end

local function each_piece(pieces, fn)
   local out = {}
   for _, p in ipairs(pieces) do
      local cps, n = U.codepoints(p)
      for _, q in ipairs(fn(cps, n, p)) do out[#out + 1] = q end
   end
   return out
end

-- GPT-2's byte-to-character table: printable bytes stand for themselves, the others for
-- characters from U+0100 on, so every byte string is a printable string.
local BYTE_CHAR, CHAR_BYTE = {}, {}
do
   local n = 0
   for b = 0, 255 do
      local printable = (b >= 33 and b <= 126) or (b >= 161 and b <= 172) or (b >= 174 and b <= 255)
      local cp = printable and b or 256 + n
      if not printable then n = n + 1 end
      BYTE_CHAR[b] = U.char(cp)
      CHAR_BYTE[cp] = b
   end
end
M.BYTE_CHAR, M.CHAR_BYTE = BYTE_CHAR, CHAR_BYTE

--- A string's bytes as byte-level characters.
function M.bytes_to_chars(s)
   local out = {}
   for i = 1, #s do out[i] = BYTE_CHAR[s:byte(i)] end
   return table.concat(out)
end

local function is_bert_punctuation(cp)
   return (cp >= 33 and cp <= 47) or (cp >= 58 and cp <= 64) or (cp >= 91 and cp <= 96)
      or (cp >= 123 and cp <= 126) or U.is_punctuation(cp)
end

local BUILDERS = {}

function BUILDERS.ByteLevel(j)
   local prefix, use_regex = j.add_prefix_space == true, j.use_regex ~= false
   return function(pieces)
      local out = {}
      for _, p in ipairs(pieces) do
         if prefix and p:sub(1, 1) ~= " " then p = " " .. p end
         local parts = { p }
         if use_regex then
            local cps, n = U.codepoints(p)
            parts = split_pieces(cps, n, regex_spans(gpt2_match, cps, n), "Isolated")
         end
         for _, q in ipairs(parts) do out[#out + 1] = M.bytes_to_chars(q) end
      end
      return out
   end
end

function BUILDERS.Split(j, who)
   local behavior = j.behavior or "Isolated"
   local invert = j.invert == true
   local pattern = j.pattern or {}
   local spans_of
   if pattern.Regex then
      local match = REGEXES[pattern.Regex]
      local literals = not match and literal_alternation(pattern.Regex)
      if literals then
         spans_of = function(cps, n) return alternation_spans(cps, n, literals) end
      elseif not match then
         error(string.format("%s: the Split pre-tokenizer's regex %q is not supported (supported: the GPT-2, "
            .. "Llama 3, Qwen2 and o200k patterns, and alternations of literals)", who, pattern.Regex), 0)
      else
         spans_of = function(cps, n) return regex_spans(match, cps, n) end
      end
   elseif pattern.String then
      local pat = U.codepoints(pattern.String)
      spans_of = function(cps, n) return literal_spans(cps, n, pat) end
   else
      error(who .. ": a Split pre-tokenizer needs a String or Regex pattern", 0)
   end
   if invert then
      -- the pattern's matches are the pieces and the text between them the delimiters: removed,
      -- each match is a piece of its own (tokenizers keeps matches apart even when adjacent);
      -- isolated, every stretch is its own piece either way. (Transformers.js writes o200k's
      -- split so: Removed, inverted.)
      if behavior == "Removed" then
         return function(pieces)
            return each_piece(pieces, function(cps, n)
               local out = {}
               for _, sp in ipairs(spans_of(cps, n)) do out[#out + 1] = U.encode(cps, sp[1], sp[2] - 1) end
               return out
            end)
         end
      elseif behavior ~= "Isolated" then
         error(string.format("%s: inverted Split pre-tokenizers with behavior %q are not supported (Removed and Isolated are)",
            who, tostring(behavior)), 0)
      end
   end
   return function(pieces)
      return each_piece(pieces, function(cps, n) return split_pieces(cps, n, spans_of(cps, n), behavior) end)
   end
end

function BUILDERS.BertPreTokenizer()
   return function(pieces)
      return each_piece(pieces, function(cps, n)
         local words = split_pieces(cps, n, class_spans(cps, n, is_space), "Removed")
         return each_piece(words, function(c2, n2)
            return split_pieces(c2, n2, class_spans(c2, n2, is_bert_punctuation, true), "Isolated")
         end)
      end)
   end
end

function BUILDERS.WhitespaceSplit()
   return function(pieces)
      return each_piece(pieces, function(cps, n) return split_pieces(cps, n, class_spans(cps, n, is_space), "Removed") end)
   end
end

function BUILDERS.Digits(j)
   local single = j.individual_digits == true
   return function(pieces)
      return each_piece(pieces, function(cps, n) return split_pieces(cps, n, class_spans(cps, n, is_N, single), "Isolated") end)
   end
end

function BUILDERS.Metaspace(j)
   local rep = j.replacement or "\226\150\129"
   local scheme = j.prepend_scheme or (j.add_prefix_space == false and "never" or "always")
   local split = j.split ~= false
   local rep_cps = U.codepoints(rep)
   return function(pieces, ctx)
      local out = {}
      for k, p in ipairs(pieces) do
         if p == "" then goto continue end
         p = p:gsub(" ", rep)
         if (scheme == "always" or (scheme == "first" and ctx.first and k == 1)) and p:sub(1, #rep) ~= rep then
            p = rep .. p
         end
         if split then
            local cps, n = U.codepoints(p)
            for _, q in ipairs(split_pieces(cps, n, literal_spans(cps, n, rep_cps), "MergedWithNext")) do out[#out + 1] = q end
         else
            out[#out + 1] = p
         end
         ::continue::
      end
      return out
   end
end

function BUILDERS.Sequence(j, who)
   local steps = {}
   for i, sub in ipairs(j.pretokenizers or {}) do steps[i] = M.build(sub, who) end
   return function(pieces, ctx)
      for _, step in ipairs(steps) do pieces = step(pieces, ctx) end
      return pieces
   end
end

--- The pre-tokenizer of a tokenizer.json object (nil: the whole text is one piece).
function M.build(j, who)
   return components.build(BUILDERS, "pre-tokenizer", j, who, function(pieces) return pieces end)
end

M.split_pieces, M.regex_spans = split_pieces, regex_spans
M.REGEXES = REGEXES

return M
