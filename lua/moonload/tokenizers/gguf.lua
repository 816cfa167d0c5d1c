--- ml.tokenizers.from_gguf(path or an ml.gguf file) -> the tokenizer a GGUF file carries, for its
-- byte-level BPE vocabularies (tokenizer.ggml.model "gpt2": GPT-2, Llama 3, Qwen2/2.5/3, ...).
--
-- llama.cpp's converter stores the vocabulary by id, each token's type (3 control, 4 user
-- defined: these are tokenizers' added tokens, split out of the text first), the merges, and
-- the name of the pre-tokenizer (tokenizer.ggml.pre) whose split regex the file leaves out. That
-- is rebuilt here as the tokenizer.json those models ship (the same regex, ByteLevel, Llama 3's
-- ignore_merges, Qwen2's NFC), so the ids are tokenizers' own. add_bos_token adds the BOS id in
-- front; the chat template (tokenizer.chat_template) is kept for apply_chat_template.
-- SentencePiece vocabularies ("llama": Llama 2, Mistral), other models and pre-tokenizers not
-- listed here are errors that name them.
local M = {}
local WHO = "tokenizers.from_gguf"

-- The split regexes of the tokenizer.json files these pre-tokenizers come from.
local LLAMA3 = [[(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+]]
local QWEN2 = [[(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+]]

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
}

local function names(t)
   local out = {}
   for k in pairs(t) do out[#out + 1] = k end
   table.sort(out)
   return table.concat(out, ", ")
end

--- spec(f) -> the tokenizer.json table equivalent to GGUF file f's tokenizer.
function M.spec(f)
   local md = f.metadata
   local model = md["tokenizer.ggml.model"]
   if model ~= "gpt2" then
      error(string.format('%s: %s has tokenizer.ggml.model "%s"; byte-level BPE ("gpt2") vocabularies are read',
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
   local bos = md["tokenizer.ggml.bos_token_id"]
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
