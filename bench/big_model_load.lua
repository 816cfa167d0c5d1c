--- Issue 4, benchmark 2: load_checkpoint_and_dispatch(device_map = "auto") of a ~500 MB
-- GPT-2-small-shaped checkpoint (5 safetensors shards + index, written once by
-- `luajit examples/demo.lua --write-only` into .bench/) to CPU: moonload vs accelerate on the same
-- files in the same run, warm page cache, median of BENCH_REPEATS (default 3) after one warm-up.
-- Goal: at most 0.2x accelerate's time (moonload's CPU weights are views into the mapping).
-- Also reported: the first forward (1x16 tokens) after loading, where moonload's mapped pages
-- are touched for the first time. Prints one JSON object.
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local now, median = B.now, B.median

local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 3

local dir, index = B.demo_checkpoint()

local times, first_forward = {}, {}
local ids = ml.tensor({ { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 } }, { dtype = "int64" })
for r = 0, repeats do
   local model = ml.init_empty_weights(function() return ml.models.gpt2.GPT2LMHeadModel(dir .. "/config.json") end)
   local t0 = now()
   ml.load_checkpoint_and_dispatch(model, index, { device_map = "auto", no_split_module_classes = { "GPT2Block" } })
   local dt = now() - t0
   t0 = now()
   model(ids)
   local df = now() - t0
   if r > 0 then times[#times + 1] = dt; first_forward[#first_forward + 1] = df end
   model = nil
   collectgarbage()
   collectgarbage()
end

local result = {
   bench = "big_model_load", checkpoint = dir, repeats = repeats,
   moonload = { load_seconds = median(times), runs = times, first_forward_16_tokens_seconds = median(first_forward) },
   goal = { time_ratio = 0.2 },
}
local peer, err = B.run_peer(string.format("bench/big_model_peer.py load --ckpt %s --repeats %d", dir, repeats))
if peer then
   result.accelerate = { load_seconds = peer.load_seconds, runs = peer.runs, version = peer.accelerate, torch = peer.torch }
   result.time_ratio = result.moonload.load_seconds / peer.load_seconds
   result.meets_goal = result.time_ratio <= 0.2
else
   result.peer_error = err
end
print(cjson.encode(result))
