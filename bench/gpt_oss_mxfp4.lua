--- gpt-oss's MXFP4 checkpoints: a gpt-oss-20b-shaped model shrunk to 2 layers (hidden 2880, 64
-- query heads over 8 key/value heads with sinks, 32 experts of width 2880, 4 per token; vocab
-- 32000), written once by this file into .bench/gpt-oss-mxfp4 as the hub stores it: the experts'
-- gate_up_proj and down_proj as MXFP4 blocks and scales (random bytes, scales near 2^-7), the
-- rest bfloat16, config.json's quantization_config {quant_method mxfp4}. moonload keeps the
-- experts packed (a decoding step multiplies from the bytes; a prompt expands one expert at a
-- time); transformers on a machine without a GPU dequantizes them to bfloat16 as it loads (its
-- MXFP4 kernels need a GPU). Reported for each, in a process of its own: seconds to load, the
-- growth of resident memory over the load and a warm-up, seconds for 16 greedy tokens after a
-- 32-token prompt, and how many generated ids agree.
-- Environment: BENCH_THREADS (default: all cores).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local DIR, PROMPT, NEW = ".bench/gpt-oss-mxfp4", 32, 16
local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()

local CONFIG = { architectures = { "GptOssForCausalLM" }, model_type = "gpt_oss", vocab_size = 32000,
   hidden_size = 2880, intermediate_size = 2880, num_hidden_layers = 2, num_attention_heads = 64,
   num_key_value_heads = 8, head_dim = 64, num_local_experts = 32, num_experts_per_tok = 4,
   experts_per_token = 4, sliding_window = 128, layer_types = { "sliding_attention", "full_attention" },
   max_position_embeddings = 131072, rms_norm_eps = 1e-5, attention_bias = true, swiglu_limit = 7.0,
   tie_word_embeddings = false, dtype = "bfloat16", bos_token_id = 0, eos_token_id = 1, pad_token_id = 0,
   rope_theta = 150000, rope_scaling = { rope_type = "yarn", factor = 32.0, beta_fast = 32.0, beta_slow = 1.0,
      truncate = false, original_max_position_embeddings = 4096 },
   quantization_config = { quant_method = "mxfp4", modules_to_not_convert = { "model.layers.*.self_attn",
      "model.layers.*.mlp.router", "model.embed_tokens", "lm_head" } } }

local function write_checkpoint()
   ml.manual_seed(0)
   local model = ml.init_empty_weights(function() return ml.models.gpt_oss.GptOssForCausalLM(CONFIG) end)
   local sd = {}
   for name, p in model:named_parameters() do
      if p.dtype == "uint8" and name:find("_blocks$") then
         sd[name] = (ml.rand(p.shape) * 255.99):to("uint8")
      elseif p.dtype == "uint8" then
         sd[name] = (ml.rand(p.shape) * 2 + 119):to("uint8")     -- 2^-8 and 2^-7: weights up to 0.05
      elseif p:dim() == 1 and name:find("norm") then
         sd[name] = ml.ones(p.shape):to("bfloat16")
      else
         sd[name] = (ml.randn(p.shape) * 0.02):to("bfloat16")
      end
   end
   ml.safetensors.save_file(sd, DIR .. "/model.safetensors")
   -- (transformers' config checks want swiglu_limit a float; cjson writes 7.0 as 7)
   B.write_config_last(DIR, (cjson.encode(CONFIG):gsub('"swiglu_limit":7', '"swiglu_limit":7.0')))
end

B.load_generate_main("gpt_oss_mxfp4", DIR, PROMPT, NEW, threads, write_checkpoint)
