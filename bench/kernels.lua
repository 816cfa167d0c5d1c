--- softmax, layer_norm and gelu over 16M float32 elements (16384 rows of 1024): GB/s counting
-- the bytes read plus written (input + output, 128 MiB) next to a plain memcpy of the same bytes
-- (64 MiB copied = 128 MiB moved) in the same run. Each op allocates its output; the previous one
-- is collected before each timed run, as in a steady model loop. Goal: ratio >= 0.5.
-- JSON lines on stdout.
local ml = require("moonload")
local C = require("moonload.C")
local Tensor = require("moonload.tensor")
local B = require("benchutil")
local ffi, lib = C.ffi, C.lib

local rows, cols = 16384, 1024
if os.getenv("MOONLOAD_BENCH_QUICK") then rows = 1024 end
local n = rows * cols
local bytes = 2 * n * 4
local reps = 6

local x = ml.randn(rows, cols)
local dst = ml.empty(rows, cols)
local w, b = ml.randn(cols), ml.randn(cols)
local out1 = ffi.new("ml_tensor*[1]")
local xp, dp = lib.ml_tensor_data(x._c), lib.ml_tensor_data(dst._c)

local function memcpy_time()
   return B.best(reps, function() ffi.C.memcpy(dp, xp, n * 4) end)
end

local ops = {
   { "softmax", function() return x:softmax(-1) end },
   { "layer_norm", function()
      C.check(lib.ml_layer_norm(x._c, 1, w._c, b._c, 1e-5, out1))
      return Tensor.wrap(out1[0])
   end },
   { "gelu", function() return x:gelu() end },
}
for _, op in ipairs(ops) do
   local t_copy = memcpy_time()                      -- next to each op: load on the machine varies
   local ok, t = pcall(B.best_collect, reps, op[2])
   local memcpy_gbs = bytes / t_copy * 1e-9
   if ok then
      local gbs = bytes / t * 1e-9
      B.emit({ "bench", "op", "elements", "gbs", "memcpy_gbs", "ratio", "goal", "threads" }, {
         bench = "rowwise_f32", op = op[1], elements = n, gbs = gbs, memcpy_gbs = memcpy_gbs,
         ratio = gbs / memcpy_gbs, goal = 0.5, threads = ml.get_num_threads(),
      })
   else
      B.emit({ "bench", "op", "error" }, { bench = "rowwise_f32", op = op[1], error = t })
   end
   collectgarbage()
end
