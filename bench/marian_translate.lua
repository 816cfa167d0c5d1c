--- Marian on the CPU as an opus-mt model translates, on an opus-mt-en-de-shaped model (6 + 6
-- layers, d_model 512, 8 heads, MLP 2048, SiLU, vocabulary 58101, sinusoidal positions, random
-- weights, float32): a 64-token input, 32 new tokens with 4 beams and the pad token banned
-- (bad_words_ids, as opus-mt folders say); next to transformers' generate in the same run with the
-- same thread count (bench/marian_translate_peer.py through BENCH_PYTHON). One JSON object; ratio
-- < 1: moonload faster. Environment: BENCH_THREADS (default: all cores), BENCH_REPEATS (3).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local C = require("moonload.C")
local B = require("benchutil")

local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()
local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 3
local INPUT, NEW, BEAMS = 64, 32, 4
C.lib.ml_set_num_threads(threads)

local PAD = 58100
local cfg = { model_type = "marian", vocab_size = 58101, d_model = 512, encoder_layers = 6, decoder_layers = 6,
   encoder_attention_heads = 8, decoder_attention_heads = 8, encoder_ffn_dim = 2048, decoder_ffn_dim = 2048,
   activation_function = "swish", scale_embedding = true, max_position_embeddings = 512, pad_token_id = PAD,
   decoder_start_token_id = PAD, eos_token_id = 0, forced_eos_token_id = 0 }
ml.manual_seed(0)
local model = ml.models.bart.MarianMTModel(cfg)
local input = B.minstd_prompts(1, INPUT, PAD)[1]
local opts = { max_new_tokens = NEW, min_new_tokens = NEW, num_beams = BEAMS, bad_words_ids = { { PAD } },
   eos_token_id = 0, forced_eos_token_id = 0, no_repeat_ngram_size = 0 }

local beam_s = B.best(repeats, function()
   local out = model:generate(input, opts)
   assert(#out == NEW + 1)
   return out
end)
local result = { bench = "marian_translate", threads = threads, input = INPUT, new_tokens = NEW, num_beams = BEAMS,
   beam_s = beam_s }
B.compare_with_peer(result, string.format("bench/marian_translate_peer.py --threads %d --repeats %d --input %d --new %d --beams %d",
   threads, repeats, INPUT, NEW, BEAMS), { { "beam_ratio", "beam_s", "beam_s" } })
print(require("cjson").encode(result))
