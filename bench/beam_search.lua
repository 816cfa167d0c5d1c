--- Beam search on the CPU: a Llama-shaped model (8 layers, d=1024, 16 query heads over 4
-- key/value heads, MLP 2816, vocab 32000, random weights, float32) generates 32 tokens after a
-- 64-token prompt, greedily and with num_beams = 4 (each beam search's cache rows follow their
-- beams every step), next to transformers' generate doing the same in the same run with the same
-- thread count (bench/beam_search_peer.py through BENCH_PYTHON). One JSON object; ratios < 1:
-- moonload faster. Both sides check that the beams returned are num_beams sequences.
-- Environment: BENCH_THREADS (default: all cores), BENCH_REPEATS (3), BENCH_BEAMS (4).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local C = require("moonload.C")
local B = require("benchutil")

local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()
local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 3
local beams = tonumber(os.getenv("BENCH_BEAMS") or "") or 4
local PROMPT, NEW = 64, 32
C.lib.ml_set_num_threads(threads)

local cfg = { model_type = "llama", vocab_size = 32000, hidden_size = 1024, intermediate_size = 2816,
   num_hidden_layers = 8, num_attention_heads = 16, num_key_value_heads = 4, max_position_embeddings = 4096,
   rms_norm_eps = 1e-5, rope_theta = 10000.0, tie_word_embeddings = false, hidden_act = "silu" }
ml.manual_seed(0)
local model = ml.models.llama.LlamaForCausalLM(cfg)
local prompt = B.minstd_prompts(1, PROMPT, cfg.vocab_size)[1]

local greedy_s = B.best(repeats, function()
   return model:generate(prompt, { max_new_tokens = NEW, eos_token_id = false })
end)
local beam_s = B.best(repeats, function()
   local out = model:generate(prompt, { max_new_tokens = NEW, eos_token_id = false, num_beams = beams,
      num_return_sequences = beams })
   assert(#out == beams and #out[1] == PROMPT + NEW)
   return out
end)
local result = { bench = "beam_search", threads = threads, prompt = PROMPT, new_tokens = NEW, num_beams = beams,
   greedy_s = greedy_s, beam_s = beam_s, beam_over_greedy = beam_s / greedy_s }
B.compare_with_peer(result, string.format("bench/beam_search_peer.py --threads %d --repeats %d --prompt %d --new %d --beams %d",
   threads, repeats, PROMPT, NEW, beams), { { "greedy_ratio", "greedy_s", "greedy_s" }, { "beam_ratio", "beam_s", "beam_s" } })
print(require("cjson").encode(result))
