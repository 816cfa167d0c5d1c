-- The meta-initialisation seam (lua/moonload/nn/init_context.lua): parameters and buffers are
-- created directly on the context's devices, never allocated elsewhere first.
local ml = require("moonload")
local nn = ml.nn
local ctx = require("moonload.nn.init_context")

describe("nn.init_context", function()
   it("defaults to nil (cpu) and restores after fn, returning fn's results", function()
      assert.is_nil(ctx.param_device())
      assert.is_nil(ctx.buffer_device())
      local a, b, c = ctx.with_devices("meta", "meta", function()
         assert.equal("meta", ctx.param_device())
         assert.equal("meta", ctx.buffer_device())
         return 1, nil, 3
      end)
      assert.same({ 1, nil, 3 }, { a, b, c })
      assert.is_nil(ctx.param_device())
      assert.is_nil(ctx.buffer_device())
   end)

   it("restores the devices when fn raises, and re-raises the error unchanged", function()
      local ok, err = pcall(ctx.with_devices, "meta", nil, function() error("boom", 0) end)
      assert.is_false(ok)
      assert.equal("boom", err)
      assert.is_nil(ctx.param_device())
   end)

   it("nests", function()
      ctx.with_devices("meta", nil, function()
         ctx.with_devices("cpu", "cpu", function()
            assert.equal("cpu", ctx.param_device())
         end)
         assert.equal("meta", ctx.param_device())
         assert.is_nil(ctx.buffer_device())
      end)
   end)

   it("checks its arguments", function()
      assert.has_error(function() ctx.with_devices("meta", nil, 3) end,
         "with_devices: a function to run is expected as the third argument, got number")
      assert.has_error(function() ctx.with_devices({}, nil, function() end) end,
         'with_devices: parameter device must be a device string ("meta", "cpu", "cuda:0"), an integer or nil, got table')
   end)

   it("an integer device means cuda:N", function()
      ctx.with_devices(1, nil, function() assert.equal("cuda:1", ctx.param_device()) end)
   end)
end)

describe("building modules under a parameter device", function()
   it("puts parameters on meta and leaves buffers on cpu by default", function()
      local bn = ctx.with_devices("meta", nil, function() return nn.BatchNorm1d(4) end)
      assert.equal("meta", bn.weight.device)
      assert.equal("cpu", bn.running_mean.device)
      assert.same({ 0, 0, 0, 0 }, bn.running_mean:tolist())
   end)

   it("puts buffers on the buffer device too when asked", function()
      local bn = ctx.with_devices("meta", "meta", function() return nn.BatchNorm1d(4) end)
      assert.equal("meta", bn.running_var.device)
      assert.equal("meta", bn.num_batches_tracked.device)
      assert.equal("int64", bn.num_batches_tracked.dtype)
   end)

   it("allocates nothing: 1000 x Linear(10000, 10000) on meta", function()
      collectgarbage()
      ml.reset_peak_memory("cpu")
      local before = ml.memory_allocated("cpu")
      local layers = ctx.with_devices("meta", nil, function()
         local list = {}
         for i = 1, 1000 do list[i] = nn.Linear(10000, 10000) end
         return nn.ModuleList(list)
      end)
      local _, peak = ml.memory_allocated("cpu")
      assert.equal(1000, #layers)
      assert.same({ 10000, 10000 }, layers[1000].weight.shape)
      assert.equal("meta", layers[1].bias.device)
      assert.is_true(peak - before < 1024 * 1024, "allocated " .. (peak - before) .. " bytes")
   end)

   it("moves a parameter created elsewhere when it is registered (the original stays put)", function()
      local t = ml.ones(3)
      local M = nn.Module:extend("M")
      function M:__init() self.p = nn.Parameter(t) end
      local m = ctx.with_devices("meta", nil, function() return M() end)
      assert.equal("meta", m.p.device)
      assert.equal("cpu", t.device)
      assert.same({ 1, 1, 1 }, t:tolist())
   end)

   it("keeps ties made inside the context", function()
      local s = ctx.with_devices("meta", nil, function()
         local s = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 5, { bias = false }))
         s[2].weight = s[1].weight
         return s
      end)
      assert.is_true(rawequal(s[1].weight, s[2].weight))
      assert.equal("meta", s[2].weight.device)
   end)

   it("ml.init_empty_weights builds on it", function()
      local l = ml.init_empty_weights(function() return nn.Linear(3, 3) end)
      assert.equal("meta", l.weight.device)
      assert.is_nil(ctx.param_device())
   end)
end)
