--- Text to text with a T5 model (T5, FLAN-T5, T0, mT5): the folder's tokenizer.json encodes a
-- padded batch, generate runs the encoder once and beam-searches the decoder, the tokenizer
-- decodes each answer.
--
--    luajit examples/t5.lua [path/to/model] ["text" ...]
--
-- Any T5 folder with a tokenizer.json works, e.g. google/flan-t5-base from the Hugging Face hub
-- ("translate English to German: ...", "summarize: ..."). Without one it runs the test folder
-- tests/fixtures/models/t5_tiny_text: a tiny FLAN-T5-shaped model with random weights over a small
-- SentencePiece tokenizer, so its answers are noise, but every step is the real one (and equals
-- transformers', see tests/models_t5_spec.lua). Big models: add a device_map and max_memory to
-- from_pretrained, as in examples/demo.lua.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local dir = arg[1] or "tests/fixtures/models/t5_tiny_text"
local texts = { select(2, ...) }
if #texts == 0 then
   texts = { "summarize: The quick brown fox jumps over the lazy dog.",
      "translate English to German: Beautiful is better than ugly." }
end

local model = ml.models.from_pretrained(dir)
local tokenizer = ml.tokenizers.from_pretrained(dir)

-- one batch, padded on the right (T5 reads its input whole; the mask hides the padding)
local ids, mask = tokenizer:encode_batch(texts)
local out = model:generate(ids, { attention_mask = mask, max_new_tokens = arg[1] and 64 or 12, num_beams = 3,
   no_repeat_ngram_size = 2 })
for i, text in ipairs(texts) do
   print(string.format("%s\n  -> %s", text, tokenizer:decode(out[i], { skip_special_tokens = true })))
end
