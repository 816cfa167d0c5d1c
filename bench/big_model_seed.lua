--- Issue 4, benchmark 1: the seed's example, 1000 x nn.Linear(10000, 10000) built under
-- init_empty_weights: build time and peak RSS, moonload (examples/seed.lua in a fresh LuaJIT
-- process) vs accelerate.init_empty_weights (bench/big_model_peer.py seed, fresh Python process).
-- Goals: at most 0.5x the time and 0.25x the peak RSS. Prints one JSON object.
-- Environment: BENCH_PYTHON (default /opt/ref/bin/python), BENCH_REPEATS (default 3).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local cjson = require("cjson")
local B = require("benchutil")

local luajit = os.getenv("LUAJIT") or "luajit"
local python = B.python
local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 3

local run_json, median = B.run_json, B.median

local function collect(cmd)
   local t, rss, last = {}, {}, nil
   for _ = 1, repeats do
      local r, err = run_json(cmd)
      if not r then return nil, err end
      t[#t + 1], rss[#rss + 1], last = r.build_seconds, r.peak_rss_mb, r
   end
   last.build_seconds, last.peak_rss_mb = median(t), median(rss)
   return last
end

local ours = assert(collect(luajit .. " examples/seed.lua --json"))
local result = {
   bench = "big_model_seed", repeats = repeats,
   moonload = { build_seconds = ours.build_seconds, peak_rss_mb = ours.peak_rss_mb,
                rss_before_build_mb = ours.rss_before_build_mb, parameters = ours.parameters },
   goal = { time_ratio = 0.5, rss_ratio = 0.25 },
}
if B.have_python() then
   local peer, err = collect(python .. " bench/big_model_peer.py seed")
   if peer then
      result.accelerate = { build_seconds = peer.build_seconds, peak_rss_mb = peer.peak_rss_mb,
                            rss_before_build_mb = peer.rss_before_build_mb, version = peer.accelerate,
                            torch = peer.torch }
      result.time_ratio = ours.build_seconds / peer.build_seconds
      result.rss_ratio = ours.peak_rss_mb / peer.peak_rss_mb
      result.rss_growth_mb = { moonload = ours.peak_rss_mb - ours.rss_before_build_mb,
                               accelerate = peer.peak_rss_mb - peer.rss_before_build_mb }
      result.meets_goal = result.time_ratio <= 0.5 and result.rss_ratio <= 0.25
   else
      result.peer_error = tostring(err)
   end
else
   result.peer_error = "no Python at " .. python .. " (set BENCH_PYTHON)"
end
print(cjson.encode(result))
