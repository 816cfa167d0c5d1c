-- The example the project was created from (Accelerate's init_empty_weights docs):
--
--    with init_empty_weights():
--        tst = nn.Sequential(*[nn.Linear(10000, 10000) for _ in range(1000)])
--
-- A 100-billion-parameter model built in no time and without using any RAM: every parameter
-- is created directly on the meta device (shape and dtype, no bytes).
--
--    luajit examples/seed.lua           # human-readable
--    luajit examples/seed.lua --json    # one JSON line (used by the spec and the benchmark)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")
local nn = ml.nn

local function peak_rss_mb()
   local f = io.open("/proc/self/status", "r")
   if not f then return -1 end
   local s = f:read("*a")
   f:close()
   local kb = s:match("VmHWM:%s*(%d+)")
   return kb and tonumber(kb) / 1024 or -1
end

local function now()
   local ffi = require("ffi")
   pcall(ffi.cdef, "typedef struct { long tv_sec; long tv_nsec; } ml_seed_timespec; int clock_gettime(int, ml_seed_timespec *);")
   local ts = ffi.new("ml_seed_timespec")
   ffi.C.clock_gettime(1, ts)
   return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local rss_before = peak_rss_mb()
local t0 = now()
local tst = ml.init_empty_weights(function()
   local layers = {}
   for i = 1, 1000 do layers[i] = nn.Linear(10000, 10000) end
   return nn.Sequential(unpack(layers))
end)
local seconds = now() - t0

local params = 0
for _, p in tst:named_parameters() do params = params + p:numel() end
local device = tst[1].weight.device

if arg[1] == "--json" then
   print(string.format('{"parameters": %d, "build_seconds": %.4f, "peak_rss_mb": %.1f, "rss_before_build_mb": %.1f, "device": "%s"}',
      params, seconds, peak_rss_mb(), rss_before, device))
else
   print(string.format("built nn.Sequential of 1000 x nn.Linear(10000, 10000): %d parameters on %s", params, device))
   print(string.format("build time %.3f s, peak RSS of this process %.1f MB (%.1f MB before building)",
      seconds, peak_rss_mb(), rss_before))
   print("last layer: " .. tostring(tst[1000]))
end
