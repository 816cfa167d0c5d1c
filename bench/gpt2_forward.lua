--- GPT-2-small shape (12 layers, d=768, 12 heads, vocab 50257), random float32 weights, CPU:
-- (1) forward on 1x128 tokens, (2) greedy decode of 64 tokens with the KV cache; both next to
-- PyTorch/transformers measured in the same run with the same thread count (bench/gpt2_forward.py
-- through BENCH_PYTHON, default /opt/ref/bin/python; skipped with a note when absent).
-- Prints one JSON object. Run from the repository root: luajit bench/gpt2_forward.lua
-- Environment: BENCH_THREADS (default: all cores), BENCH_REPEATS (10), BENCH_LAYERS (12).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local C = require("moonload.C")
local gpt2 = require("moonload.models.gpt2")
local cjson = require("cjson")
local B = require("benchutil")

local now, median = B.now, B.median

local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()
local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 10
local layers = tonumber(os.getenv("BENCH_LAYERS") or "") or 12
local SEQ, PROMPT, NEW = 128, 16, 64
C.lib.ml_set_num_threads(threads)

ml.manual_seed(0)
local t_build = now()
local model = gpt2.GPT2LMHeadModel({ n_layer = layers, n_embd = 768, n_head = 12, vocab_size = 50257,
   n_positions = 1024 })
t_build = now() - t_build

local ids = {}
local seed = 12345
for i = 1, SEQ do
   seed = (seed * 1103515245 + 12345) % 2147483648
   ids[i] = seed % 50257
end
local input = ml.tensor({ ids }, { dtype = "int64" })

for _ = 1, 2 do model(input) end
local times = {}
for r = 1, repeats do
   collectgarbage()
   local t0 = now()
   model(input)
   times[r] = now() - t0
end
local forward_best = math.min(unpack(times))
local forward_s = median(times)

local prompt = {}
for i = 1, PROMPT do prompt[i] = ids[i] end
model:generate(prompt, { max_new_tokens = 4, eos_token_id = false })
local dts = {}
for r = 1, 3 do
   collectgarbage()
   local t0 = now()
   local out = model:generate(prompt, { max_new_tokens = NEW, eos_token_id = false })
   dts[r] = now() - t0
   assert(#out == PROMPT + NEW)
end
local decode_best = math.min(unpack(dts))
local decode_s = median(dts)

local result = {
   bench = "gpt2_forward", threads = threads, layers = layers, build_s = t_build,
   forward_seq = SEQ, forward_s = forward_s, forward_best_s = forward_best,
   decode_prompt = PROMPT, decode_new_tokens = NEW, decode_s = decode_s, decode_best_s = decode_best,
   decode_tokens_per_s = NEW / decode_s,
}

local python = B.python
if B.have_python() then
   local cmd = string.format("%s bench/gpt2_forward.py --threads %d --repeats %d --layers %d 2>/dev/null",
      python, threads, repeats, layers)
   local p = io.popen(cmd)
   local line = p:read("*a")
   p:close()
   local ok, peer = pcall(cjson.decode, line)
   if ok and type(peer) == "table" then
      result.peer = peer
      -- Ratios of the best runs (the least disturbed by other load on the machine).
      result.forward_ratio = forward_best / peer.forward_best_s          -- < 1: moonload faster
      result.decode_speedup = peer.decode_best_s / decode_best           -- > 1: moonload faster
   else
      result.peer_note = "peer failed: " .. tostring(line)
   end
else
   result.peer_note = "no Python peer at " .. python .. " (set BENCH_PYTHON)"
end
print(cjson.encode(result))
