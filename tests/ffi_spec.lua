-- The FFI seam: every function the generated cdef declares resolves in the loaded library,
-- and the ABI version matches.
local C = require("moonload.C")

describe("ffi seam", function()
   it("resolves every symbol declared in cdef.lua", function()
      local cdef = require("moonload.cdef")
      local missing, count = {}, 0
      for name in cdef:gmatch("[%w_%*%s]+[%s%*](ml_[%w_]+)%s*%(") do
         count = count + 1
         local ok = pcall(function() return C.lib[name] end)
         if not ok then missing[#missing + 1] = name end
      end
      assert.is_true(count > 80, "expected the header to declare the whole API, found " .. count)
      assert.are.same({}, missing)
   end)

   it("checks the ABI version", function()
      assert.are.equal(tonumber(C.lib.ML_ABI), C.lib.ml_abi_version())
   end)

   it("turns a failed status into a Lua error carrying the C message", function()
      local d = C.ffi.new("ml_device")
      assert.has_error(function() C.check(C.lib.ml_device_parse("gpu0", d), 0) end,
         'unknown device "gpu0" (expected "cpu", "meta", "cuda" or "cuda:N")')
   end)

   it("wraps the functions that return a status, and retries them after a collection when memory runs out", function()
      assert.are.equal("function", type(C.lib.ml_tensor_empty))        -- returns ml_status
      assert.are.equal("cdata", type(C.lib.ml_tensor_ndim))            -- returns int: as loaded
      assert.are.equal(C.raw_lib.ML_ENOMEM, C.lib.ML_ENOMEM)
      -- a garbage sentinel: collected only by a full collection, with the collector stopped
      local collected = false
      local sentinel = newproxy(true)
      getmetatable(sentinel).__gc = function() collected = true end
      sentinel = nil
      collectgarbage("stop")
      local shape, out = C.ffi.new("int64_t[1]", 2 ^ 52), C.ffi.new("ml_tensor*[1]")   -- 4 PiB
      local st = C.lib.ml_tensor_empty(C.lib.ML_FLOAT32, 1, shape, C.ffi.new("ml_device"), out)
      collectgarbage("restart")
      assert.are.equal(C.lib.ML_ENOMEM, st)
      assert.is_true(collected)
      assert.matches("cannot allocate", C.ffi.string(C.lib.ml_last_error()))
   end)
end)
