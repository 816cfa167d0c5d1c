--- GPTBigCode with multi-query attention, SantaCoder's widths in 12 layers (hidden 2048, 16 query heads
-- over one key/value head of 128, an MLP of 8192, vocab 49280, a tied head), bfloat16, written once
-- by this file into .bench/gpt_bigcode with random weights. Multi-query attention keeps one key/value
-- head a layer in the cache, against transformers' own. Reported for each, in a process of its own:
-- seconds to load, the growth of resident memory over the load and a warm-up, seconds for 32 greedy
-- tokens after a 128-token prompt, and how many generated ids agree.
-- Environment: BENCH_THREADS (default: all cores).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local B = require("benchutil")

local DIR, PROMPT, NEW = ".bench/gpt_bigcode", 128, 32
local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()

local CONFIG = { architectures = { "GPTBigCodeForCausalLM" }, model_type = "gpt_bigcode", vocab_size = 49280,
   n_positions = 2048, n_embd = 2048, n_layer = 12, n_head = 16, n_inner = 8192, multi_query = true,
   activation_function = "gelu_pytorch_tanh", layer_norm_epsilon = 1e-5, scale_attn_weights = true,
   tie_word_embeddings = true, dtype = "bfloat16", bos_token_id = 0, eos_token_id = 0 }

local function write_checkpoint()
   ml.manual_seed(0)
   local model = ml.init_empty_weights(function()
      return require("moonload.models.gpt_bigcode").GPTBigCodeForCausalLM(CONFIG)
   end)
   local sd = B.random_ssm_weights(model)            -- (norms near 1, matrices N(0, 0.02))
   for name, t in pairs(sd) do
      if name:find("bias$") and not name:find("ln_") then sd[name] = ml.zeros(t.shape):to("bfloat16") end
   end
   sd["lm_head.weight"] = nil                         -- (tied)
   ml.safetensors.save_file(sd, DIR .. "/model.safetensors")
   B.write_config_last(DIR, require("cjson").encode(CONFIG))
end

B.load_generate_main("gpt_bigcode", DIR, PROMPT, NEW, threads, write_checkpoint, "hybrid_peer")
