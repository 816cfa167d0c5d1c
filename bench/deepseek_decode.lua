--- Decoding with multi-head latent attention on the CPU: a DeepSeek-V2-Lite-shaped model, shrunk
-- to 6 layers (d=1024, 16 heads, kv_lora_rank 512, rotary 64 + 128 other query/key dims, values
-- 128; the first layer dense, then 16 experts of width 352, 4 per token, and 2 shared; vocab
-- 32000, random weights, float32) generates 32 tokens greedily after a 512-token prompt. Timed
-- apart: the prompt (a generate of one token) and the decoding steps after it. moonload decodes
-- with kv_b_proj absorbed into the queries and outputs (attending over the cached latents); the
-- same run times it also forced to expand the latents every step as transformers does, and
-- transformers' DeepseekV2ForCausalLM (bench/deepseek_decode_peer.py through BENCH_PYTHON) with
-- the same thread count. One JSON object; ratios < 1: moonload faster.
-- Environment: BENCH_THREADS (default: all cores), BENCH_REPEATS (2).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local C = require("moonload.C")
local B = require("benchutil")
local deepseek = require("moonload.models.deepseek")

local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()
local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 2
local PROMPT, NEW = 512, 32
C.lib.ml_set_num_threads(threads)

local cfg = { model_type = "deepseek_v2", vocab_size = 32000, hidden_size = 1024, intermediate_size = 2816,
   moe_intermediate_size = 352, num_hidden_layers = 6, num_attention_heads = 16, num_key_value_heads = 16,
   n_routed_experts = 16, n_shared_experts = 2, num_experts_per_tok = 4, topk_method = "greedy",
   first_k_dense_replace = 1, kv_lora_rank = 512, qk_rope_head_dim = 64, qk_nope_head_dim = 128,
   v_head_dim = 128, max_position_embeddings = 4096, rms_norm_eps = 1e-6, tie_word_embeddings = false }
ml.manual_seed(0)
local model = deepseek.DeepseekV2ForCausalLM(cfg)
for _, p in model:named_parameters() do p:normal_(0, 0.02) end
local prompt = B.minstd_prompts(1, PROMPT, cfg.vocab_size)[1]

local function timings()
   local prefill = B.best(repeats, function()
      return model:generate(prompt, { max_new_tokens = 1, eos_token_id = false })
   end)
   local total = B.best(repeats, function()
      local out = model:generate(prompt, { max_new_tokens = NEW, min_new_tokens = NEW, eos_token_id = false })
      assert(#out == PROMPT + NEW)
      return out
   end)
   return prefill, (total - prefill) / (NEW - 1)
end

local prefill_s, step_s = timings()
local absorbs = deepseek.MLAttention.absorbs
deepseek.MLAttention.absorbs = function() return false end
local _, expanded_step_s = timings()
deepseek.MLAttention.absorbs = absorbs
local result = { bench = "deepseek_decode", threads = threads, prompt = PROMPT, new_tokens = NEW,
   prefill_s = prefill_s, decode_step_s = step_s, decode_tok_s = 1 / step_s,
   expanded_decode_step_s = expanded_step_s, absorbed_over_expanded = step_s / expanded_step_s }
B.compare_with_peer(result, string.format("bench/deepseek_decode_peer.py --threads %d --repeats %d --prompt %d --new %d",
   threads, repeats, PROMPT, NEW), { { "prefill_ratio", "prefill_s", "prefill_s" },
   { "decode_step_ratio", "decode_step_s", "decode_step_s" } })
print(require("cjson").encode(result))
