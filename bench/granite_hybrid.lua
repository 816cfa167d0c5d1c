--- Granite 4.0's Mamba-2 hybrid: a model of granite-4.0-h-tiny's widths shrunk to 4 layers (three
-- Mamba-2 mixers of 48 heads of 64 with a 128-wide state, then one attention layer of 12 query heads
-- over 4 key/value heads of 128, no position embedding; hidden 1536; in every layer 64 experts of
-- width 512, 6 per token, beside a shared SwiGLU of 1024; vocab 100352), bfloat16, written once by
-- this file into .bench/granite-hybrid with random weights, its experts stacked as the hub stores
-- them. moonload runs the mixers' scan in a C kernel (F.ssm_scan) and keeps their state in the
-- cache; transformers without mamba-ssm and causal-conv1d runs its PyTorch fallbacks (chunked for
-- the prompt, one step at a time for decoding). Reported for each, in a process of its own:
-- seconds to load, the growth of resident memory over the load and a warm-up, seconds for 32
-- greedy tokens after a 128-token prompt, and how many generated ids agree.
-- Environment: BENCH_THREADS (default: all cores).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local DIR, PROMPT, NEW = ".bench/granite-hybrid", 128, 32
local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()

local CONFIG = { architectures = { "GraniteMoeHybridForCausalLM" }, model_type = "granitemoehybrid",
   vocab_size = 100352, hidden_size = 1536, intermediate_size = 512, shared_intermediate_size = 1024,
   num_hidden_layers = 4, num_attention_heads = 12, num_key_value_heads = 4, num_local_experts = 64,
   num_experts_per_tok = 6, layer_types = { "mamba", "mamba", "mamba", "attention" },
   position_embedding_type = "nope", mamba_n_heads = 48, mamba_d_head = 64, mamba_d_state = 128,
   mamba_n_groups = 1, mamba_d_conv = 4, mamba_expand = 2, mamba_chunk_size = 256, mamba_conv_bias = true,
   mamba_proj_bias = false, embedding_multiplier = 12, residual_multiplier = 0.22, attention_multiplier = 0.0078125,
   logits_scaling = 6, max_position_embeddings = 131072, rms_norm_eps = 1e-5, hidden_act = "silu",
   tie_word_embeddings = true, dtype = "bfloat16", bos_token_id = 100257, eos_token_id = 100257, pad_token_id = 100256 }

local function write_checkpoint()
   ml.manual_seed(0)
   local model = ml.init_empty_weights(function()
      return require("moonload.models.bamba").GraniteMoeHybridForCausalLM(CONFIG)
   end)
   local sd = B.random_ssm_weights(model)
   -- the hub's names for the experts and the router (transformers renames them as it loads)
   local hub_names = {}
   for name in pairs(sd) do
      local hub = name:gsub("%.experts%.gate_up_proj$", ".input_linear.weight"):gsub("%.experts%.down_proj$",
         ".output_linear.weight"):gsub("%.router%.weight$", ".router.layer.weight")
      if hub ~= name then hub_names[name] = hub end
   end
   for name, hub in pairs(hub_names) do sd[hub], sd[name] = sd[name], nil end
   sd["lm_head.weight"] = nil                                            -- (tied)
   ml.safetensors.save_file(sd, DIR .. "/model.safetensors")
   B.write_config_last(DIR, cjson.encode(CONFIG))
end

B.load_generate_main("granite_hybrid", DIR, PROMPT, NEW, threads, write_checkpoint, "hybrid_peer")
