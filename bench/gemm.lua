--- float32 GEMM at 1024, 2048 and 4096 square: GFLOP/s of ml.matmul called from LuaJIT next to
-- OpenBLAS cblas_sgemm called directly from C (bench/c/gemm_peer.c) in the same run, the two
-- interleaved round by round so that other load on the machine hits both alike; best of the
-- rounds each. Goal: ratio >= 0.95 (no overhead in the binding). The previous output is
-- collected before each timed run (the core's block cache then serves the new one, as in a
-- steady model loop). JSON lines on stdout.
local ml = require("moonload")
local B = require("benchutil")

local sizes = { { 1024, 8 }, { 2048, 4 }, { 4096, 3 } }
if os.getenv("MOONLOAD_BENCH_QUICK") then sizes = { { 512, 3 } } end

local function peer(n)
   local p = assert(io.popen(string.format("%s/gemm_peer %d 1", B.bin, n)))
   local line = p:read("*l") or ""
   p:close()
   return tonumber(line:match('"best_s":([%d%.]+)'))
end

for _, s in ipairs(sizes) do
   local n, rounds = s[1], s[2]
   local a, b = ml.randn(n, n), ml.randn(n, n)
   local c = ml.matmul(a, b)                         -- warm-up
   local best, best_peer = math.huge, math.huge
   for _ = 1, rounds do
      local tp = peer(n)
      if tp and tp < best_peer then best_peer = tp end
      c = nil
      collectgarbage()
      collectgarbage()
      local t0 = B.now()
      c = ml.matmul(a, b)
      local t = B.now() - t0
      if t < best then best = t end
   end
   local flop = 2 * n * n * n
   B.emit({ "bench", "n", "moonload_gflops", "openblas_gflops", "ratio", "goal", "threads" }, {
      bench = "gemm_f32", n = n, moonload_gflops = flop / best * 1e-9,
      openblas_gflops = flop / best_peer * 1e-9, ratio = best_peer / best, goal = 0.95,
      threads = ml.get_num_threads(),
   })
end
