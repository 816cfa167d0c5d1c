--- A hybrid model under a RAM budget: its routed experts on disk (read per token only for the ones
-- the router picks), the rest planned into memory. Most of its layers keep a state of fixed size
-- in the cache rather than keys and values per token: Qwen3-Next's and Qwen3.5's linear attention,
-- the Mamba-2 mixers of Granite 4.0-h, Bamba and Nemotron-H (whose other layers are attention, an
-- MLP or experts), and Mamba-2 itself, mixers alone. The example prints each layer's kind,
-- the tokens as they come, and what the cache holds at the end beside what attention in every
-- layer would have held.
--
--    luajit examples/hybrid.lua [path/to/model] [cpu budget, e.g. 40GB]
--
-- Any folder of these families works (Qwen3-Next-80B-A3B-Instruct: 160 GB in bfloat16, of which
-- the experts are 154 GB; Qwen3.5-35B-A3B's experts are stacked per projection, one tensor a
-- layer, and go to disk the same way, as do granite-4.0-h-small's). Without one it runs the test
-- folder tests/fixtures/models/qwen3_next_tiny: a tiny random-weight Qwen3-Next, so its tokens
-- are noise, but every step is the real one (and equals transformers', see
-- tests/models_qwen3_next_spec.lua).
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local dir = arg[1] or "tests/fixtures/models/qwen3_next_tiny"
local budget = arg[2] or "200MB"
local folder = os.tmpname()
os.remove(folder)

-- Where each family keeps its experts: Qwen3-Next's are modules of their own, the others' stacked
-- in one module per layer (dense Qwen3.5 and Bamba have none)
local model_type = require("moonload.utils.json").read(dir .. "/config.json").model_type
local experts = model_type:find("^qwen3_5_moe") and "%.mlp%.experts$"
   or ({ qwen3_next = "%.mlp%.experts%.%d+$", granitemoehybrid = "%.block_sparse_moe%.experts$",
         nemotron_h = "%.mixer%.experts%.%d+$" })[model_type]
local model = ml.models.from_pretrained(dir, {
   dtype = "bfloat16", device_map = "auto", max_memory = { cpu = budget }, offload_folder = folder,
   device_overrides = experts and { [experts] = "disk" } or nil,
   reserve_for = { batch_size = 1, max_length = 64, prompt_length = 16 } })

local sizes = ml.utils.compute_module_sizes(model)
local by_place = {}
for prefix, dev in pairs(model.hf_device_map) do
   by_place[tostring(dev)] = (by_place[tostring(dev)] or 0) + sizes[prefix]
end
print(string.format("%s: %s, %.2f MB of weights in RAM, %.2f MB on disk", dir, model.__name,
   (by_place.cpu or 0) / 2 ^ 20, (by_place.disk or 0) / 2 ^ 20))
local kinds = {}
-- a layer's kind: linear attention, a Mamba-2 mixer (Granite's and Bamba's mamba, Nemotron-H's and
-- Mamba-2's mixer), attention, or Nemotron-H's MLP and expert layers (its block_type)
local function kind(layer)
   local mixer = layer.mamba or layer.mixer
   if layer.linear_attn then return "linear" end
   if mixer and mixer.geometry then return "mamba" end
   if layer.self_attn or mixer and mixer.n_head then return "full" end
   return layer.block_type
end
for i, layer in ipairs((model.model or model.backbone).layers) do kinds[i] = kind(layer) end
print("layers: " .. table.concat(kinds, " "))

local tokenizer_ok, tokenizer = pcall(ml.tokenizers.from_pretrained, dir)
local prompt = tokenizer_ok and tokenizer:encode("The capital of France is") or { 1, 5, 17, 42, 3 }
local out = model:generate(prompt, { max_new_tokens = 16, eos_token_id = false,
   on_token = function(ids) io.write(tokenizer_ok and tokenizer:decode({ ids[1] }) or (ids[1] .. " ")); io.flush() end })
print()

-- the cache of one more forward over the whole sequence: states for the linear and mixer layers
local cfg = model.config
local cache = model:new_cache(#out)
model({ out }, { cache = cache, logits_to_keep = 1 })
local states, kv = 0, 0
for i = 1, cfg.num_hidden_layers do
   for _, t in pairs(cache.states[i] or {}) do states = states + t:nbytes() end
   if cache.k[i] then kv = kv + cache.k[i]:nbytes() + cache.v[i]:nbytes() end
end
local line = string.format("%d tokens; cache: %.1f KB of fixed-size state + %.1f KB of keys and values", cache.length,
   states / 1024, kv / 1024)
if cfg.num_key_value_heads then                  -- (a pure Mamba-2 model has no attention to compare with)
   local per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 2      -- bfloat16 keys and values
   line = line .. string.format(" (%.1f KB if all %d layers cached keys and values)",
      per_token * cache.length * cfg.num_hidden_layers / 1024, cfg.num_hidden_layers)
end
print(line)
os.execute("rm -rf '" .. folder .. "'")
