--- Mamba-1: a model of Falcon-Mamba-7B's widths shrunk to 4 layers (hidden 4096, the mixer 8192
-- channels wide with a 16-entry state each, a step of rank 256; vocab 65024, an untied head),
-- bfloat16, written once by this file into .bench/falcon-mamba with random weights. moonload runs
-- the scan in a C kernel (F.ssm_scan's per-channel form) and keeps each mixer's state in the cache;
-- transformers without mamba-ssm and causal-conv1d runs its PyTorch fallbacks (the sequential scan
-- for the prompt, one step at a time for decoding). Reported for each, in a process of its own:
-- seconds to load, the growth of resident memory over the load and a warm-up, seconds for 32
-- greedy tokens after a 128-token prompt, and how many generated ids agree.
-- Environment: BENCH_THREADS (default: all cores).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local DIR, PROMPT, NEW = ".bench/falcon-mamba", 128, 32
local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()

local CONFIG = { architectures = { "FalconMambaForCausalLM" }, model_type = "falcon_mamba", vocab_size = 65024,
   hidden_size = 4096, state_size = 16, num_hidden_layers = 4, expand = 2, conv_kernel = 4, time_step_rank = 256,
   use_bias = false, use_conv_bias = true, layer_norm_epsilon = 1e-5, mixer_rms_eps = 1e-6, residual_in_fp32 = true,
   hidden_act = "silu", tie_word_embeddings = false, dtype = "bfloat16", bos_token_id = 0, eos_token_id = 11,
   pad_token_id = 11 }

local function write_checkpoint()
   ml.manual_seed(0)
   local model = ml.init_empty_weights(function()
      return require("moonload.models.mamba").FalconMambaForCausalLM(CONFIG)
   end)
   local sd = B.random_ssm_weights(model)
   ml.safetensors.save_file(sd, DIR .. "/model.safetensors")
   B.write_config_last(DIR, cjson.encode(CONFIG))
end

B.load_generate_main("falcon_mamba", DIR, PROMPT, NEW, threads, write_checkpoint, "hybrid_peer")
