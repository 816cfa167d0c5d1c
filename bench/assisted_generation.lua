--- Assisted generation where it pays: a model whose layers stream from disk at every forward (the
-- pages are evicted after each layer, as for a model larger than RAM), drafted by its own int4
-- copy held in RAM. Greedy decode of NEW tokens after a 64-token prompt, plain and with
-- assistant_model, in the same run: the same tokens, the model's forwards, the draft's
-- acceptance, and the tokens/s ratio; next to transformers' assisted generation over accelerate's
-- disk offload with a dynamic-int8 draft (bench/assisted_generation_peer.py, BENCH_PYTHON) in the
-- same run. The Llama-shaped model (8 layers, d=1024, GQA 16/4, vocab
-- 32000, random weights, bfloat16: 300 MB) is written once to a folder (BENCH_DIR, default
-- /tmp/moonload_bench_assist). Prints one JSON object.
-- Environment: BENCH_NEW (default 48), BENCH_DRAFT (int4 | int8, default int4), BENCH_DROP_PAGES
-- (the hooks' page-drop level, default 2: evicted after each layer; 0: the page cache keeps them),
-- BENCH_ACTIVATIONS (the draft's, ml.set_quantized_activations: int8 (default) | float32).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local hooks = require("moonload.hooks")
local B = require("benchutil")

local NEW = tonumber(os.getenv("BENCH_NEW") or "") or 48
local DRAFT = os.getenv("BENCH_DRAFT") or "int4"
local DROP = tonumber(os.getenv("BENCH_DROP_PAGES") or "") or 2
local dir = os.getenv("BENCH_DIR") or "/tmp/moonload_bench_assist"
local ACTIVATIONS = os.getenv("BENCH_ACTIVATIONS") or "int8"
ml.set_quantized_activations(ACTIVATIONS)             -- (the model is bfloat16: only the draft's layers)

local cfg = { model_type = "llama", architectures = { "LlamaForCausalLM" }, vocab_size = 32000, hidden_size = 1024,
   intermediate_size = 2816, num_hidden_layers = 8, num_attention_heads = 16, num_key_value_heads = 4,
   max_position_embeddings = 4096, rms_norm_eps = 1e-5, rope_theta = 10000.0, tie_word_embeddings = false,
   hidden_act = "silu" }

local f = io.open(dir .. "/config.json")
if f then f:close() else
   ml.manual_seed(0)
   local m = ml.models.llama.LlamaForCausalLM(cfg)
   ml.save_model(m:to("bfloat16"), dir)
end

-- the model: embeddings, norm and head in RAM, every decoder layer on disk (read in place)
local map = { ["model.embed_tokens"] = "cpu", ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" }
for i = 0, cfg.num_hidden_layers - 1 do map["model.layers." .. i] = "disk" end
local model = ml.models.from_pretrained(dir, { device_map = map, offload_folder = dir .. "/offload" })
local draft = ml.models.from_pretrained(dir, { quantize = DRAFT })
hooks.set_drop_pages(DROP)

local prompt = {}
for i = 1, 64 do prompt[i] = (i * 7919) % cfg.vocab_size end
local opts = { max_new_tokens = NEW, eos_token_id = false }
model:generate(prompt, { max_new_tokens = 2, eos_token_id = false })      -- (first-touch costs)

local t0 = B.now()
local plain = model:generate(prompt, opts)
local plain_s = B.now() - t0
local stats = {}
t0 = B.now()
local assisted = model:generate(prompt, { max_new_tokens = NEW, eos_token_id = false, assistant_model = draft,
   assistant_stats = stats })
local assisted_s = B.now() - t0
local same = table.concat(plain, " ") == table.concat(assisted, " ")

-- the peer: transformers' assisted generation over accelerate's disk offload, the same folder
local peer, note = B.run_peer(string.format("bench/assisted_generation_peer.py decode --dir %s --new %d --threads %d --drop-pages %d",
   dir, NEW, ml.get_num_threads(), DROP))
local result = {
   bench = "assisted_generation", new_tokens = NEW, draft = DRAFT, draft_activations = ACTIVATIONS, drop_pages = DROP, threads = ml.get_num_threads(),
   plain_s = plain_s, plain_tokens_per_s = NEW / plain_s, plain_forwards = NEW,
   assisted_s = assisted_s, assisted_tokens_per_s = NEW / assisted_s, assisted_forwards = stats.forwards,
   draft_forwards = stats.draft_forwards, proposed = stats.proposed, accepted = stats.accepted,
   speedup = plain_s / assisted_s, same_tokens = same,
}
if peer then
   result.peer = peer
   result.plain_speedup_vs_peer = result.plain_tokens_per_s / peer.plain_tokens_per_s         -- > 1: moonload faster
   result.assisted_speedup_vs_peer = result.assisted_tokens_per_s / peer.assisted_tokens_per_s
else
   result.peer_note = note
end
print(require("cjson").encode(result))
assert(same, "assisted generation gave other tokens than plain greedy decoding")
