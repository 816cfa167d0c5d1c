-- `make demo`: big-model inference end to end on a GPT-2-small-shaped model (124M parameters,
-- ~500 MB of float32).
--
--  1. Writes a random checkpoint once (sharded safetensors + model.safetensors.index.json, as
--     Hugging Face saves it) into a cache folder (.bench/demo-gpt2-small, or $MOONLOAD_DEMO_DIR).
--  2. Builds the model empty (init_empty_weights: no memory), plans a device map under a CPU
--     budget too small for the whole model, so the last blocks go to "disk", and loads the
--     checkpoint with load_checkpoint_and_dispatch: CPU weights are zero-copy views into the
--     checkpoint files; disk weights stay in the files and are mapped at their block's forward,
--     the next block's pages read ahead on a worker thread.
--  3. Prints the device map, the bytes per device, a short greedy generation and the timings.
--
--    luajit examples/demo.lua [--cpu-budget 350MB] [--tokens 8]
--    luajit examples/demo.lua --write-only      # only make sure the checkpoint exists (benchmarks)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")
local hooks = require("moonload.hooks")
local cjson = require("cjson")
local ffi = require("ffi")

pcall(ffi.cdef, "typedef struct { long tv_sec; long tv_nsec; } ml_demo_timespec; int clock_gettime(int, ml_demo_timespec *);")
local ts = ffi.new("ml_demo_timespec")
local function now()
   ffi.C.clock_gettime(1, ts)
   return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local opts = { budget = "350MB", tokens = 8, write_only = false }
do
   local i = 1
   while arg[i] do
      if arg[i] == "--cpu-budget" then opts.budget = arg[i + 1]; i = i + 2
      elseif arg[i] == "--tokens" then opts.tokens = tonumber(arg[i + 1]); i = i + 2
      elseif arg[i] == "--write-only" then opts.write_only = true; i = i + 1
      else error("demo: unknown argument " .. arg[i] .. " (use --cpu-budget SIZE, --tokens N, --write-only)", 0) end
   end
end

local DIR = os.getenv("MOONLOAD_DEMO_DIR") or ".bench/demo-gpt2-small"
local CONFIG = {
   model_type = "gpt2", architectures = { "GPT2LMHeadModel" }, vocab_size = 50257,
   n_positions = 1024, n_embd = 768, n_layer = 12, n_head = 12, activation_function = "gelu_new",
   layer_norm_epsilon = 1e-5, tie_word_embeddings = true, bos_token_id = 50256, eos_token_id = 50256,
}
local SHARD_BYTES = 100 * 1000 * 1000

local function exists(path)
   local f = io.open(path, "rb")
   if f then f:close(); return true end
   return false
end

local function mb(n) return string.format("%.1f MB", n / 1e6) end

local function peak_rss_mb()
   local f = io.open("/proc/self/status", "r")
   local s = f and f:read("*a") or ""
   if f then f:close() end
   local hwm, rss = s:match("VmHWM:%s*(%d+)"), s:match("VmRSS:%s*(%d+)")
   return (tonumber(hwm) or 0) / 1024, (tonumber(rss) or 0) / 1024
end

-- --- 1. the checkpoint ---------------------------------------------------------------------------

local index_path = DIR .. "/model.safetensors.index.json"
if not exists(index_path) or not exists(DIR .. "/config.json") then
   print(string.format("writing a random GPT-2-small-shaped checkpoint to %s (once) ...", DIR))
   local t0 = now()
   assert(os.execute("mkdir -p '" .. DIR .. "'") == 0 or true)
   ml.manual_seed(0)
   local model = ml.models.gpt2.GPT2LMHeadModel(CONFIG)
   local sd, keys = model:state_dict()
   -- the tied lm_head.weight is not saved, as transformers does
   local names = {}
   for _, k in ipairs(keys) do if k ~= "lm_head.weight" then names[#names + 1] = k end end
   local shards, cur, cur_bytes = {}, {}, 0
   for _, k in ipairs(names) do
      local n = sd[k]:nbytes()
      if cur_bytes > 0 and cur_bytes + n > SHARD_BYTES then
         shards[#shards + 1] = cur
         cur, cur_bytes = {}, 0
      end
      cur[k] = sd[k]
      cur_bytes = cur_bytes + n
   end
   shards[#shards + 1] = cur
   local weight_map, total = {}, 0
   for i, shard in ipairs(shards) do
      local file = string.format("model-%05d-of-%05d.safetensors", i, #shards)
      ml.safetensors.save_file(shard, DIR .. "/" .. file, { format = "pt" })
      for k, t in pairs(shard) do weight_map[k] = file; total = total + t:nbytes() end
   end
   local f = assert(io.open(index_path, "w"))
   f:write(cjson.encode({ metadata = { total_size = total }, weight_map = weight_map }))
   f:close()
   f = assert(io.open(DIR .. "/config.json", "w"))
   f:write(cjson.encode(CONFIG))
   f:close()
   local nshards = #shards
   model, sd, shards, cur = nil, nil, nil, nil   -- the random weights: freed before loading
   collectgarbage()
   collectgarbage()
   ml.empty_cache()   -- and not kept in the CPU block cache either (RSS)
   print(string.format("  %d shards, %s, written in %.2f s", nshards, mb(total), now() - t0))
   -- the peak reported at the end is the run's, not the writing's: VmHWM starts again from VmRSS
   local f_refs = io.open("/proc/self/clear_refs", "w")
   if f_refs then
      f_refs:write("5")
      f_refs:close()
   end
end

if opts.write_only then
   print(DIR)
   os.exit(0)
end

-- --- 2. empty model, plan, load and dispatch -----------------------------------------------------------

local t_build0 = now()
local model = ml.init_empty_weights(function() return ml.models.gpt2.GPT2LMHeadModel(DIR .. "/config.json") end)
local t_build = now() - t_build0

local offload_folder = DIR .. "/offload"
-- The demo plays a machine with only the CPU budget of RAM: there, the hooks unmap each disk
-- block's pages after it runs so RSS stays near the budget. (The default drop level, "auto",
-- does this by itself once the offloaded weights exceed half of the real RAM; this machine
-- has far more than 500 MB, so ask for it explicitly.)
hooks.set_drop_pages(1)
local t_load0 = now()
local warnings = {}
local prev_handler = ml.utils.set_warning_handler(function(msg, level)
   if level == "warning" then warnings[#warnings + 1] = msg end
end)
ml.load_checkpoint_and_dispatch(model, index_path, {
   device_map = "auto", max_memory = { cpu = opts.budget },
   no_split_module_classes = { "GPT2Block" }, offload_folder = offload_folder })
ml.utils.set_warning_handler(prev_handler)
local t_load = now() - t_load0

print(string.format("\nGPT-2 small shape: %d layers, d=%d, vocab %d; CPU budget %s", CONFIG.n_layer, CONFIG.n_embd,
   CONFIG.vocab_size, opts.budget))
print("device map (load_checkpoint_and_dispatch, device_map = \"auto\"):")
local map = model.hf_device_map
local keys = {}
for k in pairs(map) do keys[#keys + 1] = k end
local function rank(k)
   local i = k:match("^transformer%.h%.(%d+)")
   if i then return 100 + tonumber(i) end
   if k:find("^transformer%.wte") then return 1 end
   if k:find("^transformer%.wpe") then return 2 end
   if k:find("^transformer%.ln_f") then return 200 end
   if k:find("^lm_head") then return 300 end
   return 50
end
table.sort(keys, function(a, b)
   if rank(a) ~= rank(b) then return rank(a) < rank(b) end
   return a < b
end)
for _, k in ipairs(keys) do print(string.format("  %-28s %s", k == "" and '""' or k, tostring(map[k]))) end

-- bytes per device: what the map puts there, and what moonload itself allocated
local sizes = ml.utils.compute_module_sizes(model)
local per_device = {}
for _, k in ipairs(keys) do
   local d = tostring(map[k])
   per_device[d] = (per_device[d] or 0) + (sizes[k] or 0)
end
local in_use = ml.memory_allocated("cpu")
print("bytes per device:")
for _, d in ipairs({ "cpu", "disk" }) do
   if per_device[d] then print(string.format("  %-5s %s of weights", d, mb(per_device[d]))) end
end
print(string.format("  moonload's own CPU allocations after loading: %s (CPU weights are views into the checkpoint mapping)",
   mb(in_use)))

-- --- 3. generation ------------------------------------------------------------------------------------

local prompt = { 464, 2068, 7586, 21831, 18045, 625, 262, 16931 }
local ids = ml.tensor({ prompt }, { dtype = "int64" })
local t_fwd0 = now()
local logits = model(ids)
local t_fwd = now() - t_fwd0
local t_gen0 = now()
local out = model:generate(prompt, { max_new_tokens = opts.tokens })
local t_gen = now() - t_gen0
local new = {}
for i = #prompt + 1, #out do new[#new + 1] = out[i] end

print(string.format("\ngreedy generation (random weights, so the ids mean nothing): prompt %s",
   table.concat(prompt, " ")))
print("  -> " .. table.concat(new, " "))
local s = hooks.runtime_stats()
local hwm, rss = peak_rss_mb()
print("\ntimings:")
print(string.format("  build empty model          %8.3f s", t_build))
print(string.format("  plan + load + dispatch     %8.3f s", t_load))
print(string.format("  forward, %d tokens          %8.3f s   (logits [%s])", #prompt, t_fwd, table.concat(logits.shape, ", ")))
print(string.format("  generate %d tokens          %8.3f s   (%.2f tokens/s)", opts.tokens, t_gen, opts.tokens / t_gen))
print(string.format("hook runtime: %d materializations, %s viewed zero-copy, %s copied, %d prefetch jobs (%s read ahead)",
   s.materialize_calls, mb(s.bytes_viewed), mb(s.bytes_copied), s.prefetch_jobs, mb(s.prefetch_bytes)))
print(string.format("process RSS now %.0f MB, peak %.0f MB from loading on", rss, hwm))
for _, w in ipairs(warnings) do print("(warning while dispatching: " .. w .. ")") end
