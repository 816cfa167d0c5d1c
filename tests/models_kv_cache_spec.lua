-- models.kv_cache: per-layer key/value buffers that grow and hand out views of the past.
local ml = require("moonload")
local KVCache = require("moonload.models.kv_cache")

describe("models.kv_cache", function()
   it("appends steps and returns views of everything cached", function()
      local c = KVCache.new(2, 4)
      local k1 = ml.arange(0, 12, { dtype = "float32" }):view(1, 2, 3, 2)
      local k, v = c:update(1, k1, k1 * 10)
      assert.are.same({ 1, 2, 3, 2 }, k.shape)
      assert.is_true(k:equal(k1))
      assert.is_true(v:equal(k1 * 10))
      c:advance(3)
      local k2 = ml.full({ 1, 2, 1, 2 }, -1)
      k, v = c:update(1, k2, k2)
      assert.are.same({ 1, 2, 4, 2 }, k.shape)
      assert.is_true(k:narrow(3, 1, 3):equal(k1))
      assert.is_true(k:narrow(3, 4, 1):equal(k2))
      assert.are.equal("KVCache(layers=2, length=3)", tostring(c))
   end)

   it("grows past its capacity, keeping the cached values", function()
      local c = KVCache.new(1, 2)
      local a = ml.randn(1, 1, 2, 3)
      c:update(1, a, a)
      c:advance(2)
      local b = ml.randn(1, 1, 3, 3)
      local k = c:update(1, b, b)
      c:advance(3)
      assert.are.same({ 1, 1, 5, 3 }, k.shape)
      assert.is_true(k:narrow(3, 1, 2):equal(a))
      assert.is_true(k:narrow(3, 3, 3):equal(b))
      assert.are.equal(5, c.length)
   end)

   -- keys tagged with their position: row p of a step holds the value p
   local function step(c, from, n)
      local k = ml.arange(from, from + n, { dtype = "float32" }):view(1, 1, n, 1)
      local kk, vv = c:update(1, k, k * 10, 3)
      c:advance(n)
      return kk, vv
   end

   it("keeps a sliding layer's last window - 1 keys and this step's, in a bounded buffer", function()
      local c = KVCache.new(1, 100)
      local k = step(c, 0, 5)                                  -- a 5-token prompt: every key
      assert.are.same({ 0, 1, 2, 3, 4 }, k:view(5):tolist())
      assert.are.equal(5 + 2 * 3, c.k[1]:size(3))               -- not 100
      for p = 5, 40 do
         k = step(c, p, 1)
         assert.are.same({ p - 2, p - 1, p }, k:view(3):tolist())
      end
      assert.are.equal(11, c.k[1]:size(3))
      -- a chunk of 4 after that: its first query sees 2 keys back
      local kk, vv = step(c, 41, 4)
      assert.are.same({ 39, 40, 41, 42, 43, 44 }, kk:view(6):tolist())
      assert.are.same({ 390, 400, 410, 420, 430, 440 }, vv:view(6):tolist())
      assert.are.equal(11, KVCache.layer_capacity(100, 5, 3))
      assert.are.equal(100, KVCache.layer_capacity(100, 5, nil))
   end)
end)
