--- Indexing ops on the CPU (core/src/cpu/index.c) through the Lua API: cat, stack, gather,
-- index_select and arange against PyTorch fixtures (tests/fixtures/gen_ops_elementwise.py ->
-- ops_elementwise_index.json), and their error messages. Index values are 0-based data.
local ml = require("moonload")
local H = require("ops_helpers")

describe("indexing", function()
   H.define("ops_elementwise_index.json", describe, it)

   describe("errors", function()
      local x = ml.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
      local long = function(t) return ml.tensor(t, { dtype = "int64" }) end

      it("cat names both shapes when sizes differ", function()
         assert.are.equal("cat: sizes must match except in the cat dimension: tensor 1 has shape [2, 3], tensor 2 has shape [2, 4]",
            H.errmsg(function() return ml.cat({ x, ml.zeros(2, 4) }, 1) end))
         assert.are.equal("cat: tensors must have the same number of dimensions: tensor 1 has shape [2, 3], tensor 2 has shape [3]",
            H.errmsg(function() return ml.cat({ x, ml.zeros(3) }, 1) end))
         assert.are.equal("cat: zero-dimensional tensor (at position 1) cannot be concatenated",
            H.errmsg(function() return ml.cat({ ml.tensor(1), ml.tensor(2) }, 1) end))
      end)

      it("cat refuses meta tensors and mixed devices", function()
         local m = ml.zeros({ 2, 3 }, { device = "meta" })
         assert.are.equal("cat: expected tensors on the same device, got cpu and meta",
            H.errmsg(function() return ml.cat({ x, m }, 1) end))
      end)

      it("gather checks index values, dtype and shape", function()
         assert.are.equal("gather: index 3 is out of range for a dimension of size 3 (input shape [2, 3])",
            H.errmsg(function() return x:gather(2, long({ { 0 }, { 3 } })) end))
         assert.are.equal("gather: index must be an integer tensor, got float32",
            H.errmsg(function() return x:gather(2, ml.tensor({ { 0 } })) end))
         assert.are.equal("gather: index (shape [2]) must have as many dimensions as input (shape [2, 3])",
            H.errmsg(function() return x:gather(2, long({ 0, 1 })) end))
         assert.are.equal("gather: index shape [3, 1] is larger than input shape [2, 3] outside the gather dimension",
            H.errmsg(function() return x:gather(2, long({ { 0 }, { 1 }, { 2 } })) end))
         -- negative index values count from the end, as PyTorch
         assert.are.same({ { 3 }, { 4 } }, x:gather(2, long({ { -1 }, { -3 } })):tolist())
      end)

      it("index_select checks index values, dtype and rank", function()
         assert.are.equal("index_select: index -4 is out of range for a dimension of size 3 (input shape [2, 3])",
            H.errmsg(function() return x:index_select(2, long({ 0, -4 })) end))
         assert.are.equal("index_select: index must be 1-D, got shape [1, 2]",
            H.errmsg(function() return x:index_select(1, long({ { 0, 1 } })) end))
         assert.are.equal("index_select: index must be an integer tensor, got bool",
            H.errmsg(function() return x:index_select(1, ml.tensor({ true })) end))
         assert.are.same({ { 3, 1 }, { 6, 4 } }, x:index_select(2, long({ -1, 0 })):tolist())
      end)

      it("arange wants a nonzero step with the right sign", function()
         assert.are.equal("arange: step must be nonzero, got 0", H.errmsg(function() return ml.arange(0, 5, 0) end))
         assert.are.equal("arange: upper bound and lower bound inconsistent with step sign (start 0, end 5, step -1)",
            H.errmsg(function() return ml.arange(0, 5, -1) end))
         assert.are.equal("arange: start (0) and end (inf) must be finite",
            H.errmsg(function() return ml.arange(0, math.huge) end))
      end)
   end)

   describe("large inputs", function()
      it("index_select picks whole rows of an embedding-sized table", function()
         local w = (ml.arange(0, 50000):float()):reshape(1000, 50)
         local rows = w:index_select(1, ml.tensor({ 999, 0, 500, 500 }, { dtype = "int64" }))
         assert.are.same({ 4, 50 }, rows.shape)
         assert.are.equal(999 * 50 + 49, rows:tolist()[1][50])
         assert.are.equal(500 * 50, rows:tolist()[4][1])
         assert.is_true(rows:narrow(1, 3, 1):equal(w:narrow(1, 501, 1)))
      end)
   end)
end)

describe("indexing", function()
   H.define_cuda("ops_elementwise_index.json", describe, it)
end)
