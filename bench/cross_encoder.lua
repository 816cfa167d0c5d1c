--- Reranking on the CPU as sentence-transformers' CrossEncoder reranks: a cross-encoder of
-- ms-marco-MiniLM-L-6-v2's shape (BertForSequenceClassification: 6 layers, hidden 384, 12 heads,
-- MLP 1536, one label; random weights, float32) with all-MiniLM-L6-v2's real WordPiece tokenizer
-- (tests/fixtures/tokenizers/minilm_wordpiece), saved to a temporary folder that both sides load:
-- predict over 64 (query, passage) pairs cut at 256 tokens, tokenizing included; next to
-- CrossEncoder.predict on the same folder in the same run with the same thread count
-- (bench/cross_encoder_peer.py through BENCH_PYTHON). One JSON object; ratio < 1: moonload faster.
-- Environment: BENCH_THREADS (default: all cores), BENCH_REPEATS (3).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local C = require("moonload.C")
local B = require("benchutil")

local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()
local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 3
local PAIRS, MAX_LENGTH = 64, 256
C.lib.ml_set_num_threads(threads)

local dir = os.tmpname()
os.remove(dir)
assert(os.execute("mkdir -p " .. dir) == 0 or true)
local cfg = { model_type = "bert", architectures = { "BertForSequenceClassification" }, vocab_size = 30522,
   hidden_size = 384, num_hidden_layers = 6, num_attention_heads = 12, intermediate_size = 1536,
   max_position_embeddings = 512, type_vocab_size = 2, num_labels = 1, id2label = { ["0"] = "LABEL_0" },
   label2id = { LABEL_0 = 0 }, hidden_act = "gelu", layer_norm_eps = 1e-12 }
ml.manual_seed(0)
local model = ml.models.bert.BertForSequenceClassification(cfg)
for _, p in model:named_parameters() do p:copy_(ml.randn(p.shape) * 0.05) end
ml.save_model(model, dir)
local tok = "tests/fixtures/tokenizers/minilm_wordpiece/"
os.execute(string.format("cp %stokenizer.json %s/ && printf '%s' > %s/tokenizer_config.json", tok, dir,
   '{"model_max_length": ' .. MAX_LENGTH .. ', "do_lower_case": true}', dir))

-- queries and passages of varied lengths, words from a fixed list (MINSTD picks)
local words = { "the", "city", "population", "museum", "river", "how", "many", "people", "live", "in", "Berlin",
   "history", "of", "art", "was", "founded", "year", "largest", "German", "capital", "and", "its", "famous" }
local seed = 12345
local function pick() seed = (seed * 48271) % 2147483647; return words[seed % #words + 1] end
local function text(n) local t = {} for i = 1, n do t[i] = pick() end return table.concat(t, " ") end
local pair_list = {}
for i = 1, PAIRS do pair_list[i] = { text(6 + i % 5), text(40 + (i * 37) % 200) } end
local file = dir .. "/pairs.json"
local f = assert(io.open(file, "w")); f:write(require("cjson").encode(pair_list)); f:close()

local ce = ml.models.cross_encoder.from_pretrained(dir)
local scores
local predict_s = B.best(repeats, function() scores = ce:predict(pair_list) end)
local result = { bench = "cross_encoder", threads = threads, pairs = PAIRS, max_length = MAX_LENGTH,
   predict_s = predict_s, pairs_per_s = PAIRS / predict_s }
B.compare_with_peer(result, string.format("bench/cross_encoder_peer.py --threads %d --repeats %d --dir %s",
   threads, repeats, dir), { { "predict_ratio", "predict_s", "predict_s" } })
if result.peer and result.peer.scores then
   local diff = 0
   for i, s in ipairs(scores:tolist()) do diff = math.max(diff, math.abs(s - result.peer.scores[i])) end
   result.max_score_diff, result.peer.scores = diff, nil
end
os.execute("rm -rf " .. dir)
print(require("cjson").encode(result))
