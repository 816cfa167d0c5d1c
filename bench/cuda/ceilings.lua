--- This GPU's ceilings, measured through moonload (run on a machine with a GPU; see
-- tests/cuda/device_check.sh): cuBLAS bf16 GEMM 8192^3 in TFLOP/s, a device-to-device copy,
-- one row through bf16 linear layers (decoding's weight reads), and host-to-device copies: pageable (t:to("cuda:0")), pinned (t:pin_memory():to("cuda:0")) and
-- through the weight uploader's pinned double-buffered staging (default and 1, 2, 4, ... staging
-- threads). One JSON line per figure. BENCH_SHAPE=tiny shrinks every size (a dry run on the CUDA
-- emulator: the figures then mean nothing).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local C = require("moonload.C")
local B = require("benchutil")
local ffi, lib = C.ffi, C.lib

if ml.cuda_device_count() == 0 then
   B.emit({ "bench", "skipped" }, { bench = "cuda_ceilings", skipped = "no CUDA device" })
   return
end
local DEV = "cuda:0"
local tiny = os.getenv("BENCH_SHAPE") == "tiny"
local function sync() ml.cuda.synchronize(0) end
local function timed(reps, fn)
   return B.best(reps, function() fn(); sync() end)
end

-- bf16 GEMM on random data (never zeros: they run faster than real data).
ml.manual_seed(0)
local n = tiny and 128 or 8192
local a = ml.rand({ n, n }, { dtype = "bfloat16" }):to(DEV)
local b = ml.rand({ n, n }, { dtype = "bfloat16" }):to(DEV)
local c
local t = timed(5, function() c = a:matmul(b) end)
B.emit({ "bench", "n", "seconds", "tflops" }, { bench = "cuda_gemm_bf16", n = n, seconds = t, tflops = 2 * n ^ 3 / t / 1e12 })
a, b, c = nil, nil, nil
collectgarbage()

-- device-to-device copy, bytes read + written
local elems = tiny and 1024 * 1024 or 1024 * 1024 * 1024   -- 4 GiB of float32
local x = ml.empty({ elems }, { device = DEV }):fill_(1.5)
local y = ml.empty({ elems }, { device = DEV })
t = timed(5, function() y:copy_(x) end)
B.emit({ "bench", "bytes", "seconds", "gbps" }, { bench = "cuda_copy_d2d", bytes = 8 * elems, seconds = t, gbps = 8 * elems / t / 1e9 })
x, y = nil, nil
collectgarbage()

-- One row through bf16 linear layers of a Llama-3-8B's shapes (decoding: cuBLAS's GEMM with M = 1)
-- as weight bytes read per second, against the copy above. (A gemv kernel of our own, four
-- columns a block in 16-byte loads, read 2.7 TB/s on the H200 where cuBLAS read 3.1-3.2: dropped.)
do
   local shapes = tiny and { { 256, 64 }, { 64, 256 } } or { { 14336, 4096 }, { 4096, 14336 }, { 4096, 4096 }, { 1024, 4096 } }
   local ws, wbytes = {}, 0
   for i, s in ipairs(shapes) do
      ws[i] = (ml.rand(s, { dtype = "bfloat16", device = DEV }) - 0.5)
      wbytes = wbytes + ws[i]:nbytes()
   end
   local x1 = ml.rand({ 1, shapes[1][2] }, { dtype = "bfloat16", device = DEV })
   local x2 = ml.rand({ 1, shapes[2][2] }, { dtype = "bfloat16", device = DEV })
   local reps = 20
   t = timed(3, function()
      for _ = 1, reps do
         for i, w in ipairs(ws) do ml.nn.functional.linear(w.shape[2] == shapes[1][2] and x1 or x2, w) end
      end
   end)
   B.emit({ "bench", "bytes", "seconds", "gbps" }, { bench = "cuda_linear_bf16_one_row", bytes = wbytes * reps,
      seconds = t / reps / #ws, gbps = wbytes * reps / t / 1e9 })
   ws, x1, x2 = nil, nil, nil
   collectgarbage()
end

-- host-to-device: pageable through the synchronous path, and through the uploader
local host = ml.rand({ tiny and 4 * 1024 * 1024 or 256 * 1024 * 1024 })   -- 1 GiB
local bytes = host:nbytes()
t = timed(3, function() local d = host:to(DEV) end)
B.emit({ "bench", "bytes", "seconds", "gbps" }, { bench = "cuda_h2d_pageable", bytes = bytes, seconds = t, gbps = bytes / t / 1e9 })

-- from page-locked memory (t:pin_memory()): the DMA reads it directly, the link's ceiling
local pinned = host:pin_memory()
t = timed(3, function() local d = pinned:to(DEV) end)
B.emit({ "bench", "bytes", "seconds", "gbps" }, { bench = "cuda_h2d_pinned", bytes = bytes, seconds = t, gbps = bytes / t / 1e9 })
pinned = nil
collectgarbage()

-- Through the uploader's pinned double-buffered staging, from the same pageable memory, with
-- 1, 2, 4, ... staging threads (MOONLOAD_UPLOAD_THREADS is read when an uploader is made): the
-- thread count at which the link, not the host memcpy, becomes the limit.
pcall(ffi.cdef, "int setenv(const char *, const char *, int); int unsetenv(const char *); long sysconf(int);")
local cores = tonumber(ffi.C.sysconf(84))                    -- _SC_NPROCESSORS_ONLN
local dst = ml.empty(host.shape, { device = DEV })
local ticket = ffi.new("int[1]")
local function uploader_seconds(threads)
   if threads then ffi.C.setenv("MOONLOAD_UPLOAD_THREADS", tostring(threads), 1) end
   local up = ffi.new("ml_uploader*[1]")
   C.check(lib.ml_uploader_new(up))
   ffi.C.unsetenv("MOONLOAD_UPLOAD_THREADS")
   local uploader = ffi.gc(up[0], lib.ml_uploader_release)
   local secs = timed(3, function()
      C.check(lib.ml_uploader_submit(uploader, dst._c, host._c, ticket))
      C.check(lib.ml_uploader_wait(uploader, ticket[0]))
   end)
   return secs
end
t = uploader_seconds(nil)
assert(dst:cpu():equal(host), "uploaded bytes differ")
B.emit({ "bench", "bytes", "seconds", "gbps" }, { bench = "cuda_h2d_uploader_staged", bytes = bytes, seconds = t, gbps = bytes / t / 1e9 })
local threads = 1
while threads <= math.min(cores, 16) do
   t = uploader_seconds(threads)
   B.emit({ "bench", "bytes", "seconds", "gbps" },
      { bench = "cuda_h2d_uploader_staged_" .. threads .. "_threads", bytes = bytes, seconds = t, gbps = bytes / t / 1e9 })
   threads = threads * 2
end
