--- BART on the CPU as bart-large-cnn summarizes, on a bart-base-shaped model (6 + 6 layers,
-- d_model 768, 12 heads, MLP 3072, vocab 50265, random weights, float32): a 256-token input, 32
-- new tokens with 4 beams, 3-gram blocking, length penalty 2, forced BOS and EOS; next to
-- transformers' generate in the same run with the same thread count
-- (bench/bart_summarize_peer.py through BENCH_PYTHON). One JSON object; ratio < 1: moonload
-- faster. Environment: BENCH_THREADS (default: all cores), BENCH_REPEATS (3).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local C = require("moonload.C")
local B = require("benchutil")

local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()
local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 3
local INPUT, NEW, BEAMS = 256, 32, 4
C.lib.ml_set_num_threads(threads)

local cfg = { model_type = "bart", vocab_size = 50265, d_model = 768, encoder_layers = 6, decoder_layers = 6,
   encoder_attention_heads = 12, decoder_attention_heads = 12, encoder_ffn_dim = 3072, decoder_ffn_dim = 3072,
   max_position_embeddings = 1024, decoder_start_token_id = 2 }
ml.manual_seed(0)
local model = ml.models.bart.BartForConditionalGeneration(cfg)
local input = B.minstd_prompts(1, INPUT, cfg.vocab_size)[1]
local opts = { max_new_tokens = NEW, min_new_tokens = NEW, num_beams = BEAMS, no_repeat_ngram_size = 3,
   length_penalty = 2.0, forced_bos_token_id = 0, forced_eos_token_id = 2, eos_token_id = 2 }

local beam_s = B.best(repeats, function()
   local out = model:generate(input, opts)
   assert(#out == NEW + 1)
   return out
end)
local result = { bench = "bart_summarize", threads = threads, input = INPUT, new_tokens = NEW, num_beams = BEAMS,
   beam_s = beam_s }
B.compare_with_peer(result, string.format("bench/bart_summarize_peer.py --threads %d --repeats %d --input %d --new %d --beams %d",
   threads, repeats, INPUT, NEW, BEAMS), { { "beam_ratio", "beam_s", "beam_s" } })
print(require("cjson").encode(result))
