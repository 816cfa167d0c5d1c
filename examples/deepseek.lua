--- A DeepSeek-V3-layout MoE model under a RAM budget: the routed experts (nearly all of the
-- weights) stay on disk, read per token only for the experts the router picks, while attention,
-- the shared experts, the embeddings and the head are planned into memory; FP8 checkpoints keep
-- their float8 bytes. Prints where the weights went, the tokens as they come, and what the latent
-- cache holds per token.
--
--    luajit examples/deepseek.lua [path/to/model] [cpu budget, e.g. 64GB]
--
-- Any DeepSeek-V2/V3 folder works (DeepSeek-V2-Lite, Moonlight, DeepSeek-V3 or Kimi K2 in FP8:
-- give a budget that holds the dense part), and so do their relatives: GLM-4.7-Flash, and the
-- sparse-attention DeepSeek-V3.2 and GLM-5, whose indexers choose the keys each query sees. Without one it runs the test folder
-- tests/fixtures/models/deepseek_v3_fp8_tiny: a tiny random-weight DeepSeek-V3 in FP8, so its tokens
-- are noise, but every step is the real one (and equals transformers', see
-- tests/models_deepseek_spec.lua).
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local dir = arg[1] or "tests/fixtures/models/deepseek_v3_fp8_tiny"
local budget = arg[2] or "200MB"
local folder = os.tmpname()
os.remove(folder)

local model = ml.models.from_pretrained(dir, {
   device_map = "auto", max_memory = { cpu = budget }, offload_folder = folder,
   device_overrides = { ["%.mlp%.experts$"] = "disk" },             -- llama.cpp's -ot exps=...
   reserve_for = { batch_size = 1, max_length = 64, prompt_length = 16 } })

-- bytes per place, each parameter under the device map entry that covers it
local bytes = {}
for name, p in model:named_parameters() do
   local best, where = -1, "?"
   for prefix, dev in pairs(model.hf_device_map) do
      if (prefix == "" or name == prefix or name:sub(1, #prefix + 1) == prefix .. ".") and #prefix > best then
         best, where = #prefix, tostring(dev)
      end
   end
   bytes[where] = (bytes[where] or 0) + p:numel() * p:element_size()
end
print(string.format("%s: %s, %.2f MB of weights in RAM, %.2f MB on disk (the routed experts); projections %s", dir,
   model.__name, (bytes.cpu or 0) / 2 ^ 20, (bytes.disk or 0) / 2 ^ 20, model.model.layers[2].self_attn.kv_b_proj.weight.dtype))

local tokenizer_ok, tokenizer = pcall(ml.tokenizers.from_pretrained, dir)
local prompt = tokenizer_ok and tokenizer:encode("The capital of France is") or { 0, 5, 17, 42, 3 }
local out = model:generate(prompt, { max_new_tokens = 16, eos_token_id = false,
   on_token = function(ids) io.write(tokenizer_ok and tokenizer:decode({ ids[1] }) or (ids[1] .. " ")); io.flush() end })
print()
-- what the cache holds per token: the normed latent and the shared rotary key of each layer, and
-- with sparse attention each indexer's key
local cfg = model.config
local indexers = 0
for _, t in ipairs(cfg.indexer_types or {}) do indexers = indexers + (t == "full" and 1 or 0) end
local per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers + indexers * (cfg.index_head_dim or 0)
print(string.format("%d tokens; the latent cache holds %d values a token (%d per layer%s), where per-head keys and values would be %d",
   #out, per_token, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
   indexers > 0 and string.format(", %d per indexer", cfg.index_head_dim) or "",
   cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)))
if cfg.index_topk then
   print(string.format("sparse attention: %d of %d layers run an indexer; each query attends to its best %d keys",
      indexers, cfg.num_hidden_layers, cfg.index_topk))
end
os.execute("rm -rf '" .. folder .. "'")
