--- Gemma 4, an E-model's layout (per-layer inputs, the last layers reusing keys and values; widths
-- of a small one, no hub config at hand) in 8 layers (hidden 1536, 8 query
-- heads over 1 key/value head of 256 on the sliding layers and 512 on the full ones, an MLP of 6144
-- doubled on the last 4 layers, which reuse the keys and values of layers 2 and 3; per-layer
-- inputs of 256 a layer; vocab 262144, a tied head soft-capped at 30; a window of 512), bfloat16,
-- written once by this file into .bench/gemma4 with random weights. For the prompt, moonload runs
-- the 4 layers that reuse keys and values on its last position only (transformers too, with
-- logits_to_keep). Reported for each, in a process of its own: seconds to load, the growth of
-- resident memory over the load and a warm-up, seconds for 32 greedy tokens after a 128-token
-- prompt, and how many generated ids agree.
-- Environment: BENCH_THREADS (default: all cores).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local B = require("benchutil")

local DIR, PROMPT, NEW = ".bench/gemma4", 128, 32
local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()

local S, F = "sliding_attention", "full_attention"
local CONFIG = { architectures = { "Gemma4ForCausalLM" }, model_type = "gemma4_text", vocab_size = 262144,
   hidden_size = 1536, intermediate_size = 6144, num_hidden_layers = 8, num_attention_heads = 8,
   num_key_value_heads = 1, head_dim = 256, global_head_dim = 512, layer_types = { S, S, S, F, S, S, S, F },
   num_kv_shared_layers = 4, use_double_wide_mlp = true, vocab_size_per_layer_input = 262144,
   hidden_size_per_layer_input = 256, sliding_window = 512, final_logit_softcapping = 30.0,
   hidden_activation = "gelu_pytorch_tanh", rms_norm_eps = 1e-6, max_position_embeddings = 131072,
   tie_word_embeddings = true, dtype = "bfloat16", bos_token_id = 2, eos_token_id = 1, pad_token_id = 0 }

local function write_checkpoint()
   ml.manual_seed(0)
   local model = ml.init_empty_weights(function()
      return require("moonload.models.gemma4").Gemma4ForCausalLM(CONFIG)
   end)
   local sd = B.random_ssm_weights(model)            -- (norms near 1, matrices N(0, 0.02))
   for name, b in model:named_buffers() do
      if name:find("layer_scalar$") then sd[name] = ml.ones(b.shape):to("bfloat16") end
   end
   sd["lm_head.weight"] = nil                         -- (tied)
   ml.safetensors.save_file(sd, DIR .. "/model.safetensors")
   -- (transformers' strict config wants the cap as a float: 30.0, not 30)
   B.write_config_last(DIR, require("moonload.utils.json").encode(CONFIG, nil, nil, { final_logit_softcapping = true }))
end

B.load_generate_main("gemma4", DIR, PROMPT, NEW, threads, write_checkpoint, "hybrid_peer")

-- A 512-token prompt through the base model: every layer on every position, against the layers
-- that reuse keys and values on the last position only (what generate asks for).
if arg[1] ~= "--run" then
   require("moonload.C").lib.ml_set_num_threads(threads)
   local model = ml.models.from_pretrained(DIR)
   local ids = ml.tensor(B.minstd_prompts(1, 512, CONFIG.vocab_size), { dtype = "int64" })
   model.model(ids, nil, nil, nil, nil, 1)
   local all = B.best(3, function() return model.model(ids) end)
   local last = B.best(3, function() return model.model(ids, nil, nil, nil, nil, 1) end)
   print(require("cjson").encode({ bench = "gemma4_prompt_reuse", prompt = 512, threads = threads, all_positions_s = all,
      last_position_s = last, speedup = all / last }))
end
