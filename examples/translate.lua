--- Translation with a Marian model (Helsinki-NLP's opus-mt folders): the folder's MarianTokenizer
-- (source.spm + vocab.json, read without the sentencepiece library) encodes a padded batch,
-- generate beam-searches as the folder's generation config says (opus-mt: 4 beams, the pad token
-- banned), the tokenizer decodes each translation.
--
--    luajit examples/translate.lua [path/to/opus-mt-en-de] ["text" ...]
--
-- Any opus-mt folder works (with model.safetensors; convert a pytorch_model.bin-only one once with
-- transformers' save_pretrained). A multilingual target wants its language code in front of the
-- text (">>fra<< Hello"). Without a folder it runs tests/fixtures/models/marian_tiny_text: a tiny
-- Marian model with random weights over a small pair of SentencePiece models, so its translations
-- are noise, but every step is the real one (and equals transformers', see
-- tests/models_marian_spec.lua). Big models: add a device_map and max_memory to from_pretrained,
-- as in examples/demo.lua.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local dir = arg[1] or "tests/fixtures/models/marian_tiny_text"
local texts = { select(2, ...) }
if #texts == 0 then
   texts = { "The quick brown fox jumps over the lazy dog.", "Beautiful is better than ugly." }
end

local model = ml.models.from_pretrained(dir)
local tokenizer = ml.tokenizers.from_pretrained(dir)

-- one batch, padded on the right (the encoder reads its input whole; the mask hides the padding)
local ids, mask = tokenizer:encode_batch(texts)
local out = model:generate(ids, { attention_mask = mask, max_new_tokens = arg[1] and 256 or nil })
for i, text in ipairs(texts) do
   print(string.format("%s\n  -> %s", text, tokenizer:decode(out[i], { skip_special_tokens = true })))
end
