-- MXFP4 weights (gpt-oss's experts): ml_dequantize_mxfp4 against transformers' own expansion
-- (tests/fixtures/mxfp4.json, tests/fixtures/gen_mxfp4.py), ml_mxfp4_linear against torch's
-- x W^T + b on both CPU paths (the packed bytes up to 16 rows, the GEMM past them), views of a
-- stacked expert tensor, the errors, and the same on cuda:0 (#cuda).
local ml = require("moonload")
local N = require("nn_helpers")
local F = ml.nn.functional

local FIX = N.read_json("tests/fixtures/mxfp4.json")
local null = require("cjson").null

local function from_json(v)
   if v == null then return 0 / 0 end
   if v == "inf" then return math.huge elseif v == "-inf" then return -math.huge end
   return v
end

-- A fixture case's blocks (..., O, G, 16) and scales (..., O, G) as uint8 tensors.
local function operands(c)
   local shape = c.blocks_shape
   return ml.tensor(c.blocks, { dtype = "uint8" }):view(shape),
      ml.tensor(c.scales, { dtype = "uint8" }):view({ unpack(shape, 1, #shape - 1) })
end

-- Where a tensor differs from a flat JSON list, exactly: NaN for NaN, the sign of zero kept.
local function mismatches(got, want)
   local flat = got:float():flatten():tolist()
   local bad = {}
   if #flat ~= #want then return { string.format("%d values, want %d", #flat, #want) } end
   for i, w in ipairs(want) do
      local v, x = flat[i], from_json(w)
      local same = (x ~= x and v ~= v) or (v == x and (x ~= 0 or 1 / v == 1 / x))
      if not same and #bad < 5 then bad[#bad + 1] = string.format("[%d] %.9g, want %.9g", i, v, x) end
   end
   return bad
end

local function rel(a, b) return ((a:float() - b:float()):abs():max() / b:float():abs():max()):item() end

-- Random MXFP4 operands: blocks (..., O, G, 16), scales in lo..hi.
local function random_mxfp4(shape, lo, hi)
   local sshape = { unpack(shape, 1, #shape - 1) }
   return (ml.rand(shape) * 255):to("uint8"), (ml.rand(sshape) * (hi - lo) + lo):to("uint8")
end

-- transformers-order blocks (..., 16) repacked in llama.cpp's order: the same 32 values, value j
-- in byte j's low nibble and j + 16 in its high one.
local function to_ggml_order(blocks)
   local flat = blocks:contiguous():view(-1, 16):tolist()
   for r, row in ipairs(flat) do
      local nib = {}
      for k = 1, 16 do nib[2 * k - 1], nib[2 * k] = row[k] % 16, math.floor(row[k] / 16) end
      for j = 1, 16 do row[j] = nib[j] + 16 * nib[j + 16] end
      flat[r] = row
   end
   return ml.tensor(flat, { dtype = "uint8" }):view(blocks.shape)
end

local function fails(fn, msg)
   local ok, err = pcall(fn)
   assert.is_false(ok)
   assert.truthy(tostring(err):find(msg, 1, true), err)
end

describe("dequantize_mxfp4", function()
   it("expands the blocks as transformers' convert_moe_packed_tensors does, in float32, bfloat16 and float16", function()
      for _, name in ipairs({ "linear", "edges", "stacked" }) do
         local c = FIX[name]
         local blocks, scales = operands(c)
         local want_shape = { unpack(c.blocks_shape, 1, #c.blocks_shape - 1) }
         want_shape[#want_shape] = want_shape[#want_shape] * 32
         for _, dtype in ipairs({ "float32", "bfloat16", "float16" }) do
            local got = F.dequantize_mxfp4(blocks, scales, dtype)
            assert.are.equal(dtype, got.dtype)
            assert.are.same(want_shape, got.shape)
            assert.are.same({}, mismatches(got, c[dtype]), name .. " " .. dtype)
         end
      end
      -- float32 when no dtype is given
      local blocks, scales = operands(FIX.linear)
      assert.are.equal("float32", F.dequantize_mxfp4(blocks, scales).dtype)
   end)

   it("reads value 2j from byte j's low nibble and 2j + 1 from its high one, times 2^(scale - 127)", function()
      local fp4 = { 0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6 }
      local bytes = {}
      for j = 0, 31 do bytes[j + 1] = (2 * j) % 16 + ((2 * j + 1) % 16) * 16 end   -- values 0..15, twice a row
      local blocks = ml.tensor(bytes, { dtype = "uint8" }):view(2, 1, 16)
      local scales = ml.tensor({ { 126 }, { 130 } }, { dtype = "uint8" })
      local got = F.dequantize_mxfp4(blocks, scales):tolist()
      for o, p in ipairs({ 0.5, 8 }) do
         for i = 1, 32 do assert.are.equal(fp4[(i - 1) % 16 + 1] * p, got[o][i], o .. ", " .. i) end
      end
      assert.are.equal(-math.huge, 1 / got[1][9])                 -- nibble 8 is -0
   end)

   it("reads llama.cpp's nibble order (GGUF's MXFP4) as the same values, and names an unknown order", function()
      ml.manual_seed(5)
      local blocks, scales = random_mxfp4({ 2, 6, 3, 16 }, 115, 135)
      local want = F.dequantize_mxfp4(blocks, scales)
      local ggml = to_ggml_order(blocks)
      assert.is_false(ml.equal(ggml, blocks))
      assert.is_true(ml.equal(F.dequantize_mxfp4(ggml, scales, "float32", "ggml"), want))
      local x = ml.randn(3, 96)
      for _, rows in ipairs({ 1, 3 }) do           -- the direct product, and (3 > 1 row) both paths agree
         local xr = x:narrow(1, 1, rows)
         local got = F.mxfp4_linear(xr, ggml:select(1, 2), scales:select(1, 2), nil, "ggml")
         assert.is_true(rel(got, F.linear(xr, want:select(1, 2))) < 1e-6)
      end
      fails(function() F.dequantize_mxfp4(ggml, scales, "float32", "llama") end,
         'dequantize_mxfp4: order must be "transformers" or "ggml", got llama')
   end)

   it("reads views: an expert selected from a stacked tensor, strided groups and bytes", function()
      local c = FIX.stacked
      local blocks, scales = operands(c)                          -- (2, 8, 2, 16), (2, 8, 2)
      local half = #c.float32 / 2
      local second = { unpack(c.float32, half + 1, 2 * half) }
      local b2, s2 = blocks:select(1, 2), scales:select(1, 2)
      assert.are.same({}, mismatches(F.dequantize_mxfp4(b2, s2), second))
      -- the same values with every stride changed: the bytes' last dim outermost in memory, the
      -- scales transposed
      local bt = blocks:permute({ 4, 1, 2, 3 }):contiguous():permute({ 2, 3, 4, 1 })
      local st = scales:permute({ 3, 1, 2 }):contiguous():permute({ 2, 3, 1 })
      assert.are_not.equal(1, bt:stride(4))
      assert.is_false(st:is_contiguous())
      for _, dtype in ipairs({ "float32", "bfloat16" }) do
         assert.are.same({}, mismatches(F.dequantize_mxfp4(bt, st, dtype), c[dtype]), dtype)
      end
      assert.are.same({}, mismatches(F.dequantize_mxfp4(bt:select(1, 2), st:select(1, 2)), second))
   end)

   it("names the operand that does not fit", function()
      local blocks, scales = random_mxfp4({ 4, 2, 16 }, 120, 130)
      fails(function() F.dequantize_mxfp4(blocks:float(), scales) end,
         "dequantize_mxfp4: the blocks must be uint8 (..., O, G, 16), got float32 [4, 2, 16]")
      fails(function() F.dequantize_mxfp4(blocks:narrow(3, 1, 15), scales) end,
         "dequantize_mxfp4: the blocks must be uint8 (..., O, G, 16), got uint8 [4, 2, 15]")
      fails(function() F.dequantize_mxfp4(blocks:select(1, 1), scales:select(1, 1)) end,
         "dequantize_mxfp4: the blocks must be uint8 (..., O, G, 16), got uint8 [2, 16]")
      fails(function() F.dequantize_mxfp4(blocks, scales:narrow(2, 1, 1)) end,
         "dequantize_mxfp4: the scales must be uint8 [4, 2] (the blocks' shape without the last dim), got uint8 [4, 1]")
      fails(function() F.dequantize_mxfp4(blocks, scales:float()) end,
         "dequantize_mxfp4: the scales must be uint8 [4, 2] (the blocks' shape without the last dim), got float32 [4, 2]")
      fails(function() F.dequantize_mxfp4(blocks, scales, "int8") end,
         "dequantize_mxfp4: the output dtype must be float32, float16 or bfloat16, got int8")
      fails(function() F.dequantize_mxfp4(blocks, ml.empty({ 4, 2 }, { dtype = "uint8", device = "meta" })) end,
         "dequantize_mxfp4: the scales is on the meta device and has no data")
      fails(function() F.dequantize_mxfp4(blocks) end, "dequantize_mxfp4: scales must be a tensor, got nil")
   end)
end)

describe("mxfp4_linear", function()
   it("gives torch's x W^T + b for 1, 3, 16 and 40 rows (the packed bytes, then the GEMM)", function()
      local c = FIX.linear
      local blocks, scales = operands(c)
      local bias = ml.tensor(c.bias)
      local I = c.blocks_shape[2] * 32
      local seen = 0
      for _, l in ipairs(c.linear) do
         if l.dtype == "float32" then
            local x = ml.tensor(l.x):view(l.rows, I)
            local want = ml.tensor(l.y):view(l.rows, #c.bias)
            local got = F.mxfp4_linear(x, blocks, scales, bias)
            assert.are.equal("float32", got.dtype)
            assert.are.same({ l.rows, #c.bias }, got.shape)
            assert.is_true(rel(got, want) < 1e-5, l.rows .. " rows: " .. rel(got, want))
            -- no bias: the same less b
            assert.is_true(rel(F.mxfp4_linear(x, blocks, scales), want - bias) < 1e-5, l.rows .. " rows, no bias")
            seen = seen + 1
         end
      end
      assert.are.equal(4, seen)
   end)

   it("in bfloat16 gives what torch computes in bfloat16", function()
      local c = FIX.linear
      local blocks, scales = operands(c)
      local bias = ml.tensor(c.bias):to("bfloat16")
      local seen = 0
      for _, l in ipairs(c.linear) do
         if l.dtype == "bfloat16" then
            local x = ml.tensor(l.x):to("bfloat16"):view(l.rows, c.blocks_shape[2] * 32)
            local got = F.mxfp4_linear(x, blocks, scales, bias)
            assert.are.equal("bfloat16", got.dtype)
            local want = ml.tensor(l.y):view(l.rows, #c.bias)
            -- one rounding to bfloat16 (2^-8) after float32 sums in another order
            local d = ((got:float() - want):abs() - want:abs() * 2 ^ -7):max():item()
            assert.is_true(d <= 1e-3, l.rows .. " rows: " .. d)
            seen = seen + 1
         end
      end
      assert.are.equal(2, seen)
   end)

   it("agrees with the expanded weight on both paths, for any leading dims, dtypes and strides of x", function()
      ml.manual_seed(41)
      local blocks, scales = random_mxfp4({ 70, 5, 16 }, 115, 130)   -- 70 columns: two blocks of 32 and a part
      local w, b = F.dequantize_mxfp4(blocks, scales), ml.randn({ 70 })
      for _, rows in ipairs({ 1, 2, 5, 16, 17, 33 }) do
         local x = ml.randn({ rows, 160 })
         local want = F.linear(x, w, b)
         assert.is_true(rel(F.mxfp4_linear(x, blocks, scales, b), want) < 1e-5, rows .. " rows")
         local x3 = x:view(1, rows, 160)
         local y3 = F.mxfp4_linear(x3, blocks, scales, b)
         assert.are.same({ 1, rows, 70 }, y3.shape)
         assert.is_true(rel(y3:view(rows, 70), want) < 1e-5)
         -- a transposed view reads as its values
         local xt = x:t():contiguous():t()
         assert.is_true(rows == 1 or not xt:is_contiguous())
         assert.is_true(rel(F.mxfp4_linear(xt, blocks, scales, b), want) < 1e-5, rows .. " rows, strided")
         for _, dt in ipairs({ "float16", "bfloat16" }) do
            local y = F.mxfp4_linear(x:to(dt), blocks, scales, b)         -- a float32 bias, output in x's dtype
            assert.are.equal(dt, y.dtype)
            assert.is_true(rel(y, F.linear(x:to(dt):float(), w, b)) < 0.01, rows .. " rows " .. dt)
         end
      end
   end)

   it("multiplies by an expert selected from a stacked tensor, and by strided blocks", function()
      ml.manual_seed(42)
      local blocks, scales = random_mxfp4({ 3, 40, 4, 16 }, 118, 132)
      local w = F.dequantize_mxfp4(blocks, scales)                       -- (3, 40, 128)
      for _, rows in ipairs({ 3, 20 }) do
         local x = ml.randn({ rows, 128 })
         for e = 1, 3 do
            local got = F.mxfp4_linear(x, blocks:select(1, e), scales:select(1, e))
            assert.is_true(rel(got, F.linear(x, w:select(1, e))) < 1e-5, rows .. " rows, expert " .. e)
         end
         -- bytes not contiguous along the group (a copy), groups and rows strided
         local bt = blocks:select(1, 2):permute({ 3, 1, 2 }):contiguous():permute({ 2, 3, 1 })
         assert.are_not.equal(1, bt:stride(3))
         assert.is_true(rel(F.mxfp4_linear(x, bt, scales:select(1, 2)), F.linear(x, w:select(1, 2))) < 1e-5)
      end
   end)

   it("reads the scales' edges: 2^-127 and 2^73 where the products stay finite", function()
      ml.manual_seed(44)
      local bytes = {}
      for j = 1, 32 do bytes[j] = (j * 37) % 256 end
      local blocks = ml.tensor(bytes, { dtype = "uint8" }):view(2, 1, 16)
      local x = ml.randn({ 1, 32 })
      for _, s in ipairs({ 0, 1, 127, 200 }) do
         local scales = ml.tensor({ { s }, { 127 } }, { dtype = "uint8" })
         local want = F.linear(x, F.dequantize_mxfp4(blocks, scales))
         local got = F.mxfp4_linear(x, blocks, scales)
         assert.is_true(rel(got, want) < 1e-5, "scale " .. s)
         local w0 = want:float():select(2, 1):item()
         local d = math.abs(got:select(2, 1):item() - w0)
         assert.is_true(d <= 1e-5 * math.abs(w0), "scale " .. s .. ": " .. d)
      end
   end)

   it("names what does not fit", function()
      local blocks, scales = random_mxfp4({ 24, 2, 16 }, 120, 130)
      fails(function() F.mxfp4_linear(ml.zeros({ 1, 63 }), blocks, scales) end,
         "mxfp4_linear: input of shape [1, 63] does not match blocks of shape [24, 2, 16] (in_features 64)")
      fails(function() F.mxfp4_linear(ml.zeros({ 1, 64 }, { dtype = "int32" }), blocks, scales) end,
         "mxfp4_linear: the input must be float32, float16 or bfloat16, got int32")
      fails(function() F.mxfp4_linear(ml.zeros({ 1, 64 }), blocks:view(1, 24, 2, 16), scales:view(1, 24, 2)) end,
         "mxfp4_linear: the blocks must be uint8 (O, G, 16), got uint8 [1, 24, 2, 16]")
      fails(function() F.mxfp4_linear(ml.zeros({ 1, 64 }), blocks:float(), scales) end,
         "mxfp4_linear: the blocks must be uint8 (..., O, G, 16), got float32 [24, 2, 16]")
      fails(function() F.mxfp4_linear(ml.zeros({ 1, 64 }), blocks, scales:t()) end,
         "mxfp4_linear: the scales must be uint8 [24, 2] (the blocks' shape without the last dim), got uint8 [2, 24]")
      fails(function() F.mxfp4_linear(ml.zeros({ 1, 64 }), blocks, scales, ml.zeros({ 23 })) end,
         "mxfp4_linear: the bias must be floating (out_features = 24), got float32 [23]")
      fails(function() F.mxfp4_linear(ml.zeros({ 1, 64 }), blocks, scales, ml.zeros({ 24 }, { dtype = "int64" })) end,
         "mxfp4_linear: the bias must be floating (out_features = 24), got int64 [24]")
      fails(function() F.mxfp4_linear(ml.empty({ 1, 64 }, { device = "meta" }), blocks, scales) end,
         "mxfp4_linear: the input is on the meta device and has no data")
   end)
end)

describe("mxfp4 on cuda #cuda", function()
   local DEV = "cuda:0"

   it("dequantizes on the device to the CPU's values, every dtype, stacked, selected and strided", function()
      for _, name in ipairs({ "linear", "edges", "stacked" }) do
         local c = FIX[name]
         local blocks, scales = operands(c)
         for _, dtype in ipairs({ "float32", "bfloat16", "float16" }) do
            local got = F.dequantize_mxfp4(blocks:to(DEV), scales:to(DEV), dtype)
            assert.are.equal(DEV, got.device)
            assert.are.equal(dtype, got.dtype)
            assert.are.same({}, mismatches(got:cpu(), c[dtype]), name .. " " .. dtype)
         end
      end
      local blocks, scales = operands(FIX.stacked)
      local bd, sd = blocks:to(DEV), scales:to(DEV)
      local want = F.dequantize_mxfp4(blocks:select(1, 2), scales:select(1, 2))
      assert.is_true(ml.equal(F.dequantize_mxfp4(bd:select(1, 2), sd:select(1, 2)):cpu(), want))
      local bt = bd:permute({ 4, 1, 2, 3 }):contiguous():permute({ 2, 3, 4, 1 })
      local st = sd:permute({ 3, 1, 2 }):contiguous():permute({ 2, 3, 1 })
      assert.are.same({}, mismatches(F.dequantize_mxfp4(bt, st, "bfloat16"):cpu(), FIX.stacked.bfloat16))
   end)

   it("expands llama.cpp's nibble order on the device to the CPU's values", function()
      ml.manual_seed(6)
      local blocks, scales = random_mxfp4({ 4, 2, 16 }, 118, 130)
      local ggml = to_ggml_order(blocks)
      local want = F.dequantize_mxfp4(blocks, scales)
      assert.is_true(ml.equal(F.dequantize_mxfp4(ggml:to(DEV), scales:to(DEV), "float32", "ggml"):cpu(), want))
      local x = ml.randn(2, 64)
      local got = F.mxfp4_linear(x:to(DEV), ggml:to(DEV), scales:to(DEV), nil, "ggml"):cpu()
      assert.is_true(rel(got, F.linear(x, want)) < 1e-5)
   end)

   it("multiplies on the device as the CPU does, decoding rows and prompt rows", function()
      ml.manual_seed(43)
      local blocks, scales = random_mxfp4({ 70, 5, 16 }, 115, 130)
      local b = ml.randn({ 70 })
      local bd, sd, biasd = blocks:to(DEV), scales:to(DEV), b:to(DEV)
      for _, rows in ipairs({ 1, 3, 16, 40 }) do
         local x = ml.randn({ rows, 160 })
         local want = F.mxfp4_linear(x, blocks, scales, b)
         local got = F.mxfp4_linear(x:to(DEV), bd, sd, biasd)
         assert.are.equal(DEV, got.device)
         assert.is_true(rel(got:cpu(), want) < 1e-5, rows .. " rows")
         local gb = F.mxfp4_linear(x:to(DEV):to("bfloat16"), bd, sd, biasd)
         assert.are.equal("bfloat16", gb.dtype)
         assert.is_true(rel(gb:cpu(), want) < 0.02, rows .. " rows bfloat16")
      end
      -- an expert of a stacked tensor on the device
      local sb, ss = random_mxfp4({ 2, 24, 3, 16 }, 118, 132)
      local x = ml.randn({ 2, 96 })
      local want = F.mxfp4_linear(x, sb:select(1, 2), ss:select(1, 2))
      assert.is_true(rel(F.mxfp4_linear(x:to(DEV), sb:to(DEV):select(1, 2), ss:to(DEV):select(1, 2)):cpu(), want) < 1e-5)
   end)

   it("names the operand on another device", function()
      local blocks, scales = random_mxfp4({ 4, 2, 16 }, 120, 130)
      fails(function() F.dequantize_mxfp4(blocks:to(DEV), scales) end,
         "dequantize_mxfp4: the blocks is on cuda:0 but the scales is on cpu")
      fails(function() F.mxfp4_linear(ml.zeros({ 1, 64 }):to(DEV), blocks, scales) end,
         "mxfp4_linear: the input is on cuda:0 but the blocks is on cpu")
      fails(function() F.mxfp4_linear(ml.zeros({ 1, 64 }):to(DEV), blocks:to(DEV), scales:to(DEV), ml.zeros({ 4 })) end,
         "mxfp4_linear: the input is on cuda:0 but the bias is on cpu")
   end)
end)
