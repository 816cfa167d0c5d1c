--- Decoding a long context with DeepSeek Sparse Attention on the CPU: a DeepSeek-V3.2-shaped model
-- shrunk to 4 layers (d=1024; 16 heads of latent attention: kv_lora_rank 512, rotary 64 + 128
-- other query/key dims, values 128, q_lora_rank 768; indexers of 32 heads of 128 keeping the best
-- 1024 keys, half V3.2's 2048 as the context is shrunk; the first layer dense, then 16 experts of
-- width 352, 4 per token, and a shared one; vocab 32000; random weights, float32) generates 16
-- tokens greedily after a 4096-token prompt. Timed apart from each token's arrival: the prompt
-- (to the first new token) and the decoding steps after it (first to last new token), best of
-- the repeats each. The same run times the decoding steps with the indexers' choice
-- turned off (every key attended: what the model would cost without sparse attention), and
-- transformers' DeepseekV32ForCausalLM (bench/dsa_decode_peer.py through BENCH_PYTHON) with the
-- same thread count. One JSON object; ratios < 1: moonload faster.
-- Environment: BENCH_THREADS (default: all cores), BENCH_REPEATS (2), BENCH_PROMPT (4096).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local C = require("moonload.C")
local B = require("benchutil")
local sparse = require("moonload.models.deepseek_sparse")

local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()
local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 2
local PROMPT, NEW = tonumber(os.getenv("BENCH_PROMPT") or "") or 4096, 16
C.lib.ml_set_num_threads(threads)

local cfg = { model_type = "deepseek_v32", vocab_size = 32000, hidden_size = 1024, intermediate_size = 2816,
   moe_intermediate_size = 352, num_hidden_layers = 4, num_attention_heads = 16, num_key_value_heads = 16,
   n_routed_experts = 16, n_shared_experts = 1, num_experts_per_tok = 4, n_group = 1, topk_group = 1,
   first_k_dense_replace = 1, kv_lora_rank = 512, q_lora_rank = 768, qk_rope_head_dim = 64, qk_nope_head_dim = 128,
   v_head_dim = 128, index_topk = 1024, index_head_dim = 128, index_n_heads = 32, max_position_embeddings = 8192,
   rms_norm_eps = 1e-6, tie_word_embeddings = false }
ml.manual_seed(0)
local model = sparse.DeepseekV32ForCausalLM(cfg)
for _, p in model:named_parameters() do p:normal_(0, 0.02) end
local prompt = B.minstd_prompts(1, PROMPT, cfg.vocab_size)[1]

local function timings()
   local prefill, step = math.huge, math.huge
   for _ = 1, repeats do
      local arrived = {}
      local t0 = B.now()
      local out = model:generate(prompt, { max_new_tokens = NEW, min_new_tokens = NEW, eos_token_id = false,
         on_token = function() arrived[#arrived + 1] = B.now() end })
      assert(#out == PROMPT + NEW and #arrived == NEW)
      prefill = math.min(prefill, arrived[1] - t0)
      step = math.min(step, (arrived[NEW] - arrived[1]) / (NEW - 1))
   end
   return prefill, step
end

local prefill_s, step_s = timings()
local choice = sparse.DsaAttention.key_choice
sparse.DsaAttention.key_choice = function() return nil end
local _, dense_step_s = timings()
sparse.DsaAttention.key_choice = choice
local result = { bench = "dsa_decode", threads = threads, prompt = PROMPT, new_tokens = NEW,
   index_topk = cfg.index_topk, prefill_s = prefill_s, decode_step_s = step_s, decode_tok_s = 1 / step_s,
   all_keys_decode_step_s = dense_step_s, sparse_over_all_keys = step_s / dense_step_s }
B.compare_with_peer(result, string.format("bench/dsa_decode_peer.py --threads %d --repeats %d --prompt %d --new %d",
   threads, repeats, PROMPT, NEW), { { "prefill_ratio", "prefill_s", "prefill_s" },
   { "decode_step_ratio", "decode_step_s", "decode_step_s" } })
print(require("cjson").encode(result))
