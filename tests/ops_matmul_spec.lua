-- GEMM kernels (core/src/cpu/matmul.c): ml.matmul and linear against PyTorch fixtures
-- (tests/fixtures/gen_ops_nn.py -> ops_nn_matmul.json), plus error messages and the panelled
-- float16 path; through ml.matmul and ml.nn.functional.linear.
local ml = require("moonload")
local C = require("moonload.C")
local H = require("ops_helpers")

local ffi, lib = C.ffi, C.lib

local build, values, assert_matches, errmsg = H.nn_build, H.values, H.assert_matches, H.errmsg

local fx = H.load("ops_nn_matmul.json")

local F = ml.nn.functional

local function linear(x, w, b) return F.linear(x, w, b) end

describe("matmul", function()
   for _, case in ipairs(fx.matmul) do
      it("matches PyTorch: " .. case.name, function()
         local a, b = build(case.a), build(case.b)
         local before_a = values(a)
         assert_matches(case.expected, ml.matmul(a, b), case.name)
         assert.are.same(before_a, values(a))           -- inputs untouched
      end)
   end

   it("is also a tensor method", function()
      local a = ml.tensor({ { 1, 2 }, { 3, 4 } })
      assert.are.same({ { 7, 10 }, { 15, 22 } }, a:matmul(a):tolist())
   end)

   it("converts float16 operands panel by panel and agrees with the float32 path", function()
      -- K = 64: panels of 2^20 / 64 = 16384 columns, so N = 40000 takes three panels.
      local K, N = 64, 40000
      local function filled(shape, n, f)
         local t, buf = ml.empty(shape), ffi.new("double[?]", n)
         for i = 0, n - 1 do buf[i] = f(i) end
         C.check(lib.ml_tensor_write_f64(t._c, buf, n))
         return t
      end
      local a32 = filled({ 1, K }, K, function(i) return i / 16 end)
      local b32 = filled({ K, N }, K * N, function(i) return i % 7 - 3 end)
      local want = values(ml.matmul(a32, b32))
      local got = ml.matmul(a32:half(), b32:half())
      assert.are.equal("float16", got.dtype)
      local gv = values(got)
      for _, i in ipairs({ 1, 2, 16384, 16385, 32768, 32769, 40000 }) do
         assert.is_true(math.abs(gv[i] - want[i]) <= 1e-3 * math.abs(want[i]) + 1e-3,
            string.format("column %d: %g vs %g", i, gv[i], want[i]))
      end
      -- the transposed float16 layout takes the same path through row panels
      local gt = values(ml.matmul(a32:half(), b32:t():contiguous():half():t()))
      for _, i in ipairs({ 1, 16385, 40000 }) do assert.is_true(math.abs(gt[i] - want[i]) <= 1e-3 * math.abs(want[i]) + 1e-3) end
   end)

   it("computes few-row products with a float32/float16/bfloat16 weight in registers, as the float64 path", function()
      -- 1 to 16 rows against a weight stored K-contiguous (linear) take cpu/few_rows_gemm.c (float32
      -- from 2 rows, four rows and two columns at a time); 17 rows the panels. K = 37 and 100 leave
      -- tails past the 8-wide steps, N = 131 spans three column blocks and ends on an odd column.
      ml.manual_seed(19)
      for _, dt in ipairs({ "float32", "bfloat16", "float16" }) do
         local ulp = ({ bfloat16 = 2 ^ -8, float16 = 2 ^ -11, float32 = 2 ^ -20 })[dt]
         for _, K in ipairs({ 37, 100 }) do
            local w, b = ml.randn(131, K):to(dt), ml.randn(131):to(dt)
            for _, M in ipairs({ 1, 2, 3, 4, 5, 7, 8, 16, 17 }) do
               local x = ml.randn(K, M):to(dt):t()                       -- strided rows
               local want = F.linear(x:double(), w:double(), b:double())
               local got = F.linear(x, w, b)
               assert.are.equal(dt, got.dtype)
               local err = (got:double() - want):abs() - want:abs() * ulp
               assert.is_true(err:max():item() <= 1e-4, string.format("%s K=%d M=%d: %g", dt, K, M, err:max():item()))
            end
         end
         if dt ~= "float32" then
         -- attention at decode: one query against the keys (scores = scale * q @ k^T)
         local q, k, v = ml.randn(1, 2, 1, 64):to(dt), ml.randn(1, 2, 9, 64):to(dt), ml.randn(1, 2, 9, 64):to(dt)
         local want = F.scaled_dot_product_attention(q:float(), k:float(), v:float())
         local got = F.scaled_dot_product_attention(q, k, v):float()
         assert.is_true(((got - want):abs() - want:abs() * 2 * ulp):max():item() <= 1e-3, dt .. " attention")
         end
      end
   end)

   it("widens halves on the AVX2 path as on AVX-512 (MOONLOAD_NO_AVX512=1, in a process of its own)", function()
      -- float16 and bfloat16 weights against float32 or float16 rows: cpu/few_rows_gemm.c widens the
      -- weights in registers, 8 (AVX2) or 16 (AVX-512) at a time, 2 or 4 columns a pass
      local script = [[
         local ml = require("moonload")
         local F = ml.nn.functional
         ml.manual_seed(24)
         local worst = 0
         for _, dt in ipairs({ "float16", "bfloat16" }) do
            for _, K in ipairs({ 37, 100 }) do
               local w = ml.randn(131, K):to(dt)
               for _, M in ipairs({ 1, 2, 3, 4, 5, 16 }) do
                  for _, xdt in ipairs({ "float32", dt == "float16" and "float16" or "float32" }) do
                     local x = ml.randn(M, K):to(xdt)
                     local want = F.linear(x:double(), w:double())
                     local got = F.linear(x, w):double()
                     worst = math.max(worst, ((got - want):abs():max() / want:abs():max()):item())
                  end
               end
            end
         end
         print(worst)
      ]]
      local worst, out = require("nn_helpers").printed_under({ "MOONLOAD_NO_AVX512=1", "MOONLOAD_NO_AVX512=0" }, script)
      for env, text in pairs(out) do assert.is_true(worst[env] ~= nil and worst[env] < 2e-3, env .. ": " .. text) end
   end)

   it("multiplies bfloat16 by bfloat16 as the float32 path does (AVX512-BF16 where the CPU has it)", function()
      -- 17 to 23 rows cover the 6-row tiles and their tails (16 rows or fewer take
      -- cpu/few_rows_gemm.c), K = 37 an odd last element, N = 70
      -- a panel of 32 columns cut short; a transposed input takes the widening path instead.
      ml.manual_seed(20)
      local ulp = 2 ^ -8
      for _, K in ipairs({ 37, 100 }) do
         local w, b = ml.randn(70, K):bfloat16(), ml.randn(70):bfloat16()
         for _, M in ipairs({ 6, 17, 18, 23, 200 }) do      -- 200: blocks of 96 rows, one cut short
            for _, x in ipairs({ ml.randn(M, K):bfloat16(), ml.randn(K, M):bfloat16():t() }) do
               local want = F.linear(x:float(), w:float(), b:float())
               local got = F.linear(x, w, b)
               assert.are.equal("bfloat16", got.dtype)
               local err = ((got:float() - want):abs() - want:abs() * ulp):max():item()
               assert.is_true(err <= 1e-4, string.format("K=%d M=%d contiguous=%s: %g", K, M, tostring(x:is_contiguous()), err))
            end
         end
      end
      -- prefill attention: 7 queries, scores = scale * q @ k^T in bfloat16 operands
      local q, k, v = ml.randn(1, 2, 7, 64):bfloat16(), ml.randn(1, 2, 7, 64):bfloat16(), ml.randn(1, 2, 7, 64):bfloat16()
      local want = F.scaled_dot_product_attention(q:float(), k:float(), v:float(), { is_causal = true })
      local got = F.scaled_dot_product_attention(q, k, v, { is_causal = true }):float()
      assert.is_true(((got - want):abs() - want:abs() * 2 * ulp):max():item() <= 1e-3, "attention")
   end)

   it("uses both batch layouts on many small batched products", function()
      -- 64 batches of 8x8: the threaded path; compared with a per-batch loop of 2-D products.
      local a, b = ml.randn(64, 8, 8), ml.randn(64, 8, 8)
      local got = values(ml.matmul(a, b))
      for bi = 1, 64, 21 do
         local want = values(ml.matmul(a:select(1, bi), b:select(1, bi)))
         for i = 1, 64 do
            assert.is_true(math.abs(got[(bi - 1) * 64 + i] - want[i]) < 1e-5)
         end
      end
   end)

   -- Products big enough to be split across threads (column blocks, or row blocks for a single
   -- column), checked element by element against sums computed here in Lua.
   local function check_sampled(a, b, c, step)
      local M, K, N = a:size(1), a:size(2), b:size(2)
      local av, bv, cv = values(a), values(b), values(c)
      for idx = 1, M * N, step do
         local i, j = math.floor((idx - 1) / N), (idx - 1) % N
         local sum = 0
         for k = 0, K - 1 do sum = sum + av[i * K + k + 1] * bv[k * N + j + 1] end
         assert.is_true(math.abs(cv[idx] - sum) <= 1e-4 * (1 + math.abs(sum)),
            string.format("C[%d, %d] = %g, expected %g", i + 1, j + 1, cv[idx], sum))
      end
   end

   it("splits a large product over column blocks", function()
      local a, b = ml.randn(200, 96), ml.randn(96, 300)
      check_sampled(a, b, ml.matmul(a, b), 397)
   end)

   it("splits a single-column product over row blocks", function()
      local a, b = ml.randn(5000, 64), ml.randn(64, 1)
      check_sampled(a, b, ml.matmul(a, b), 71)
   end)

   it("splits a single-row product (gemv) over column blocks", function()
      local a, b = ml.randn(1, 256), ml.randn(256, 4000)
      check_sampled(a, b, ml.matmul(a, b), 53)
   end)

   it("rejects mismatched inner dims naming both shapes", function()
      assert.are.equal("matmul: shapes [3, 4] and [5, 6] cannot be multiplied (4 != 5)",
         errmsg(function() return ml.matmul(ml.zeros(3, 4), ml.zeros(5, 6)) end))
      assert.are.equal("matmul: shapes [4] and [3] cannot be multiplied (4 != 3)",
         errmsg(function() return ml.matmul(ml.zeros(4), ml.zeros(3)) end))
   end)

   it("rejects batch dims that do not broadcast", function()
      assert.are.equal("matmul: the batch dims of shapes [2, 3, 4] and [3, 4, 5] cannot be broadcast",
         errmsg(function() return ml.matmul(ml.zeros(2, 3, 4), ml.zeros(3, 4, 5)) end))
   end)

   it("rejects 0-d operands, bool tensors and meta tensors", function()
      assert.are.equal("matmul: both arguments need at least 1 dimension, got shapes [] and [3]",
         errmsg(function() return ml.matmul(ml.tensor(2), ml.zeros(3)) end))
      assert.are.equal("matmul: bool tensors cannot be multiplied (got bool and bool)",
         errmsg(function() return ml.matmul(ml.tensor({ true }), ml.tensor({ false })) end))
      assert.are.equal("matmul: the second argument is on the meta device and has no data",
         errmsg(function() return ml.matmul(ml.zeros(2, 2), ml.empty(2, 2, { device = "meta" })) end))
   end)
end)

describe("linear", function()
   for _, case in ipairs(fx.linear) do
      it("matches PyTorch: " .. case.name, function()
         local x, w = build(case.x), build(case.w)
         local b = case.b and build(case.b) or nil
         assert_matches(case.expected, linear(x, w, b), case.name)
      end)
   end

   it("rejects an input that does not match the weight", function()
      assert.are.equal("linear: input of shape [2, 4] does not match weight of shape [5, 3] (in_features 3)",
         errmsg(function() return linear(ml.zeros(2, 4), ml.zeros(5, 3)) end))
   end)

   it("rejects a bias of the wrong size and a weight that is not 2-D", function()
      assert.are.equal("linear: bias of shape [4] does not match out_features 5",
         errmsg(function() return linear(ml.zeros(2, 3), ml.zeros(5, 3), ml.zeros(4)) end))
      assert.are.equal("linear: weight must be 2-D (out_features, in_features), got shape [3]",
         errmsg(function() return linear(ml.zeros(2, 3), ml.zeros(3)) end))
   end)

   it("names a meta weight", function()
      assert.are.equal("linear: the weight is on the meta device and has no data",
         errmsg(function() return linear(ml.zeros(2, 3), ml.empty(4, 3, { device = "meta" })) end))
   end)
end)

-- The same fixtures through the CUDA backend (make test-cuda; needs a GPU): base tensors moved to
-- cuda:0 before the view ops (so strided operands stay strided), results brought back and
-- compared with looser tolerances for the reduced-precision dtypes.
describe("matmul and linear on cuda #cuda", function()
   local check = H.assert_matches_cuda
   for _, case in ipairs(fx.matmul) do
      if case.expected.dtype ~= "int64" then
         it("matches PyTorch: " .. case.name, function()
            check(case.expected, ml.matmul(build(case.a, "cuda:0"), build(case.b, "cuda:0")), case.name)
         end)
      end
   end
   for _, case in ipairs(fx.linear) do
      it("linear matches PyTorch: " .. case.name, function()
         local b = case.b and build(case.b, "cuda:0") or nil
         check(case.expected, linear(build(case.x, "cuda:0"), build(case.w, "cuda:0"), b), case.name)
      end)
   end
end)

-- Decoding's shapes: a few rows of float16 / bfloat16 through cuBLAS, with N and K that are not
-- multiples of anything, a bias, a batch, an input one element off alignment, a transposed
-- weight. Each case against float64 on the CPU, the output rounded once to the dtype.
describe("linear for few rows on cuda #cuda", function()
   local function rel_err(got, want)
      local diff = (got:double() - want):abs():max():item()
      return diff / math.max(want:abs():max():item(), 1e-30)
   end
   for _, dtype in ipairs({ "bfloat16", "float16" }) do
      local tol = dtype == "bfloat16" and 1e-2 or 2e-3
      it(dtype .. ": 1 to 9 rows, any N, K a multiple of 8 or not, with and without bias", function()
         ml.manual_seed(7)
         for _, M in ipairs({ 1, 2, 5, 8, 9 }) do
            for _, NK in ipairs({ { 1, 8 }, { 3, 24 }, { 4, 2056 }, { 7, 4096 }, { 64, 12 }, { 130, 520 } }) do
               local N, K = NK[1], NK[2]
               local x = (ml.rand({ M, K }) - 0.5):to(dtype)
               local w = (ml.rand({ N, K }) - 0.5):to(dtype)
               local b = (ml.rand({ N }) - 0.5):to(dtype)
               for _, bias in ipairs({ false, true }) do
                  local want = F.linear(x:double(), w:double(), bias and b:double() or nil)
                  local got = F.linear(x:to("cuda:0"), w:to("cuda:0"), bias and b:to("cuda:0") or nil)
                  assert.are.equal(dtype, got.dtype)
                  local e = rel_err(got:to("cpu"), want)
                  assert.is_true(e < tol, string.format("M %d N %d K %d bias %s: %.3g", M, N, K, tostring(bias), e))
               end
            end
         end
      end)
      it(dtype .. ": a batch of sequences, an input one element off alignment, a transposed weight", function()
         ml.manual_seed(8)
         local x = (ml.rand({ 2, 3, 64 }) - 0.5):to(dtype)
         local w = (ml.rand({ 40, 64 }) - 0.5):to(dtype)
         local want = F.linear(x:double(), w:double())
         local e = rel_err(F.linear(x:to("cuda:0"), w:to("cuda:0")):to("cpu"), want)
         assert.is_true(e < tol, "batch: " .. e)
         -- a view starting one element into its storage: 2-byte aligned only
         local big = (ml.rand({ 1, 65 }) - 0.5):to(dtype)
         local xv = big:to("cuda:0"):narrow(2, 2, 64)
         e = rel_err(F.linear(xv, w:to("cuda:0")):to("cpu"), F.linear(big:narrow(2, 2, 64):double(), w:double()))
         assert.is_true(e < tol, "offset: " .. e)
         local wt = (ml.rand({ 64, 40 }) - 0.5):to(dtype)
         local x1 = x:narrow(1, 1, 1):reshape(3, 64)
         e = rel_err(F.linear(x1:to("cuda:0"), wt:to("cuda:0"):t()):to("cpu"), F.linear(x1:double(), wt:double():t()))
         assert.is_true(e < tol, "transposed weight: " .. e)
      end)
   end
end)
