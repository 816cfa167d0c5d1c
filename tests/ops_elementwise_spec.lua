--- Elementwise CPU kernels (core/src/cpu/elementwise.c) through the Lua API: values against PyTorch
-- fixtures (tests/fixtures/gen_ops_elementwise.py -> ops_elementwise.json), error messages, meta
-- inputs, and results that do not depend on the thread count.
local ml = require("moonload")
local H = require("ops_helpers")

describe("elementwise ops", function()
   H.define("ops_elementwise.json", describe, it)

   describe("errors", function()
      local a, b = ml.tensor({ { 1, 2, 3 }, { 4, 5, 6 } }), ml.tensor({ 1, 2, 3, 4 })

      it("names the op and both shapes when broadcasting fails", function()
         assert.are.equal("add: shapes [2, 3] and [4] cannot be broadcast (dimension 1: 3 vs 4)",
            H.errmsg(function() return a + b end))
         assert.are.equal("maximum: shapes [2, 3] and [4] cannot be broadcast (dimension 1: 3 vs 4)",
            H.errmsg(function() return a:maximum(b) end))
         -- nothing was written into the inputs
         assert.are.same({ { 1, 2, 3 }, { 4, 5, 6 } }, a:tolist())
      end)

      it("rejects bool subtraction and negation like PyTorch", function()
         local m = ml.tensor({ true, false })
         assert.are.equal("sub: subtraction of two bool tensors is not supported (use logical_xor or ne)",
            H.errmsg(function() return m - m end))
         assert.are.equal("neg: negation of a bool tensor is not supported (use logical_not)",
            H.errmsg(function() return -m end))
      end)

      it("rejects integer tensors to negative integer powers", function()
         local x = ml.tensor({ 1, 2 }, { dtype = "int64" })
         assert.are.equal("pow: integers to negative integer powers are not allowed (int64 tensor to the power -1)",
            H.errmsg(function() return x ^ -1 end))
         assert.are.same({ 1, 0.25 }, (x:float() ^ -2):tolist())
      end)

      it("wants a bool condition in where and a bool mask in masked_fill", function()
         assert.are.equal("where: condition must be a bool tensor, got float32",
            H.errmsg(function() return ml.where(a, a, a) end))
         assert.are.equal("masked_fill: mask must be a bool tensor, got int64",
            H.errmsg(function() return a:masked_fill(ml.tensor({ 1, 0, 1 }, { dtype = "int64" }), 0) end))
         assert.are.equal("where: shapes [2] and [2, 3] cannot be broadcast (dimension 1: 2 vs 3)",
            H.errmsg(function() return ml.where(ml.tensor({ true, false }), a, a) end))
      end)

      it("needs 2 dimensions for tril and triu", function()
         assert.are.equal("tril: input must have at least 2 dimensions, got a 1-d tensor",
            H.errmsg(function() return b:tril() end))
         assert.are.equal("triu: input must have at least 2 dimensions, got a 0-d tensor",
            H.errmsg(function() return ml.tensor(1):triu() end))
      end)

      it("refuses meta tensors (no data) and mixed devices", function()
         local m = ml.zeros({ 2, 3 }, { device = "meta" })
         assert.are.equal("exp: tensor is on the meta device and has no data", H.errmsg(function() return m:exp() end))
         assert.are.equal("gelu: tensor is on the meta device and has no data", H.errmsg(function() return m:gelu() end))
         assert.are.equal("add: expected tensors on the same device, got cpu and meta",
            H.errmsg(function() return a + m end))
         assert.are.equal("mul: tensor is on the meta device and has no data", H.errmsg(function() return m * 2 end))
         assert.are.equal("where: expected tensors on the same device, got meta and cpu",
            H.errmsg(function() return ml.where(ml.zeros({ 2, 3 }, { dtype = "bool", device = "meta" }), a, a) end))
      end)
   end)

   describe("float16 blocks", function()
      it("load every float16 bit pattern exactly (NaNs stay NaN)", function()
         local bits = ml.arange(0, 65536):to("int32"):to("int16")   -- wraps through all 16-bit patterns
         local h = bits:view_dtype("float16")
         local same = (h * 1):view_dtype("int16"):eq(bits)
         local nan = h:ne(h)
         assert.are.equal(65536 - 2046, same:logical_and(nan:logical_not()):sum():item())
         assert.are.equal(2046, (h * 1):ne(h * 1):sum():item())
      end)

      it("round results to nearest even like the scalar converter", function()
         local a = ml.arange(0, 200000):float() * 1.2345e-4 - 12
         local b = ml.arange(0, 200000):float() * -3.3e-5 + 2
         local direct = a:half() + b:half()                                  -- computed in float32, stored as float16
         local via = (a:half():float() + b:half():float()):half()            -- copy_'s scalar rounding
         assert.is_true(direct:equal(via))
      end)
   end)

   describe("large tensors (threads and blocks)", function()
      after_each(function() ml.set_num_threads(0) end)

      -- 600 x 500 values in [-15, 15), exactly representable
      local function big()
         return (ml.arange(0, 300000):float() * 1e-4 - 15):reshape(600, 500)
      end

      it("gives bitwise the same results with 1 and 2 threads", function()
         local x, y = big(), big():t():contiguous():t()      -- y: same values, transposed storage
         local row = ml.arange(0, 500):float() * 0.01
         ml.set_num_threads(1)
         local g1, s1, m1, h1 = x:gelu(), x:sigmoid(), y * row, x:half():silu()
         ml.set_num_threads(2)
         local g2, s2, m2, h2 = x:gelu(), x:sigmoid(), y * row, x:half():silu()
         assert.is_true(g1:equal(g2))
         assert.is_true(s1:equal(s2))
         assert.is_true(m1:equal(m2))
         assert.is_true(h1:equal(h2))
      end)

      it("gives the same values over transposed inputs (tiled walk) as over contiguous ones", function()
         for _, shape in ipairs({ { 600, 500 }, { 3, 70, 50 }, { 130, 33 }, { 5, 7, 97, 41 } }) do
            local n = 1
            for _, d in ipairs(shape) do n = n * d end
            local base = (ml.arange(0, n):float() * 1e-3 - 7):reshape(shape)
            local tv = base:transpose(-1, -2)                       -- strided view
            local tc = tv:contiguous()
            local other = ml.arange(0, tc:size(-1)):float() * 0.5    -- broadcast along rows
            assert.is_true((tv * other):equal(tc * other))
            assert.is_true((tv + tc):equal(tc + tc))
            assert.is_true(tv:gelu():equal(tc:gelu()))
            assert.is_true(ml.where(tv:gt(0), tv, other):equal(ml.where(tc:gt(0), tc, other)))
         end
      end)

      it("gives the same values for random shapes, permutations and narrowings", function()
         -- a small deterministic generator, so failures reproduce
         local state = 12345
         local function rnd(n)
            state = (state * 1103515245 + 12345) % 2147483648
            return state % n + 1
         end
         for case = 1, 60 do
            local nd, shape, n = rnd(4), {}, 1
            for d = 1, nd do
               shape[d] = rnd(d == 1 and 90 or 40)
               n = n * shape[d]
            end
            local dt = ({ "float32", "float16", "int32", "float64" })[rnd(4)]
            local base = ((ml.arange(0, n):float() * 0.37):sin() * 50):to(dt):reshape(shape)
            local perm = {}
            for d = 1, nd do perm[d] = d end
            for d = nd, 2, -1 do local k = rnd(d); perm[d], perm[k] = perm[k], perm[d] end
            local v = base:permute(perm)
            local d = rnd(nd)
            if v:size(d) > 2 then v = v:narrow(d, 2, v:size(d) - 1) end
            local c = v:contiguous()
            local what = string.format("case %d: %s %s perm %s", case, dt, table.concat(v.shape, "x"),
               table.concat(perm, ","))
            local row = ml.arange(0, v:size(-1)):to(dt)
            assert.is_true((v + row):equal(c + row), what .. " add")
            assert.is_true((v * v):equal(c * c), what .. " mul")
            assert.is_true(v:sigmoid():equal(c:sigmoid()), what .. " sigmoid")
            assert.is_true(ml.where(v:gt(0), v, row):equal(ml.where(c:gt(0), c, row)), what .. " where")
            local rd = rnd(nd)
            assert.is_true(v:sum(rd):allclose(c:sum(rd), 1e-5, 1e-3), what .. " sum")
            local mv, mi = v:max(rd)
            local cv, ci = c:max(rd)
            assert.is_true(mv:equal(cv) and mi:equal(ci), what .. " max")
            assert.is_true(v:cumsum(rd):allclose(c:cumsum(rd), 1e-5, 1e-3), what .. " cumsum")
         end
      end)

      it("computes every block of a long row like a short one", function()
         local x = big():reshape(300000)
         local g = x:gelu()
         for _, start in ipairs({ 1, 1020, 131000, 299001 }) do
            local piece = x:narrow(1, start, 1000):clone()        -- small: one thread, few blocks
            assert.is_true(g:narrow(1, start, 1000):equal(piece:gelu()))
         end
         local st = big():t()                                     -- strided view through every block
         assert.is_true(st:exp():equal(st:contiguous():exp()))
      end)
   end)
end)

describe("elementwise ops", function()
   H.define_cuda("ops_elementwise.json", describe, it)
end)
