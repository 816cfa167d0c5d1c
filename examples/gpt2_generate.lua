--- Generate text ids with GPT-2 from Lua.
--
--    luajit examples/gpt2_generate.lua                  -- the tiny test checkpoint
--    luajit examples/gpt2_generate.lua path/to/gpt2     -- any folder with config.json +
--                                                        -- model.safetensors (e.g. openai-community/gpt2)
--
-- Token ids are 0-based, as Hugging Face tokenizers produce them. Without a tokenizer this
-- example prints ids; pass them to a tokenizer's decode to read the text.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local dir = arg[1] or "tests/fixtures/models/gpt2_tiny"
local model = ml.models.from_pretrained(dir)
print(string.format("loaded %s from %s: %d layers, d=%d, vocab %d", model.__name, dir,
   model.config.n_layer, model.config.n_embd, model.config.vocab_size))

local prompt = { 5, 17, 42, 3 }

-- Greedy decoding (temperature absent or 0) with the key-value cache: one token per step.
local greedy = model:generate(prompt, { max_new_tokens = 16 })
print("greedy:  " .. table.concat(greedy, " "))

-- Sampling: temperature and top-k; the same seed gives the same ids.
local sampled = model:generate(prompt, { max_new_tokens = 16, temperature = 0.8, top_k = 20, seed = 42 })
print("sampled: " .. table.concat(sampled, " "))

-- The logits of the prompt, (batch, tokens, vocab).
local logits = model(ml.tensor({ prompt }, { dtype = "int64" }))
print("logits shape: [" .. table.concat(logits.shape, ", ") .. "]")
