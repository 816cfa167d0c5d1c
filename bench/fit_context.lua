--- A batch that fits only when the device map counts its key-value cache: a Llama-shaped model
-- (16 layers, hidden 512, about 340 MB in float32, made once by bench/fit_context_peer.py), 32
-- prompts of 16 tokens, 240 greedy tokens each, under an 800 MB CPU budget. The cache alone takes
-- 537 MB. Accelerate's planner counts weights only, so it keeps every layer in RAM and the run
-- goes past the budget; moonload's reserve_for plan sends layers to disk to make room.
-- Reported for each, in the same run: the bytes the map put per device, the peak resident memory
-- from just before loading (VmHWM after /proc/self/clear_refs; mapped checkpoint pages count),
-- its ratio to the budget, seconds, and whether row 0's tokens equal transformers'. moonload runs
-- three times, each in its own process: with Accelerate's plan (no reserve_for), with
-- reserve_for, and with reserve_for and an int8 key-value cache (kv_cache_dtype = "int8", 151 MB
-- instead of 537: more layers stay in RAM; reported with how many of row 0's tokens agree with the
-- float cache's).
-- Environment: BENCH_PYTHON (default /opt/ref/bin/python), BENCH_THREADS (default: all cores).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local dir = ".bench/fit-context-llama"
local BUDGET, BATCH, PROMPT, NEW = "800MB", 32, 16, 240
local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()

-- One variant in this process: "plan" (Accelerate's), "reserve" (reserve_for) or "reserve_int8".
local function run(variant)
   ml.set_num_threads(threads)
   local folder = os.tmpname()
   os.remove(folder)
   local base = B.reset_peak_rss()
   local opts = { device_map = "auto", max_memory = { cpu = BUDGET }, offload_folder = folder }
   if variant ~= "plan" then opts.reserve_for = { batch_size = BATCH, max_length = PROMPT + NEW, prompt_length = PROMPT } end
   if variant == "reserve_int8" then opts.reserve_for.kv_cache_dtype = "int8" end
   local model = ml.models.from_pretrained(dir, opts)
   local sizes = ml.utils.compute_module_sizes(model)
   local per_device = {}
   for name, dev in pairs(model.hf_device_map) do
      per_device[tostring(dev)] = (per_device[tostring(dev)] or 0) + sizes[name]
   end
   local t0 = B.now()
   local out = model:generate(B.minstd_prompts(BATCH, PROMPT, model.config.vocab_size), { max_new_tokens = NEW, eos_token_id = false })
   local seconds = B.now() - t0
   local peak = B.proc_field("/proc/self/status", "VmHWM")
   os.execute("rm -rf '" .. folder .. "'")
   print(cjson.encode({ bytes_per_device = per_device, seconds = seconds, peak_rss_mb = (peak - base) / 1024,
      generated = { unpack(out[1], PROMPT + 1) } }))
end

if arg[1] == "--variant" then return run(arg[2]) end

local made, err = B.run_peer("bench/fit_context_peer.py make --dir " .. dir)
if not made then
   print(cjson.encode({ bench = "fit_context", skipped = "cannot make the checkpoint: " .. tostring(err) }))
   return
end
local budget_mb = ml.utils.convert_file_size_to_int(BUDGET) / 2 ^ 20
local luajit = os.getenv("LUAJIT") or "luajit"
local result = { bench = "fit_context", budget = BUDGET, batch = BATCH, prompt = PROMPT, new_tokens = NEW, threads = threads }
local KEYS = { plan = "moonload_accelerate_plan", reserve = "moonload_reserve_for", reserve_int8 = "moonload_int8_cache" }
for _, variant in ipairs({ "plan", "reserve", "reserve_int8" }) do
   local r, rerr = B.run_json(luajit .. " bench/fit_context.lua --variant " .. variant, true)
   if not r then error("moonload " .. variant .. " failed: " .. tostring(rerr)) end
   r.peak_over_budget = r.peak_rss_mb / budget_mb
   result[KEYS[variant]] = r
end
local agree, float_ids = 0, result.moonload_reserve_for.generated
for i, id in ipairs(result.moonload_int8_cache.generated) do if float_ids[i] == id then agree = agree + 1 end end
result.moonload_int8_cache.tokens_agreeing_with_float_cache = agree
local peer, perr = B.run_peer(string.format("bench/fit_context_peer.py generate --dir %s --max-memory %s --batch %d --prompt %d --new %d --threads %d",
   dir, BUDGET, BATCH, PROMPT, NEW, threads))
if peer then
   peer.peak_over_budget = peer.peak_rss_mb / budget_mb
   result.accelerate = peer
   for _, k in ipairs({ "moonload_accelerate_plan", "moonload_reserve_for", "moonload_int8_cache" }) do
      result[k].same_tokens = cjson.encode(peer.generated) == cjson.encode(result[k].generated)
   end
else
   result.peer_error = perr
end
for _, k in ipairs({ "moonload_accelerate_plan", "moonload_reserve_for", "moonload_int8_cache", "accelerate" }) do
   if result[k] then result[k].generated = nil end
end
print(cjson.encode(result))
