-- The CUDA backend against the CPU on fresh random inputs, and models dispatched over
-- cuda:0 + cpu + disk against the plain CPU model. Tagged #cuda: `make test-cuda` on a machine
-- with a GPU (tests/cuda/device_check.sh on the lent GPU machine); `make test` leaves it out.
local ml = require("moonload")
local hooks = require("moonload.hooks")

local DEV = "cuda:0"

-- Allocates n tensors of 1 MiB on DEV, each dead at once, with LuaJIT's own collector stopped:
-- only the core's pressure flag collects them.
local function allocate_dead_mib(n)
   collectgarbage("stop")
   local ok, err = pcall(function()
      for _ = 1, n do
         local t = ml.empty({ 262144 }, { device = DEV })
         t = nil
      end
   end)
   collectgarbage("restart")
   assert(ok, err)
end

local function max_rel_err(got, want)
   local g, w = got:cpu():float():tolist(), want:cpu():float():tolist()
   local worst = 0
   local function walk(a, b)
      if type(a) == "table" then
         for i = 1, #a do walk(a[i], b[i]) end
      else
         local d = math.abs(a - b) / math.max(1, math.abs(b))
         if d ~= d then d = math.huge end
         if d > worst then worst = d end
      end
   end
   walk(g, w)
   return worst
end

local function assert_close(got, want, tol, what)
   assert.are.same(want.shape, got.shape, what .. ": shape")
   local err = max_rel_err(got, want)
   assert.is_true(err <= tol, string.format("%s: relative error %.3g > %.3g", what, err, tol))
end

describe("cuda backend #cuda", function()
   it("has a device and accounts its memory", function()
      assert.is_true(ml.cuda_device_count() > 0)
      collectgarbage(); collectgarbage()     -- (tensors of earlier spec files would be freed midway)
      local before = ml.memory_allocated(DEV)
      local x = ml.empty({ 1024, 1024 }, { device = DEV })
      assert.are.equal(before + 4 * 1024 * 1024, (ml.memory_allocated(DEV)))
      assert.are.equal(DEV, x.device)
      x = nil
      collectgarbage(); collectgarbage()
      assert.are.equal(before, (ml.memory_allocated(DEV)))
   end)

   it("pins host memory: a page-locked copy that moves to the device and back", function()
      local x = ml.randn(4, 5):t()
      local p = x:pin_memory()
      assert.is_true(p:is_pinned())
      assert.is_false(x:is_pinned())
      assert.is_true(p:equal(x))
      assert.are.equal(p, p:pin_memory())
      assert.is_true(p:to(DEV, { non_blocking = true }):cpu():equal(x))
      assert.has_error(function() p:to(DEV):pin_memory() end,
         "pin_memory: only cpu tensors can be pinned, this one is on cuda:0")
   end)

   it("pins host memory in place: the same bytes page-locked, a checkpoint's mapping whole, unlocked when freed", function()
      local big = ml.randn(2 ^ 18)                                   -- 1 MiB: a block of its own
      local ptr = big:data_ptr()
      assert.are.equal(big, big:pin_memory({ in_place = true }))
      assert.is_true(big:is_pinned())
      assert.are.equal(ptr, big:data_ptr())
      assert.are.equal(big, big:pin_memory({ in_place = true }))    -- (once is enough)
      assert.is_true(big:to(DEV, { non_blocking = true }):cpu():equal(big))
      local small = ml.randn(10)                                     -- shares its pages: stays pageable
      small:pin_memory({ in_place = true })
      assert.is_false(small:is_pinned())
      -- freed, the block is unlocked: the CPU cache hands the same block out again, which locks anew
      big = nil
      collectgarbage(); collectgarbage()
      local again = ml.empty({ 2 ^ 18 })
      assert.are.equal(ptr, again:data_ptr())
      again:pin_memory({ in_place = true })
      assert.is_true(again:is_pinned())
      -- a tensor of a checkpoint's mapping locks the file whole: its neighbours are pinned too
      local file = "tests/fixtures/models/mamba_tiny/model.safetensors"
      local tensors = ml.safetensors.load_file(file)
      local names = {}
      for name in pairs(tensors) do names[#names + 1] = name end
      table.sort(names)
      assert.is_false(tensors[names[1]]:is_pinned())
      tensors[names[1]]:pin_memory({ in_place = true })
      for _, name in ipairs(names) do assert.is_true(tensors[name]:is_pinned(), name) end
      tensors, names = nil, nil
      collectgarbage(); collectgarbage()
      local reread = ml.safetensors.load_file(file)                 -- (locks again: the first was unlocked)
      local _, t = next(reread)
      t:pin_memory({ in_place = true })
      assert.is_true(t:is_pinned())
      assert.has_error(function() t:to(DEV):pin_memory({ in_place = true }) end,
         "pin_memory in place: only cpu tensors can be pinned, this one is on cuda:0")
   end)

   it("shows the allocator as torch.cuda does: allocated, peak, reserved, empty_cache, mem_get_info", function()
      assert.is_true(ml.cuda.is_available())
      collectgarbage(); collectgarbage()
      ml.cuda.synchronize()
      ml.cuda.empty_cache()
      local base = ml.cuda.memory_allocated(DEV)
      assert.are.equal(base, ml.cuda.memory_reserved(0))
      ml.cuda.reset_peak_memory_stats(0)
      local x = ml.empty({ 2 ^ 20 }, { device = DEV })                 -- 4 MiB
      assert.are.equal(base + 4 * 2 ^ 20, ml.cuda.memory_allocated())
      x = nil
      collectgarbage(); collectgarbage()
      assert.are.equal(base, ml.cuda.memory_allocated(0))
      assert.are.equal(base + 4 * 2 ^ 20, ml.cuda.max_memory_allocated(0))
      -- the block is kept for reuse, unless MOONLOAD_CUDA_NO_CACHING=1 (make test-asan) freed it
      local caching = os.getenv("MOONLOAD_CUDA_NO_CACHING") ~= "1"
      assert.are.equal(caching, ml.cuda.memory_reserved(0) >= base + 4 * 2 ^ 20)
      local free_before = ml.cuda.mem_get_info(0)
      ml.cuda.empty_cache(DEV)
      assert.are.equal(base, ml.cuda.memory_reserved(0))
      local free, total = ml.cuda.mem_get_info(0)
      -- idle blocks count as free either way; a driver hands small blocks out of 2 MiB pages, so
      -- giving them back need not show to the byte
      assert.is_true(math.abs(free - free_before) <= 32 * 2 ^ 20, string.format("%d vs %d", free, free_before))
      assert.is_true(total >= free)
      local n = ml.cuda.device_count()
      assert.has_error(function() ml.cuda.synchronize(n) end,
         string.format("synchronize: cuda:%d does not exist (%d CUDA devices)", n, n))
      assert.are.equal(DEV, ml.cuda(ml.ones(2)).device)
      -- what the device is, as torch.cuda.get_device_properties / get_device_name / capability
      local props = ml.cuda.get_device_properties(DEV)
      assert.are.equal(props.name, ml.cuda.get_device_name())
      assert.is_true(#props.name > 0)
      assert.are.equal(total, props.total_memory)             -- the driver's total, as mem_get_info's
      local major, minor = ml.cuda.get_device_capability(0)
      assert.are.same({ props.major, props.minor }, { major, minor })
      assert.is_true(major >= 8 and props.multi_processor_count >= 1, "sm_80 or newer is what the build targets")
      assert.has_error(function() ml.cuda.get_device_name(n) end,
         string.format("get_device_properties: cuda:%d does not exist (%d CUDA devices)", n, n))
   end)

   it("keeps few idle blocks while a tensor grows a little each step, as a cache built with cat does", function()
      collectgarbage(); collectgarbage()
      ml.cuda.empty_cache(0)
      local t
      for step = 1, 300 do                                -- 2 KiB more each step, up to 600 KiB
         t = ml.empty({ 512 * step }, { device = DEV })
         collectgarbage()                                 -- the last step's block goes back to the cache
      end
      local final = t:nbytes()
      local idle = ml.cuda.memory_reserved(0) - ml.cuda.memory_allocated(0)
      -- size classes eight to a power of two: one idle block per class passed, about 23 times the
      -- last size (14.4 MB); with a block for each size passed it was 150 times (91.9 MB)
      assert.is_true(idle < 32 * final, string.format("%d idle bytes for a %d-byte tensor", idle, final))
      t = nil
      collectgarbage()
      ml.cuda.empty_cache(0)
   end)

   it("names the device and the sizes when its memory runs out", function()
      local ok, err = pcall(function() return ml.empty({ 2 ^ 40 }, { device = DEV }) end)   -- 4 TiB
      assert.is_false(ok)
      assert.truthy(tostring(err):find("cuda:0: out of memory allocating 4398046511104 bytes (", 1, true), tostring(err))
      assert.truthy(tostring(err):find("bytes free)", 1, true))
      local x = ml.ones(3, { device = DEV })                          -- the device still works
      assert.are.same({ 1, 1, 1 }, x:cpu():tolist())
   end)

   it("round-trips every dtype through the device", function()
      ml.manual_seed(1)
      for _, dt in ipairs({ "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool" }) do
         local x = (ml.randn(37, 5) * 20):to(dt)
         assert.is_true(x:to(DEV):cpu():equal(x), dt)
      end
   end)

   it("copies strided and broadcast views on the device", function()
      local x = ml.randn(6, 7)
      local d = x:to(DEV)
      assert.is_true(d:t():contiguous():cpu():equal(x:t():contiguous()))
      assert.is_true(d:narrow(2, 2, 3):contiguous():cpu():equal(x:narrow(2, 2, 3):contiguous()))
      assert.is_true(d:select(1, 1):unsqueeze(1):expand(4, 7):contiguous():cpu():equal(x[1]:unsqueeze(1):expand(4, 7):contiguous()))
   end)

   local unary = { "neg", "abs", "sqrt", "rsqrt", "exp", "log", "tanh", "sigmoid", "relu", "gelu", "silu", "sin", "cos" }
   for _, op in ipairs(unary) do
      it("unary " .. op .. " matches the CPU (float32 and bfloat16)", function()
         ml.manual_seed(2)
         local x = ml.rand(33, 65) * 4 + 0.1
         assert_close(x:to(DEV)[op](x:to(DEV)), x[op](x), 1e-5, op)
         local xb = x:bfloat16()
         assert_close(xb:to(DEV)[op](xb:to(DEV)), xb[op](xb), 1e-2, op .. " bf16")
      end)
   end

   for _, op in ipairs({ "add", "sub", "mul", "div", "maximum", "minimum", "pow" }) do
      it("binary " .. op .. " broadcasts like the CPU", function()
         ml.manual_seed(3)
         local a, b = ml.rand(4, 1, 9) + 0.5, ml.rand(5, 1) + 0.5
         assert_close(a:to(DEV)[op](a:to(DEV), b:to(DEV)), a[op](a, b), 1e-5, op)
         assert_close(a:to(DEV)[op](a:to(DEV), 1.5), a[op](a, 1.5), 1e-5, op .. " scalar")
      end)
   end

   it("compares into bool tensors", function()
      local a, b = ml.randn(50), ml.randn(50)
      assert.is_true(a:to(DEV):lt(b:to(DEV)):cpu():equal(a:lt(b)))
   end)

   for _, op in ipairs({ "sum", "mean", "max", "min", "argmax", "argmin" }) do
      it("reduction " .. op .. " over a dim and over all matches the CPU", function()
         ml.manual_seed(4)
         local x = ml.randn(7, 300, 5)
         local d = x:to(DEV)
         assert_close(d[op](d, 2), x[op](x, 2), 1e-5, op .. " dim 2")
         assert_close(d[op](d), x[op](x), 1e-5, op .. " all")
      end)
   end

   it("reduces integers exactly in int64, wrapping as on the CPU", function()
      -- 2^53 + 1 is not a double: built by integer addition, which is exact on both sides.
      local x = ml.tensor({ { 2 ^ 53, 2 ^ 53 }, { 2 ^ 62, 2 ^ 62 } }, { dtype = "int64" })
         + ml.tensor({ { 0, 1 }, { 3, 5 } }, { dtype = "int64" })
      local d = x:to(DEV)
      for _, op in ipairs({ "sum", "prod", "max", "min", "argmax", "argmin" }) do
         assert.is_true(d[op](d, 2):cpu():equal(x[op](x, 2)), op .. " over a dim")
         assert.is_true(d[op](d):cpu():equal(x[op](x)), op .. " over all")
      end
      assert.are.same({ 1, 1 }, d:argmax(2):cpu():tolist())
      local flags = ml.tensor({ true, false, true, true })
      assert.is_true(flags:to(DEV):sum():cpu():equal(flags:sum()))
      assert.are.equal("int64", flags:to(DEV):sum().dtype)
   end)

   it("softmax, layer_norm and rms_norm match the CPU", function()
      ml.manual_seed(5)
      local F = ml.nn.functional
      local x, w, b = ml.randn(3, 17, 64), ml.randn(64), ml.randn(64)
      local d = x:to(DEV)
      assert_close(d:softmax(-1), x:softmax(-1), 1e-5, "softmax")
      assert_close(d:softmax(2), x:softmax(2), 1e-5, "softmax dim 2")
      assert_close(F.layer_norm(d, { 64 }, w:to(DEV), b:to(DEV), 1e-5), F.layer_norm(x, { 64 }, w, b, 1e-5), 1e-4, "layer_norm")
      assert_close(F.rms_norm(d, { 64 }, w:to(DEV), 1e-6), F.rms_norm(x, { 64 }, w, 1e-6), 1e-4, "rms_norm")
   end)

   it("matmul, linear and attention match the CPU in float32 and bfloat16", function()
      ml.manual_seed(6)
      local F = ml.nn.functional
      local a, b = ml.randn(2, 3, 40, 64), ml.randn(64, 48)
      assert_close(a:to(DEV):matmul(b:to(DEV)), a:matmul(b), 1e-4, "matmul")
      assert_close(a:to(DEV):matmul(b:to(DEV):t():contiguous():t()), a:matmul(b), 1e-4, "matmul transposed")
      local w, bias = ml.randn(96, 64), ml.randn(96)
      assert_close(F.linear(a:to(DEV), w:to(DEV), bias:to(DEV)), F.linear(a, w, bias), 1e-4, "linear")
      local ab, wb = a:bfloat16(), w:bfloat16()
      assert_close(F.linear(ab:to(DEV), wb:to(DEV)), F.linear(ab, wb), 2e-2, "linear bf16")
      local q, k, v = ml.randn(1, 4, 9, 16), ml.randn(1, 4, 12, 16), ml.randn(1, 4, 12, 16)
      assert_close(F.scaled_dot_product_attention(q:to(DEV), k:to(DEV), v:to(DEV), { is_causal = true }),
         F.scaled_dot_product_attention(q, k, v, { is_causal = true }), 1e-4, "sdpa causal")
      -- the kernel's extension: a float bias of one row with the causal triangle (BLOOM's ALiBi)
      local lib, T = require("moonload.C").lib, require("moonload.tensor")
      local out = require("ffi").new("ml_tensor*[1]")
      local qs, bias = ml.randn(1, 4, 12, 16), ml.randn(1, 4, 1, 12)
      local function biased(qq, kk, vv, bb)
         require("moonload.C").check(lib.ml_sdpa(qq._c, kk._c, vv._c, bb._c, nil, true, 0, out))
         return T.wrap(out[0])
      end
      assert_close(biased(qs:to(DEV), k:to(DEV), v:to(DEV), bias:to(DEV)), biased(qs, k, v, bias), 1e-4, "sdpa bias + causal")
   end)

   it("runs attention over blocks of query rows when the scores would pass the scratch cap", function()
      -- MOONLOAD_CUDA_ATTN_SCRATCH is read at each call: 2 KiB holds a few score rows here, so
      -- the causal key skipping, the mask's row offsets and the output rows of every block count;
      -- with grouped key/value heads the blocks also cross the stacked query heads.
      local ffi = require("ffi")
      pcall(ffi.cdef, "int setenv(const char *, const char *, int); int unsetenv(const char *);")
      local F = ml.nn.functional
      ml.manual_seed(16)
      local q, k, v = ml.randn(2, 4, 11, 16), ml.randn(2, 2, 11, 16), ml.randn(2, 2, 11, 8)
      local long_k, long_v = ml.randn(2, 4, 13, 16), ml.randn(2, 4, 13, 8)
      local k2, v2 = long_k:narrow(2, 1, 2), long_v:narrow(2, 1, 2)
      -- q as Llama makes it, (B, L, H, D) transposed to (B, H, L, D) on the device, where its heads
      -- are not stacked in memory (moving a view to a device makes it contiguous, so it is
      -- transposed after the move)
      local q_blhd, q1_blhd = ml.randn(2, 11, 4, 16), ml.randn(2, 1, 4, 16)
      local cases = {
         { "causal, grouped heads", q, k, v, { is_causal = true } },
         { "causal, grouped heads, transposed query", q_blhd, k, v, { is_causal = true }, true },
         { "grouped heads, one query (decode)", q1_blhd, k2, v2, {}, true },
         { "grouped heads, a mask per query head", q_blhd, k2, v2, { attn_mask = ml.randn(2, 4, 11, 13):gt(0) }, true },
         { "causal, more keys than queries", q, long_k, long_v, { is_causal = true } },
         { "bool mask", q, long_k, long_v, { attn_mask = ml.rand(11, 13):gt(0.3) } },
         { "additive mask", q, long_k, long_v, { attn_mask = ml.randn(2, 1, 11, 13) } },
      }
      local function run(c, dtype, device)
         local function put(t) return t:to(dtype):to(device) end
         local qq = c[6] and put(c[2]):transpose(2, 3) or put(c[2])
         local mask = c[5].attn_mask and c[5].attn_mask:to(device)
         return F.scaled_dot_product_attention(qq, put(c[3]), put(c[4]), { is_causal = c[5].is_causal, attn_mask = mask })
      end
      local want = {}
      for i, c in ipairs(cases) do want[i] = { run(c, "float32", "cpu"), run(c, "bfloat16", "cpu") } end
      ffi.C.setenv("MOONLOAD_CUDA_ATTN_SCRATCH", "2048", 1)
      local ok, err = pcall(function()
         for i, c in ipairs(cases) do
            assert_close(run(c, "float32", DEV), want[i][1], 1e-4, c[1])
            assert_close(run(c, "bfloat16", DEV), want[i][2], 2e-2, c[1] .. " bfloat16")
            assert_close(run(c, "float64", DEV), want[i][1], 1e-5, c[1] .. " float64")
         end
      end)
      ffi.C.unsetenv("MOONLOAD_CUDA_ATTN_SCRATCH")
      assert(ok, err)
   end)

   it("indexes on the device: tril, triu, cumsum, gather, index_select (with the CPU's errors)", function()
      ml.manual_seed(8)
      local x = ml.randn(3, 6, 7)
      local d = x:to(DEV)
      for _, k in ipairs({ -2, 0, 3 }) do
         assert.is_true(d:tril(k):cpu():equal(x:tril(k)))
         assert.is_true(d:triu(k):cpu():equal(x:triu(k)))
      end
      assert.is_true(d:transpose(2, 3):tril():cpu():equal(x:transpose(2, 3):tril()))
      assert.is_true(d:cumsum(2):cpu():allclose(x:cumsum(2), 1e-6, 1e-5))
      assert.is_true(d:transpose(1, 3):cumsum(1):cpu():allclose(x:transpose(1, 3):cumsum(1), 1e-6, 1e-5))
      local ints = ml.tensor({ { 2 ^ 40, 1 }, { 3, -4 } }, { dtype = "int64" })
      assert.are.same(ints:cumsum(1):tolist(), ints:to(DEV):cumsum(1):cpu():tolist())
      local idx = ml.tensor({ { { 0, 6, -1 } } }, { dtype = "int64" }):expand(3, 6, 3)
      assert.is_true(d:gather(3, idx:to(DEV)):cpu():equal(x:gather(3, idx)))
      local sel = ml.tensor({ 5, 0, -1, 2 }, { dtype = "int64" })
      assert.is_true(d:index_select(2, sel:to(DEV)):cpu():equal(x:index_select(2, sel)))
      local bad = ml.tensor({ 1, 7 }, { dtype = "int64" })
      local ok, err = pcall(function() return d:index_select(3, bad:to(DEV)) end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("index_select: index 7 is out of range for a dimension of size 7 (input shape [3, 6, 7])", 1, true))
      ok, err = pcall(function() return d:gather(3, (idx * 3):to(DEV)) end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("gather: index 18 is out of range for a dimension of size 7", 1, true))
   end)

   it("picks topk in the CPU's order: ties by index, NaN largest, integers exact, any dim", function()
      local x = ml.tensor({ { 3, 1, 3, 0 / 0, -2, 3 }, { 5, 5, 5, 5, 5, 5 } })
      for _, largest in ipairs({ true, false }) do
         for _, k in ipairs({ 0, 1, 4, 6 }) do
            local v, i = x:to(DEV):topk(k, -1, largest)
            local cv, ci = x:topk(k, -1, largest)
            assert.are.equal(DEV, v.device)
            local what = string.format("k %d largest %s", k, tostring(largest))
            assert.are.same(ci:tolist(), i:cpu():tolist(), what)
            local hv = v:cpu()
            assert.is_true(hv:ne(hv):equal(cv:ne(cv)), what .. ": NaN places")
            assert.is_true(hv:masked_fill(hv:ne(hv), 0):equal(cv:masked_fill(cv:ne(cv), 0)), what .. ": values")
         end
      end
      local big = ml.tensor({ 2 ^ 53 + 1, 2 ^ 53, 7 }, { dtype = "int64" })
      local _, bi = big:to(DEV):topk(2)
      assert.are.same({ 0, 1 }, bi:cpu():tolist())
      ml.manual_seed(14)
      local r = ml.randn(4, 300, 3):bfloat16()
      local v, i = r:to(DEV):topk(7, 2)
      local cv, ci = r:topk(7, 2)
      assert.is_true(v:cpu():equal(cv) and i:cpu():equal(ci))
   end)

   it("runs multinomial through the host and returns to the device", function()
      local x = ml.randn(6, 6)
      ml.manual_seed(10)
      local pick = x:to(DEV):softmax(-1):multinomial()
      ml.manual_seed(10)
      assert.are.equal(DEV, pick.device)
      assert.is_true(pick:cpu():equal(x:softmax(-1):multinomial()))
   end)

   it("fills with the CPU's random numbers for a seed, on the device", function()
      for _, dt in ipairs({ "float32", "float64", "bfloat16" }) do
         ml.manual_seed(9)
         local r = ml.rand({ 5, 7 }, { device = DEV, dtype = dt })
         local n = ml.randn({ 5, 7 }, { device = DEV, dtype = dt })
         ml.manual_seed(9)
         assert.is_true(r:cpu():equal(ml.rand({ 5, 7 }, { dtype = dt })), dt .. " uniform")
         assert_close(n, ml.randn({ 5, 7 }, { dtype = dt }), 1e-12, dt .. " normal")
      end
      local t = ml.zeros(6, 4):to(DEV):t()                     -- strided: element order is t's row-major
      ml.manual_seed(3)
      t:uniform_(-2, 2)
      ml.manual_seed(3)
      assert.is_true(t:cpu():equal(ml.zeros(6, 4):t():uniform_(-2, 2)))
      assert.has_error(function() ml.zeros(2, 2):to(DEV):normal_(0, -1) end, "normal_: expected std >= 0, got -1")
   end)

   it("embeds 0-based ids and names an out-of-range id", function()
      local F = ml.nn.functional
      local w = ml.randn(10, 8)
      local ids = ml.tensor({ { 0, 9, 3 } }, { dtype = "int64" })
      assert_close(F.embedding(ids:to(DEV), w:to(DEV)), F.embedding(ids, w), 0, "embedding")
      local ok, err = pcall(F.embedding, ml.tensor({ 10 }, { dtype = "int64" }):to(DEV), w:to(DEV))
      assert.is_false(ok)
      assert.truthy(tostring(err):find("10", 1, true))
   end)
end)

describe("models on cuda #cuda", function()
   local ids = ml.tensor({ { 5, 17, 42, 3, 8, 1 } }, { dtype = "int64" })

   local function cpu_logits(dir)
      return ml.models.from_pretrained(dir)(ids)
   end

   it("the tiny GPT-2 moved whole to cuda:0 gives the CPU logits", function()
      local dir = "tests/fixtures/models/gpt2_tiny"
      local want = cpu_logits(dir)
      local model = ml.models.from_pretrained(dir):to(DEV)
      assert_close(model(ids:to(DEV)), want, 1e-4, "gpt2 on cuda")
   end)

   local function split_map(prefix, n_layer, head)
      local map = {}
      for i = 0, n_layer - 1 do map[prefix .. i] = i % 2 == 0 and "cpu" or "disk" end
      for k, v in pairs(head) do map[k] = v end
      return map
   end

   local cases = {
      { dir = "tests/fixtures/models/gpt2_tiny", prefix = "transformer.h.", n = 2,
        head = { ["transformer.wte"] = 0, ["transformer.wpe"] = 0, ["transformer.drop"] = 0, ["transformer.ln_f"] = 0, lm_head = 0 } },
      { dir = "tests/fixtures/models/llama_tiny_untied", prefix = "model.layers.", n = 2,
        head = { ["model.embed_tokens"] = 0, ["model.norm"] = 0, ["model.rotary_emb"] = 0, lm_head = "cpu" } },
   }
   -- prefetch with the default streaming window (the whole tiny model ahead), one module ahead, none
   local modes = { { "streaming window", true, 64 * 2 ^ 20 }, { "one module ahead", true, 0 }, { "no prefetch", false, 0 },
                   { "computed in place on the CPU", true, 64 * 2 ^ 20, 8 } }
   for _, case in ipairs(cases) do
      for _, mode in ipairs(modes) do
         it(string.format("%s over cuda:0 + cpu + disk (%s) equals the CPU model", case.dir, mode[1]), function()
            local want = cpu_logits(case.dir)
            hooks.set_prefetch(mode[2])
            hooks.set_stream_window(mode[3])
            hooks.set_compute_in_place(mode[4] or 0)
            local folder = os.tmpname()
            os.remove(folder)
            local model = ml.models.from_pretrained(case.dir, {
               device_map = split_map(case.prefix, case.n, case.head), offload_folder = folder })
            local before = hooks.runtime_stats()
            local got = model(ids)
            local mid = hooks.runtime_stats()
            got = model(ids)          -- the second forward uses the learned order (streamed ahead)
            local after = hooks.runtime_stats()
            hooks.set_prefetch(true)
            hooks.set_stream_window(64 * 2 ^ 20)
            hooks.set_compute_in_place(0)
            os.execute("rm -rf '" .. folder .. "'")
            assert_close(got, want, 1e-4, case.dir)
            if mode[4] then       -- 6 tokens < 8: the cpu and disk blocks ran where their weights are
               assert.is_true(after.in_place_forwards > before.in_place_forwards)
               assert.are.equal(before.bytes_copied, after.bytes_copied)
            elseif mode[2] then
               assert.is_true(after.bytes_streamed > before.bytes_streamed)
               -- the next module is queued before the host waits for this one's upload: the copy
               -- engine never runs dry at a module boundary (the emulator holds copies back, so the
               -- host does wait there)
               assert.are.equal(0, after.stream_drains - mid.stream_drains,
                  string.format("%d of %d waits", after.stream_drains - mid.stream_drains, after.stream_waits - mid.stream_waits))
               assert.is_true(after.stream_busy_s > mid.stream_busy_s)
            end
         end)
      end
   end
end)

describe("block schedule on cuda #cuda", function()
   it("streams each cpu and disk layer to cuda:0 once for all blocks, with the CPU model's logits and tokens", function()
      local dir = "tests/fixtures/models/llama_tiny_untied"
      local plain = ml.models.from_pretrained(dir)
      local rows = {}
      for b = 1, 5 do
         rows[b] = {}
         for t = 1, 11 do rows[b][t] = (b * 13 + t * 7) % plain.config.vocab_size end
      end
      local ids = ml.tensor(rows, { dtype = "int64" })
      local folder = os.tmpname()
      os.remove(folder)
      local model = ml.models.from_pretrained(dir, { offload_folder = folder, device_map = {
         ["model.embed_tokens"] = 0, ["model.layers.0"] = "cpu", ["model.layers.1"] = "disk",
         ["model.norm"] = 0, ["model.rotary_emb"] = 0, lm_head = 0 } })
      model(ids)                                   -- learns the order
      local function calls(opts)
         local before = hooks.runtime_stats().materialize_calls
         local out = model(ids, opts)
         return out, hooks.runtime_stats().materialize_calls - before
      end
      local whole, n = calls()
      local blocked, n_blocked = calls({ micro_batch_size = 2, prefill_chunk_size = 4 })
      assert.are.equal(n, n_blocked)
      assert_close(blocked, plain(ids), 1e-4, "blocked over cuda:0 + cpu + disk")
      assert_close(whole, blocked, 1e-4, "blocked against whole")
      assert.are.same(plain:generate(rows, { max_new_tokens = 5 }),
         model:generate(rows, { max_new_tokens = 5, micro_batch_size = 2, prefill_chunk_size = 3 }))
      os.execute("rm -rf '" .. folder .. "'")
   end)
end)

describe("device_overrides on cuda #cuda", function()
   for _, name in ipairs({ "qwen3_moe_tiny", "deepseek_v3_tiny" }) do
   it(name .. " runs with its experts in RAM and the rest on cuda:0 (llama.cpp's -ot exps=CPU)", function()
      local dir = "tests/fixtures/models/" .. name
      local plain = ml.models.from_pretrained(dir)
      local model = ml.models.from_pretrained(dir, { device_map = "auto", max_memory = { [0] = "200MB", cpu = "1GB" },
         device_overrides = { ["%.experts$"] = "cpu" } })
      for name, d in pairs(model.hf_device_map) do
         assert.are.equal(name:find("%.experts$") and "cpu" or 0, d, name)
      end
      local prompt = { 5, 17, 42, 3 }
      local want = plain:generate(prompt, { max_new_tokens = 6 })
      assert.are.same(want, model:generate(prompt, { max_new_tokens = 6 }))
      -- decoding with the experts computed where they lie
      local before = hooks.runtime_stats().in_place_forwards
      local prev = hooks.set_compute_in_place(8)
      local got = model:generate(prompt, { max_new_tokens = 6 })
      hooks.set_compute_in_place(prev)
      assert.are.same(want, got)
      assert.is_true(hooks.runtime_stats().in_place_forwards > before)
   end)
   end
end)

describe("key-value cache on the CPU #cuda", function()
   local dir = "tests/fixtures/models/llama_tiny_untied"

   it("keeps the cache in host memory and attends there, with the CPU model's logits and tokens", function()
      local plain = ml.models.from_pretrained(dir)
      local model = ml.models.from_pretrained(dir):to(DEV)
      local ids = ml.tensor({ { 5, 17, 42, 3 }, { 7, 8, 9, 10 } }, { dtype = "int64" })
      local cache = model:new_cache(8, "cpu")
      local logits = model(ids:to(DEV), { cache = cache })
      assert.are.equal(DEV, logits.device)
      assert.are.equal("cpu", cache.k[1].device)
      assert_close(logits, plain(ids), 1e-4, "prefill with the cache on the CPU")
      local step = ml.tensor({ { 1 }, { 2 } }, { dtype = "int64" })
      local want = plain(ml.cat({ ids, step }, 2)):narrow(2, 5, 1)
      assert_close(model(step:to(DEV), { cache = cache }), want, 1e-4, "a step over the CPU cache")
      local batch, mask = { { 0, 0, 5, 17 }, { 7, 8, 9, 10 } }, { { 0, 0, 1, 1 }, { 1, 1, 1, 1 } }
      assert.are.same(plain:generate(batch, { max_new_tokens = 6, attention_mask = mask }),
         model:generate(batch, { max_new_tokens = 6, attention_mask = mask, kv_cache_device = "cpu" }))
   end)

   -- each attention implementation: GPT-2's, GPT-NeoX's, Gemma 2's soft-capped scores, a sliding window,
   -- Gemma 4's layers reading earlier layers' keys and values from the CPU
   for _, name in ipairs({ "gpt2_tiny", "gpt_neox_tiny", "gemma2_tiny", "mistral_tiny", "gemma4_tiny" }) do
      it(name .. " generates the CPU's tokens on cuda:0 with the cache on the CPU", function()
         local fixture = "tests/fixtures/models/" .. name
         local batch, mask = { { 0, 0, 5, 17, 9, 4 }, { 7, 8, 9, 10, 11, 12 } }, { { 0, 0, 1, 1, 1, 1 }, { 1, 1, 1, 1, 1, 1 } }
         local want = ml.models.from_pretrained(fixture):generate(batch, { max_new_tokens = 8, attention_mask = mask })
         local model = ml.models.from_pretrained(fixture):to(DEV)
         assert.are.same(want, model:generate(batch, { max_new_tokens = 8, attention_mask = mask, kv_cache_device = "cpu" }))
      end)
   end

   it("plans with reserve_for's kv_cache_device and generates with the cache there", function()
      local plain = ml.models.from_pretrained(dir)
      local model = ml.models.from_pretrained(dir, { device_map = "auto", max_memory = { [0] = "200MB", cpu = "1GB" },
         reserve_for = { batch_size = 2, max_length = 16, kv_cache_device = "cpu" } })
      assert.are.same({ [""] = 0 }, model.hf_device_map)
      local devices = {}
      local new_cache = model.new_cache
      rawset(model, "new_cache", function(self, capacity, device)
         devices[#devices + 1] = device
         return new_cache(self, capacity, device)
      end)
      assert.are.same(plain:generate({ 5, 17, 42 }, { max_new_tokens = 5 }), model:generate({ 5, 17, 42 }, { max_new_tokens = 5 }))
      assert.are.same({ "cpu" }, devices)
   end)
end)

describe("generation and encoders on cuda #cuda", function()
   local prompt = { 5, 17, 42, 3 }
   local batch, mask = { { 0, 0, 5, 17 }, { 7, 8, 9, 10 } }, { { 0, 0, 1, 1 }, { 1, 1, 1, 1 } }

   for _, name in ipairs({ "gpt2_tiny", "llama_tiny_untied", "llama_tiny_tied", "mistral_tiny", "qwen2_tiny", "qwen3_tiny", "phi3_tiny_partial", "phi3_tiny_longrope",
                           "gemma2_tiny", "gemma3_tiny", "qwen3_moe_tiny",
                           "mixtral_tiny", "gpt_neox_tiny", "qwen2_moe_tiny", "starcoder2_tiny",
                           "olmo2_tiny", "phi_tiny", "opt_tiny", "opt_tiny_post_norm", "bloom_tiny", "falcon_tiny", "falcon_tiny_new_arch", "gptj_tiny",
                           "deepseek_v3_tiny", "deepseek_v2_lite_tiny", "glm4_moe_tiny", "deepseek_v32_tiny", "glm_moe_dsa_tiny", "glm4_moe_lite_tiny", "deepseek_v32_fp8_tiny", "mistral4_tiny", "mistral4_multimodal_tiny", "llama4_tiny", "llama4_multimodal_tiny", "ernie4_5_tiny", "ernie4_5_moe_tiny", "seed_oss_tiny", "exaone4_tiny", "smollm3_tiny", "hunyuan_v1_dense_tiny", "hunyuan_v1_moe_tiny", "cohere_tiny", "cohere2_tiny", "glm4_tiny", "granite_tiny", "granitemoe_tiny", "olmoe_tiny", "phimoe_tiny", "internlm3_tiny", "arcee_tiny", "apertus_tiny", "gemma_tiny", "ministral_tiny", "helium_tiny", "glm_tiny", "olmo_tiny", "nemotron_tiny", "stablelm_tiny", "stablelm_12b_tiny", "gpt_bigcode_tiny", "gpt_bigcode_mha_tiny", "exaone_tiny", "vaultgemma_tiny", "mpt_tiny", "solar_open_tiny", "dbrx_tiny", "gpt_neo_tiny", "codegen_tiny", "flex_olmo_tiny", "cohere2_moe_tiny", "cohere2_moe_sigmoid_tiny", "afmoe_tiny", "hy_v3_tiny", "mimo_v2_flash_tiny", "longcat_flash_tiny", "laguna_tiny", "laguna_per_element_tiny", "exaone_moe_tiny", "minicpm3_tiny", "zamba_tiny", "zamba2_tiny", "zamba2_untied_tiny", "recurrent_gemma_tiny", "youtu_tiny", "diffllama_tiny", "doge_tiny", "doge_moe_tiny", "gpt_neox_japanese_tiny", "lara_mini_tiny", "axk2_tiny", "dory_tiny", "zaya_tiny", "apertus1p5_text_tiny", "apertus1p5_multimodal_tiny", "cohere_compass_text_tiny", "cohere_compass_multimodal_tiny", "jetmoe_tiny", "sarvam_moe_tiny", "sarvam_mla_tiny", "kolibri1_tiny", "flint_tiny", "axk1_tiny", "mellum_tiny", "persimmon_tiny", "xglm_tiny", "biogpt_tiny", "openai_gpt_tiny", "ctrl_tiny", "gpt_sw3_tiny", "iquestcoder_tiny", "cwm_tiny", "jais2_tiny", "bitnet_tiny", "nanochat_tiny", "granitemoeshared_tiny", "granite_swa_tiny", "granitemoe_swa_tiny", "hyperclovax_tiny", "deepseek_v3_fp8_tiny", "gpt_oss_tiny", "gpt_oss_mxfp4_tiny", "qwen3_next_tiny", "olmo_hybrid_tiny", "minimax_tiny",
                           "qwen3_5_tiny", "qwen3_5_moe_multimodal_tiny",
                           "mistral3_multimodal_tiny", "ministral3_tiny", "ministral3_multimodal_tiny", "qwen3_vl_multimodal_tiny",
                           "qwen3_vl_moe_multimodal_tiny", "glm4v_multimodal_tiny", "glm4v_moe_multimodal_tiny", "dots1_tiny", "lfm2_tiny", "lfm2_moe_tiny", "lfm3_tiny", "lfm3_plain_tiny", "minimax_m2_tiny", "olmo3_tiny",
                           "bamba_tiny", "granitemoehybrid_tiny", "granitemoehybrid_dense_tiny", "nemotron_h_tiny",
                           "nemotron_h_latent_tiny", "mamba2_tiny", "mamba2_tiny_tied", "jamba_tiny", "mamba_tiny", "falcon_mamba_tiny", "falcon_h1_tiny",
                           "gemma4_tiny", "gemma4_moe_tiny", "gemma4_multimodal_tiny",
                           "llama_ct_int_tiny", "qwen3_ct_fp8_tiny", "deepseek_v3_ct_int4_tiny", "kimi_k25_ct_int4_tiny", "qwen2_awq_tiny",
                           "qwen2_awq_ct_tiny", "llama_gptq_int4_tiny", "qwen2_gptq_asym_tiny", "llama_gptq_int8_tiny",
                           "llama_gptq_act_order_tiny" }) do
      local dir = "tests/fixtures/models/" .. name
      it(name .. " generates the CPU's tokens with a KV cache, alone and as a padded batch", function()
         local cpu = ml.models.from_pretrained(dir)
         local gpu = ml.models.from_pretrained(dir):to(DEV)
         assert.are.same(cpu:generate(prompt, { max_new_tokens = 6 }), gpu:generate(prompt, { max_new_tokens = 6 }))
         assert.are.same(cpu:generate(batch, { max_new_tokens = 4, attention_mask = mask }),
            gpu:generate(batch, { max_new_tokens = 4, attention_mask = mask }))
      end)

      it(name .. " generates the CPU's tokens streamed to cuda:0 by cpu_offload", function()
         local want = ml.models.from_pretrained(dir):generate(prompt, { max_new_tokens = 5 })
         local model = ml.models.from_pretrained(dir)
         ml.cpu_offload(model, { execution_device = DEV })
         assert.are.same(want, model:generate(prompt, { max_new_tokens = 5 }))
      end)

      -- (pinning in place on a few kinds: tied heads, experts, mixers; the mapping is locked whole)
      local pins_in_place = ({ gpt2_tiny = true, llama_tiny_untied = true, qwen3_moe_tiny = true,
                               granitemoehybrid_tiny = true, mamba_tiny = true })[name]
      if pins_in_place then
         it(name .. " generates the CPU's tokens from weights pinned in place (cpu_offload with pin_memory \"in_place\")",
            function()
            local want = ml.models.from_pretrained(dir):generate(prompt, { max_new_tokens = 5 })
            local model = ml.models.from_pretrained(dir)
            local ptrs = {}
            for pname, p in model:named_parameters() do ptrs[pname] = p:data_ptr() end
            ml.cpu_offload(model, { execution_device = DEV, pin_memory = "in_place" })
            -- the hooks hold the weights where they were (no copy); the big ones page-locked
            for mname, m in model:named_modules() do
               local h = rawget(m, "_hf_hook")
               for _, slot in ipairs(h and h.slots or {}) do
                  local w = h.weights_map[slot.name]
                  local full = mname == "" and slot.name or mname .. "." .. slot.name
                  if ptrs[full] then assert.are.equal(ptrs[full], w:data_ptr(), full) end
                  if w:nbytes() >= 2 ^ 18 then assert.is_true(w:is_pinned(), full) end
               end
            end
            assert.are.same(want, model:generate(prompt, { max_new_tokens = 5 }))
         end)
      end

      it(name .. " generates the CPU's tokens from pinned weights (cpu_offload with pin_memory)", function()
         local want = ml.models.from_pretrained(dir):generate(prompt, { max_new_tokens = 5 })
         local model = ml.models.from_pretrained(dir)
         local before = {}                  -- every tensor by full name, tied ones under each name
         for tname, t in pairs(model:state_dict()) do before[tname] = t end
         for pname, p in model:named_parameters("", true, false) do before[pname] = p end
         local params = {}
         for _, p in model:named_parameters() do params[#params + 1] = p:data_ptr() end
         ml.cpu_offload(model, { execution_device = DEV, pin_memory = true })
         -- the hooks hold a pinned copy of every parameter (buffers may stay on cuda:0:
         -- offload_buffers is off), one copy for each tensor however many names tie to it (the
         -- state dict may give each name an object of its own: data pointers count)
         local seen, held = {}, {}
         for mname, m in model:named_modules() do
            local h = rawget(m, "_hf_hook")
            for _, s in ipairs(h and h.slots or {}) do
               local w = h.weights_map[s.name]
               assert.is_true(w:is_pinned(), s.name)
               seen[w:data_ptr()] = true
               held[assert(before[mname == "" and s.name or (mname .. "." .. s.name)], s.name):data_ptr()] = true
            end
         end
         local n_seen, n_held = 0, 0
         for _ in pairs(seen) do n_seen = n_seen + 1 end
         for _ in pairs(held) do n_held = n_held + 1 end
         assert.are.equal(n_held, n_seen)
         for _, ptr in ipairs(params) do assert.is_true(held[ptr] == true) end
         assert.are.same(want, model:generate(prompt, { max_new_tokens = 5 }))
      end)

      it(name .. " decodes on the CPU in place and streams the prompt, with set_compute_in_place", function()
         local want = ml.models.from_pretrained(dir):generate(prompt, { max_new_tokens = 5 })
         local model = ml.models.from_pretrained(dir)
         ml.cpu_offload(model, { execution_device = DEV })
         local prev = hooks.set_compute_in_place(2)       -- the 4-token prompt streams, 1-token steps do not
         local ok, err = pcall(function()
            local s0 = hooks.runtime_stats()
            local got = model:generate(prompt, { max_new_tokens = 5 })
            local s1 = hooks.runtime_stats()
            assert.are.same(want, got)
            assert.is_true(s1.in_place_forwards > s0.in_place_forwards)
            assert.is_true(s1.bytes_copied > s0.bytes_copied)       -- the prompt went to the GPU
            -- one token: every hooked module runs on the CPU, no weight goes to the GPU (the
            -- threshold counts rows: Qwen3's per-head q_norm sees one per head)
            hooks.set_compute_in_place(8)
            local s2 = hooks.runtime_stats()
            local logits = model(ml.tensor({ { 7 } }, { dtype = "int64" }))
            local s3 = hooks.runtime_stats()
            assert.are.equal(s2.bytes_streamed, s3.bytes_streamed)
            assert.are.equal(s2.bytes_copied, s3.bytes_copied)
            assert.is_true(s3.in_place_forwards > s2.in_place_forwards)
            assert_close(logits, ml.models.from_pretrained(dir)(ml.tensor({ { 7 } }, { dtype = "int64" })), 1e-4, name)
         end)
         hooks.set_compute_in_place(prev)
         assert(ok, err)
      end)
   end

   it("samples the CPU's tokens for a seed with top_p, top_k and a repetition penalty (on the device)", function()
      local dir = "tests/fixtures/models/gpt2_tiny"
      local cpu = ml.models.from_pretrained(dir)
      local gpu = ml.models.from_pretrained(dir):to(DEV)
      for _, o in ipairs({ { temperature = 0.8, top_p = 0.7, seed = 3, repetition_penalty = 1.3 }, { temperature = 40, top_p = 0.9, seed = 4 },
                           { temperature = 1.2, top_k = 20, top_p = 0.8, seed = 5 } }) do
         o.max_new_tokens = 6
         assert.are.same(cpu:generate(prompt, o), gpu:generate(prompt, o))
      end
   end)

   it("a module run in place on the CPU hands its output to the execution device", function()
      ml.manual_seed(17)
      local lin = ml.nn.Linear(8, 5)
      local w, b = lin.weight:clone(), lin.bias:clone()
      hooks.add_hook_to_module(lin, hooks.AlignDevicesHook({ execution_device = DEV, offload = true,
         weights_map = { weight = w, bias = b } }))
      local prev = hooks.set_compute_in_place(3)
      local ok, err = pcall(function()
         ml.manual_seed(18)
         local small, big = ml.randn(2, 8), ml.randn(3, 8)
         local before = hooks.runtime_stats()
         local y = lin(small:to(DEV))                        -- 2 rows < 3: on the CPU
         local mid = hooks.runtime_stats()
         local z = lin(big:to(DEV))                          -- 3 rows: streamed to cuda:0
         local after = hooks.runtime_stats()
         assert.are.equal(DEV, y.device)
         assert.are.equal(DEV, z.device)
         assert_close(y, small:matmul(w:t()) + b, 1e-5, "in place")
         assert_close(z, big:matmul(w:t()) + b, 1e-5, "streamed")
         assert.are.equal(before.in_place_forwards + 1, mid.in_place_forwards)
         assert.are.equal(before.bytes_copied, mid.bytes_copied)
         assert.are.equal(mid.in_place_forwards, after.in_place_forwards)
         assert.is_true(after.bytes_copied > mid.bytes_copied)
      end)
      hooks.set_compute_in_place(prev)
      hooks.remove_hook_from_module(lin)
      assert(ok, err)
   end)

   it("looks an offloaded embedding up on the CPU and sends only its rows to the device (set_lookup_in_place)", function()
      ml.manual_seed(19)
      local emb = ml.nn.Embedding(100, 16)
      local w = emb.weight:clone()
      hooks.add_hook_to_module(emb, hooks.AlignDevicesHook({ execution_device = DEV, offload = true,
         weights_map = { weight = w } }))
      local ids = ml.tensor({ { 3, 99, 0, 42, 3, 7 } }, { dtype = "int64" })
      local prev = hooks.set_lookup_in_place(true)
      local ok, err = pcall(function()
         local before = hooks.runtime_stats()
         local y = emb(ids:to(DEV))                      -- 6 rows gathered on the CPU
         local mid = hooks.runtime_stats()
         hooks.set_lookup_in_place(false)
         local z = emb(ids:to(DEV))                      -- the whole table streamed, as Accelerate does
         local after = hooks.runtime_stats()
         assert.are.equal(DEV, y.device)
         assert.are.equal(DEV, z.device)
         local want = w:index_select(1, ids:view(-1)):view(1, 6, 16)
         assert_close(y, want, 0, "looked up in place")
         assert_close(z, want, 0, "streamed")
         assert.are.equal(before.in_place_forwards + 1, mid.in_place_forwards)
         assert.are.equal(before.bytes_copied, mid.bytes_copied)
         assert.are.equal(mid.in_place_forwards, after.in_place_forwards)
         assert.are.equal(100 * 16 * 4, after.bytes_copied - mid.bytes_copied)
      end)
      hooks.set_lookup_in_place(prev)
      hooks.remove_hook_from_module(emb)
      assert(ok, err)
      assert.has_error(function() hooks.set_lookup_in_place(1) end, "set_lookup_in_place: expected true or false, got 1")
   end)

   it("a cpu_offload Llama streams every weight but its embedding, each ahead of its module across forwards", function()
      local dir = "tests/fixtures/models/llama_tiny_untied"
      local ids = ml.tensor({ { 5, 17, 42, 3, 8, 1 } }, { dtype = "int64" })
      local want = ml.models.from_pretrained(dir)(ids)
      local model = ml.models.from_pretrained(dir)
      local total, table_bytes = 0, model.model.embed_tokens.weight:nbytes()
      for _, p in model:named_parameters() do total = total + p:nbytes() end
      ml.cpu_offload(model, { execution_device = DEV })
      model(ids)
      model(ids)                      -- the order is learned
      local before = hooks.runtime_stats()
      local got = model(ids)
      local after = hooks.runtime_stats()
      assert_close(got, want, 1e-4, dir)
      assert.are.equal(total - table_bytes, after.bytes_copied - before.bytes_copied)
      -- all of it streamed ahead: the first layer's during the last forward's head, past the
      -- embedding looked up on the CPU in between
      assert.are.equal(after.bytes_copied - before.bytes_copied, after.bytes_streamed - before.bytes_streamed)
      assert.are.equal(before.in_place_forwards + 1, after.in_place_forwards)
   end)

   it("the tiny BERT gives the CPU's hidden states with a padding mask and token types", function()
      local dir = "tests/fixtures/models/bert_tiny"
      local ids = ml.tensor({ { 2, 7, 9, 4, 0 }, { 3, 3, 8, 1, 6 } }, { dtype = "int64" })
      local am = ml.tensor({ { 1, 1, 1, 1, 0 }, { 1, 1, 1, 1, 1 } }, { dtype = "int64" })
      local types = { { 0, 0, 1, 1, 1 }, { 0, 0, 0, 1, 1 } }
      local want = ml.models.from_pretrained(dir)(ids, { attention_mask = am, token_type_ids = types })
      local got = ml.models.from_pretrained(dir):to(DEV)(ids, { attention_mask = am, token_type_ids = types })
      assert_close(got.last_hidden_state, want.last_hidden_state, 1e-4, "last_hidden_state")
      assert_close(got.pooler_output, want.pooler_output, 1e-4, "pooler_output")
   end)
end)

describe("device memory on cuda #cuda", function()
   -- Largest weights of one hooked module, and the activations of a forward (the whole model on
   -- the device: peak minus the weights).
   local dir = "tests/fixtures/models/llama_tiny_untied"
   local ids = ml.tensor({ { 5, 17, 42, 3, 8, 1 } }, { dtype = "int64" })
   local function settle() collectgarbage(); collectgarbage() end

   local function forward_peak(model, input)
      model(input)
      settle()
      ml.reset_peak_memory(DEV)
      local before = ml.memory_allocated(DEV)
      model(input)
      local _, peak = ml.memory_allocated(DEV)
      return peak, before
   end

   it("streams CPU weights with the activations, the running module and the window on the device", function()
      local full = ml.models.from_pretrained(dir):to(DEV)
      local weights, biggest = 0, 0
      for _, m in full:named_modules() do
         local b = 0
         for _, p in m:named_parameters({ recurse = false }) do b = b + p:nbytes() end
         biggest = math.max(biggest, b)
      end
      for _, p in full:named_parameters() do weights = weights + p:nbytes() end
      local peak_full, resident = forward_peak(full, ids:to(DEV))
      local activations = peak_full - resident
      full = nil
      settle()
      -- in flight: the next module, then more while they fit the window (so at most
      -- max(window, biggest)); none without prefetch
      local window = math.floor(weights / 4)
      local modes = { { "window of a quarter of the weights", true, window, biggest + math.max(window, biggest) },
                      { "one module ahead", true, 0, 2 * biggest }, { "no prefetch", false, 0, biggest } }
      local peaks = {}
      for _, mode in ipairs(modes) do
         hooks.set_prefetch(mode[2])
         hooks.set_stream_window(mode[3])
         local model = ml.models.from_pretrained(dir)
         ml.cpu_offload(model, { execution_device = DEV })
         settle()
         local base = ml.memory_allocated(DEV)
         local peak = forward_peak(model, ids)
         peaks[#peaks + 1] = peak - base
         -- 1 KiB: the input ids the hook moves to the device count as activations here
         assert.is_true(peak - base <= activations + mode[4] + 1024,
            string.format("%s: peak %d over %d + %d activations + %d", mode[1], peak, base, activations, mode[4]))
         assert.is_true(peak - base < activations + weights / 2)
         model = nil
         settle()
      end
      hooks.set_prefetch(true)
      hooks.set_stream_window(64 * 2 ^ 20)
      assert.is_true(peaks[1] > peaks[2] and peaks[2] > peaks[3], table.concat(peaks, " "))   -- the window is used
   end)

   -- Fills cuda:0 until `left` bytes stay free, to 512 bytes: whole 2 MiB granules, then blocks
   -- under 1 MiB, which the allocator rounds to 512 bytes.
   local function fill_device(left)
      ml.cuda.empty_cache(0)
      local want = ml.cuda.mem_get_info(0) - left
      local blocks = {}
      while want >= 2 ^ 20 do
         local n = want >= 2 ^ 21 and math.floor(want / 2 ^ 21) * 2 ^ 21 or 2 ^ 19
         blocks[#blocks + 1] = ml.empty({ n }, { dtype = "uint8", device = DEV })
         want = want - n
      end
      want = math.floor(want / 512) * 512
      if want > 0 then blocks[#blocks + 1] = ml.empty({ want }, { dtype = "uint8", device = DEV }) end
      return blocks
   end

   it("never runs out of memory for uploads streamed ahead: they are given back, the window narrows, then widens", function()
      -- Eight layers four times the size of their activations: what streaming ahead takes is far
      -- above the noise of the allocator's rounding and of garbage waiting for the collector. The
      -- emulator counts device memory to the byte: 64 KiB layers. A real driver counts it in
      -- 2 MiB pages: 16 MiB layers, of which the 64 MiB window holds four.
      local emulated = ml.cuda.get_device_name(0):find("^cudasim") ~= nil
      local width, rows = emulated and 128 or 2048, emulated and 32 or 512
      ml.manual_seed(21)
      local layers = {}
      for i = 1, 8 do layers[i] = ml.nn.Linear(width, width) end
      local model = ml.nn.Sequential(layers)
      local x = ml.randn(rows, width)
      local want = model(x)
      ml.cpu_offload(model, { execution_device = DEV })
      -- Starting from nothing streamed ahead (a forward without prefetch drops it) and no
      -- garbage, two forwards; returns whether they ran, and what they added to the driver's
      -- used memory (the allocator keeps every block it used).
      local function run(prefetch, left)
         hooks.set_prefetch(false)
         model(x)
         settle()
         local blocks = left and fill_device(left)
         ml.cuda.empty_cache(0)
         local free0 = ml.cuda.mem_get_info(0)
         hooks.set_prefetch(prefetch)
         hooks.set_stream_window(64 * 2 ^ 20)
         local ok, got = pcall(model, x)
         local ok2, again = pcall(model, x)
         local used = free0 - ml.cuda.mem_get_info(0)
         blocks = nil
         settle()
         if ok and ok2 then
            assert_close(got, want, 1e-5, "forward")
            assert_close(again, want, 1e-5, "second forward")
         end
         return ok and ok2, used, not ok2 and again or not ok and got or nil
      end
      local _, plain = run(false)
      local _, streamed = run(true)                 -- the window holds all eight layers
      assert.is_true(streamed > plain + 4 * width * width, string.format("window %d, none %d", streamed, plain))
      -- From half what the forward without streaming took to all the window: wherever it runs
      -- without streaming (garbage waiting for the collector makes that vary), it must run with it.
      local failures, fitted, reclaimed, narrowed = {}, 0, 0, true
      local tightest, tightest_window = nil, math.huge   -- the level that narrowed the window most
      local steps = 12
      local ballast = fill_device(streamed + 2 ^ 22)   -- once: each level then adds a few MiB
      for i = 0, steps do
         local left = math.floor(plain / 2 + (streamed - plain / 2) * i / steps)
         if run(false, left) then
            fitted = fitted + 1
            local before = hooks.runtime_stats()
            local ok, _, err = run(true, left)
            local after = hooks.runtime_stats()
            if not ok then failures[#failures + 1] = left .. " bytes free: " .. tostring(err) end
            if after.streams_reclaimed > before.streams_reclaimed then
               reclaimed = reclaimed + 1
               narrowed = narrowed and after.stream_window < 64 * 2 ^ 20
               if after.stream_window < tightest_window then tightest, tightest_window = left, after.stream_window end
            end
         end
      end
      -- Once memory is back, forwards that give nothing back widen the window again (from
      -- stopped: one module ahead after a forward, then 1 MiB, doubling up to the 64 MiB set).
      local recovered
      if tightest then
         hooks.set_prefetch(false)
         model(x)
         settle()
         local blocks = fill_device(tightest)
         hooks.set_prefetch(true)
         hooks.set_stream_window(64 * 2 ^ 20)
         model(x)
         model(x)
         blocks = nil
         ballast = nil
         settle()
         local windows = { hooks.runtime_stats().stream_window }
         for _ = 1, 12 do
            model(x)
            windows[#windows + 1] = hooks.runtime_stats().stream_window
         end
         recovered = table.concat(windows, " ")
         assert.are.equal(64 * 2 ^ 20, windows[#windows], recovered)
         assert.is_true(windows[1] < 64 * 2 ^ 20, recovered)
      end
      ballast = nil
      hooks.set_prefetch(true)
      hooks.set_stream_window(64 * 2 ^ 20)
      assert.are.same({}, failures)
      assert.is_true(fitted >= steps / 2, fitted .. " levels fit")
      assert.is_true(reclaimed > 0, "no forward ran out of memory: the test does not reach the case")
      assert.is_true(narrowed)
   end)

   it("collects dead tensors and tries again when the device runs out of memory", function()
      settle()
      local x = ml.ones({ 2 ^ 18 }, { device = DEV })                -- 1 MiB
      local blocks = fill_device(8 * 2 ^ 20)
      -- The collector is stopped and 32 MiB stays under the pressure threshold (64 MiB), so only
      -- running out of memory can collect the results that died
      collectgarbage("stop")
      local ok, err = pcall(function()
         for _ = 1, 32 do
            local y = x * 2
            y = nil
         end
         return (x + 1):sum():item()
      end)
      collectgarbage("restart")
      blocks = nil
      settle()
      assert(ok, err)
      assert.are.equal(2 * 2 ^ 18, err)
   end)

   it("gives back the uploads streamed ahead when the model is dropped without removing its hooks", function()
      settle()
      local base = ml.memory_allocated(DEV)
      local model = ml.models.from_pretrained(dir)
      ml.cpu_offload(model, { execution_device = DEV })
      model(ids)
      model(ids)                 -- the last module streams the first ones of the next forward ahead
      assert.is_true(hooks.runtime_stats().streams_pending > 0)
      model = nil
      settle()
      assert.are.equal(0, hooks.runtime_stats().streams_pending)
      assert.are.equal(base, (ml.memory_allocated(DEV)))
   end)

   it("collects dead device tensors once 64 MiB or a quarter of the free memory was allocated", function()
      settle()
      require("moonload.C").lib.ml_gc_done()                  -- the threshold from the free memory now
      local free = ml.utils.get_max_memory()[0]
      local limit = math.max(64 * 2 ^ 20, free / 4)
      ml.reset_peak_memory(DEV)
      local before = ml.memory_allocated(DEV)
      local n = math.ceil(limit / 2 ^ 20) * 2 + 8
      -- (on a GPU with 140 GB the limit is 35 GB, and the wrappers' garbage alone could trigger
      -- a cycle of LuaJIT's own collector first)
      allocate_dead_mib(n)
      local _, peak = ml.memory_allocated(DEV)
      assert.is_true(peak - before <= limit + 2 ^ 21, string.format("peak %d over %d, limit %d", peak, before, limit))
      assert.is_true(peak - before >= limit - 2 ^ 21)          -- nothing was collected long before that
   end)
end)

describe("memory planned with reserve_for on cuda #cuda", function()
   local log = require("moonload.utils.log")
   local prev
   before_each(function() prev = log.set_warning_handler(function() end) end)
   after_each(function()
      log.set_warning_handler(prev)
      ml.set_gc_cap(DEV, 0)
   end)

   it("a gc cap collects dead device tensors once that much was allocated", function()
      collectgarbage()
      local cap = 8 * 2 ^ 20
      ml.set_gc_cap(DEV, cap)
      ml.reset_peak_memory(DEV)
      local before = ml.memory_allocated(DEV)
      allocate_dead_mib(40)
      local _, peak = ml.memory_allocated(DEV)
      assert.is_true(peak - before <= cap + 2 ^ 21, string.format("peak %d over %d", peak, before))
   end)

   it("the tiny Llama over cuda:0 + cpu with its cache budgeted: the CPU's tokens, inside the GPU budget", function()
      local dir = "tests/fixtures/models/llama_tiny_untied"
      local reserve = { batch_size = 2, max_length = 48, prompt_length = 16 }
      local skeleton = ml.init_empty_weights(function() return ml.models.from_config(dir .. "/config.json") end)
      local runtime, workspace = ml.utils.runtime_memory_sizes(skeleton, reserve)
      local weights = ml.utils.compute_module_sizes(skeleton)[""]
      -- the workspace, half the weights and every cache: some layers must run from the CPU
      local budget = workspace.gpu + math.floor(weights / 2)
      for _, b in pairs(runtime) do budget = budget + b end
      collectgarbage()
      local base = ml.memory_allocated(DEV)
      ml.reset_peak_memory(DEV)
      local model = ml.models.from_pretrained(dir, { device_map = "auto", reserve_for = reserve,
         max_memory = { [0] = budget, cpu = "1GB" } })
      local places = {}
      for _, d in pairs(model.hf_device_map) do places[tostring(d)] = true end
      assert.is_true(places["0"] and places.cpu, "expected a cuda:0 + cpu split")
      local ids = { { 5, 17, 42, 3, 8, 1, 9, 12, 4, 7, 30, 2, 6, 11, 13, 14 }, { 3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3 } }
      local got = model:generate(ids, { max_new_tokens = 32 })
      local _, peak = ml.memory_allocated(DEV)
      assert.is_true(peak - base <= budget, string.format("cuda:0 held %d of a %d budget", peak - base, budget))
      assert.are.same(ml.models.from_pretrained(dir):generate(ids, { max_new_tokens = 32 }), got)
   end)
end)

describe("rotary embedding on cuda #cuda", function()
   it("matches the CPU kernel for float32 and bfloat16, strided x and broadcast cos/sin", function()
      ml.manual_seed(12)
      local F = ml.nn.functional
      for _, dt in ipairs({ "float32", "bfloat16" }) do
         local x = ml.randn(2, 5, 4, 16):to(dt):transpose(2, 3)
         local ang = ml.randn(1, 1, 5, 16) * 3
         local cos, sin = ang:cos():to(dt), ang:sin():to(dt)
         local got = F.rotary_embedding(x:to(DEV), cos:to(DEV), sin:to(DEV))
         assert.are.equal(DEV, got.device)
         assert_close(got, F.rotary_embedding(x, cos, sin), dt == "float32" and 1e-6 or 1e-2, "rotary " .. dt)
      end
   end)
end)

describe("two GPUs #cuda", function()
   it("copies results of queued kernels across devices, and runs a model split over cuda:0, cuda:1, cpu and disk", function()
      if ml.cuda_device_count() < 2 then pending("needs two CUDA devices (make test-cuda-sim emulates two)") return end
      ml.manual_seed(13)
      local x = ml.randn(64, 64)
      local a = x:to("cuda:0")
      for _ = 1, 5 do a = (a * 1.5):tanh() end            -- kernels still queued on cuda:0 ...
      local b = a:to("cuda:1")                              -- ... when the copy is issued
      local want = x
      for _ = 1, 5 do want = (want * 1.5):tanh() end
      assert.are.equal("cuda:1", b.device)
      assert_close(b, want, 1e-5, "cross-device copy")

      local dir = "tests/fixtures/models/llama_tiny_untied"
      local prompt = { 5, 17, 42, 3 }
      local expected = ml.models.from_pretrained(dir):generate(prompt, { max_new_tokens = 6 })
      local folder = os.tmpname()
      os.remove(folder)
      local model = ml.models.from_pretrained(dir, { offload_folder = folder, device_map = {
         ["model.embed_tokens"] = 0, ["model.rotary_emb"] = 0, ["model.layers.0"] = "disk", ["model.layers.1"] = 1,
         ["model.norm"] = 1, lm_head = "cpu" } })
      assert.are.equal("cuda:1", model.model.layers[2].self_attn.q_proj.weight.device)
      assert.are.same(expected, model:generate(prompt, { max_new_tokens = 6 }))
      os.execute("rm -rf '" .. folder .. "'")
   end)
end)

describe("weight uploads to cuda #cuda", function()
   local C = require("moonload.C")
   local ffi, lib = C.ffi, C.lib

   it("streams pageable sources through staging and pinned ones directly, both complete at wait", function()
      local out = ffi.new("ml_uploader*[1]")
      C.check(lib.ml_uploader_new(out))
      local u = ffi.gc(out[0], lib.ml_uploader_release)
      ml.manual_seed(15)
      local want, dsts, tickets = {}, {}, {}
      -- odd sizes: the third spans 3 staging chunks of 16 MiB; the last three are pageable, one
      -- after another
      local sizes = { 5003, 10003, 10 * 2 ^ 20 + 7, 15003, 2 ^ 18 + 5, 3 * 2 ^ 20 + 1, 777 }
      for i = 1, #sizes do
         local src = ml.randn(sizes[i])
         want[i] = src
         if i == 2 or i == 4 then src = src:pin_memory() end
         dsts[i] = ml.empty(src.shape, { device = DEV })
         local ticket = ffi.new("int[1]")
         C.check(lib.ml_uploader_submit(u, dsts[i]._c, src._c, ticket))
         tickets[i] = ticket[0]
         src = nil                                              -- the uploader holds what it needs
         collectgarbage()
      end
      for i = #sizes, 1, -1 do
         C.check(lib.ml_uploader_wait(u, tickets[i]))
         assert.is_true(dsts[i]:cpu():equal(want[i]), "upload " .. i)
      end
   end)

   it("keeps a pinned source the caller dropped until its DMA is done, then lets it go, idle or not", function()
      local out = ffi.new("ml_uploader*[1]")
      C.check(lib.ml_uploader_new(out))
      local u = out[0]
      collectgarbage(); collectgarbage()
      local base = ml.memory_allocated("cpu")
      local want = ml.randn(3 * 2 ^ 20)                              -- 12 MiB
      local dsts, tickets = {}, {}
      for i = 1, 3 do
         local src = want:pin_memory()
         dsts[i] = ml.empty(src.shape, { device = DEV })
         local ticket = ffi.new("int[1]")
         C.check(lib.ml_uploader_submit(u, dsts[i]._c, src._c, ticket))
         tickets[i] = ticket[0]
         src = nil
         collectgarbage()
      end
      for i = 1, 3 do C.check(lib.ml_uploader_wait(u, tickets[i])) end
      for i = 1, 3 do assert.is_true(dsts[i]:cpu():equal(want), "upload " .. i) end
      -- the idle worker lets them go once their DMA is done, with no upload after them
      ml.cuda.synchronize(0)
      local t0 = os.time()
      while ml.memory_allocated("cpu") > base + want:nbytes() and os.time() - t0 < 5 do collectgarbage() end
      assert.are.equal(base + want:nbytes(), ml.memory_allocated("cpu"))
      lib.ml_uploader_release(u)
      collectgarbage(); collectgarbage()
      assert.are.equal(base + want:nbytes(), ml.memory_allocated("cpu"))
   end)

   it("a model whose CPU weights are pinned streams them to cuda:0 and gives the CPU's logits", function()
      local dir = "tests/fixtures/models/llama_tiny_untied"
      local ids = ml.tensor({ { 5, 17, 42, 3, 8, 1 } }, { dtype = "int64" })
      local want = ml.models.from_pretrained(dir)(ids)
      local model = ml.models.from_pretrained(dir)
      for name, p in model:named_parameters() do
         ml.utils.set_module_tensor_to_device(model, name, "cpu", { value = p:pin_memory() })
      end
      assert.is_true(model.model.layers[1].mlp.up_proj.weight:is_pinned())
      ml.cpu_offload(model, { execution_device = DEV })
      local before = hooks.runtime_stats().bytes_streamed
      model(ids)
      local got = model(ids)
      assert_close(got, want, 1e-4, "pinned weights")
      assert.is_true(hooks.runtime_stats().bytes_streamed > before)
   end)
end)

describe("float8 weights on cuda #cuda", function()
   it("converts float8 to and from float as the CPU does, all 256 bytes and rounding edges", function()
      for _, name in ipairs({ "float8_e4m3fn", "float8_e5m2" }) do
         local bytes = {}
         for b = 0, 255 do bytes[b + 1] = b end
         local t = ml.tensor(bytes, { dtype = "uint8" }):view_dtype(name)
         local cpu, gpu = t:to("float32"):tolist(), t:to(DEV):to("float32"):cpu():tolist()
         for i = 1, 256 do
            assert.is_true(cpu[i] == gpu[i] or (cpu[i] ~= cpu[i] and gpu[i] ~= gpu[i]), name .. " byte " .. (i - 1))
         end
         ml.manual_seed(11)
         local x = ml.cat({ ml.randn({ 512 }) * 300, ml.randn({ 256 }) * 1e-3, ml.tensor({ 1e30, -1e30, 464, 61440, 0 }) })
         assert.are.same(x:to(name):view_dtype("uint8"):tolist(), x:to(DEV):to(name):cpu():view_dtype("uint8"):tolist())
      end
   end)

   it("dequantizes block-scaled float8 weights and multiplies by them as the CPU does", function()
      ml.manual_seed(12)
      local w = (ml.randn({ 40, 72 }) * 100):to("float8_e4m3fn")
      local s = ml.rand({ 3, 5 }) + 0.01
      local F = ml.nn.functional
      for _, dtype in ipairs({ "float32", "bfloat16" }) do
         local want = F.dequantize_fp8_blocks(w, s, { 16, 16 }, dtype)
         local got = F.dequantize_fp8_blocks(w:to(DEV), s:to(DEV), { 16, 16 }, dtype)
         assert.are.equal(DEV, got.device)
         assert_close(got, want, 0, "dequantize_fp8_blocks " .. dtype)
      end
      -- fp8_linear: the CPU reads the bytes for 3 rows, the GPU expands and multiplies
      local x, b = ml.randn({ 3, 72 }), ml.randn({ 40 })
      local want = F.fp8_linear(x, w, s, { 16, 16 }, b)
      local got = F.fp8_linear(x:to(DEV), w:to(DEV), s:to(DEV), { 16, 16 }, b:to(DEV))
      assert.are.equal(DEV, got.device)
      assert_close(got, want, 1e-4, "fp8_linear")
   end)

   it("runs DeepSeek-V3's FP8 checkpoint on cuda:0, placed whole and streamed, with the CPU's tokens", function()
      local dir = "tests/fixtures/models/deepseek_v3_fp8_tiny"
      local prompt = { 5, 17, 42, 3 }
      local want = ml.models.from_pretrained(dir):generate(prompt, { max_new_tokens = 6 })
      local gpu = ml.models.from_pretrained(dir):to(DEV)
      assert.are.equal("float8_e4m3fn", gpu.model.layers[2].self_attn.kv_b_proj.weight.dtype)
      assert.are.same(want, gpu:generate(prompt, { max_new_tokens = 6 }))
      local folder = os.tmpname()
      os.remove(folder)
      -- float8 layers in RAM and on disk streamed to cuda:0 as they are stored (one byte a value)
      local split = ml.models.from_pretrained(dir, { offload_folder = folder, device_map = {
         ["model.embed_tokens"] = 0, ["model.rotary_emb"] = 0, ["model.layers.0"] = "cpu", ["model.layers.1"] = "disk",
         ["model.layers.2"] = 0, ["model.norm"] = 0, lm_head = "cpu" } })
      local before = hooks.runtime_stats()
      assert.are.same(want, split:generate(prompt, { max_new_tokens = 6 }))
      assert.is_true(hooks.runtime_stats().bytes_streamed > before.bytes_streamed)
      os.execute("rm -rf '" .. folder .. "'")
   end)
end)
