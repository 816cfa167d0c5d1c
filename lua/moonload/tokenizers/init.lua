--- ml.tokenizers: Hugging Face tokenizer.json files in Lua, so text goes in and out of the models
-- without Python.
--
--    local tok = ml.tokenizers.from_pretrained("path/to/model")   -- reads tokenizer.json
--    local ids = tok:encode("Hello world")          -- 0-based ids, with BOS/[CLS] as configured
--    print(tok:decode(model:generate(ids, {max_new_tokens = 20})))
--
-- The pipeline is tokenizers': added (special) tokens are split out of the text first, the rest
-- goes through the normalizer, the pre-tokenizer and the model (BPE, Unigram or WordPiece), and
-- add_special_tokens applies the post-processor. Supported: byte-level BPE (GPT-2, Llama 3,
-- Qwen2/3), SentencePiece-style BPE with byte fallback (Llama 2, Mistral), SentencePiece Unigram
-- with its precompiled normalizer (T5, ALBERT, XLM-R), WordPiece (BERT); a
-- component outside these is an error that names it. Ids match tokenizers' own
-- (tests/fixtures/gen_tokenizers.py).
local cjson = require("cjson")
local class = require("moonload.class")
local normalizers = require("moonload.tokenizers.normalizers")
local pre_tokenizers = require("moonload.tokenizers.pre_tokenizers")
local models = require("moonload.tokenizers.models")
local processors = require("moonload.tokenizers.processors")
local decoders = require("moonload.tokenizers.decoders")
local U = require("moonload.tokenizers.unicode")

local M = {}

local Tokenizer = class("Tokenizer")
M.Tokenizer = Tokenizer

-- JSON null reads as absent (cjson gives a sentinel), recursively through objects and lists.
local function strip_nulls(v)
   if type(v) ~= "table" then return v end
   for k, x in pairs(v) do
      if x == cjson.null then v[k] = nil else strip_nulls(x) end
   end
   return v
end

local function is_word_char(cp)
   return cp ~= nil and (U.is_letter(cp) or U.is_number(cp) or cp == 95)
end

--- Tokenizer(spec[, source]): spec is a decoded tokenizer.json table; source names it in errors.
function Tokenizer:__init(spec, source)
   local who = "tokenizer " .. (source or "(table)")
   rawset(self, "source", source)
   rawset(self, "spec", spec)                  -- (what save_pretrained writes back)
   self.normalize = normalizers.build(spec.normalizer, who)
   self.pre_tokenize = pre_tokenizers.build(spec.pre_tokenizer, who)
   self.model = models.build(spec.model, who)
   self.post_process = processors.build(spec.post_processor, who)
   self.decode_chain = decoders.build(spec.decoder, who)
   -- ids <-> tokens: the model's vocabulary, then the added tokens (which may extend it)
   local to_token, n = {}, 0
   for token, id in pairs(self.model.vocab) do
      if type(id) ~= "number" then error(string.format("%s: vocabulary entry %q has id %s", who, token, tostring(id)), 0) end
      to_token[id] = token
   end
   local added, by_first = {}, {}
   for _, a in ipairs(spec.added_tokens or {}) do
      if type(a.content) ~= "string" or a.content == "" or type(a.id) ~= "number" then
         error(who .. ": an added token needs a content string and an id", 0)
      end
      local entry = { content = a.content, id = a.id, special = a.special == true, lstrip = a.lstrip == true,
         rstrip = a.rstrip == true, single_word = a.single_word == true }
      added[a.content] = entry
      to_token[a.id] = a.content
      local b = a.content:byte(1)
      by_first[b] = by_first[b] or {}
      table.insert(by_first[b], entry)
   end
   for _, list in pairs(by_first) do table.sort(list, function(x, y) return #x.content > #y.content end) end
   for _ in pairs(to_token) do n = n + 1 end
   self.added, self.added_by_first, self.to_token = added, by_first, to_token
   self.vocab_size = n
   local padding = type(spec.padding) == "table" and spec.padding or {}
   self.pad_id = type(padding.pad_id) == "number" and padding.pad_id or 0
end

-- The text split around added tokens (leftmost, then longest): a list of {text = s, first =
-- bool} and {added = entry}.
function Tokenizer:_split_added(text)
   local out, pos, i, len = {}, 1, 1, #text
   local by_first = self.added_by_first
   local function plain(a, b)
      if b >= a then out[#out + 1] = { text = text:sub(a, b), first = a == 1 } end
   end
   while i <= len do
      local hit
      for _, e in ipairs(by_first[text:byte(i)] or {}) do
         if text:sub(i, i + #e.content - 1) == e.content then
            local ok = true
            if e.single_word then
               local before = i > 1 and U.codepoints(text:sub(1, i - 1)) or {}
               local after = U.codepoints(text:sub(i + #e.content))
               ok = not is_word_char(before[#before]) and not is_word_char(after[1])
            end
            if ok then hit = e break end
         end
      end
      if hit then
         local a, b = i, i + #hit.content - 1
         if hit.lstrip then while a > pos and text:sub(a - 1, a - 1):match("%s") do a = a - 1 end end
         if hit.rstrip then while b < len and text:sub(b + 1, b + 1):match("%s") do b = b + 1 end end
         plain(pos, a - 1)
         out[#out + 1] = { added = hit }
         pos, i = b + 1, b + 1
      else
         i = i + 1
      end
   end
   plain(pos, len)
   return out
end

local function check_text(text, who)
   if type(text) ~= "string" then error(string.format("%s: text must be a string, got %s", who, type(text)), 3) end
   U.codepoints(text, who)
end

--- The token strings of text (no special tokens added; added tokens in the text stay whole).
function Tokenizer:tokenize(text)
   check_text(text, "tokenize")
   local tokens = {}
   for _, seg in ipairs(self:_split_added(text)) do
      if seg.added then
         tokens[#tokens + 1] = seg.added.content
      else
         local normalized = self.normalize(seg.text)
         for _, piece in ipairs(self.pre_tokenize({ normalized }, { first = seg.first })) do
            for _, t in ipairs(self.model.tokenize(piece)) do tokens[#tokens + 1] = t end
         end
      end
   end
   return tokens
end

-- opts.max_length when opts.truncation asks for it (nil otherwise), checked.
local function max_length_of(opts, who)
   local max_length = opts.truncation and opts.max_length
   if max_length ~= nil and max_length ~= false and (type(max_length) ~= "number" or max_length < 0 or max_length % 1 ~= 0) then
      error(who .. ": max_length must be a non-negative integer, got " .. tostring(max_length), 3)
   end
   return max_length or nil
end

-- The ids of text's tokens, no special tokens added.
local function token_ids(self, text, who)
   local vocab, added = self.model.vocab, self.added
   local ids = {}
   for _, t in ipairs(self:tokenize(text)) do
      local e = added[t]
      local id = e and e.id or vocab[t] or self.model.unk_id
      if id == nil then error(string.format("%s: token %q is not in the vocabulary of %s", who, t, self.source or "the tokenizer"), 3) end
      ids[#ids + 1] = id
   end
   return ids
end

--- encode(text[, {add_special_tokens = true, truncation = false, max_length}]) -> list of 0-based
-- token ids. With truncation, the text's tokens are cut on the right so that the whole, special
-- tokens included, fits max_length (transformers' default truncation).
function Tokenizer:encode(text, opts)
   check_text(text, "encode")
   opts = opts or {}
   local max_length = max_length_of(opts, "encode")
   local ids = token_ids(self, text, "encode")
   local special = opts.add_special_tokens ~= false
   if max_length then
      local room = max_length - (special and #self.post_process({}) or 0)
      if room < 0 then
         error(string.format("encode: max_length %d leaves no room beside the %d special tokens", max_length,
            #self.post_process({})), 2)
      end
      for i = #ids, room + 1, -1 do ids[i] = nil end
   end
   if special then ids = self.post_process(ids) end
   return ids
end

--- encode_pair(a, b[, {add_special_tokens = true, truncation = false, max_length}]) -> ids,
-- token_type_ids: two texts as one input (a cross-encoder's query and passage), joined as the
-- file's post-processor joins a pair ([CLS] a [SEP] b [SEP], b's part of type 1, for BERT). With
-- truncation both are cut on the right to fit max_length as the tokenizers library's
-- "longest_first" cuts them: the longer one alone while the shorter fills at most half the room,
-- else half each.
function Tokenizer:encode_pair(a, b, opts)
   check_text(a, "encode_pair")
   check_text(b, "encode_pair")
   opts = opts or {}
   local max_length = max_length_of(opts, "encode_pair")
   local ia, ib = token_ids(self, a, "encode_pair"), token_ids(self, b, "encode_pair")
   local special = opts.add_special_tokens ~= false
   local join = processors.build_pair(nil)                -- (the texts one after the other)
   if special then
      join = rawget(self, "post_process_pair")
      if not join then
         join = processors.build_pair(self.spec.post_processor, "tokenizer " .. (self.source or "(table)"))
         rawset(self, "post_process_pair", join)
      end
   end
   if max_length then
      local room = max_length - #join({}, {})
      if room < 0 then
         error(string.format("encode_pair: max_length %d leaves no room beside the %d special tokens", max_length, #join({}, {})), 2)
      end
      local na, nb = #ia, #ib
      if na + nb > room then
         -- the shorter text keeps its tokens if they fill at most half the room; otherwise each
         -- gets half, the longer one the odd token (tokenizers' truncate_encodings)
         local short, long = math.min(na, nb), math.max(na, nb)
         if short <= room - short then
            long = room - short
         else
            short = math.floor(room / 2)
            long = short + room % 2
         end
         if na > nb then na, nb = long, short else na, nb = short, long end
      end
      for i = #ia, na + 1, -1 do ia[i] = nil end
      for i = #ib, nb + 1, -1 do ib[i] = nil end
   end
   return join(ia, ib)
end

--- encode_batch(texts[, {add_special_tokens = true, padding_side, pad_id, truncation, max_length}])
-- -> ids, attention_mask: the texts encoded and padded to the longest (with the file's pad id,
-- else tokenizer_config.json's pad token, else 0), as lists of lists; the mask has 1 for real
-- tokens. padding_side: "right", "left" (suits generation), or by default tokenizer_config.json's,
-- else right. texts may be pairs {a, b} (encode_pair): then token_type_ids (padded with 0) is
-- returned third.
function Tokenizer:encode_batch(texts, opts)
   opts = opts or {}
   if type(texts) ~= "table" or #texts == 0 then
      error("encode_batch: texts must be a non-empty list of strings or of {a, b} pairs", 2)
   end
   local side = opts.padding_side or self.padding_side or "right"
   if side ~= "right" and side ~= "left" then
      error(string.format('encode_batch: padding_side must be "right" or "left", got %s', tostring(side)), 2)
   end
   local pairs_given = type(texts[1]) == "table"
   local rows, type_rows = {}, {}
   for i, t in ipairs(texts) do
      if pairs_given then
         if type(t) ~= "table" or type(t[1]) ~= "string" or type(t[2]) ~= "string" then
            error(string.format("encode_batch: texts[%d] must be a pair {a, b} of strings like texts[1]", i), 2)
         end
         rows[i], type_rows[i] = self:encode_pair(t[1], t[2], opts)
      else
         rows[i] = self:encode(t, opts)
      end
   end
   return self:pad(rows, { padding_side = side, pad_id = opts.pad_id }, pairs_given and type_rows or nil)
end

--- pad(rows[, {padding_side, pad_id}[, type_rows]]) -> ids, attention_mask[, token_type_ids]:
-- encoded rows (lists of ids) padded to the longest as encode_batch pads them; with type_rows
-- (each row's token types), those padded with 0 too.
function Tokenizer:pad(rows, opts, type_rows)
   opts = opts or {}
   local side = opts.padding_side or self.padding_side or "right"
   local pad = opts.pad_id or self.pad_id
   local longest = 0
   for _, r in ipairs(rows) do longest = math.max(longest, #r) end
   local ids, mask, types = {}, {}, {}
   for i, r in ipairs(rows) do
      local row, m, tt, fill = {}, {}, {}, longest - #r
      local tr = type_rows and type_rows[i]
      for k = 1, longest do
         local real = side == "right" and k <= #r or side == "left" and k > fill
         local at = side == "right" and k or k - fill
         row[k] = real and r[at] or pad
         m[k] = real and 1 or 0
         tt[k] = real and tr and tr[at] or 0
      end
      ids[i], mask[i], types[i] = row, m, tt
   end
   if type_rows then return ids, mask, types end
   return ids, mask
end

--- decode(ids[, {skip_special_tokens = false}]) -> text. ids: a list or a 1-D integer tensor.
function Tokenizer:decode(ids, opts)
   opts = opts or {}
   if type(ids) == "table" and ids.tolist then ids = ids:tolist() end
   if type(ids) ~= "table" then error("decode: ids must be a list of token ids or a tensor, got " .. type(ids), 2) end
   local tokens = {}
   for i, id in ipairs(ids) do
      local t = self.to_token[id]
      if t == nil then error(string.format("decode: id %s at position %d is not in the vocabulary (size %d)", tostring(id), i, self.vocab_size), 2) end
      local e = self.added[t]
      if not (opts.skip_special_tokens and e and e.special and e.id == id) then tokens[#tokens + 1] = t end
   end
   return table.concat(self.decode_chain(tokens))
end

--- The id of a token string (nil when unknown), and the token of an id.
function Tokenizer:token_to_id(token)
   local e = self.added[token]
   if e then return e.id end
   return self.model.vocab[token]
end

function Tokenizer:id_to_token(id) return self.to_token[id] end

function Tokenizer:get_vocab_size() return self.vocab_size end

--- A tokenizer from a tokenizer.json file.
function M.from_file(path)
   if type(path) ~= "string" then error("tokenizers.from_file: path must be a string, got " .. type(path), 2) end
   local f, err = io.open(path, "rb")
   if not f then error(string.format("tokenizers.from_file: cannot read %s (%s)", path, tostring(err)), 2) end
   local text = f:read("*a")
   f:close()
   local ok, spec = pcall(cjson.decode, text)
   if not ok or type(spec) ~= "table" then
      error(string.format("tokenizers.from_file: %s is not a JSON object (%s)", path, tostring(spec)), 2)
   end
   local built, t = pcall(Tokenizer, strip_nulls(spec), path)
   if not built then error(t, 2) end
   return t
end

--- apply_chat_template(messages[, {add_generation_prompt = false, tokenize = true, chat_template,
-- ...}]) -> ids, or the text with tokenize = false. messages: a list of {role = ..., content = ...};
-- the template is the folder's (tokenizer_config.json's chat_template, read by from_pretrained)
-- unless chat_template gives one; it sees messages, add_generation_prompt, bos_token, eos_token and
-- any other option (tools, documents, ...), as in transformers. The text is encoded without adding
-- special tokens again (the template writes them).
function Tokenizer:apply_chat_template(messages, opts)
   opts = opts or {}
   if type(messages) ~= "table" then error("apply_chat_template: messages must be a list of {role, content} tables", 2) end
   local source = opts.chat_template or self.chat_template
   if source == nil then
      error(string.format("apply_chat_template: %s has no chat template (tokenizer_config.json's chat_template); "
         .. "pass one as the chat_template option", self.source or "this tokenizer"), 2)
   end
   local compiled = self._templates and self._templates[source]
   if not compiled then
      compiled = require("moonload.tokenizers.jinja").compile(source)
      rawset(self, "_templates", self._templates or {})
      self._templates[source] = compiled
   end
   local vars = { messages = messages, add_generation_prompt = opts.add_generation_prompt == true }
   for k, v in pairs(self.special_token_strings or {}) do vars[k] = v end
   for k, v in pairs(opts) do
      if k ~= "tokenize" and k ~= "chat_template" and k ~= "add_generation_prompt" then vars[k] = v end
   end
   local text = compiled(vars)
   if opts.tokenize == false then return text end
   return self:encode(text, { add_special_tokens = false })
end

--- tok:save_pretrained(dir): tokenizer.json (the pipeline this tokenizer was built from, as
-- tokenizers writes it) and tokenizer_config.json (the chat template and the special token
-- strings) in dir, each under a temporary name first. With ml.save_model, a model loaded from a
-- GGUF file becomes a Hugging Face folder that from_pretrained (and transformers, for a float
-- model) reads.
function Tokenizer:save_pretrained(dir)
   local json = require("moonload.utils.json")
   local offload = require("moonload.utils.offload")
   if type(dir) ~= "string" or dir == "" then error("save_pretrained: dir must be a folder path, got " .. type(dir), 2) end
   local spec = rawget(self, "spec")
   dir = dir:gsub("/+$", "")
   offload.mkdir_p(dir, "save_pretrained")
   local function value(v) return v == nil and cjson.null or v end
   local added = spec.added_tokens
   local out = {
      version = "1.0", truncation = cjson.null, padding = cjson.null,
      added_tokens = (added == nil or next(added) == nil) and json.EMPTY_LIST or added,
      normalizer = value(spec.normalizer), pre_tokenizer = value(spec.pre_tokenizer), model = spec.model,
      post_processor = value(spec.post_processor), decoder = value(spec.decoder),
   }
   local config = { tokenizer_class = "PreTrainedTokenizerFast", clean_up_tokenization_spaces = false,
                    chat_template = rawget(self, "chat_template") }
   for k, v in pairs(rawget(self, "special_token_strings") or {}) do config[k] = v end
   for name, t in pairs({ ["tokenizer.json"] = out, ["tokenizer_config.json"] = config }) do
      local text = json.encode(t) .. "\n"
      offload.write_atomic(dir .. "/" .. name, "save_pretrained", function(f) assert(f:write(text)) end)
   end
end

-- tokenizer_config.json's chat template (a string, or a list of named ones: "default") and the
-- special token strings templates print (bos_token, eos_token, ...).
local function read_tokenizer_config(tok, dir)
   local f = io.open(dir .. "/tokenizer_config.json", "rb")
   if not f then return end
   local ok, cfg = pcall(cjson.decode, f:read("*a"))
   f:close()
   if not ok or type(cfg) ~= "table" then
      error(string.format("tokenizers.from_pretrained: %s/tokenizer_config.json is not a JSON object", dir), 3)
   end
   local tmpl = cfg.chat_template
   if type(tmpl) == "table" then
      for _, t in ipairs(tmpl) do if t.name == "default" then tmpl = t.template break end end
      if type(tmpl) == "table" then tmpl = tmpl[1] and tmpl[1].template end
   end
   if type(tmpl) == "string" then rawset(tok, "chat_template", tmpl) end
   local specials = {}
   for _, k in ipairs({ "bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token" }) do
      local v = cfg[k]
      if type(v) == "table" then v = v.content end
      if type(v) == "string" then specials[k] = v end
   end
   rawset(tok, "special_token_strings", specials)
   -- encode_batch pads with the pad token the config names when tokenizer.json's padding does
   -- not say (XLM-R's <pad> is 1, not 0)
   local spec_padding = type(tok.spec.padding) == "table" and tok.spec.padding.pad_id
   local pad_id = specials.pad_token and tok:token_to_id(specials.pad_token)
   if type(spec_padding) ~= "number" and pad_id then tok.pad_id = pad_id end
   if cfg.padding_side == "left" or cfg.padding_side == "right" then rawset(tok, "padding_side", cfg.padding_side) end
end

--- A tokenizer from a model folder's tokenizer.json (and its tokenizer_config.json's chat template
-- and special token strings, when there is one; chat_template.jinja's template when there is that).
function M.from_pretrained(dir)
   if type(dir) ~= "string" then error("tokenizers.from_pretrained: expected a folder path, got " .. type(dir), 2) end
   if dir:lower():match("%.gguf$") then return M.from_gguf(dir) end       -- (the tokenizer a GGUF file carries)
   local path = dir:gsub("/+$", "") .. "/tokenizer.json"
   local f = io.open(path, "rb")
   if not f then
      -- Marian's folders (opus-mt) have source.spm and vocab.json instead
      local ok, marian = pcall(function() return require("moonload.tokenizers.marian").from_folder(dir:gsub("/+$", "")) end)
      if not ok then error(marian, 2) end
      if marian then return marian end
      error(string.format("tokenizers.from_pretrained: no tokenizer.json in %s (tokenizer.json files and Marian's "
         .. "source.spm + vocab.json are read; for a bare SentencePiece model use tokenizers.from_sentencepiece)", dir), 2)
   end
   f:close()
   local tok = M.from_file(path)
   read_tokenizer_config(tok, dir:gsub("/+$", ""))
   -- a chat_template.jinja beside them wins over tokenizer_config.json's, as in transformers (which
   -- saves templates so; gpt-oss's folders ship theirs so)
   local jf = io.open(dir:gsub("/+$", "") .. "/chat_template.jinja", "rb")
   if jf then
      rawset(tok, "chat_template", jf:read("*a"))
      jf:close()
   end
   return tok
end

--- from_sentencepiece(path): a SentencePiece model file (tokenizer.model, spiece.model, *.spm)
-- read without the sentencepiece library; it encodes and decodes as SentencePieceProcessor does,
-- ids being the file's piece ids and no special tokens added (tokenizers/sentencepiece.lua).
function M.from_sentencepiece(path)
   return require("moonload.tokenizers.sentencepiece").from_file(path)
end

--- from_gguf(path or ml.gguf file): the byte-level BPE tokenizer a GGUF file carries
-- (tokenizers/gguf.lua).
function M.from_gguf(file)
   return require("moonload.tokenizers.gguf").from_gguf(file)
end

return M
