-- ml.Tensor: construction, fields, views, conversion, printing, and error messages.
local ml = require("moonload")

local function errmsg(fn)
   local ok, err = pcall(fn)
   assert.is_false(ok, "expected an error")
   return tostring(err):gsub("^[^:]*:%d+: ", "")
end

describe("tensor construction", function()
   it("builds from nested tables as float32 with the right shape", function()
      local t = ml.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
      assert.are.same({ 2, 3 }, t.shape)
      assert.are.equal("float32", t.dtype)
      assert.are.equal("cpu", t.device)
      assert.are.same({ { 1, 2, 3 }, { 4, 5, 6 } }, t:tolist())
   end)

   it("infers bool from booleans and honours an explicit dtype", function()
      assert.are.equal("bool", ml.tensor({ true, false }).dtype)
      assert.are.same({ true, false }, ml.tensor({ true, false }):tolist())
      local ids = ml.tensor({ 5, 7 }, { dtype = "int64" })
      assert.are.equal("int64", ids.dtype)
      assert.are.same({ 5, 7 }, ids:tolist())
   end)

   it("rejects ragged tables with a clear message", function()
      assert.are.equal("tensor: ragged nested table: expected 2 elements at depth 2, got 1",
         errmsg(function() return ml.tensor({ { 1, 2 }, { 3 } }) end))
   end)

   it("accepts shapes as a list or as varargs", function()
      assert.are.same({ 2, 3 }, ml.zeros(2, 3).shape)
      assert.are.same({ 2, 3 }, ml.ones({ 2, 3 }).shape)
      assert.are.same({ 2, 3 }, ml.empty(2, 3, { dtype = "int8" }).shape)
      assert.are.equal("int8", ml.empty(2, 3, { dtype = "int8" }).dtype)
   end)

   it("fills zeros, ones and full with the value", function()
      assert.are.same({ 0, 0 }, ml.zeros(2):tolist())
      assert.are.same({ { 1, 1 } }, ml.ones(1, 2):tolist())
      assert.are.same({ 2.5, 2.5, 2.5 }, ml.full({ 3 }, 2.5):tolist())
      assert.are.same({ 7, 7 }, ml.full({ 2 }, 7, { dtype = "int32" }):tolist())
   end)

   it("makes int64 ranges from integers and float32 from fractions", function()
      local r = ml.arange(5)
      assert.are.equal("int64", r.dtype)
      assert.are.same({ 0, 1, 2, 3, 4 }, r:tolist())
      assert.are.same({ 2, 4, 6 }, ml.arange(2, 8, 2):tolist())
      local f = ml.arange(0, 1, 0.25)
      assert.are.equal("float32", f.dtype)
      assert.are.same({ 0, 0.25, 0.5, 0.75 }, f:tolist())
   end)

   it("builds meta tensors that own no bytes", function()
      collectgarbage(); collectgarbage()
      collectgarbage("stop")           -- no finalizer may change the count while we look
      local before = ml.memory_allocated("cpu")
      local t = ml.empty({ 100000, 100000 }, { device = "meta" })
      local after = ml.memory_allocated("cpu")
      collectgarbage("restart")
      assert.are.equal("meta", t.device)
      assert.are.equal(0, t:data_ptr())
      assert.are.equal(before, after)
      assert.are.equal(4e10, t:nbytes())
   end)

   it("rejects unknown dtypes and devices naming them", function()
      assert.are.equal("empty: unknown dtype float8 (expected one of float32, float16, bfloat16, float64, int64, int32, int16, int8, uint8, bool, float8_e4m3fn, float8_e5m2)",
         errmsg(function() return ml.empty({ 2 }, { dtype = "float8" }) end))
      assert.are.equal('empty: unknown device "gpu0" (expected "cpu", "meta", "cuda" or "cuda:N")',
         errmsg(function() return ml.empty({ 2 }, { device = "gpu0" }) end))
   end)

   it("makes rand and randn reproducible with manual_seed", function()
      ml.manual_seed(42)
      local a = ml.randn(4):tolist()
      ml.manual_seed(42)
      assert.are.same(a, ml.randn(4):tolist())
      local u = ml.rand(1000)
      assert.is_true(u:min():item() >= 0 and u:max():item() < 1)
   end)
end)

describe("tensor fields", function()
   local t = ml.zeros(2, 3, 4)
   it("reports size, stride and counts with 1-based and negative dims", function()
      assert.are.equal(2, t:size(1))
      assert.are.equal(4, t:size(-1))
      assert.are.same({ 12, 4, 1 }, t:stride())
      assert.are.equal(4, t:stride(2))
      assert.are.equal(3, t:dim())
      assert.are.equal(24, t:numel())
      assert.are.equal(96, t:nbytes())
   end)

   it("returns a fresh shape list each time", function()
      local s = t.shape
      s[1] = 99
      assert.are.equal(2, t.shape[1])
   end)

   it("rejects dim 0 and out-of-range dims in 1-based terms", function()
      assert.are.equal("size: dimension 0 is out of range for a 3-d tensor (dims are 1-based; -1 is the last)",
         errmsg(function() return t:size(0) end))
      assert.are.equal("size: dimension 4 is out of range for a 3-d tensor (dims are 1-based; -1 is the last)",
         errmsg(function() return t:size(4) end))
   end)
end)

describe("views", function()
   local base = ml.arange(12):float():view(3, 4)

   it("share storage with the base tensor", function()
      local v = base:view(4, 3)
      assert.are.equal(base:data_ptr(), v:data_ptr())
      local n = base:narrow(2, 2, 2)
      assert.are.equal(base:data_ptr() + 4, n:data_ptr())
   end)

   it("infer one -1 in view and reshape", function()
      assert.are.same({ 2, 6 }, base:view(2, -1).shape)
      assert.are.same({ 12 }, base:reshape(-1).shape)
   end)

   it("refuses to view a non-contiguous tensor but reshape copies", function()
      local tt = base:t()
      assert.is_false(tt:is_contiguous())
      assert.are.equal("view: cannot view a non-contiguous tensor of shape [4, 3] as [12] (use reshape)",
         errmsg(function() return tt:view(12) end))
      assert.are.same({ 0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11 }, tt:reshape(12):tolist())
   end)

   it("transpose and permute swap shapes and strides", function()
      local x = ml.zeros(2, 3, 4)
      assert.are.same({ 4, 3, 2 }, x:transpose(1, -1).shape)
      assert.are.same({ 1, 4, 12 }, x:transpose(1, -1):stride())
      assert.are.same({ 3, 4, 2 }, x:permute(2, 3, 1).shape)
      assert.are.equal("permute: dimension 1 is repeated", errmsg(function() return x:permute(1, 1, 2) end))
   end)

   it("narrow and select take 1-based positions, negatives from the end", function()
      assert.are.same({ { 1, 2 }, { 5, 6 }, { 9, 10 } }, base:narrow(2, 2, 2):tolist())
      assert.are.same({ 8, 9, 10, 11 }, base:select(1, -1):tolist())
      assert.are.same({ 4, 5, 6, 7 }, base[2]:tolist())
      assert.are.equal("select: index 4 is out of range for dimension 1 of size 3 (positions are 1-based)",
         errmsg(function() return base:select(1, 4) end))
      assert.are.equal("narrow: start 3 and length 3 are out of range for dimension 1 of size 4",
         errmsg(function() return base:narrow(2, 4, 3) end))
   end)

   it("indexes with Torch7's tables: positions select, {first, last} ranges keep the dim, views to read and write", function()
      -- base is 3 x 4 holding 0..11
      assert.are.same({ 5, 6 }, base[{ 2, { 2, 3 } }]:tolist())
      assert.are.same({ { 3 }, { 7 }, { 11 } }, base[{ {}, { -1 } }]:tolist())
      assert.are.same({ { 8, 9, 10, 11 } }, base[{ { 3 } }]:tolist())
      assert.are.equal(6, base[{ 2, 3 }]:item())
      local x = ml.zeros(3, 4)
      x[{ 2, 1 }] = 5
      x[{ 3, { 2, -1 } }] = 7
      x[{ { 1, 2 }, { 4 } }] = ml.tensor({ { 1 }, { 2 } })
      assert.are.same({ { 0, 0, 0, 1 }, { 5, 0, 0, 2 }, { 0, 7, 7, 7 } }, x:tolist())
      local m = ml.ones({ 2, 2 }, { dtype = "bool" })
      m[{ 1, 1 }] = false
      assert.are.same({ { false, true }, { true, true } }, m:tolist())
      assert.are.equal("index: 3 indices for a tensor of 2 dims", errmsg(function() return base[{ 1, 2, 3 }] end))
      assert.are.equal("index: range {0, 2} is out of range for dimension 1 of size 3 (positions are 1-based, inclusive)",
         errmsg(function() return base[{ { 0, 2 } }] end))
      assert.are.equal("index: entry 2 must be a position or a {first, last} range, got string",
         errmsg(function() x[{ 1, "a" }] = 0 end))
   end)

   it("unsqueeze, squeeze, expand and flatten", function()
      local x = ml.ones(3)
      assert.are.same({ 1, 3 }, x:unsqueeze(1).shape)
      assert.are.same({ 3, 1 }, x:unsqueeze(-1).shape)
      assert.are.same({ 3 }, x:unsqueeze(1):unsqueeze(3):squeeze().shape)
      assert.are.same({ 1, 3 }, x:unsqueeze(1):unsqueeze(3):squeeze(3).shape)
      local e = x:unsqueeze(1):expand(4, 3)
      assert.are.same({ 4, 3 }, e.shape)
      assert.are.same({ 0, 1 }, e:stride())
      assert.are.equal("expand: cannot expand shape [3] to [2] (dimension 0 of size 3 is not 1)",
         errmsg(function() return x:expand(2) end))
      assert.are.same({ 2, 12 }, ml.zeros(2, 3, 4):flatten(2).shape)
      assert.are.same({ 24 }, ml.zeros(2, 3, 4):flatten().shape)
   end)

   it("split and chunk along a dim", function()
      local parts = base:split(2, 2)
      assert.are.equal(2, #parts)
      assert.are.same({ { 2, 3 }, { 6, 7 }, { 10, 11 } }, parts[2]:tolist())
      local c = ml.arange(5):chunk(2)
      assert.are.same({ 0, 1, 2 }, c[1]:tolist())
      assert.are.same({ 3, 4 }, c[2]:tolist())
      local s = ml.arange(6):split({ 1, 5 })
      assert.are.same({ 1, 2, 3, 4, 5 }, s[2]:tolist())
   end)

   it("writes through a view into the base", function()
      local x = ml.zeros(2, 2)
      x[2] = 5
      x:select(2, 1):fill_(1)
      assert.are.same({ { 1, 0 }, { 1, 5 } }, x:tolist())
   end)
end)

describe("conversion", function()
   it("to returns the same object when nothing changes", function()
      local x = ml.ones(2)
      assert.are.equal(x, x:to("cpu"))
      assert.are.equal(x, x:to("float32"))
      assert.are.equal(x, x:contiguous())
   end)

   it("converts between dtypes with rounding to nearest even and NaN/Inf preserved", function()
      local x = ml.tensor({ 1.0009765625 + 2 ^ -11, 65504, 70000, -1 / 0, 0 / 0, 1e-8, 3.14159 })
      local h = x:half():float():tolist()
      assert.are.equal(1.001953125, h[1])   -- tie rounds to even
      assert.are.equal(65504, h[2])
      assert.are.equal(math.huge, h[3])
      assert.are.equal(-math.huge, h[4])
      assert.is_true(h[5] ~= h[5])
      assert.are.equal(0, h[6])
      assert.are.near(3.140625, h[7], 1e-9)
      local b = x:bfloat16():float():tolist()
      assert.are.equal(1, b[1])
      assert.are.equal(65536, b[2])
      assert.is_true(b[5] ~= b[5])
      assert.are.near(3.140625, b[7], 1e-9)
   end)

   it("keeps half subnormals", function()
      local tiny = 2 ^ -24
      assert.are.equal(tiny, ml.tensor({ tiny }):half():float():item())
      assert.are.equal(3 * tiny, ml.tensor({ 3 * tiny }):half():float():item())
   end)

   it("reads back NaNs of any bit pattern as NaN (bfloat16 0xFFFF)", function()
      local nan_bits = ml.tensor({ -1, 1 }, { dtype = "int16" }):view_dtype("bfloat16")
      local values = nan_bits:tolist()
      assert.are.equal(2, #values)
      assert.is_true(values[1] ~= values[1])
      assert.is_true(nan_bits:select(1, 1):item() ~= nan_bits:select(1, 1):item())
   end)

   it("truncates floats to integers toward zero", function()
      assert.are.same({ 1, -1, 2 }, ml.tensor({ 1.7, -1.7, 2.2 }):to("int64"):tolist())
   end)

   it("clone copies, contiguous materialises a transpose", function()
      local x = ml.arange(6):float():view(2, 3)
      local c = x:clone()
      c:fill_(0)
      assert.are.equal(15, x:sum():item())
      local tc = x:t():contiguous()
      assert.is_true(tc:is_contiguous())
      assert.are.same({ { 0, 3 }, { 1, 4 }, { 2, 5 } }, tc:tolist())
   end)

   it("refuses to move meta tensors to a real device", function()
      local m = ml.empty({ 2 }, { device = "meta" })
      assert.are.equal("meta", m:to("meta").device)
      assert.are.equal("to: cannot move a meta tensor to cpu: it has no data (load weights into it instead)",
         errmsg(function() return m:to("cpu") end))
   end)

   it("item needs exactly one element", function()
      assert.are.equal(3, ml.tensor({ { 3 } }):item())
      assert.are.equal("item: tensor has 2 elements, item() needs exactly one",
         errmsg(function() return ml.ones(2):item() end))
   end)

   it("set_ swaps the data under the same object", function()
      local a, b = ml.zeros(2), ml.ones(3)
      local same = a
      a:set_(b)
      assert.are.equal(same, a)
      assert.are.same({ 1, 1, 1 }, a:tolist())
   end)
end)

describe("pinned memory and copy options", function()
   it("needs CUDA to pin, and accepts to()'s non_blocking and copy options", function()
      local x = ml.tensor({ 1, 2, 3 })
      assert.is_false(x:is_pinned())
      if ml.cuda_device_count() == 0 then
         local ok, err = pcall(function() return x:pin_memory() end)
         assert.is_false(ok)
         assert.truthy(tostring(err):find("pin_memory: CUDA is not available", 1, true))
      end
      assert.are.equal(x, x:to("cpu", { non_blocking = true }))
      local y = x:to("cpu", { copy = true })
      assert.are_not.equal(x, y)
      assert.is_true(y:equal(x))
      assert.are.equal("float64", x:to("float64", { non_blocking = true }).dtype)
   end)
end)

describe("memory accounting", function()
   it("counts cpu bytes in use and the peak, and frees on collection", function()
      collectgarbage(); collectgarbage()
      collectgarbage("stop")
      local before = ml.memory_allocated("cpu")
      ml.reset_peak_memory("cpu")
      local x = ml.empty({ 1024, 1024 })
      local in_use, peak = ml.memory_allocated("cpu")
      collectgarbage("restart")
      assert.are.equal(before + 4 * 1024 * 1024, in_use)
      assert.is_true(peak >= in_use)
      x = nil
      collectgarbage(); collectgarbage()
      assert.are.equal(before, (ml.memory_allocated("cpu")))
   end)

   -- limit(before): the threshold for `before` bytes live; cap: an ml.set_gc_cap to apply.
   local function collects_at(label, limit_of, cap)
      it(label, function()
      local lib = require("moonload.C").lib
      collectgarbage(); collectgarbage()
      lib.ml_gc_done()                                         -- the threshold from what is live now
      if cap then ml.set_gc_cap("cpu", cap) end
      local before = ml.memory_allocated("cpu")
      local limit = limit_of(before)
      ml.reset_peak_memory("cpu")
      for _ = 1, math.ceil(limit / 2 ^ 20) + 64 do
         local t = ml.empty({ 262144 })                        -- 1 MiB, dead at once
         t = nil
      end
      local _, peak = ml.memory_allocated("cpu")
      assert.is_true(peak - before <= limit + 2 ^ 21, string.format("peak %d over %d, limit %d", peak, before, limit))
      assert.is_true(peak - before >= limit)                  -- nothing was collected before that
      ml.set_gc_cap("cpu", 0)
      collectgarbage(); collectgarbage()
      ml.empty_cache()
      end)
   end
   collects_at("collects dead tensors once 64 MiB, or a quarter of what was live, was allocated since the last collection",
      function(live) return math.max(64 * 2 ^ 20, math.floor(live / 4)) end)
   collects_at("collects them after the gc cap instead when that is lower", function() return 8 * 2 ^ 20 end, 8 * 2 ^ 20)
end)

describe("cpu block cache", function()
   it("reuses a freed large block for the next tensor of that size, and empties on request", function()
      collectgarbage(); collectgarbage()
      ml.empty_cache()
      local x = ml.empty({ 512, 1024 })          -- 2 MiB
      local addr = x:data_ptr()
      x = nil
      collectgarbage(); collectgarbage()
      assert.are.equal(2 * 1024 * 1024, ml.cpu_cached_bytes())
      local y = ml.empty({ 1024, 512 })
      assert.are.equal(addr, y:data_ptr())
      assert.are.equal(0, ml.cpu_cached_bytes())
      y = nil
      collectgarbage(); collectgarbage()
      ml.empty_cache()
      assert.are.equal(0, ml.cpu_cached_bytes())
   end)
end)

describe("printing", function()
   it("prints like PyTorch with the dtype", function()
      assert.are.equal("tensor([[1., 2.],\n        [3., 4.]], dtype=float32)",
         tostring(ml.tensor({ { 1, 2 }, { 3, 4 } })))
      assert.are.equal("tensor([0.5000, 1.2500], dtype=float32)", tostring(ml.tensor({ 0.5, 1.25 })))
      assert.are.equal("tensor([1, 2], dtype=int64)", tostring(ml.tensor({ 1, 2 }, { dtype = "int64" })))
      assert.are.equal("tensor(3., dtype=float32)", tostring(ml.tensor(3)))
      assert.are.equal("tensor([ True, False], dtype=bool)", tostring(ml.tensor({ true, false })))
   end)

   it("abbreviates big tensors", function()
      local s = tostring(ml.arange(2000))
      assert.are.equal("tensor([   0,    1,    2, ..., 1997, 1998, 1999], dtype=int64)", s)
   end)

   it("prints a meta tensor's shape only", function()
      assert.are.equal("tensor(..., size=[2, 3], dtype=float16, device=meta)",
         tostring(ml.empty({ 2, 3 }, { dtype = "float16", device = "meta" })))
   end)
end)
