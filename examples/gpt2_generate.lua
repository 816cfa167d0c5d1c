--- Generate text ids with GPT-2 from Lua.
--
--    luajit examples/gpt2_generate.lua                  -- the tiny test checkpoint
--    luajit examples/gpt2_generate.lua path/to/gpt2     -- any folder with config.json +
--                                                        -- model.safetensors (e.g. openai-community/gpt2)
--
-- Token ids are 0-based, as Hugging Face tokenizers produce them. When the folder has a
-- tokenizer.json (the hub's gpt2 does), the prompt is text and the output is decoded with
-- ml.tokenizers; the tiny test checkpoint has none, so there the example prints ids.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local dir = arg[1] or "tests/fixtures/models/gpt2_tiny"
local model = ml.models.from_pretrained(dir)
print(string.format("loaded %s from %s: %d layers, d=%d, vocab %d", model.__name, dir,
   model.config.n_layer, model.config.n_embd, model.config.vocab_size))

local tokenizer
local has_tokenizer = io.open(dir .. "/tokenizer.json", "rb")
if has_tokenizer then
   has_tokenizer:close()
   tokenizer = ml.tokenizers.from_pretrained(dir)
end
local prompt = tokenizer and tokenizer:encode("Moonload runs big models from Lua because") or { 5, 17, 42, 3 }
local function show(ids)
   return tokenizer and string.format("%q", tokenizer:decode(ids)) or table.concat(ids, " ")
end

-- Greedy decoding (temperature absent or 0) with the key-value cache: one token per step.
local greedy = model:generate(prompt, { max_new_tokens = 16 })
print("greedy:  " .. show(greedy))

-- Sampling: temperature, top-k and top-p; the same seed gives the same ids.
local sampled = model:generate(prompt, { max_new_tokens = 16, temperature = 0.8, top_k = 20, top_p = 0.9, seed = 42 })
print("sampled: " .. show(sampled))

-- The logits of the prompt, (batch, tokens, vocab).
local logits = model(ml.tensor({ prompt }, { dtype = "int64" }))
print("logits shape: [" .. table.concat(logits.shape, ", ") .. "]")
