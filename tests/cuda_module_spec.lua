-- ml.cuda (lua/moonload/cuda.lua) where no GPU is present: availability without errors, and
-- clear errors for what needs a device. The GPU side is in cuda_spec.lua (#cuda).
local ml = require("moonload")

describe("ml.cuda without a GPU", function()
   it("reports no device and names what is missing", function()
      if ml.cuda.is_available() then pending("a GPU (or the emulator) is present") return end
      assert.are.equal(0, ml.cuda.device_count())
      local ok, err = pcall(ml.cuda.synchronize)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("CUDA is not available", 1, true))
      ok, err = pcall(ml.cuda.mem_get_info, 0)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("CUDA is not available", 1, true))
      ok, err = pcall(ml.cuda.get_device_name, 0)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("CUDA is not available", 1, true))
      ok, err = pcall(ml.cuda, ml.ones(2))                   -- called, ml.cuda moves a tensor (t:cuda())
      assert.is_false(ok)
      assert.truthy(tostring(err):find("CUDA is not available", 1, true))
   end)

   it("refuses cpu_offload's pin_memory with the reason", function()
      if ml.cuda.is_available() then pending("a GPU (or the emulator) is present") return end
      local m = ml.nn.Linear(3, 2)
      local ok, err = pcall(ml.cpu_offload, m, { execution_device = "cpu", pin_memory = true })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("pin_memory: CUDA is not available", 1, true), tostring(err))
   end)

   it("refuses pinning in place with the reason, for a tensor and for cpu_offload", function()
      if ml.cuda.is_available() then pending("a GPU (or the emulator) is present") return end
      assert.has_error(function() ml.randn(2 ^ 18):pin_memory({ in_place = true }) end)
      local ok, err = pcall(function() ml.randn(2 ^ 18):pin_memory({ in_place = true }) end)
      assert.truthy(tostring(err):find("pin_memory in place: CUDA is not available", 1, true), tostring(err))
      local m = ml.nn.Linear(3, 2)
      ok, err = pcall(ml.cpu_offload, m, { execution_device = "cpu", pin_memory = "in_place" })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("pin_memory in place: CUDA is not available", 1, true), tostring(err))
   end)

   it("wants a cuda device where it takes one", function()
      assert.has_error(function() ml.cuda.empty_cache("cpu") end, 'empty_cache: expected a cuda device, got "cpu"')
      assert.has_error(function() ml.cuda.memory_allocated("meta") end,
         'memory_allocated: expected a cuda device, got "meta"')
      assert.has_error(function() ml.cuda.get_device_name("cpu") end,
         'get_device_name: expected a cuda device, got "cpu"')
   end)
end)
