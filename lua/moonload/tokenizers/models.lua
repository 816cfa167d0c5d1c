--- Tokenizer models of tokenizer.json: BPE (byte-level as in GPT-2, Llama 3 and Qwen, or
-- SentencePiece-style with byte fallback as in Llama 2 and Mistral), WordPiece (BERT) and
-- Unigram (T5, ALBERT, XLM-R). M.build returns {tokenize = function(piece) -> list of token
-- strings, vocab = token -> id, unk = the unknown token or nil, unk_id = the id of token strings
-- not in vocab (Unigram's unknown text) or nil}.
local U = require("moonload.tokenizers.unicode")
local components = require("moonload.tokenizers.components")

local M = {}

local function utf8_chars(s)
   local out, i, n = {}, 1, #s
   while i <= n do
      local c = s:byte(i)
      local len = c < 0x80 and 1 or c < 0xE0 and 2 or c < 0xF0 and 3 or 4
      out[#out + 1] = s:sub(i, i + len - 1)
      i = i + len
   end
   return out
end

-- --- BPE --------------------------------------------------------------------------------------

-- A binary min-heap of candidate merges ordered by rank, then position (the leftmost first).
local function heap_push(h, rank, pos, left, right)
   local e = { rank, pos, left, right }
   local i = #h + 1
   h[i] = e
   while i > 1 do
      local p = math.floor(i / 2)
      local a = h[p]
      if a[1] < rank or (a[1] == rank and a[2] < pos) then break end
      h[p], h[i] = e, a
      i = p
   end
end

local function heap_pop(h)
   local top, last = h[1], h[#h]
   h[#h] = nil
   local n = #h
   if n > 0 then
      h[1] = last
      local i = 1
      while true do
         local l, r, m = 2 * i, 2 * i + 1, i
         local function less(x, y) return x[1] < y[1] or (x[1] == y[1] and x[2] < y[2]) end
         if l <= n and less(h[l], h[m]) then m = l end
         if r <= n and less(h[r], h[m]) then m = r end
         if m == i then break end
         h[i], h[m] = h[m], h[i]
         i = m
      end
   end
   return top
end

local function build_bpe(j, who)
   -- (transformers 5 writes empty strings for "none")
   local function set(v) return type(v) == "string" and v ~= "" end
   if set(j.continuing_subword_prefix) or set(j.end_of_word_suffix) then
      error(who .. ": BPE with continuing_subword_prefix or end_of_word_suffix is not supported", 0)
   end
   local vocab = j.vocab or {}
   local ranks = {}
   for rank, m in ipairs(j.merges or {}) do
      local a, b
      if type(m) == "table" then a, b = m[1], m[2]
      else a, b = m:match("^(%S+) (%S+)$") end
      if not a or not b then
         error(string.format("%s: BPE merge %d is malformed: %s", who, rank, type(m) == "table" and "a list" or tostring(m)), 0)
      end
      if vocab[a .. b] == nil then
         error(string.format("%s: BPE merge %d (%q + %q) makes a token missing from the vocabulary", who, rank, a, b), 0)
      end
      ranks[a .. "\0" .. b] = ranks[a .. "\0" .. b] or rank
   end
   local unk = j.unk_token
   local byte_fallback, fuse_unk, ignore_merges = j.byte_fallback == true, j.fuse_unk == true, j.ignore_merges == true
   local byte_tokens = {}
   if byte_fallback then
      for b = 0, 255 do byte_tokens[b] = string.format("<0x%02X>", b) end
   end
   local cached, remember = components.memo(10000)

   local function tokenize(piece)
      local hit = cached(piece)
      if hit then return hit end
      if ignore_merges and vocab[piece] ~= nil then return { piece } end
      -- the symbols: one per character, or its bytes (byte fallback), or the unknown token
      local sym, is_unk = {}, {}
      for _, ch in ipairs(utf8_chars(piece)) do
         if vocab[ch] ~= nil then
            sym[#sym + 1] = ch
         else
            local bytes = byte_fallback and {} or nil
            if bytes then
               for k = 1, #ch do
                  local t = byte_tokens[ch:byte(k)]
                  if vocab[t] == nil then bytes = nil break end
                  bytes[k] = t
               end
            end
            if bytes then
               for _, t in ipairs(bytes) do sym[#sym + 1] = t end
            elseif unk ~= nil then
               if not (fuse_unk and is_unk[#sym]) then
                  sym[#sym + 1] = unk
                  is_unk[#sym] = true
               end
            end
         end
      end
      -- merges, lowest rank first (leftmost among equals), over a linked list of symbols
      local n = #sym
      local nxt, prv, alive = {}, {}, {}
      for i = 1, n do nxt[i], prv[i], alive[i] = i + 1, i - 1, true end
      nxt[n] = nil
      local heap = {}
      for i = 1, n - 1 do
         local r = not is_unk[i] and not is_unk[i + 1] and ranks[sym[i] .. "\0" .. sym[i + 1]]
         if r then heap_push(heap, r, i, sym[i], sym[i + 1]) end
      end
      while #heap > 0 do
         local e = heap_pop(heap)
         local i = e[2]
         local k = nxt[i]
         if alive[i] and k and sym[i] == e[3] and sym[k] == e[4] then
            sym[i] = sym[i] .. sym[k]
            alive[k] = false
            nxt[i] = nxt[k]
            if nxt[k] then prv[nxt[k]] = i end
            local p, q = prv[i], nxt[i]
            if p and p >= 1 and not is_unk[p] then
               local r = ranks[sym[p] .. "\0" .. sym[i]]
               if r then heap_push(heap, r, p, sym[p], sym[i]) end
            end
            if q and not is_unk[q] then
               local r = ranks[sym[i] .. "\0" .. sym[q]]
               if r then heap_push(heap, r, i, sym[i], sym[q]) end
            end
         end
      end
      local out, i = {}, n > 0 and 1 or nil
      while i do
         out[#out + 1] = sym[i]
         i = nxt[i]
      end
      return remember(piece, out)
   end
   return { tokenize = tokenize, vocab = vocab, unk = unk }
end

-- --- WordPiece ----------------------------------------------------------------------------------

local function build_wordpiece(j, who)
   local vocab = j.vocab or {}
   local unk = j.unk_token or "[UNK]"
   local prefix = j.continuing_subword_prefix or "##"
   local max_chars = j.max_input_chars_per_word or 100
   if vocab[unk] == nil then
      error(string.format("%s: the WordPiece unk_token %q is not in the vocabulary", who, unk), 0)
   end
   local cached, remember = components.memo(10000)
   local function tokenize(word)
      local hit = cached(word)
      if hit then return hit end
      local cps, n = U.codepoints(word)
      if n > max_chars then return { unk } end
      local out, start = {}, 1
      while start <= n do
         local stop, found = n, nil
         while stop >= start do
            local sub = U.encode(cps, start, stop)
            if start > 1 then sub = prefix .. sub end
            if vocab[sub] ~= nil then found = sub break end
            stop = stop - 1
         end
         if not found then out = { unk } break end
         out[#out + 1] = found
         start = stop + 1
      end
      return remember(word, out)
   end
   return { tokenize = tokenize, vocab = vocab, unk = unk }
end

-- --- Unigram ------------------------------------------------------------------------------------

-- SentencePiece's Unigram (T5, mT5, ALBERT, XLM-R): the split of a word whose pieces' summed
-- log-probabilities (the vocabulary's scores) are highest, found by Viterbi over every piece
-- starting at every character. A character no piece covers alone becomes the unknown token, scored
-- 10 below the lowest piece; consecutive unknown characters make one unknown token (fuse_unk),
-- or with byte_fallback its <0xXX> byte tokens. Ties go to the split reached first in
-- tokenizers' lattice order (earlier pieces, then shorter ones).
local function build_unigram(j, who)
   local list = j.vocab
   if type(list) ~= "table" or #list == 0 then error(who .. ": the Unigram model has no vocabulary", 0) end
   local vocab, scores, longest, lowest = {}, {}, 0, math.huge
   for i, entry in ipairs(list) do
      local piece, score = type(entry) == "table" and entry[1], type(entry) == "table" and entry[2]
      if type(piece) ~= "string" or type(score) ~= "number" then
         error(string.format("%s: Unigram vocabulary entry %d is not a [piece, score] pair", who, i - 1), 0)
      end
      vocab[piece] = i - 1
      scores[i - 1] = score
      if #piece > longest then longest = #piece end
      if score < lowest then lowest = score end
   end
   local unk_id = type(j.unk_id) == "number" and j.unk_id or nil
   if unk_id and (unk_id < 0 or unk_id >= #list) then
      error(string.format("%s: the Unigram unk_id %d is outside the vocabulary (%d pieces)", who, unk_id, #list), 0)
   end
   -- (unmatched: moonload's own key, the ids a SentencePiece model's control, unknown and unused
   -- pieces have: they keep their ids but text never matches them, as in sentencepiece)
   local unmatched = {}
   for _, id in ipairs(type(j.unmatched) == "table" and j.unmatched or {}) do unmatched[id] = true end
   local unk_score = lowest - 10
   local byte_fallback = j.byte_fallback == true
   local cached, remember = components.memo(10000)

   local function tokenize(word)
      local hit = cached(word)
      if hit then return hit end
      local len = #word
      -- best[p]: the best score of a split of word[1 .. p - 1]; from[e], piece[e]: the last piece
      -- of the best split ending before e (piece nil: an unknown character)
      local best, from, piece = { [1] = 0 }, {}, {}
      local p = 1
      while p <= len do
         local c = word:byte(p)
         local width = c < 0x80 and 1 or c < 0xE0 and 2 or c < 0xF0 and 3 or 4
         local base, single = best[p], false
         for l = 1, math.min(longest, len - p + 1) do
            local id = vocab[word:sub(p, p + l - 1)]
            if id and not unmatched[id] then
               local e, s = p + l, base + scores[id]
               if best[e] == nil or s > best[e] then best[e], from[e], piece[e] = s, p, id end
               if l == width then single = true end
            end
         end
         if not single then
            local e, s = p + width, base + unk_score
            if best[e] == nil or s > best[e] then best[e], from[e], piece[e] = s, p, false end
         end
         p = p + width
      end
      local rev, e = {}, len + 1
      while e > 1 do
         local b = from[e]
         rev[#rev + 1] = { b, e - 1, piece[e] }
         e = b
      end
      local out, unknown = {}, nil
      local function flush()
         if unknown == nil then return end
         if unk_id == nil then
            error(string.format("%s: %q has no piece and the Unigram model has no unk_id", who, unknown), 0)
         end
         local bytes = byte_fallback and {} or nil
         for k = 1, bytes and #unknown or 0 do
            bytes[k] = string.format("<0x%02X>", unknown:byte(k))
            if vocab[bytes[k]] == nil then bytes = nil break end
         end
         if bytes then
            for _, t in ipairs(bytes) do out[#out + 1] = t end
         else
            out[#out + 1] = unknown          -- (the text itself; encode gives it unk_id)
         end
         unknown = nil
      end
      for k = #rev, 1, -1 do
         local b, last, id = rev[k][1], rev[k][2], rev[k][3]
         if id == false then
            unknown = (unknown or "") .. word:sub(b, last)
         else
            flush()
            out[#out + 1] = list[id + 1][1]
         end
      end
      flush()
      return remember(word, out)
   end
   return { tokenize = tokenize, vocab = vocab, unk = unk_id and list[unk_id + 1][1] or nil, unk_id = unk_id }
end

local SPACE = "\226\150\129"            -- U+2581, SentencePiece's space

--- model, its tokenize cutting a long text before each U+2581 and tokenizing the parts one by one
-- (each then memoized), when that gives the same tokens: no token holds U+2581 past its first
-- character (so no merge or piece spans a cut) and U+2581 alone is a token (so no unknown run
-- does). SentencePiece pipelines (Llama 2's tokenizer.json, tokenizers.from_sentencepiece) hand the
-- model whole texts; cut, their cost grows with the text, not with its longest word.
local function cut_at_spaces(model)
   if model.vocab[SPACE] == nil then return model end
   for token in pairs(model.vocab) do
      if token:find(SPACE, 2, true) then return model end
   end
   local whole = model.tokenize
   model.tokenize = function(text)
      if #text <= 256 or not text:find(SPACE, 2, true) then return whole(text) end
      local out, start = {}, 1
      repeat
         local cut = text:find(SPACE, start + 1, true)
         for _, t in ipairs(whole(text:sub(start, (cut or #text + 1) - 1))) do out[#out + 1] = t end
         start = cut
      until not cut
      return out
   end
   return model
end

--- The model of a tokenizer.json object.
function M.build(j, who)
   if type(j) ~= "table" then error(who .. ": tokenizer.json has no model", 0) end
   local kind = j.type or (j.merges and "BPE") or nil
   -- (ignore_merges keeps a word that is a token whole: cutting it would change what is whole)
   if kind == "BPE" then
      local bpe = build_bpe(j, who)
      return j.ignore_merges == true and bpe or cut_at_spaces(bpe)
   end
   if kind == "WordPiece" then return build_wordpiece(j, who) end
   if kind == "Unigram" then return cut_at_spaces(build_unigram(j, who)) end
   error(string.format("%s: tokenizer model %q is not supported (supported: BPE, Unigram, WordPiece)", who, tostring(kind)), 0)
end

return M
