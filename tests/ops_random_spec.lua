--- The random generator (core/src/cpu/random.c): Philox4x32-10, reproducible from ml.manual_seed
-- whatever the thread count; uniform_/normal_/rand/randn statistics, meta no-op, multinomial.
local ml = require("moonload")
local H = require("ops_helpers")

describe("random numbers", function()
   after_each(function() ml.set_num_threads(0) end)

   it("are reproducible from a seed and differ between draws", function()
      ml.manual_seed(42)
      local a, b = ml.rand(1000), ml.rand(1000)
      ml.manual_seed(42)
      local a2, b2 = ml.rand(1000), ml.rand(1000)
      assert.is_true(a:equal(a2))
      assert.is_true(b:equal(b2))
      assert.is_false(a:equal(b))
      ml.manual_seed(43)
      assert.is_false(ml.rand(1000):equal(a))
   end)

   it("do not depend on the thread count", function()
      ml.set_num_threads(1)
      ml.manual_seed(7)
      local u1, n1, d1 = ml.rand(300000), ml.randn(300000), ml.randn(100001, { dtype = "float64" })
      ml.set_num_threads(2)
      ml.manual_seed(7)
      local u2, n2, d2 = ml.rand(300000), ml.randn(300000), ml.randn(100001, { dtype = "float64" })
      assert.is_true(u1:equal(u2))
      assert.is_true(n1:equal(n2))
      assert.is_true(d1:equal(d2))
   end)

   it("fill strided views element by element in row-major order", function()
      ml.manual_seed(3)
      local flat = ml.rand(12)
      ml.manual_seed(3)
      local t = ml.empty(4, 3):t()                 -- (3, 4) view over transposed storage
      t:uniform_()
      assert.is_true(t:contiguous():reshape(12):equal(flat))
   end)

   it("uniform_ stays in [low, high) with the right mean and spread", function()
      ml.manual_seed(1)
      local u = ml.empty(200000):uniform_(-2, 3)
      assert.is_true(u:min():item() >= -2)
      assert.is_true(u:max():item() < 3)
      assert.is_true(math.abs(u:mean():item() - 0.5) < 0.02)
      local var = ((u - 0.5) * (u - 0.5)):mean():item()
      assert.is_true(math.abs(var - 25 / 12) < 0.03)
   end)

   it("normal_ has the requested mean and standard deviation, in every float dtype", function()
      for _, dt in ipairs({ "float32", "float64", "float16", "bfloat16" }) do
         ml.manual_seed(2)
         local x = ml.empty(200000, { dtype = dt }):normal_(1.5, 2):float()
         local mean = x:mean():item()
         local sd = math.sqrt(((x - mean) * (x - mean)):mean():item())
         assert.is_true(math.abs(mean - 1.5) < 0.03, dt .. " mean " .. mean)
         assert.is_true(math.abs(sd - 2) < 0.03, dt .. " std " .. sd)
         -- about 68.3% within one standard deviation
         local inside = ((x - 1.5):abs():lt(2)):sum():item() / 200000
         assert.is_true(math.abs(inside - 0.6827) < 0.01, dt .. " within 1 sd " .. inside)
      end
   end)

   it("is a no-op on meta tensors", function()
      local m = ml.empty({ 2, 3 }, { device = "meta" })
      assert.are.equal(m, m:uniform_())
      assert.are.equal(m, m:normal_())
   end)

   it("refuses integer tensors and bad parameters", function()
      assert.are.equal("uniform_: expected a floating point tensor, got int64",
         H.errmsg(function() return ml.empty(3, { dtype = "int64" }):uniform_() end))
      assert.are.equal("normal_: expected std >= 0, got -1", H.errmsg(function() return ml.empty(3):normal_(0, -1) end))
      assert.are.equal("uniform_: expected low <= high, got low 2 and high 1",
         H.errmsg(function() return ml.empty(3):uniform_(2, 1) end))
   end)

   describe("multinomial", function()
      it("draws in proportion to the weights and never a zero weight", function()
         ml.manual_seed(5)
         local w = ml.tensor({ 1, 0, 3, 0 }):expand(40000, 4)
         local draws = w:multinomial()
         assert.are.same({ 40000 }, draws.shape)
         assert.are.equal("int64", draws.dtype)
         local c0 = draws:eq(0):sum():item()
         local c2 = draws:eq(2):sum():item()
         assert.are.equal(40000, c0 + c2)
         assert.is_true(math.abs(c0 / 40000 - 0.25) < 0.015)
      end)

      it("is reproducible and works on one row", function()
         ml.manual_seed(9)
         local a = ml.tensor({ { 0.2, 0.3, 0.5 }, { 0.5, 0.5, 0 } }):multinomial()
         ml.manual_seed(9)
         local b = ml.tensor({ { 0.2, 0.3, 0.5 }, { 0.5, 0.5, 0 } }):multinomial()
         assert.is_true(a:equal(b))
         assert.are.same({}, ml.tensor({ 0, 0, 1 }):multinomial().shape)
         assert.are.equal(2, ml.tensor({ 0, 0, 1 }):multinomial():item())
      end)

      it("rejects negative, infinite and all-zero weights", function()
         assert.are.equal("multinomial: weights must be finite and non-negative, row 0 has -1 at 1",
            H.errmsg(function() return ml.tensor({ 1, -1 }):multinomial() end))
         assert.are.equal("multinomial: weights must be finite and non-negative, row 1 has inf at 0",
            H.errmsg(function() return ml.tensor({ { 1, 1 }, { math.huge, 1 } }):multinomial() end))
         assert.are.equal("multinomial: row 1 has weights summing to 0",
            H.errmsg(function() return ml.tensor({ { 1, 1 }, { 0, 0 } }):multinomial() end))
         assert.are.equal("multinomial: probabilities must have at least 1 dimension, got a 0-d tensor",
            H.errmsg(function() return ml.tensor(1):multinomial() end))
      end)
   end)
end)
