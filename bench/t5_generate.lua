--- T5 on the CPU: a FLAN-T5-base-shaped model (12 + 12 blocks, d_model 768, 12 heads of 64,
-- gated-GELU MLP 2048, vocab 32128, random weights, float32) encodes a 128-token input and
-- generates 32 tokens, greedily and with num_beams = 4, next to transformers' generate in the same
-- run with the same thread count (bench/t5_generate_peer.py through BENCH_PYTHON). One JSON
-- object; ratios < 1: moonload faster. Environment: BENCH_THREADS (default: all cores),
-- BENCH_REPEATS (3).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local C = require("moonload.C")
local B = require("benchutil")

local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()
local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 3
local INPUT, NEW, BEAMS = 128, 32, 4
C.lib.ml_set_num_threads(threads)

local cfg = { model_type = "t5", vocab_size = 32128, d_model = 768, d_kv = 64, d_ff = 2048, num_layers = 12,
   num_heads = 12, feed_forward_proj = "gated-gelu", tie_word_embeddings = false, relative_attention_num_buckets = 32,
   relative_attention_max_distance = 128, decoder_start_token_id = 0 }
ml.manual_seed(0)
local model = ml.models.t5.T5ForConditionalGeneration(cfg)
local input = B.minstd_prompts(1, INPUT, cfg.vocab_size)[1]

local greedy_s = B.best(repeats, function()
   local out = model:generate(input, { max_new_tokens = NEW, min_new_tokens = NEW, eos_token_id = 1 })
   assert(#out == NEW + 1)
   return out
end)
local beam_s = B.best(repeats, function()
   local out = model:generate(input, { max_new_tokens = NEW, min_new_tokens = NEW, eos_token_id = 1, num_beams = BEAMS })
   assert(#out == NEW + 1)
   return out
end)
local result = { bench = "t5_generate", threads = threads, input = INPUT, new_tokens = NEW, num_beams = BEAMS,
   greedy_s = greedy_s, beam_s = beam_s }
B.compare_with_peer(result, string.format("bench/t5_generate_peer.py --threads %d --repeats %d --input %d --new %d --beams %d",
   threads, repeats, INPUT, NEW, BEAMS), { { "greedy_ratio", "greedy_s", "greedy_s" }, { "beam_ratio", "beam_s", "beam_s" } })
print(require("cjson").encode(result))
