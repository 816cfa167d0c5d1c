--- A Lua loop of 1M tiny ops (add of two 4-element float32 tensors): ops/s, the cost of one trip
-- through the binding (argument checks, FFI call, output allocation, wrapping with ffi.gc).
-- JSON lines on stdout.
local ml = require("moonload")
local B = require("benchutil")

local n = 1000000
if os.getenv("MOONLOAD_BENCH_QUICK") then n = 100000 end
local a, b = ml.tensor({ 1, 2, 3, 4 }), ml.tensor({ 5, 6, 7, 8 })
local function loop(count)
   local c
   for _ = 1, count do c = a + b end
   return c
end
loop(10000)
collectgarbage()
local t0 = B.now()
local c = loop(n)
local t = B.now() - t0
assert(c:tolist()[4] == 12)
B.emit({ "bench", "op", "ops", "seconds", "ops_per_s", "us_per_op" }, {
   bench = "tiny_ops", op = "add 4-element float32", ops = n, seconds = t, ops_per_s = n / t,
   us_per_op = t / n * 1e6,
})
