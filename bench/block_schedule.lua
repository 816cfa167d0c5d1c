--- Many prompts through one weight stream: the Llama-shaped checkpoint of bench/fit_context.lua
-- (16 layers, hidden 512, about 340 MB in float32) placed by device_map = "auto" under a 200 MB
-- CPU budget, so the last layers and the head are read from disk. The released pages are evicted
-- from the page cache (MOONLOAD_DROP_PAGES=2), so every forward reads the disk part again, as
-- with a model larger than RAM. 32 prompts of 256 tokens, 16 greedy tokens each, run three ways,
-- each in its own process:
--   micro-batches   4 generate calls of 8 prompts one after the other (what one does when the
--                   whole batch's activations do not fit): the weights are read 4 times a step;
--   block schedule  one generate with micro_batch_size = 8: each layer runs the 4 micro-batches
--                   before the next one loads, so the weights are read once a step;
--   whole batch     one generate of 32 rows: read once, but the activations of all of them.
-- Reported: seconds, bytes read from disk by the process (/proc/self/io), the most moonload's tensors
-- held at once beside the key-value cache (dead ones are collected past 16 MiB, as a reserve_for
-- plan would set it), peak resident memory from just before loading (VmHWM after
-- /proc/self/clear_refs), and whether the tokens agree.
-- Next to transformers + accelerate on the same map running the same micro-batches one after the
-- other (Accelerate has no block schedule; its offload folder stays in the page cache).
-- Environment: BENCH_PYTHON (default /opt/ref/bin/python), BENCH_THREADS (default: all cores).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local dir = ".bench/fit-context-llama"
local BUDGET, BATCH, PROMPT, NEW, MICRO = "200MB", 32, 256, 16, 8
local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()

-- One variant in this process: "micro_batches", "block_schedule" or "whole_batch".
local function run(variant)
   ml.set_num_threads(threads)
   ml.set_gc_cap("cpu", 16 * 2 ^ 20)
   local folder = os.tmpname()
   os.remove(folder)
   local base = B.reset_peak_rss()
   local model = ml.models.from_pretrained(dir, { device_map = "auto", max_memory = { cpu = BUDGET }, offload_folder = folder })
   local on_disk = 0
   local sizes = ml.utils.compute_module_sizes(model)
   for name, dev in pairs(model.hf_device_map) do
      if dev == "disk" then on_disk = on_disk + sizes[name] end
   end
   local rows = B.minstd_prompts(BATCH, PROMPT, model.config.vocab_size)
   collectgarbage()
   local held = ml.memory_allocated("cpu")
   ml.reset_peak_memory("cpu")
   local read0 = B.proc_field("/proc/self/io", "read_bytes")
   local t0 = B.now()
   local out = {}
   if variant == "micro_batches" then
      for first = 1, BATCH, MICRO do
         local part = model:generate({ unpack(rows, first, first + MICRO - 1) }, { max_new_tokens = NEW, eos_token_id = false })
         for i, row in ipairs(part) do out[first + i - 1] = row end
      end
   else
      out = model:generate(rows, { max_new_tokens = NEW, eos_token_id = false, micro_batch_size = variant == "block_schedule" and MICRO or nil })
   end
   local seconds = B.now() - t0
   local read = B.proc_field("/proc/self/io", "read_bytes") - read0
   local rows_at_once = variant == "micro_batches" and MICRO or BATCH
   local cache = 0
   for _, bytes in pairs(ml.utils.kv_cache_sizes(model, { batch_size = rows_at_once, max_length = PROMPT + NEW })) do
      cache = cache + bytes
   end
   local peak = B.proc_field("/proc/self/status", "VmHWM")
   local _, peak_allocated = ml.memory_allocated("cpu")
   os.execute("rm -rf '" .. folder .. "'")
   print(cjson.encode({ seconds = seconds, disk_read_mb = read / 2 ^ 20, disk_weights_mb = on_disk / 2 ^ 20,
      peak_rss_mb = (peak - base) / 1024, kv_cache_mb = cache / 2 ^ 20,
      beside_cache_mb = (peak_allocated - held - cache) / 2 ^ 20, first = { unpack(out[1], PROMPT + 1) }, last = { unpack(out[BATCH], PROMPT + 1) } }))
end

if arg[1] == "--variant" then return run(arg[2]) end

local made, err = B.run_peer("bench/fit_context_peer.py make --dir " .. dir)
if not made then
   print(cjson.encode({ bench = "block_schedule", skipped = "cannot make the checkpoint: " .. tostring(err) }))
   return
end
local luajit = os.getenv("LUAJIT") or "luajit"
local result = { bench = "block_schedule", budget = BUDGET, batch = BATCH, micro_batch = MICRO, prompt = PROMPT,
   new_tokens = NEW, threads = threads }
for _, variant in ipairs({ "micro_batches", "block_schedule", "whole_batch" }) do
   local r, rerr = B.run_json("MOONLOAD_DROP_PAGES=2 " .. luajit .. " bench/block_schedule.lua --variant " .. variant, true)
   if not r then error("moonload " .. variant .. " failed: " .. tostring(rerr)) end
   result[variant] = r
end
local tokens = cjson.encode({ result.micro_batches.first, result.micro_batches.last })
for _, variant in ipairs({ "block_schedule", "whole_batch" }) do
   local r = result[variant]
   r.same_tokens = cjson.encode({ r.first, r.last }) == tokens
   r.time_vs_micro_batches = r.seconds / result.micro_batches.seconds
   r.reads_vs_micro_batches = r.disk_read_mb / math.max(result.micro_batches.disk_read_mb, 1e-9)
end
local peer, perr = B.run_peer(string.format("bench/fit_context_peer.py generate --dir %s --max-memory %s --batch %d --prompt %d --new %d --threads %d --micro-batch %d",
   dir, BUDGET, BATCH, PROMPT, NEW, threads, MICRO))
if peer then
   result.accelerate_micro_batches = peer
   peer.same_tokens = cjson.encode({ peer.generated, peer.generated_last }) == tokens
   peer.generated, peer.generated_last = nil, nil
   result.block_schedule.time_vs_accelerate = result.block_schedule.seconds / peer.seconds
else
   result.peer_error = perr
end
for _, variant in ipairs({ "micro_batches", "block_schedule", "whole_batch" }) do
   result[variant].first, result[variant].last = nil, nil
end
print(cjson.encode(result))
