--- Marian's tokenizer (Helsinki-NLP's opus-mt models), as transformers' MarianTokenizer: the text
-- is cut into pieces by the folder's source.spm (a SentencePiece model read by
-- tokenizers/sentencepiece.lua) and the pieces get their ids from vocab.json, which is not
-- aligned with the SentencePiece ids (a piece missing from it is <unk>); </s> ends every text.
-- A language code at the start of a text (">>fr<<", for multilingual models) is one token.
-- Decoding turns ids back into pieces through vocab.json (target_vocab.json when the folder has
-- separate vocabularies) and joins them as SentencePiece does.
--
--    local tok = ml.tokenizers.from_pretrained("opus-mt-en-de")   -- source.spm, vocab.json, ...
--    local ids = tok:encode("Hello world")                         -- ... 0 (</s>)
--    print(tok:decode(model:generate({ids})[1], {skip_special_tokens = true}))
--
-- (Transformers 5.24 sets up sacremoses' punctuation normalizer when that package is installed
-- but never calls it while encoding, so the ids do not depend on it.)
local cjson = require("cjson")
local Tokenizer = require("moonload.tokenizers").Tokenizer
local sentencepiece = require("moonload.tokenizers.sentencepiece")
local U = require("moonload.tokenizers.unicode")

local M = {}
local WHO = "tokenizers.from_pretrained"

local function read_json(path, what)
   local f = io.open(path, "rb")
   if not f then error(string.format("%s: %s has no %s", WHO, path:match("^(.*)/") or ".", what), 0) end
   local ok, t = pcall(cjson.decode, f:read("*a"))
   f:close()
   if not ok or type(t) ~= "table" then error(string.format("%s: %s is not a JSON object", WHO, path), 0) end
   return t
end

-- token -> id table of a vocab.json, checked: integer ids, each used once.
local function read_vocab(path)
   local vocab, by_id = read_json(path, path:match("[^/]+$")), {}
   for token, id in pairs(vocab) do
      if type(id) ~= "number" or id < 0 or id % 1 ~= 0 then
         error(string.format("%s: %s gives %q the id %s (not an integer >= 0)", WHO, path, token, tostring(id)), 0)
      end
      if by_id[id] then error(string.format("%s: %s gives id %d to both %q and %q", WHO, path, id, by_id[id], token), 0) end
      by_id[id] = token
   end
   return vocab, by_id
end

local MarianTokenizer = Tokenizer:extend("MarianTokenizer")
M.MarianTokenizer = MarianTokenizer

--- MarianTokenizer(dir, config): config is the folder's tokenizer_config.json.
function MarianTokenizer:__init(dir, config)
   local function special(key, default)
      local v = config[key]
      if type(v) == "table" then v = v.content end
      return type(v) == "string" and v or default
   end
   local source = sentencepiece.SentencePieceTokenizer(sentencepiece.read(dir .. "/source.spm"), dir .. "/source.spm")
   local separate = config.separate_vocabs == true
   local vocab = read_vocab(dir .. "/vocab.json")
   local target_vocab = vocab
   if separate then
      local name = type(config.target_vocab_file) == "string" and config.target_vocab_file:match("[^/]+$") or "target_vocab.json"
      target_vocab = read_vocab(dir .. "/" .. name)
   end
   -- decoding joins pieces with the source model when the vocabulary is shared, as transformers does
   local target = separate and sentencepiece.SentencePieceTokenizer(sentencepiece.read(dir .. "/target.spm"), dir .. "/target.spm")
      or source
   local eos, unk, pad = special("eos_token", "</s>"), special("unk_token", "<unk>"), special("pad_token", "<pad>")
   for _, t in ipairs({ eos, unk, pad }) do
      if vocab[t] == nil then error(string.format("%s: %s/vocab.json has no %q", WHO, dir, t), 0) end
   end
   rawset(self, "source", dir)
   rawset(self, "source_spm", source)
   rawset(self, "target_spm", target)
   rawset(self, "separate_vocabs", separate)
   rawset(self, "folder_files", { "source.spm", "target.spm", "vocab.json", separate and "target_vocab.json" or nil })
   -- (the base class's encode: specials split out, each stretch normalized and cut by source.spm,
   -- pieces looked up in vocab.json, unknown ones <unk>)
   self.normalize, self.pre_tokenize = source.normalize, source.pre_tokenize
   self.model = { tokenize = source.model.tokenize, vocab = vocab, unk_id = vocab[unk] }
   local eos_id = vocab[eos]
   self.post_process = function(ids)
      local out = {}
      for i = 1, #ids do out[i] = ids[i] end
      out[#ids + 1] = eos_id
      return out
   end
   local added, by_first = {}, {}
   for _, t in ipairs({ eos, unk, pad }) do
      local e = { content = t, id = vocab[t], special = true }
      added[t] = e
      by_first[t:byte(1)] = by_first[t:byte(1)] or {}
      table.insert(by_first[t:byte(1)], e)
   end
   for _, list in pairs(by_first) do table.sort(list, function(x, y) return #x.content > #y.content end) end
   local to_token, n = {}, 0
   for token, id in pairs(target_vocab) do to_token[id] = token; n = n + 1 end
   self.added, self.added_by_first, self.to_token, self.vocab_size = added, by_first, to_token, n
   self.pad_id = vocab[pad]
   rawset(self, "special_token_strings", { eos_token = eos, unk_token = unk, pad_token = pad })
end

--- The pieces of text: a language code at its start (">>fr<<") is kept whole, the rest is cut by
-- source.spm (special tokens in the text stay whole, as in transformers).
function MarianTokenizer:tokenize(text)
   if type(text) ~= "string" then error("tokenize: text must be a string, got " .. type(text), 2) end
   U.codepoints(text, "tokenize")                 -- (names a byte that is not UTF-8)
   local tokens = {}
   for _, seg in ipairs(self:_split_added(text)) do
      if seg.added then
         tokens[#tokens + 1] = seg.added.content
      else
         local s = seg.text
         local code, rest = s:match("^(>>.-<<)(.*)$")
         if code then tokens[#tokens + 1] = code; s = rest end
         for _, t in ipairs(self.source_spm:tokenize(s)) do tokens[#tokens + 1] = t end
      end
   end
   return tokens
end

--- decode(ids[, {skip_special_tokens = false}]) -> text, as MarianTokenizer.decode: special tokens
-- kept (each followed by a space) or dropped, the pieces between them joined by SentencePiece, an
-- id missing from the vocabulary read as that SentencePiece piece, the ends stripped. (With
-- separate vocabularies transformers skips special ids by their source ids and so keeps the
-- target's <pad>; this skips the target's special tokens.)
function MarianTokenizer:decode(ids, opts)
   opts = opts or {}
   if type(ids) == "table" and ids.tolist then ids = ids:tolist() end
   if type(ids) ~= "table" then error("decode: ids must be a list of token ids or a tensor, got " .. type(ids), 2) end
   local spm = self.target_spm
   local spm_pieces = rawget(spm, "sentencepiece").pieces
   local out, run = {}, {}
   for i, id in ipairs(ids) do
      if type(id) ~= "number" or id < 0 or id % 1 ~= 0 then
         error(string.format("decode: id %s at position %d is not a token id", tostring(id), i), 2)
      end
      local t = self.to_token[id] or (spm_pieces[id + 1] and spm_pieces[id + 1][1])
      if t == nil then
         error(string.format("decode: id %d at position %d is in neither the vocabulary (size %d) nor %s (%d pieces)", id, i,
            self.vocab_size, self.separate_vocabs and "target.spm" or "source.spm", #spm_pieces), 2)
      end
      local e = self.added[t]
      if e and e.special then
         if not opts.skip_special_tokens then
            out[#out + 1] = spm:decode_pieces(run) .. t .. " "
            run = {}
         end
      else
         run[#run + 1] = t
      end
   end
   out[#out + 1] = spm:decode_pieces(run)
   local text = table.concat(out):gsub("\226\150\129", " ")
   -- Python's str.strip: Unicode whitespace at both ends
   local cps, n = U.codepoints(text)
   local a, b = 1, n
   while a <= b and U.is_whitespace(cps[a]) do a = a + 1 end
   while b >= a and U.is_whitespace(cps[b]) do b = b - 1 end
   return U.encode(cps, a, b)
end

--- save_pretrained(dir): the folder's files (source.spm, target.spm, the vocabularies) copied and
-- tokenizer_config.json written, each under a temporary name first.
function MarianTokenizer:save_pretrained(dir)
   local offload = require("moonload.utils.offload")
   local json = require("moonload.utils.json")
   if type(dir) ~= "string" or dir == "" then error("save_pretrained: dir must be a folder path, got " .. type(dir), 2) end
   dir = dir:gsub("/+$", "")
   offload.mkdir_p(dir, "save_pretrained")
   for _, name in ipairs(self.folder_files) do
      local f = assert(io.open(self.source .. "/" .. name, "rb"))
      local bytes = f:read("*a")
      f:close()
      offload.write_atomic(dir .. "/" .. name, "save_pretrained", function(out) assert(out:write(bytes)) end)
   end
   local config = { tokenizer_class = "MarianTokenizer", separate_vocabs = self.separate_vocabs }
   for k, v in pairs(self.special_token_strings) do config[k] = v end
   for k, v in pairs(rawget(self, "languages") or {}) do config[k] = v end
   offload.write_atomic(dir .. "/tokenizer_config.json", "save_pretrained",
      function(out) assert(out:write(json.encode(config) .. "\n")) end)
end

--- from_folder(dir) -> a MarianTokenizer when dir holds a Marian tokenizer (source.spm and
-- vocab.json), else nil.
function M.from_folder(dir)
   local f = io.open(dir .. "/source.spm", "rb")
   if not f then return nil end
   f:close()
   local config = {}
   local cf = io.open(dir .. "/tokenizer_config.json", "rb")
   if cf then
      cf:close()
      config = read_json(dir .. "/tokenizer_config.json", "tokenizer_config.json")
   end
   local tok = MarianTokenizer(dir, config)
   rawset(tok, "languages", { source_lang = config.source_lang, target_lang = config.target_lang })
   return tok
end

return M
