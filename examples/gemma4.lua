--- Gemma 4 with its per-layer embedding on disk. An E-model's second embedding (per-layer inputs:
-- hidden_size_per_layer_input values a token for every layer; 262144 x 30 x 256 in transformers'
-- default Gemma 4 config, 4 GB in bfloat16) is only looked up, a row per token, so it stays in the
-- checkpoint's file and a token reads its row's pages alone; the rest is planned into RAM. The
-- example prints each layer's kind (sliding or full, which ones reuse another's keys and values),
-- the tokens as they come, and what the cache holds beside what it would without the reuse.
--
--    luajit examples/gemma4.lua [path/to/model] [cpu budget, e.g. 6GB]
--
-- Any Gemma 4 folder works (the hub's are multimodal: the language model loads alone, text in,
-- text out). Without one it runs tests/fixtures/models/gemma4_multimodal_tiny, a tiny random-weight
-- Gemma 4, so its tokens are noise, but every step is the real one (and equals transformers', see
-- tests/models_gemma4_spec.lua).
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local dir = arg[1] or "tests/fixtures/models/gemma4_multimodal_tiny"
local budget = arg[2] or "200MB"
local folder = os.tmpname()
os.remove(folder)

local model = ml.models.from_pretrained(dir, {
   dtype = "bfloat16", device_map = "auto", max_memory = { cpu = budget }, offload_folder = folder,
   device_overrides = { ["^model%.embed_tokens_per_layer$"] = "disk" },
   reserve_for = { batch_size = 1, max_length = 64, prompt_length = 16 } })

local sizes = ml.utils.compute_module_sizes(model)
local by_place = {}
for prefix, dev in pairs(model.hf_device_map) do
   by_place[tostring(dev)] = (by_place[tostring(dev)] or 0) + sizes[prefix]
end
print(string.format("%s: %s, %.2f MB of weights in RAM, %.2f MB on disk", dir, model.__name,
   (by_place.cpu or 0) / 2 ^ 20, (by_place.disk or 0) / 2 ^ 20))

-- each layer: its kind and head size, "<-N" when it reuses layer N's keys and values (0-based)
local cfg = model.config
local kinds = {}
for i = 1, cfg.num_hidden_layers do
   local kind = (cfg.layer_types[i] == "full_attention" and "full" or "sliding") .. cfg.layer_head_dims[i]
   if cfg.kv_source[i] then kind = kind .. "<-" .. (cfg.kv_source[i] - 1) end
   kinds[i] = kind
end
print("layers: " .. table.concat(kinds, " "))

local tokenizer_ok, tokenizer = pcall(ml.tokenizers.from_pretrained, dir)
local prompt = tokenizer_ok and tokenizer:encode("The capital of France is") or { 2, 5, 17, 42, 3 }
local out = model:generate(prompt, { max_new_tokens = 16, eos_token_id = false,
   on_token = function(ids) io.write(tokenizer_ok and tokenizer:decode({ ids[1] }) or (ids[1] .. " ")); io.flush() end })
print()

-- the cache of one more forward over the whole sequence: the layers that compute keys and values
-- keep them (a sliding layer its window's), the reusing ones nothing
local cache = model:new_cache(#out)
model({ out }, { cache = cache, logits_to_keep = 1 })
local kept, layers_kept, if_all = 0, 0, 0
for i = 1, cfg.num_hidden_layers do
   if cache.k[i] then
      kept = kept + cache.k[i]:nbytes() + cache.v[i]:nbytes()
      layers_kept = layers_kept + 1
   end
   local window = cfg.layer_windows[i]
   local tokens = window and math.min(cache.layer_capacity(#out, #out, window), #out) or #out
   if_all = if_all + 2 * tokens * cfg.layer_kv_heads[i] * cfg.layer_head_dims[i] * 2         -- bfloat16
end
print(string.format("%d tokens; cache: %.1f KB of keys and values in %d of %d layers (%.1f KB if every layer kept its own)",
   cache.length, kept / 1024, layers_kept, cfg.num_hidden_layers, if_all / 1024))
os.execute("rm -rf '" .. folder .. "'")
