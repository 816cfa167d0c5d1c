--- A chat turn with an instruct model: the folder's tokenizer.json and chat template
-- (tokenizer_config.json) turn messages into ids, the model generates, the tokenizer decodes.
--
--    luajit examples/chat.lua [path/to/model] ["your message"] [max new tokens]
--
-- Any folder from_pretrained reads works (Llama, Qwen2/3, Mistral, Phi-3/4, Gemma 2/3, ...,
-- e.g. Qwen/Qwen2.5-0.5B-Instruct from the Hugging Face hub), and so does one of llama.cpp's GGUF
-- files (Llama, Qwen2/3: model, tokenizer and chat template in one file). Without one it runs the test
-- folder tests/fixtures/models/chat_tiny: a tiny Llama with random weights over a small trained
-- tokenizer, so the words it answers with are noise, but every step is the real one (and equals
-- transformers', see tests/models_chat_spec.lua). Big models: add a device_map and max_memory to
-- from_pretrained, as in examples/demo.lua.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local dir = arg[1] or "tests/fixtures/models/chat_tiny"
local question = arg[2] or "The quick brown fox jumps over the lazy dog. It's 12:45!"
local max_new = tonumber(arg[3] or "") or (arg[1] and 256 or 16)

local model = ml.models.from_pretrained(dir)
local tokenizer = ml.tokenizers.from_pretrained(dir)

local messages = {
   { role = "system", content = "You are terse." },
   { role = "user", content = question },
}
local prompt = tokenizer:apply_chat_template(messages, { add_generation_prompt = true })
print(string.format("%s: %d layers; prompt of %d tokens:\n%s", model.__name, model.config.num_hidden_layers,
   #prompt, tokenizer:decode(prompt)))

-- Greedy, stopping at the model's end-of-sequence ids (generate takes them from
-- generation_config.json, else config.json, as transformers does), or at the vocabulary's
-- end-of-turn token when neither names one; printed as it comes: the answer so far is decoded
-- after each token and its new end written out, held back while it ends in an incomplete
-- character (U+FFFD).
local eos = ml.models.generation_config.of(model).eos_token_id
   or tokenizer:token_to_id("<|eot_id|>") or tokenizer:token_to_id("<|im_end|>")
   or tokenizer:token_to_id("<end_of_turn>") or tokenizer:token_to_id("<|end|>") or tokenizer:token_to_id("</s>")
local answer, printed = {}, ""
io.write("answer: ")
model:generate(prompt, { max_new_tokens = max_new, eos_token_id = eos, on_token = function(ids)
   answer[#answer + 1] = ids[1]
   local text = tokenizer:decode(answer, { skip_special_tokens = true })
   if text:sub(-3) ~= "\239\191\189" then
      io.write(text:sub(#printed + 1))
      io.flush()
      printed = text
   end
end })
local text = tokenizer:decode(answer, { skip_special_tokens = true })
print(text:sub(#printed + 1))
