--- A checkpoint in another quantizer's layout under a CPU budget smaller than it: bench/compressed_load.lua's
-- Llama-shaped w4a16 model (540 M weights, compressed-tensors' int32 words) loaded by from_pretrained
-- three ways, each in a process of its own: into RAM (its layers rewritten there), and with
-- device_map "auto", max_memory.cpu = 150 MB and an offload folder, first (the layers rewritten into
-- the folder a batch at a time) and again (the folder used as it is). Reported for each: seconds to
-- load, the process's anonymous memory after the load and after 4 greedy tokens (what the kernel
-- cannot drop: file pages it can), its peak resident memory, and the 4 tokens' seconds. transformers
-- (5.24, with compressed-tensors 0.20) fails at the first forward of such a model with a disk part
-- (AttributeError: no attribute '_hf_hook'), so there is no peer to set beside it.
-- Environment: BENCH_THREADS (default: all cores).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local B = require("benchutil")

local DIR, FOLDER = ".bench/llama-w4a16", ".bench/llama-w4a16-offload"
local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()

local function status_mb(field) return B.proc_field("/proc/self/status", field) / 1024 end

if arg[1] == "--run" then
   local ml = require("moonload")
   ml.set_num_threads(threads)
   local opts = arg[2] ~= "ram" and { device_map = "auto", max_memory = { cpu = "150MB" }, offload_folder = FOLDER } or nil
   local t0 = B.now()
   local model = ml.models.from_pretrained(DIR, opts)
   local load_s = B.now() - t0
   collectgarbage()
   local anon_load = status_mb("RssAnon")
   t0 = B.now()
   model:generate(B.minstd_prompts(1, 8, model.config.vocab_size)[1], { max_new_tokens = 4, eos_token_id = false })
   local generate_s = B.now() - t0
   collectgarbage()
   print(require("cjson").encode({ load_s = load_s, anon_after_load_mb = anon_load, anon_after_generate_mb = status_mb("RssAnon"),
      peak_rss_mb = status_mb("VmHWM"), generate_s = generate_s }))
   return
end

os.execute((os.getenv("LUAJIT") or "luajit") .. " bench/compressed_load.lua --write-only")
os.execute("rm -rf " .. FOLDER)
local result = { bench = "rewrite_offload", threads = threads }
for _, way in ipairs({ "ram", "offload_first", "offload_again" }) do
   local r, err = B.run_json(string.format("%s bench/rewrite_offload.lua --run %s", os.getenv("LUAJIT") or "luajit", way))
   result[way] = r or { error = tostring(err):sub(1, 300) }
end
print(require("cjson").encode(result))
