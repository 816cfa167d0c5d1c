--- Decode with a Qwen3-MoE-shaped model whose decoder layers are all on "disk" (6 layers of 32
-- experts, 2 chosen per token; about 650 MB in float32, made once by bench/moe_offload_peer.py):
-- a 16-token prompt, then 16 greedy tokens with the cache; seconds per generated token (median of
-- the runs after a warm-up) and the expert bytes the hook runtime handed out per token, next to
-- transformers + accelerate's disk offload of the same checkpoint and map in the same run (its
-- generated ids checked equal). The page cache is warm: this measures what the offload machinery
-- costs, not the disk. Prints one JSON object.
-- Environment: BENCH_PYTHON (default /opt/ref/bin/python), BENCH_REPEATS (default 3).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local hooks = require("moonload.hooks")
local cjson = require("cjson")
local B = require("benchutil")

local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 3
local dir = ".bench/qwen3-moe-bench"
local made, err = B.run_peer("bench/moe_offload_peer.py make --dir " .. dir)
if not made then
   print(cjson.encode({ bench = "moe_offload", skipped = "cannot make the checkpoint: " .. tostring(err) }))
   return
end

local PROMPT = { 11, 250, 3000, 17, 42, 999, 5, 7, 4096, 123, 456, 789, 21, 22, 23, 24 }
local device_map = { ["model.embed_tokens"] = "cpu", ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" }
for i = 0, 5 do device_map["model.layers." .. i] = "disk" end
local folder = os.tmpname()
os.remove(folder)
local model = ml.models.from_pretrained(dir, { device_map = device_map, offload_folder = folder })

local expert_bytes = 0
for name, p in model:named_parameters() do
   if name:find("%.experts%.") then expert_bytes = expert_bytes + p:numel() * 4 end
end

local times, out = {}, nil
local s0, s1
for r = 0, repeats do
   if r == 1 then s0 = hooks.runtime_stats() end
   local t0 = B.now()
   out = model:generate(PROMPT, { max_new_tokens = 16, eos_token_id = false })
   if r > 0 then times[#times + 1] = (B.now() - t0) / 16 end
end
s1 = hooks.runtime_stats()
local generated = { unpack(out, #PROMPT + 1) }
local handed = (s1.bytes_viewed + s1.bytes_copied - s0.bytes_viewed - s0.bytes_copied) / repeats / 16   -- per forward (prefill + 15 steps)
os.execute("rm -rf '" .. folder .. "'")

local result = {
   bench = "moe_offload", checkpoint = dir, prompt = #PROMPT, new_tokens = 16, repeats = repeats,
   moonload = { seconds_per_token = B.median(times), weight_bytes_per_forward = handed,
      expert_bytes_total = expert_bytes, threads = ml.get_num_threads(), generated = generated },
}
local peer, perr = B.run_peer(string.format("bench/moe_offload_peer.py decode --dir %s --repeats %d --threads %d",
   dir, repeats, ml.get_num_threads()))
if peer then
   result.accelerate = peer
   result.speedup = peer.seconds_per_token / result.moonload.seconds_per_token
   result.same_tokens = cjson.encode(peer.generated) == cjson.encode(generated)
else
   result.peer_error = perr
end
print(cjson.encode(result))
