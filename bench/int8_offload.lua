--- int8 and int4 weights for a model larger than its RAM budget: the Llama-shaped checkpoint of
-- bench/fit_context.lua (16 layers, hidden 512, about 340 MB in float32) under CPU budgets of 100
-- and 150 MB (device_map = "auto"), with the released pages evicted from the page cache
-- (MOONLOAD_DROP_PAGES=2) as for a model larger than RAM. Three runs a budget, each in its own
-- process:
--   float32  the planner's map, disk layers read from the checkpoint;
--   int8     quantize = "int8": the plan counts int8 sizes, the layers in RAM are quantized and
--            the disk layers' int8 weights are written to the offload folder once, then read
--            from there;
--   int4     the same with quantize = "int4".
-- Reported: the bytes each map keeps in RAM and on disk, seconds to load (int8, int4: quantizing
-- included), and for 8 greedy tokens after a 16-token prompt: seconds and bytes read from disk.
-- No peer: transformers' 8-bit loading (bitsandbytes) needs a GPU.
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local dir = ".bench/fit-context-llama"
local BUDGETS, PROMPT, NEW = { "100MB", "150MB" }, 16, 8

-- One run in this process: "float32", "int8" or "int4" under budget.
local function run(variant, budget)
   local folder = os.tmpname()
   os.remove(folder)
   local opts = { device_map = "auto", max_memory = { cpu = budget }, offload_folder = folder }
   if variant ~= "float32" then opts.quantize = variant end
   local t0 = B.now()
   local model = ml.models.from_pretrained(dir, opts)
   local load_s = B.now() - t0
   -- (sizes of the modules as they are now: int8 ones count their int8 weights and scales)
   local sizes = ml.utils.compute_module_sizes(model)
   local in_ram, on_disk = 0, 0
   for name, d in pairs(model.hf_device_map) do
      if d == "disk" then on_disk = on_disk + sizes[name] else in_ram = in_ram + sizes[name] end
   end
   local prompt = B.minstd_prompts(1, PROMPT, model.config.vocab_size)[1]
   model:generate(prompt, { max_new_tokens = 2, eos_token_id = false })                  -- learns the order
   local read0 = B.proc_field("/proc/self/io", "read_bytes")
   t0 = B.now()
   local out = model:generate(prompt, { max_new_tokens = NEW, eos_token_id = false })
   local seconds = B.now() - t0
   local read = B.proc_field("/proc/self/io", "read_bytes") - read0
   os.execute("rm -rf '" .. folder .. "'")
   print(cjson.encode({ load_s = load_s, seconds = seconds, disk_read_mb = read / 2 ^ 20, in_ram_mb = in_ram / 2 ^ 20,
      on_disk_mb = on_disk / 2 ^ 20, generated = { unpack(out, PROMPT + 1) } }))
end

if arg[1] == "--variant" then return run(arg[2], arg[3]) end

local made, err = B.run_peer("bench/fit_context_peer.py make --dir " .. dir)
if not made then
   print(cjson.encode({ bench = "int8_offload", skipped = "cannot make the checkpoint: " .. tostring(err) }))
   return
end
local result = { bench = "int8_offload", prompt = PROMPT, new_tokens = NEW,
   runs = B.compare_cold("bench/int8_offload.lua", "float32", { "int8", "int4" }, BUDGETS) }
print(cjson.encode(result))
