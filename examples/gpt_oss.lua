--- gpt-oss as the hub ships it, under a RAM budget: the experts stay MXFP4 (half a byte a
-- weight) and on disk, read per token only for the 4 the router picks, while attention, the
-- router, the embeddings and the head are planned into memory. Prints where the weights went,
-- what the packed experts would weigh as bfloat16, each layer's attention window, and the tokens
-- as they come.
--
--    luajit examples/gpt_oss.lua [path/to/model] [cpu budget, e.g. 8GB]
--
-- Any gpt-oss folder works (gpt-oss-20b: its dense part is about 3 GB in bfloat16). Without one it
-- runs the test folder tests/fixtures/models/gpt_oss_mxfp4_tiny: a tiny random-weight gpt-oss in
-- MXFP4, so its tokens are noise, but every step is the real one (and equals transformers', see
-- tests/models_gpt_oss_spec.lua).
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local dir = arg[1] or "tests/fixtures/models/gpt_oss_mxfp4_tiny"
local budget = arg[2] or "200MB"
local folder = os.tmpname()
os.remove(folder)

local model = ml.models.from_pretrained(dir, {
   dtype = "bfloat16", device_map = "auto", max_memory = { cpu = budget }, offload_folder = folder,
   device_overrides = { ["%.mlp%.experts$"] = "disk" },             -- llama.cpp's -ot exps=...
   reserve_for = { batch_size = 1, max_length = 64, prompt_length = 16 } })

local sizes = ml.utils.compute_module_sizes(model)
local by_place = {}
for prefix, dev in pairs(model.hf_device_map) do
   by_place[tostring(dev)] = (by_place[tostring(dev)] or 0) + sizes[prefix]
end
local packed, weights = 0, 0
for name, p in model:named_parameters() do
   if name:find("_blocks$") then packed, weights = packed + p:nbytes(), weights + 2 * p:numel() end
end
print(string.format("%s: %s, %.2f MB of weights in RAM, %.2f MB on disk; MXFP4 experts %.2f MB (%.2f MB as bfloat16)",
   dir, model.__name, (by_place.cpu or 0) / 2 ^ 20, (by_place.disk or 0) / 2 ^ 20, packed / 2 ^ 20, 2 * weights / 2 ^ 20))
local windows = {}
for i, layer in ipairs(model.model.layers) do windows[i] = tostring(layer.self_attn.window or "full") end
print("attention windows by layer: " .. table.concat(windows, " "))

local tokenizer_ok, tokenizer = pcall(ml.tokenizers.from_pretrained, dir)
local prompt = tokenizer_ok and tokenizer:encode("The capital of France is") or { 1, 5, 17, 42, 3 }
local out = model:generate(prompt, { max_new_tokens = 16, eos_token_id = false,
   on_token = function(ids) io.write(tokenizer_ok and tokenizer:decode({ ids[1] }) or (ids[1] .. " ")); io.flush() end })
print()
print(string.format("%d tokens", #out))
os.execute("rm -rf '" .. folder .. "'")
