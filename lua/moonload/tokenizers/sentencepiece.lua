--- SentencePiece model files (tokenizer.model, spiece.model, Marian's source.spm) without the
-- sentencepiece library: the protobuf is read here, and the tokenizer.json pipeline that encodes
-- like SentencePieceProcessor.encode is built from it, as transformers'
-- SpmConverter.build_tokenizer_from_spm_proto does (a Unigram or BPE model over the pieces, the
-- normalizer spec's precompiled rules, whitespace handling and dummy prefix, user-defined pieces
-- kept whole).
--
--    local tok = ml.tokenizers.from_sentencepiece("spiece.model")
--    tok:encode("Hello world")        -- the ids SentencePieceProcessor.encode gives (no BOS/EOS)
--
-- Ids are the pieces' positions in the file. A file that is not a SentencePiece model, or one
-- whose model type is WORD or CHAR, is an error that names it.
local ffi = require("ffi")

local U = require("moonload.tokenizers.unicode")

local M = {}

local SPACE = "\226\150\129"            -- U+2581, SentencePiece's space
-- ModelProto.SentencePiece.Type
local NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
-- TrainerSpec.ModelType
local MODEL_TYPES = { [1] = "Unigram", [2] = "BPE", [3] = "WORD", [4] = "CHAR" }

local float_box = ffi.new("float[1]")

--- A protobuf message reader over s[first .. last]: calls on_field(number, wire_type, value,
-- value_start) for each field; value is a number (varint, fixed32 as a float, fixed64 skipped) or,
-- for length-delimited fields, the byte range {a, b}. who and what name the file in errors.
local function each_field(s, first, last, who, on_field)
   local pos = first
   local function varint()
      local v, shift = 0, 0
      while true do
         if pos > last then error(string.format("%s: truncated varint at byte %d", who, pos - 1), 0) end
         local b = s:byte(pos)
         pos = pos + 1
         v = v + (b % 128) * 2 ^ shift
         if b < 128 then return v end
         shift = shift + 7
         if shift > 63 then error(string.format("%s: varint longer than 10 bytes at byte %d", who, pos - 1), 0) end
      end
   end
   while pos <= last do
      local at = pos
      local key = varint()
      local number, wire = math.floor(key / 8), key % 8
      if wire == 0 then
         on_field(number, wire, varint(), at)
      elseif wire == 1 then
         if pos + 7 > last then error(string.format("%s: truncated 64-bit field %d at byte %d", who, number, at - 1), 0) end
         pos = pos + 8
      elseif wire == 2 then
         local len = varint()
         if pos + len - 1 > last then
            error(string.format("%s: field %d at byte %d runs %d bytes past its message", who, number, at - 1,
               pos + len - 1 - last), 0)
         end
         on_field(number, wire, { pos, pos + len - 1 }, at)
         pos = pos + len
      elseif wire == 5 then
         if pos + 3 > last then error(string.format("%s: truncated 32-bit field %d at byte %d", who, number, at - 1), 0) end
         ffi.copy(float_box, s:sub(pos, pos + 3), 4)
         on_field(number, wire, tonumber(float_box[0]), at)
         pos = pos + 4
      else
         error(string.format("%s: field %d at byte %d has wire type %d, not a protobuf message (is this a "
            .. "SentencePiece model?)", who, number, at - 1, wire), 0)
      end
   end
end

local function text_of(s, range) return s:sub(range[1], range[2]) end

--- decode(bytes, who) -> the model: {pieces = {{piece, score, type}, ...}, model_type ("Unigram",
-- "BPE", ...), byte_fallback, unk_id, bos_id, eos_id, pad_id, unk_piece, normalizer = {name,
-- precompiled_charsmap, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces}}, with
-- the protobuf defaults for absent fields.
function M.decode(s, who)
   local model = {
      pieces = {}, model_type = "Unigram", byte_fallback = false, unk_id = 0, bos_id = 1, eos_id = 2, pad_id = -1,
      unk_piece = "<unk>", unk_surface = " \226\129\135 ", treat_whitespace_as_suffix = false,
      normalizer = { name = "", precompiled_charsmap = "", add_dummy_prefix = true, remove_extra_whitespaces = true,
                     escape_whitespaces = true },
   }
   local signed = function(v) return v >= 2 ^ 63 and v - 2 ^ 64 or v end      -- (int32 -1 is a 10-byte varint)
   each_field(s, 1, #s, who, function(number, wire, v)
      if number == 1 and wire == 2 then
         local p = { "", 0, NORMAL }
         each_field(s, v[1], v[2], who, function(n, w, x)
            if n == 1 and w == 2 then p[1] = text_of(s, x)
            elseif n == 2 and w == 5 then p[2] = x
            elseif n == 3 and w == 0 then p[3] = x end
         end)
         model.pieces[#model.pieces + 1] = p
      elseif number == 2 and wire == 2 then
         each_field(s, v[1], v[2], who, function(n, w, x)
            if w == 0 then
               if n == 3 then model.model_type = MODEL_TYPES[x] or x
               elseif n == 35 then model.byte_fallback = x ~= 0
               elseif n == 24 then model.treat_whitespace_as_suffix = x ~= 0
               elseif n == 40 then model.unk_id = signed(x)
               elseif n == 41 then model.bos_id = signed(x)
               elseif n == 42 then model.eos_id = signed(x)
               elseif n == 43 then model.pad_id = signed(x) end
            elseif w == 2 and n == 45 then model.unk_piece = text_of(s, x)
            elseif w == 2 and n == 44 then model.unk_surface = text_of(s, x) end
         end)
      elseif number == 3 and wire == 2 then
         local ns = model.normalizer
         each_field(s, v[1], v[2], who, function(n, w, x)
            if w == 2 and n == 1 then ns.name = text_of(s, x)
            elseif w == 2 and n == 2 then ns.precompiled_charsmap = text_of(s, x)
            elseif w == 0 and n == 3 then ns.add_dummy_prefix = x ~= 0
            elseif w == 0 and n == 4 then ns.remove_extra_whitespaces = x ~= 0
            elseif w == 0 and n == 5 then ns.escape_whitespaces = x ~= 0 end
         end)
      end
   end)
   if #model.pieces == 0 then error(who .. ": no pieces (is this a SentencePiece model?)", 0) end
   return model
end

--- read(path) -> the decoded model of a .model / .spm file.
function M.read(path)
   local f, err = io.open(path, "rb")
   if not f then error(string.format("tokenizers.from_sentencepiece: cannot read %s (%s)", path, tostring(err)), 0) end
   local s = f:read("*a")
   f:close()
   return M.decode(s, "tokenizers.from_sentencepiece: " .. path)
end

-- The merges of a BPE model: every split of a normal piece into two normal pieces, the merged
-- piece's score first (higher first), then its id, then the split point (transformers ranks so).
local function bpe_merges(pieces)
   local normal = {}
   for i, p in ipairs(pieces) do if p[3] == NORMAL then normal[p[1]] = i end end
   local ranked = {}
   for i, p in ipairs(pieces) do
      if p[3] == NORMAL then
         local starts = U.char_starts(p[1])
         for c = 2, #starts - 1 do
            local l, r = p[1]:sub(1, starts[c] - 1), p[1]:sub(starts[c])
            if normal[l] and normal[r] then ranked[#ranked + 1] = { p[2], i, c, l, r } end
         end
      end
   end
   table.sort(ranked, function(a, b)
      if a[1] ~= b[1] then return a[1] > b[1] end
      if a[2] ~= b[2] then return a[2] < b[2] end
      return a[3] < b[3]
   end)
   local out = {}
   for i, m in ipairs(ranked) do out[i] = { m[4], m[5] } end
   return out
end

--- spec(model, who) -> the tokenizer.json table that encodes as SentencePieceProcessor.encode does
-- (transformers' build_tokenizer_from_spm_proto, legacy: the dummy prefix before every stretch of
-- text between added tokens).
function M.spec(model, who)
   local pieces, ns = model.pieces, model.normalizer
   if model.model_type ~= "Unigram" and model.model_type ~= "BPE" then
      error(string.format("%s: SentencePiece model type %s is not supported (Unigram and BPE are)", who,
         tostring(model.model_type)), 0)
   end
   if model.treat_whitespace_as_suffix then
      error(who .. ": trainer_spec.treat_whitespace_as_suffix is not supported", 0)
   end
   local user_defined = {}
   for _, p in ipairs(pieces) do if p[3] == USER_DEFINED then user_defined[#user_defined + 1] = p[1] end end
   local spec_model
   if model.model_type == "BPE" then
      local vocab = {}
      for i, p in ipairs(pieces) do vocab[p[1]] = i - 1 end
      spec_model = { type = "BPE", vocab = vocab, merges = bpe_merges(pieces), unk_token = model.unk_piece,
                     fuse_unk = true, byte_fallback = model.byte_fallback, ignore_merges = #user_defined > 0 }
   else
      local vocab, unmatched = {}, {}
      for i, p in ipairs(pieces) do
         vocab[i] = { p[1], p[2] }
         if p[3] ~= NORMAL and p[3] ~= USER_DEFINED and p[3] ~= BYTE then unmatched[#unmatched + 1] = i - 1 end
      end
      spec_model = { type = "Unigram", vocab = vocab, unk_id = model.unk_id, byte_fallback = model.byte_fallback,
                     unmatched = unmatched }
   end
   -- the normalizer, in SentencePiece's order; only spaces are extra whitespace (newlines stay)
   local norm = {}
   if ns.precompiled_charsmap ~= "" then
      norm[#norm + 1] = { type = "Precompiled", walk = "sentencepiece",
                          precompiled_charsmap = require("moonload.tokenizers.precompiled").base64_encode(ns.precompiled_charsmap) }
   end
   if ns.remove_extra_whitespaces then
      norm[#norm + 1] = { type = "Replace", pattern = { Regex = "\\A +| +\\z" }, content = "" }
      norm[#norm + 1] = { type = "Replace", pattern = { Regex = " {2,}" }, content = " " }
   end
   if ns.escape_whitespaces then norm[#norm + 1] = { type = "Replace", pattern = { String = " " }, content = SPACE } end
   -- Metaspace skips the dummy prefix where the text already starts with U+2581; SentencePiece does not
   if ns.add_dummy_prefix then norm[#norm + 1] = { type = "Replace", pattern = { Regex = "\\A" .. SPACE }, content = SPACE .. SPACE } end
   local pre = {}
   if ns.add_dummy_prefix then pre[#pre + 1] = { type = "Metaspace", replacement = SPACE, prepend_scheme = "always", split = false } end
   if #user_defined > 0 then
      -- SentencePiece emits user-defined pieces whole: isolated before the model sees them, longest first
      table.sort(user_defined, function(a, b) return #a > #b or (#a == #b and a < b) end)
      local escaped = {}
      for i, u in ipairs(user_defined) do escaped[i] = u:gsub("[%^%$%(%)%.%[%]%*%+%-%?%{%}|\\]", "\\%0") end
      pre[#pre + 1] = { type = "Split", pattern = { Regex = table.concat(escaped, "|") }, behavior = "Isolated", invert = false }
   end
   local dec = { { type = "Replace", pattern = { String = SPACE }, content = " " } }
   if model.byte_fallback then dec[#dec + 1] = { type = "ByteFallback" } end
   if ns.add_dummy_prefix then
      dec[#dec + 1] = { type = "Fuse" }
      dec[#dec + 1] = { type = "Strip", content = " ", start = 1, stop = 0 }
   elseif model.byte_fallback then
      dec[#dec + 1] = { type = "Fuse" }
   end
   return {
      normalizer = { type = "Sequence", normalizers = norm },
      pre_tokenizer = #pre > 0 and { type = "Sequence", pretokenizers = pre } or nil,
      model = spec_model,
      decoder = { type = "Sequence", decoders = dec },
      added_tokens = {},
   }
end

local Tokenizer = require("moonload.tokenizers").Tokenizer
local byte_fallback = require("moonload.tokenizers.decoders").build({ type = "ByteFallback" }, "sentencepiece")

--- SentencePieceTokenizer(model, source): a Tokenizer over a decoded SentencePiece model whose
-- decode is SentencePieceProcessor.decode's (control pieces vanish, the unknown piece reads as the
-- model's unk_surface, " ⁇ " by default).
local SentencePieceTokenizer = Tokenizer:extend("SentencePieceTokenizer")
M.SentencePieceTokenizer = SentencePieceTokenizer

function SentencePieceTokenizer:__init(model, source)
   Tokenizer.__init(self, M.spec(model, "tokenizers.from_sentencepiece: " .. source), source)
   rawset(self, "sentencepiece", model)
end

--- decode_pieces(pieces) -> text, as SentencePieceProcessor.decode_pieces: a piece the model does
-- not have stays as it is; the first piece that writes anything loses its dummy-prefix space.
function SentencePieceTokenizer:decode_pieces(pieces)
   local model = rawget(self, "sentencepiece")
   local ids = self.model.vocab
   local at_start = model.normalizer.add_dummy_prefix       -- (control pieces before it do not count)
   local out = {}
   for _, piece in ipairs(pieces) do
      local id = ids[piece]
      local kind = id and model.pieces[id + 1][3]
      local text
      if kind == CONTROL then
         text = ""
      elseif kind == UNKNOWN then
         text = model.unk_surface
      elseif kind == BYTE then
         text = piece                                   -- (joined with its run by byte_fallback below)
      else
         text = piece
         if at_start and text:sub(1, #SPACE) == SPACE then text = text:sub(#SPACE + 1) end
         text = text:gsub(SPACE, " ")
      end
      if kind ~= CONTROL then at_start = false end
      if text ~= "" then out[#out + 1] = text end
   end
   return table.concat(byte_fallback(out))
end

--- decode(ids[, {skip_special_tokens}]) -> the text SentencePieceProcessor.decode gives.
function SentencePieceTokenizer:decode(ids, opts)
   if type(ids) == "table" and ids.tolist then ids = ids:tolist() end
   if type(ids) ~= "table" then error("decode: ids must be a list of token ids or a tensor, got " .. type(ids), 2) end
   local pieces = rawget(self, "sentencepiece").pieces
   local out = {}
   for i, id in ipairs(ids) do
      local p = pieces[(tonumber(id) or -1) + 1]
      if p == nil or id % 1 ~= 0 then
         error(string.format("decode: id %s at position %d is not in the vocabulary (size %d)", tostring(id), i, #pieces), 2)
      end
      out[i] = p[1]
   end
   return self:decode_pieces(out)
end

--- from_file(path) -> a SentencePieceTokenizer that encodes and decodes as SentencePieceProcessor
-- does (no special tokens added).
function M.from_file(path)
   if type(path) ~= "string" then error("tokenizers.from_sentencepiece: path must be a string, got " .. type(path), 2) end
   local ok, tok = pcall(SentencePieceTokenizer, M.read(path), path)
   if not ok then error(tok, 2) end
   return tok
end

return M
