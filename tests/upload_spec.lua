-- The weight uploader (core/src/upload.c): worker-thread, chunked copies with tickets. On a
-- machine without a GPU the cpu destination exercises the same queue, chunking and waits.
local ml = require("moonload")
local C = require("moonload.C")
local ffi, lib = C.ffi, C.lib

local function new_uploader()
   local out = ffi.new("ml_uploader*[1]")
   C.check(lib.ml_uploader_new(out))
   return ffi.gc(out[0], lib.ml_uploader_release)
end

local function submit(u, dst, src)
   local ticket = ffi.new("int[1]")
   C.check(lib.ml_uploader_submit(u, dst._c, src._c, ticket))
   return ticket[0]
end

local function err_of(status)
   assert.are_not.equal(0, status)
   return ffi.string(lib.ml_last_error())
end

describe("uploader", function()
   it("copies tensors on the worker and makes them visible after wait", function()
      local u = new_uploader()
      local srcs, dsts, tickets = {}, {}, {}
      for i = 1, 5 do
         srcs[i] = ml.arange(i * 1000):float()
         dsts[i] = ml.zeros(i * 1000)
         tickets[i] = submit(u, dsts[i], srcs[i])
      end
      for i = 5, 1, -1 do          -- in any order
         C.check(lib.ml_uploader_wait(u, tickets[i]))
         assert.is_true(dsts[i]:equal(srcs[i]))
      end
      local bytes, jobs = ffi.new("int64_t[1]"), ffi.new("int64_t[1]")
      lib.ml_uploader_stats(u, bytes, jobs)
      assert.are.equal(5, tonumber(jobs[0]))
      assert.are.equal(4 * 1000 * 15, tonumber(bytes[0]))
   end)

   it("streams a tensor larger than one staging chunk in pieces", function()
      local u = new_uploader()
      local src = ml.arange(5 * 1024 * 1024):to("int32")      -- 20 MiB: two 16 MiB chunks
      local dst = ml.zeros(5 * 1024 * 1024, { dtype = "int32" })
      C.check(lib.ml_uploader_wait(u, submit(u, dst, src)))
      assert.is_true(dst:equal(src))
   end)

   it("reads sources straight from a file mapping", function()
      local path = os.tmpname()
      local w = ml.randn(300, 7)
      ml.safetensors.save_file({ w = w }, path)
      local mapped = ml.safetensors.load_file(path).w
      local dst = ml.empty({ 300, 7 })
      local u = new_uploader()
      C.check(lib.ml_uploader_wait(u, submit(u, dst, mapped)))
      assert.is_true(dst:equal(w))
      os.remove(path)
   end)

   it("finishes queued uploads when released", function()
      local u = new_uploader()
      local src, dst = ml.arange(1e5):float(), ml.zeros(1e5)
      submit(u, dst, src)
      lib.ml_uploader_release(ffi.gc(u, nil))
      assert.is_true(dst:equal(src))
   end)

   it("refuses mismatched or strided tensors and unknown tickets", function()
      local u = new_uploader()
      local t = ffi.new("int[1]")
      assert.are.equal("ml_uploader_submit: source float32 [2, 3] and destination float32 [3, 2] must be contiguous with the same dtype and shape",
         err_of(lib.ml_uploader_submit(u, ml.zeros(3, 2)._c, ml.zeros(2, 3)._c, t)))
      assert.are.equal("ml_uploader_submit: source float32 [3, 2] and destination float32 [3, 2] must be contiguous with the same dtype and shape",
         err_of(lib.ml_uploader_submit(u, ml.zeros(3, 2)._c, ml.zeros(2, 3):t()._c, t)))
      assert.are.equal("ml_uploader_submit: the source must be in host memory, it is on meta",
         err_of(lib.ml_uploader_submit(u, ml.zeros(2)._c, ml.empty({ 2 }, { device = "meta" })._c, t)))
      assert.are.equal("ml_uploader_wait: no pending upload 7", err_of(lib.ml_uploader_wait(u, 7)))
   end)

   it("frees a ticket once waited for", function()
      local u = new_uploader()
      local ticket = submit(u, ml.zeros(4), ml.ones(4))
      C.check(lib.ml_uploader_wait(u, ticket))
      assert.are.equal("ml_uploader_wait: no pending upload " .. ticket, err_of(lib.ml_uploader_wait(u, ticket)))
   end)
end)
