--- ml.tokenizers.from_gguf(path or an ml.gguf file) -> the tokenizer a GGUF file carries: byte-level
-- BPE vocabularies (tokenizer.ggml.model "gpt2": GPT-2, Llama 3, Qwen2/2.5/3, ...) and SentencePiece
-- ones ("llama": Llama 2, Mistral; see spm_spec); o200k's (pre "gpt-4o": gpt-oss's files).
--
-- llama.cpp's converter stores the vocabulary by id, each token's type (3 control, 4 user
-- defined: these are tokenizers' added tokens, split out of the text first), the merges, and
-- the name of the pre-tokenizer (tokenizer.ggml.pre) whose split regex the file leaves out. That
-- is rebuilt here as the tokenizer.json those models ship (the same regex, ByteLevel, Llama 3's
-- ignore_merges, Qwen2's NFC), so the ids are tokenizers' own. add_bos_token adds the BOS id in
-- front; the chat template (tokenizer.chat_template) is kept for apply_chat_template.
-- Other models and pre-tokenizers not listed here are errors that name them.
local U = require("moonload.tokenizers.unicode")

local M = {}
local WHO = "tokenizers.from_gguf"

-- The split regexes of the tokenizer.json files these pre-tokenizers come from.
local LLAMA3 = [[(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+]]
local QWEN2 = [[(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+]]
local O200K = [[[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?]]
   .. [[|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?]]
   .. [[|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+]]

local function split_then_bytes(regex)
   return { type = "Sequence", pretokenizers = {
      { type = "Split", pattern = { Regex = regex }, behavior = "Isolated", invert = false },
      { type = "ByteLevel", add_prefix_space = false, trim_offsets = true, use_regex = false } } }
end

-- tokenizer.ggml.pre -> the normalizer, pre-tokenizer and BPE ignore_merges of its tokenizer.json
local PRE = {
   ["gpt-2"] = { pre_tokenizer = { type = "ByteLevel", add_prefix_space = false, trim_offsets = true, use_regex = true } },
   ["llama-bpe"] = { pre_tokenizer = split_then_bytes(LLAMA3), ignore_merges = true },
   ["llama3"] = { pre_tokenizer = split_then_bytes(LLAMA3), ignore_merges = true },
   ["qwen2"] = { normalizer = { type = "NFC" }, pre_tokenizer = split_then_bytes(QWEN2) },
   ["gpt-4o"] = { pre_tokenizer = split_then_bytes(O200K), ignore_merges = true },   -- o200k: gpt-oss's files
}

local function names(t)
   local out = {}
   for k in pairs(t) do out[#out + 1] = k end
   table.sort(out)
   return table.concat(out, ", ")
end

local SPACE = "\226\150\129"            -- U+2581, SentencePiece's space

-- tokenizers' SentencePieceExtractor: the merges a SentencePiece vocabulary implies. Every way a
-- token splits into two tokens is a merge, ranked by the merged token's score (higher first),
-- ties in vocabulary order, and within a token by the ids of its two halves.
local function merges_from_scores(tokens, scores, ids)
   local all = {}
   for i, tok in ipairs(tokens) do
      local local_merges = {}
      local starts = U.char_starts(tok)
      for c = 2, #starts - 1 do
         local l, r = tok:sub(1, starts[c] - 1), tok:sub(starts[c])
         if ids[l] and ids[r] then local_merges[#local_merges + 1] = { l, r } end
      end
      table.sort(local_merges, function(a, b)
         if ids[a[1]] ~= ids[b[1]] then return ids[a[1]] < ids[b[1]] end
         return ids[a[2]] < ids[b[2]]
      end)
      for _, m in ipairs(local_merges) do all[#all + 1] = { m[1], m[2], scores[i] or 0, #all } end
   end
   table.sort(all, function(a, b)            -- (stable: the position breaks ties)
      if a[3] ~= b[3] then return a[3] > b[3] end
      return a[4] < b[4]
   end)
   local out = {}
   for i, m in ipairs(all) do out[i] = { m[1], m[2] } end        -- (pairs: pieces may hold spaces)
   return out
end

-- A SentencePiece vocabulary (tokenizer.ggml.model "llama": Llama 2, Mistral) as the
-- tokenizer.json transformers makes of it: BPE with byte fallback over the merges its scores
-- imply, U+2581 for spaces (and in front, with add_space_prefix).
local function spm_spec(f)
   local md = f.metadata
   local tokens, scores, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.scores"], md["tokenizer.ggml.token_type"] or {}
   if type(tokens) ~= "table" or type(scores) ~= "table" then
      error(string.format("%s: %s has no tokenizer.ggml.tokens and tokenizer.ggml.scores lists", WHO, f.path), 0)
   end
   local vocab, added = {}, {}
   for i, tok in ipairs(tokens) do
      vocab[tok] = i - 1
      local kind = types[i] or 1
      if kind == 2 or kind == 3 or kind == 4 then
         added[#added + 1] = { id = i - 1, content = tok, special = kind ~= 4, normalized = false, single_word = false,
                               lstrip = false, rstrip = false }
      end
   end
   local prefix = md["tokenizer.ggml.add_space_prefix"] ~= false
   local space = { type = "Replace", pattern = { String = " " }, content = SPACE }
   local unk = md["tokenizer.ggml.unknown_token_id"]
   local decoders = { { type = "Replace", pattern = { String = SPACE }, content = " " }, { type = "ByteFallback" },
                      { type = "Fuse" } }
   if prefix then decoders[#decoders + 1] = { type = "Strip", content = " ", start = 1, stop = 0 } end
   return {
      normalizer = prefix and { type = "Sequence", normalizers = { { type = "Prepend", prepend = SPACE }, space } }
         or space,
      model = { type = "BPE", vocab = vocab, merges = merges_from_scores(tokens, scores, vocab), byte_fallback = true,
                fuse_unk = true, unk_token = unk and tokens[unk + 1] or nil },
      decoder = { type = "Sequence", decoders = decoders },
      added_tokens = added,
   }
end

--- spec(f) -> the tokenizer.json table equivalent to GGUF file f's tokenizer.
function M.spec(f)
   local md = f.metadata
   local model = md["tokenizer.ggml.model"]
   if model == "llama" then return M.with_bos(spm_spec(f), md) end
   if model ~= "gpt2" then
      error(string.format('%s: %s has tokenizer.ggml.model "%s"; byte-level BPE ("gpt2") and SentencePiece ("llama") vocabularies are read',
         WHO, f.path, tostring(model)), 0)
   end
   local pre_name = md["tokenizer.ggml.pre"] or "gpt-2"
   local pre = PRE[pre_name]
   if not pre then
      error(string.format('%s: %s has tokenizer.ggml.pre "%s"; moonload knows %s', WHO, f.path, tostring(pre_name),
         names(PRE)), 0)
   end
   local tokens, types, merges = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"] or {}, md["tokenizer.ggml.merges"]
   if type(tokens) ~= "table" or type(merges) ~= "table" then
      error(string.format("%s: %s has no tokenizer.ggml.tokens and tokenizer.ggml.merges lists", WHO, f.path), 0)
   end
   local vocab, added = {}, {}
   for i, tok in ipairs(tokens) do
      local kind = types[i] or 1
      if kind == 3 or kind == 4 then
         added[#added + 1] = { id = i - 1, content = tok, special = kind == 3, normalized = kind == 4, single_word = false,
                               lstrip = false, rstrip = false }
      else
         vocab[tok] = i - 1
      end
   end
   local spec = {
      normalizer = pre.normalizer, pre_tokenizer = pre.pre_tokenizer,
      model = { type = "BPE", vocab = vocab, merges = merges, ignore_merges = pre.ignore_merges or false,
                byte_fallback = false },
      decoder = { type = "ByteLevel", add_prefix_space = true, trim_offsets = true, use_regex = true },
      added_tokens = added,
   }
   return M.with_bos(spec, md)
end

--- with_bos(spec, metadata): spec with a post-processor that puts the BOS id in front when the
-- file says add_bos_token.
function M.with_bos(spec, md)
   local bos, tokens = md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.tokens"]
   if md["tokenizer.ggml.add_bos_token"] == true and bos and tokens[bos + 1] then
      local b = tokens[bos + 1]
      spec.post_processor = { type = "TemplateProcessing",
         single = { { SpecialToken = { id = b, type_id = 0 } }, { Sequence = { id = "A", type_id = 0 } } },
         pair = { { SpecialToken = { id = b, type_id = 0 } }, { Sequence = { id = "A", type_id = 0 } },
                  { SpecialToken = { id = b, type_id = 0 } }, { Sequence = { id = "B", type_id = 1 } } },
         special_tokens = { [b] = { id = b, ids = { bos }, tokens = { b } } } }
   end
   return spec
end

function M.from_gguf(file)
   local gguf = require("moonload.gguf")
   local f = type(file) == "string" and gguf.open(file) or file
   if type(f) ~= "table" or type(f.metadata) ~= "table" then
      error(WHO .. ": expected a .gguf path or an ml.gguf file, got " .. type(file), 2)
   end
   local tok = require("moonload.tokenizers").Tokenizer(M.spec(f), f.path)
   local md = f.metadata
   if type(md["tokenizer.chat_template"]) == "string" then rawset(tok, "chat_template", md["tokenizer.chat_template"]) end
   local specials = {}
   for key, field in pairs({ bos_token = "bos_token_id", eos_token = "eos_token_id", unk_token = "unknown_token_id",
                             pad_token = "padding_token_id" }) do
      local id = md["tokenizer.ggml." .. field]
      if id and md["tokenizer.ggml.tokens"][id + 1] then specials[key] = md["tokenizer.ggml.tokens"][id + 1] end
   end
   rawset(tok, "special_token_strings", specials)
   return tok
end

return M
