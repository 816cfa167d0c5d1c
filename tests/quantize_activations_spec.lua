-- int8 activations for int8 and int4 linears (ml.set_quantized_activations, core/src/cpu/q8_dot.c):
-- the products against float products of the rounded activations and the weights' values, the
-- three CPU paths (AVX512-VNNI, AVX2, plain C) against each other, and a whole model against its
-- float-activation self.
local ml = require("moonload")
local F = ml.nn.F

local function rel(a, b) return ((a - b):abs():max() / b:abs():max()):item() end

-- What the int8-activation kernel computes, in float64: each row rounded to int8 in blocks of 32
-- exactly as quantize_q8 rounds a weight, times the float values the quantized weight stands for.
local function reference(x, q, s, b, bits)
   local rows = x:reshape(-1, x:size(x:dim()))
   local xq, xs = F.quantize_q8(rows:to("float32"))
   local xd = F.dequantize_q8(xq, xs):to("float64")
   local wd = (bits == 4 and F.dequantize_q4(q, s) or F.dequantize_q8(q, s)):to("float64")
   local out = F.linear(xd, wd, b and b:to("float64"))
   local shape = {}
   for d = 1, x:dim() - 1 do shape[d] = x:size(d) end
   shape[#shape + 1] = q:size(1)
   return out:reshape(shape)
end

local quantizers = { [8] = { F.quantize_q8, F.q8_linear }, [4] = { F.quantize_q4, F.q4_linear } }

describe("int8 activations for quantized linears", function()
   after_each(function() ml.set_quantized_activations("float32") end)

   it("is off by default, switches, returns the previous setting and names a bad one", function()
      assert.are.equal("float32", ml.get_quantized_activations())
      assert.are.equal("float32", ml.set_quantized_activations("int8"))
      assert.are.equal("int8", ml.get_quantized_activations())
      assert.are.equal("int8", ml.set_quantized_activations("float32"))
      assert.has_error(function() ml.set_quantized_activations("int4") end,
         'set_quantized_activations: expected "int8" or "float32", got int4')
      assert.has_error(function() ml.set_quantized_activations() end,
         'set_quantized_activations: expected "int8" or "float32", got nil')
   end)

   it("reads MOONLOAD_QUANTIZED_ACTIVATIONS at start, naming a bad value", function()
      local luajit = os.getenv("LUAJIT") or "luajit"
      local function run(value)
         local p = io.popen(("MOONLOAD_QUANTIZED_ACTIVATIONS=%s LUA_PATH='lua/?.lua;lua/?/init.lua;;' %s -e "
            .. "'io.write(require(\"moonload\").get_quantized_activations())' 2>&1"):format(value, luajit))
         local out = p:read("*a")
         p:close()
         return out
      end
      assert.are.equal("int8", run("int8"))
      assert.truthy(run("int16"):find('MOONLOAD_QUANTIZED_ACTIVATIONS must be "int8" or "float32", got int16', 1, true))
   end)

   for _, bits in ipairs({ 8, 4 }) do
      it("multiplies int" .. bits .. " weights by 1 to 8 rounded rows, as float products of the same values", function()
         ml.manual_seed(40 + bits)
         local quantize, linear = quantizers[bits][1], quantizers[bits][2]
         -- 7 blocks of 32: an odd count, so the last block goes without a partner
         local w, b = ml.randn(37, 224), ml.randn(37)
         local q, s = quantize(w)
         ml.set_quantized_activations("int8")
         for M = 1, 8 do
            local x = ml.randn(M, 224) * 3
            local got = linear(x, q, s, b)
            assert.is_true(rel(got:to("float64"), reference(x, q, s, b, bits)) < 1e-6, "rows " .. M)
            -- and differs from the float-activation product: the rows really were rounded
            ml.set_quantized_activations("float32")
            local floats = linear(x, q, s, b)
            ml.set_quantized_activations("int8")
            assert.is_false(ml.equal(got, floats))
            assert.is_true(rel(got, floats) < 0.02, "rows " .. M)
         end
         -- batched and bfloat16 inputs fold to rows the same way; no bias
         local x3 = ml.randn(2, 2, 224)
         assert.is_true(rel(linear(x3, q, s):to("float64"), reference(x3, q, s, nil, bits)) < 1e-6)
         local xb = ml.randn(1, 224):to("bfloat16")
         local yb = linear(xb, q, s)
         assert.are.equal("bfloat16", yb.dtype)
         assert.is_true(rel(yb:to("float64"), reference(xb, q, s, nil, bits)) < 1e-2)
      end)
   end

   for _, bits in ipairs({ 8, 4 }) do
      it("multiplies int" .. bits .. " weights by many rounded rows (a prompt), as float products of the same values", function()
         ml.manual_seed(50 + bits)
         local quantize, linear = quantizers[bits][1], quantizers[bits][2]
         ml.set_quantized_activations("int8")
         -- rows past a multiple of the kernel's 4 and 64, columns past a multiple of 32, one block or seven
         for _, case in ipairs({ { 9, 37, 224 }, { 70, 64, 32 }, { 133, 100, 96 } }) do
            local M, N, K = case[1], case[2], case[3]
            local w, b = ml.randn(N, K), ml.randn(N)
            local q, s = quantize(w)
            local x = ml.randn(M, K) * 2
            local got = linear(x, q, s, b)
            assert.are.same({ M, N }, got.shape)
            assert.is_true(rel(got:to("float64"), reference(x, q, s, b, bits)) < 1e-6, table.concat(case, " x "))
            ml.set_quantized_activations("float32")
            local floats = linear(x, q, s, b)
            ml.set_quantized_activations("int8")
            assert.is_true(rel(got, floats) < 0.02, table.concat(case, " x "))
         end
         -- a strided input (a transposed view), bfloat16, batched, no bias
         local w = ml.randn(48, 64)
         local q, s = quantize(w)
         local xt = ml.randn(64, 9):t()
         assert.is_false(xt:is_contiguous())
         assert.is_true(rel(linear(xt, q, s):to("float64"), reference(xt:contiguous(), q, s, nil, bits)) < 1e-6)
         local xb = ml.randn(3, 6, 64):to("bfloat16")
         local yb = linear(xb, q, s)
         assert.are.equal("bfloat16", yb.dtype)
         assert.are.same({ 3, 6, 48 }, yb.shape)
         assert.is_true(rel(yb:to("float64"), reference(xb, q, s, nil, bits)) < 1e-2)
      end)
   end

   it("gives the same products on the AVX512-VNNI, AVX2 and plain C paths", function()
      -- each path in its own process (MOONLOAD_Q8_DOT picks a narrower one than the CPU's)
      local script = os.tmpname()
      local f = assert(io.open(script, "w"))
      f:write([[
         local ml = require("moonload")
         local F = ml.nn.F
         ml.set_quantized_activations("int8")
         ml.manual_seed(9)
         local w = ml.randn(70, 160)
         w[3][5] = -300                  -- a -128 after rounding in an int8 block (|w| as unsigned 128)
         local q8, s8 = F.quantize_q8(w)
         q8[3][5] = -128
         local q4, s4 = F.quantize_q4(w)
         local out = {}
         for _, M in ipairs({ 1, 2, 3, 4, 5, 8, 9, 70 }) do       -- the dots, then the GEMM
            local x = ml.randn(M, 160) * 5
            out[#out + 1] = F.q8_linear(x, q8, s8):tolist()
            out[#out + 1] = F.q4_linear(x, q4, s4):tolist()
         end
         io.write(require("cjson").encode(out))
      ]])
      f:close()
      local luajit = os.getenv("LUAJIT") or "luajit"
      local function run(path)
         local p = io.popen(("MOONLOAD_Q8_DOT=%s LUA_PATH='lua/?.lua;lua/?/init.lua;;' %s %s 2>&1"):format(path, luajit, script))
         local text = p:read("*a")
         p:close()
         local ok, decoded = pcall(require("cjson").decode, text)
         assert(ok, text)
         return decoded
      end
      local widest, avx2, plain_c = run("widest"), run("avx2"), run("c")
      os.remove(script)
      -- the two SIMD paths add the same integer lanes in the same order: equal to the bit
      assert.are.same(widest, avx2)
      -- plain C adds the blocks of a few rows' dots in another order
      for i = 1, #widest do
         assert.is_true(rel(ml.tensor(plain_c[i]), ml.tensor(widest[i])) < 1e-5, "product " .. i)
      end
   end)

   it("decodes a quantized model picking the tokens float activations rate best", function()
      local fixture = "tests/fixtures/models/llama_tiny_untied"
      for _, dtype in ipairs({ "int8", "int4" }) do
         local model = ml.models.from_pretrained(fixture, { quantize = dtype })
         local prompt = { 5, 17, 42, 3, 99 }
         ml.set_quantized_activations("int8")
         local tokens = model:generate(prompt, { max_new_tokens = 12, eos_token_id = false })
         ml.set_quantized_activations("float32")
         assert.are.equal(#prompt + 12, #tokens)
         -- the whole sequence in one forward (17 rows: float activations): each token the int8
         -- decode picked is the float model's best, or within 2% of its logits' range of it
         local logits = model(ml.tensor({ tokens }, { dtype = "int64" }))[1]
         for t = #prompt + 1, #tokens do
            local row = logits[t - 1]
            local best, worst = row:max():item(), row:min():item()
            local picked = row[tokens[t] + 1]:item()
            assert.is_true(picked >= best - 0.02 * (best - worst), ("%s, token %d: %g against %g"):format(dtype, t, picked, best))
         end
         -- a forward of 4 tokens (4 rows a linear: the int8 dots) against float activations
         local four = ml.tensor({ { 5, 17, 42, 3 } }, { dtype = "int64" })
         local floats = model(four)
         ml.set_quantized_activations("int8")
         local rounded = model(four)
         ml.set_quantized_activations("float32")
         assert.is_false(ml.equal(rounded, floats))
         -- (measured: 0.034 for int8 weights, 0.053 for int4, in a model of width 32: one block a row)
         assert.is_true(rel(rounded, floats) < 0.1, dtype)
      end
   end)
end)
