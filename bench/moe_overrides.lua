--- A mixture-of-experts model under a RAM budget: the Qwen3-MoE-shaped checkpoint of
-- bench/moe_offload.lua (6 layers of 32 experts, 2 per token, about 650 MB in float32) placed by
-- device_map = "auto" under 80, 200 and 400 MB for the CPU, once as the planner fills it
-- (Accelerate's plan: whole layers in RAM, then whole layers on disk) and once with
-- device_overrides = {["%.experts$"] = "disk"} (llama.cpp's -ot: every expert on disk, the rest in
-- RAM). Released pages leave the page cache (MOONLOAD_DROP_PAGES=2), as for a model larger than
-- RAM. Reported for 16 greedy tokens after a 16-token prompt: seconds, bytes read from disk, the
-- bytes each map keeps in RAM, and whether the tokens agree. Each run in its own process.
-- No peer: Accelerate has no placement by name.
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local dir = ".bench/qwen3-moe-bench"
local PROMPT = { 11, 250, 3000, 17, 42, 999, 5, 7, 4096, 123, 456, 789, 21, 22, 23, 24 }
local BUDGETS = { "80MB", "200MB", "400MB" }

-- One run in this process: variant "plan" or "overrides" under budget.
local function run(variant, budget)
   local folder = os.tmpname()
   os.remove(folder)
   local opts = { device_map = "auto", max_memory = { cpu = budget }, offload_folder = folder }
   if variant == "overrides" then opts.device_overrides = { ["%.experts$"] = "disk" } end
   local model = ml.models.from_pretrained(dir, opts)
   local sizes = ml.utils.compute_module_sizes(model)
   local in_ram = 0
   for name, d in pairs(model.hf_device_map) do
      if d ~= "disk" then in_ram = in_ram + sizes[name] end
   end
   model:generate(PROMPT, { max_new_tokens = 2, eos_token_id = false })                 -- learns the order
   local read0 = B.proc_field("/proc/self/io", "read_bytes")
   local t0 = B.now()
   local out = model:generate(PROMPT, { max_new_tokens = 16, eos_token_id = false })
   local seconds = B.now() - t0
   local read = B.proc_field("/proc/self/io", "read_bytes") - read0
   os.execute("rm -rf '" .. folder .. "'")
   print(cjson.encode({ seconds = seconds, disk_read_mb = read / 2 ^ 20, in_ram_mb = in_ram / 2 ^ 20,
      generated = { unpack(out, #PROMPT + 1) } }))
end

if arg[1] == "--variant" then return run(arg[2], arg[3]) end

local made, err = B.run_peer("bench/moe_offload_peer.py make --dir " .. dir)
if not made then
   print(cjson.encode({ bench = "moe_overrides", skipped = "cannot make the checkpoint: " .. tostring(err) }))
   return
end
local result = { bench = "moe_overrides",
   runs = B.compare_cold("bench/moe_overrides.lua", "plan", "overrides", BUDGETS) }
print(cjson.encode(result))
