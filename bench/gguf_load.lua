--- Loading llama.cpp's GGUF files: the Llama-shaped checkpoint of bench/fit_context.lua (16 layers,
-- hidden 512, about 340 MB in float32) converted to Q4_0 and to Q8_0 with gguf-py
-- (bench/gguf_load_peer.py make), loaded with ml.models.from_gguf (int4 / int8 layers holding the
-- file's values) next to transformers' GGUF loading (from_pretrained(dir, gguf_file = ...), which
-- widens every weight to float32), in the same run. Reported per file: seconds to load, the growth
-- of resident memory over the load, seconds for 16 greedy tokens after a 16-token prompt, and
-- whether both generated the same ids. Each load runs in a process of its own.
-- Environment: BENCH_THREADS (default: all cores).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local DIR, PROMPT, NEW = ".bench/fit-context-llama", 16, 16
local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()

-- One load and generation in this process.
local function run(file)
   require("moonload.C").lib.ml_set_num_threads(threads)
   local rss0 = B.proc_field("/proc/self/status", "VmRSS")
   local t0 = B.now()
   local model = ml.models.from_gguf(DIR .. "/" .. file)
   local load_s = B.now() - t0
   local rss = B.proc_field("/proc/self/status", "VmRSS") - rss0
   local prompt = B.minstd_prompts(1, PROMPT, model.config.vocab_size)[1]
   model:generate(prompt, { max_new_tokens = 2, eos_token_id = false })
   t0 = B.now()
   local out = model:generate(prompt, { max_new_tokens = NEW, eos_token_id = false })
   print(cjson.encode({ load_s = load_s, rss_growth_mb = rss / 1024, generate_s = B.now() - t0,
      generated = { unpack(out, PROMPT + 1) } }))
end

if arg[1] == "--variant" then return run(arg[2]) end

local made, err = B.run_peer("bench/fit_context_peer.py make --dir " .. DIR)
if not made then
   print(cjson.encode({ bench = "gguf_load", skipped = "cannot make the checkpoint: " .. tostring(err) }))
   return
end
local rows = {}
for _, qtype in ipairs({ "Q4_0", "Q8_0" }) do
   local file = "model-" .. qtype .. ".gguf"
   local ok, e = B.run_peer(string.format("bench/gguf_load_peer.py make --src %s --out %s/%s --type %s", DIR, DIR, file, qtype))
   if not ok then
      print(cjson.encode({ bench = "gguf_load", skipped = "cannot make " .. file .. " (gguf-py): " .. tostring(e) }))
      return
   end
   local mine, merr = B.run_json(string.format("%s bench/gguf_load.lua --variant %s", os.getenv("LUAJIT") or "luajit", file), true)
   if not mine then error("moonload run failed: " .. tostring(merr)) end
   local peer, perr = B.run_peer(string.format("bench/gguf_load_peer.py run --dir %s --file %s --prompt %d --new %d --threads %d",
      DIR, file, PROMPT, NEW, threads))
   local row = { type = qtype, moonload = mine }
   if peer then
      row.peer = peer
      row.same_tokens = cjson.encode(mine.generated) == cjson.encode(peer.generated)
      row.load_ratio = mine.load_s / peer.load_s
      row.rss_ratio = mine.rss_growth_mb / peer.rss_growth_mb
      row.generate_ratio = mine.generate_s / peer.generate_s
      peer.generated = nil
   else
      row.peer_note = "peer failed: " .. tostring(perr)
   end
   mine.generated = nil
   rows[#rows + 1] = row
end
print(cjson.encode({ bench = "gguf_load", prompt = PROMPT, new_tokens = NEW, threads = threads, runs = rows }))
