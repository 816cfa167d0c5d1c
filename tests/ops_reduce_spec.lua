--- Reductions on the CPU (core/src/cpu/reduce.c) through the Lua API: sum mean prod max min argmax
-- argmin topk cumsum against PyTorch fixtures (tests/fixtures/gen_ops_elementwise.py ->
-- ops_elementwise_reduce.json), long float sums, equal/allclose, and error messages.
local ml = require("moonload")
local H = require("ops_helpers")

describe("reductions", function()
   local doc = H.define("ops_elementwise_reduce.json", describe, it)

   describe("long float32 sums", function()
      local case
      for _, c in ipairs(doc.cases) do if c.special == "long_sum" then case = c end end

      it("match PyTorch to 1e-5 relative and the float64 sum to 1e-7", function()
         local x = ml.arange(0, case.n):float() * 1e-3 + 1      -- same float32 values as the generator
         local s = x:sum():item()
         assert.is_true(math.abs(s - case.expected) <= 1e-5 * math.abs(case.expected))
         assert.is_true(math.abs(s - case.expected_f64) <= 1e-7 * math.abs(case.expected_f64))
         local m = x:mean():item()
         assert.is_true(math.abs(m - case.expected_mean) <= 1e-5 * math.abs(case.expected_mean))
      end)

      it("split a whole-tensor reduction into chunks that merge in order", function()
         local n = 300000
         local x = ml.zeros(n)
         x:narrow(1, 100001, 1):fill_(5)
         x:narrow(1, 250001, 1):fill_(5)
         x:narrow(1, 7, 1):fill_(-2)
         assert.are.equal(100000, x:argmax():item())              -- first of the tied maxima
         assert.are.equal(6, x:argmin():item())
         assert.are.equal(8, x:sum():item())
         assert.are.equal(5, x:max():item())
         assert.are.equal(100000, x:long():argmax():item())
         assert.are.equal(8, x:long():sum():item())
         x:narrow(1, 200001, 1):fill_(0 / 0)
         assert.are.equal(200000, x:argmax():item())              -- NaN wins, as in PyTorch
         assert.is_true(x:max():item() ~= x:max():item())
         assert.is_true(x:sum():item() ~= x:sum():item())
      end)

      it("do not depend on the thread count", function()
         local x = (ml.arange(0, 262144):float() * 1e-3):reshape(512, 512)
         ml.set_num_threads(1)
         local a, b, c, d, e = x:sum(2), x:sum(1), x:max(1), x:sum(), x:argmin()
         ml.set_num_threads(2)
         local a2, b2, c2, d2, e2 = x:sum(2), x:sum(1), x:max(1), x:sum(), x:argmin()
         ml.set_num_threads(0)
         assert.is_true(a:equal(a2))
         assert.is_true(b:equal(b2))
         assert.is_true(c:equal(c2))
         assert.is_true(d:equal(d2))
         assert.is_true(e:equal(e2))
      end)
   end)

   describe("topk over long rows", function()
      it("selects like a full sort (ties by lower index, NaN first when largest)", function()
         ml.manual_seed(0)
         for _, n in ipairs({ 100, 1000, 50257 }) do
            local x = (ml.rand(3, n) * 8):to("int32"):float()        -- many ties
            x = ml.where(ml.rand(3, n):lt(0.01), 0 / 0, x)            -- and some NaNs
            for _, k in ipairs({ 1, 5, 50, 65, math.floor(n / 4), n - 1 }) do   -- (from 65: partitioned)
               for _, largest in ipairs({ true, false }) do
                  local v, i = x:topk(k, -1, largest)
                  local fv, fi = x:topk(n, -1, largest)                -- k = n sorts the whole row
                  assert.is_true(i:equal(fi:narrow(2, 1, k)), n .. " " .. k)
                  assert.is_true(v:allclose(fv:narrow(2, 1, k), { equal_nan = true }))
               end
            end
         end
         -- sorted runs (a masked row: -inf keys in index order) keep the partition linear
         local row = ml.arange(0, 20000):float():masked_fill(ml.arange(0, 20000):lt(19000), -math.huge)
         local v, i = row:topk(2048)
         local vl, il = v:tolist(), i:tolist()
         assert.are.same({ 19999, 19000, -math.huge, -math.huge }, { vl[1], vl[1000], vl[1001], vl[2048] })
         assert.are.same({ 19999, 19000, 0, 1047 }, { il[1], il[1000], il[1001], il[2048] })   -- ties: lower index first
         v, i = ml.tensor({ 1, 0 / 0, 3, 3, 2 }):topk(2)
         assert.are.same({ 1, 2 }, i:tolist())
         assert.are.equal(3, v:tolist()[2])
      end)
   end)

   describe("equal and allclose", function()
      local a = ml.tensor({ { 1, 2 }, { 3, 4 } })

      it("equal compares shapes and values", function()
         assert.is_true(a:equal(a:clone()))
         assert.is_true(a:equal(a:t():contiguous():t()))
         assert.is_false(a:equal(a:reshape(4)))
         assert.is_false(a:equal(a + 1e-6))
         assert.is_true(a:equal(a:long()))                        -- values, not dtypes (torch.equal)
         local n = ml.tensor({ 0 / 0 })
         assert.is_false(n:equal(n))
         assert.is_true(ml.zeros(0, 3):equal(ml.zeros(0, 3)))
      end)

      it("allclose broadcasts and uses |a - b| <= atol + rtol * |b|", function()
         assert.is_true(a:allclose(a + 1e-6))
         assert.is_false(a:allclose(a + 1e-3))
         assert.is_true(a:allclose(a + 1e-3, 1e-2))
         assert.is_true(ml.tensor({ 1, 1 }):allclose(ml.tensor(1)))
         local n = ml.tensor({ 1, 0 / 0, math.huge })
         assert.is_false(n:allclose(n))
         assert.is_true(n:allclose(n, { equal_nan = true }))
         assert.is_false(ml.tensor({ math.huge }):allclose(ml.tensor({ -math.huge })))
      end)

      it("allclose fails on shapes that do not broadcast", function()
         assert.are.equal("allclose: shapes [2, 2] and [3] cannot be broadcast (dimension 1: 2 vs 3)",
            H.errmsg(function() return a:allclose(ml.zeros(3)) end))
      end)
   end)

   describe("errors", function()
      local x = ml.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })

      it("mean of integers needs a float dtype", function()
         assert.are.equal("mean: input dtype must be floating point, got int64 (convert it first)",
            H.errmsg(function() return x:long():mean() end))
      end)

      it("max, min, argmax over zero elements have no identity", function()
         local e = ml.zeros(0, 3)
         assert.are.equal("max: cannot reduce over zero elements (input shape [0, 3] has no identity for max)",
            H.errmsg(function() return e:max() end))
         assert.are.equal("max: cannot reduce over zero elements (input shape [0, 3] has no identity for max)",
            H.errmsg(function() return e:max(1) end))
         assert.are.equal("argmin: cannot reduce over zero elements (input shape [0, 3] has no identity for argmin)",
            H.errmsg(function() return e:argmin() end))
         assert.are.same({ 0, 0, 0 }, e:sum(1):tolist())
         assert.are.same({}, e:max(2):tolist())                   -- nothing to reduce into
      end)

      it("argmax takes one dim or all", function()
         assert.are.equal("argmax: expects one dim or all dims, got 2 dims",
            H.errmsg(function() return x:argmax({ 1, 2 }) end))
      end)

      it("rejects a dim listed twice", function()
         assert.are.equal("sum: the same dim appears twice in the list of dims (input shape [2, 3])",
            H.errmsg(function() return x:sum({ 1, -2 }) end))
      end)

      it("topk checks k against the dim", function()
         assert.are.equal("topk: k = 4 is out of range for a dimension of size 3 (input shape [2, 3])",
            H.errmsg(function() return x:topk(4) end))
         local v, i = x:topk(0)
         assert.are.same({ 2, 0 }, v.shape)
         assert.are.same({ 2, 0 }, i.shape)
      end)

      it("refuses meta tensors", function()
         local m = ml.zeros({ 2, 3 }, { device = "meta" })
         assert.are.equal("sum: tensor is on the meta device and has no data", H.errmsg(function() return m:sum() end))
         assert.are.equal("topk: tensor is on the meta device and has no data", H.errmsg(function() return m:topk(1) end))
         assert.are.equal("cumsum: tensor is on the meta device and has no data",
            H.errmsg(function() return m:cumsum(1) end))
         assert.are.equal("max: tensor is on the meta device and has no data", H.errmsg(function() return m:max(1) end))
         assert.are.equal("equal: expected tensors on the same device, got cpu and meta",
            H.errmsg(function() return x:equal(m) end))
      end)
   end)
end)

describe("reductions", function()
   H.define_cuda("ops_elementwise_reduce.json", describe, it)
end)
