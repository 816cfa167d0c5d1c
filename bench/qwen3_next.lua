--- Qwen3-Next's hybrid layers: a Qwen3-Next-80B-A3B-shaped model shrunk to 4 layers (three
-- Gated DeltaNet linear-attention layers with 16 key and 32 value heads of 128, then one gated
-- attention layer of 16 query heads over 2 key/value heads of 256; hidden 2048; 32 experts of
-- width 512, 10 per token, plus a shared expert; vocab 32000), bfloat16, written once by this
-- file into .bench/qwen3-next with random weights, per expert as the hub stores them.
-- moonload runs the linear layers' recurrence in a C kernel (F.gated_delta_rule) and keeps
-- their state in the cache; transformers on a machine without flash-linear-attention runs its
-- PyTorch fallbacks (chunked for the prompt, one step at a time for decoding). Reported for
-- each, in a process of its own: seconds to load, the growth of resident memory over the load
-- and a warm-up, seconds for 32 greedy tokens after a 128-token prompt, and how many generated
-- ids agree.
-- Environment: BENCH_THREADS (default: all cores).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local DIR, PROMPT, NEW = ".bench/qwen3-next", 128, 32
local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()

local CONFIG = { architectures = { "Qwen3NextForCausalLM" }, model_type = "qwen3_next", vocab_size = 32000,
   hidden_size = 2048, intermediate_size = 5120, num_hidden_layers = 4, num_attention_heads = 16,
   num_key_value_heads = 2, head_dim = 256, linear_num_key_heads = 16, linear_num_value_heads = 32,
   linear_key_head_dim = 128, linear_value_head_dim = 128, linear_conv_kernel_dim = 4, num_experts = 32,
   num_experts_per_tok = 10, moe_intermediate_size = 512, shared_expert_intermediate_size = 512,
   norm_topk_prob = true, decoder_sparse_step = 1, full_attention_interval = 4,
   layer_types = { "linear_attention", "linear_attention", "linear_attention", "full_attention" },
   max_position_embeddings = 262144, rms_norm_eps = 1e-6, hidden_act = "silu", tie_word_embeddings = false,
   rope_parameters = { rope_type = "default", rope_theta = 10000000, partial_rotary_factor = 0.25 },
   dtype = "bfloat16", bos_token_id = 0, eos_token_id = 1, pad_token_id = 0 }

local function write_checkpoint()
   ml.manual_seed(0)
   local model = ml.init_empty_weights(function() return ml.models.qwen3_next.Qwen3NextForCausalLM(CONFIG) end)
   local sd = {}
   for name, p in model:named_parameters() do
      if name:find("A_log$") then
         sd[name] = (ml.rand(p.shape) * 2):to("bfloat16")                  -- decay rates exp(0..2)
      elseif name:find("norm") and p:dim() == 1 then
         sd[name] = (ml.randn(p.shape) * 0.02):to("bfloat16")              -- (1 + w) norms, and the gated one near 0
      elseif p:dim() == 1 then
         sd[name] = ml.ones(p.shape):to("bfloat16")                        -- dt_bias
      else
         sd[name] = (ml.randn(p.shape) * 0.02):to("bfloat16")
      end
   end
   ml.safetensors.save_file(sd, DIR .. "/model.safetensors")
   B.write_config_last(DIR, cjson.encode(CONFIG))
end

B.load_generate_main("qwen3_next", DIR, PROMPT, NEW, threads, write_checkpoint, "hybrid_peer")
