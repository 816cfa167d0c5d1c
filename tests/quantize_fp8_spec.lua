-- float8 tensors and FP8 layers: the float8_e4m3fn and float8_e5m2 dtypes against PyTorch's
-- (tests/fixtures/fp8.json, tests/fixtures/gen_fp8.py), safetensors' F8_E4M3 / F8_E5M2, block
-- dequantization (ml_dequantize_fp8_blocks) against a plain Lua loop, and nn.Fp8Linear.
local ml = require("moonload")
local N = require("nn_helpers")
local F = ml.nn.functional

local FIX = N.read_json("tests/fixtures/fp8.json")

local null = require("cjson").null

local function from_json(v)
   if v == null then return nil end
   if v == "inf" then return math.huge elseif v == "-inf" then return -math.huge end
   return v                                           -- (nil: NaN)
end

describe("float8 dtypes", function()
   for _, name in ipairs({ "float8_e4m3fn", "float8_e5m2" }) do
      local fix = FIX[name]

      it(name .. ": each of the 256 bytes reads as PyTorch reads it", function()
         local bytes = {}
         for b = 0, 255 do bytes[b + 1] = b end
         local t = ml.tensor(bytes, { dtype = "uint8" }):view_dtype(name)
         assert.are.equal(name, t.dtype)
         for i, v in ipairs(t:to("float32"):tolist()) do
            local want = from_json(fix.values[i])
            if want == nil then assert.is_true(v ~= v, "byte " .. (i - 1) .. " is NaN")
            else assert.are.equal(want, v, "byte " .. (i - 1)) end
         end
         -- to bfloat16 goes the table's fast way: every value fits
         local bf = t:to("bfloat16"):to("float32"):tolist()
         for i, v in ipairs(t:to("float32"):tolist()) do
            if v == v then assert.are.equal(v, bf[i]) end
         end
      end)

      it(name .. ": floats round to PyTorch's bytes (ties to even, subnormals, overflow, infinities, NaN)", function()
         local inputs = {}
         for i, v in ipairs(fix.inputs) do
            local x = from_json(v)
            inputs[i] = x == nil and 0 / 0 or x
         end
         local got = ml.tensor(inputs, { dtype = "float32" }):to(name):view_dtype("uint8"):tolist()
         local bad = {}
         for i, b in ipairs(got) do
            if b ~= fix.bytes[i] then bad[#bad + 1] = string.format("%.9g -> %d (want %d)", inputs[i], b, fix.bytes[i]) end
         end
         assert.are.same({}, bad)
      end)
   end

   it("stays as it is when a model or a load converts floating tensors", function()
      local lin = ml.nn.Fp8Linear(32, 16, { block = { 16, 16 }, bias = true })
      lin:to("bfloat16")
      assert.are.equal("float8_e4m3fn", lin.weight.dtype)
      assert.are.equal("float32", lin.weight_scale_inv.dtype)
      assert.are.equal("bfloat16", lin.bias.dtype)
   end)
end)

describe("safetensors float8", function()
   it("reads F8_E4M3 tensors in place and writes them back under that name", function()
      local sd = ml.safetensors.load_file("tests/fixtures/models/deepseek_v3_fp8_tiny/model.safetensors")
      local w = sd["model.layers.1.self_attn.kv_b_proj.weight"]
      assert.are.equal("float8_e4m3fn", w.dtype)
      assert.are.same({ -11, 80, -176, 20, 120, -18 }, w:narrow(1, 1, 1):narrow(2, 1, 6):to("float32"):tolist()[1])
      local path = os.tmpname()
      ml.safetensors.save_file({ w = w, e5 = ml.tensor({ 1.5, -3, 57344 }):to("float8_e5m2") }, path)
      local f = assert(io.open(path, "rb"))
      local head = f:read(400)
      f:close()
      assert.truthy(head:find('"dtype":"F8_E4M3"', 1, true))
      assert.truthy(head:find('"dtype":"F8_E5M2"', 1, true))
      local back = ml.safetensors.load_file(path)
      assert.are.same(w:view_dtype("uint8"):tolist(), back.w:view_dtype("uint8"):tolist())
      assert.are.same({ 1.5, -3, 57344 }, back.e5:to("float32"):tolist())
      os.remove(path)
   end)
end)

describe("dequantize_fp8_blocks", function()
   -- w (O, I) float8 and scales per bo x bi tile, expanded by hand
   local function by_hand(w, s, bo, bi)
      local wl, sl, out = w:to("float32"):tolist(), s:tolist(), {}
      for o = 1, #wl do
         out[o] = {}
         for i = 1, #wl[o] do
            out[o][i] = wl[o][i] * sl[math.floor((o - 1) / bo) + 1][math.floor((i - 1) / bi) + 1]
         end
      end
      return out
   end

   it("multiplies each tile by its scale, partial tiles at the edges included", function()
      ml.manual_seed(3)
      for _, case in ipairs({ { 24, 40, 16, 16 }, { 7, 5, 3, 2 }, { 128, 64, 128, 128 }, { 1, 1, 1, 1 } }) do
         local O, I, bo, bi = case[1], case[2], case[3], case[4]
         local w = (ml.randn({ O, I }) * 50):to("float8_e4m3fn")
         local s = ml.rand({ math.ceil(O / bo), math.ceil(I / bi) }) + 0.01
         local want = by_hand(w, s, bo, bi)
         for _, dtype in ipairs({ "float32", "bfloat16" }) do
            local got = F.dequantize_fp8_blocks(w, s, { bo, bi }, dtype)
            assert.are.equal(dtype, got.dtype)
            local d = N.max_abs_diff(got:float(), want)
            assert.is_true(d <= (dtype == "float32" and 1e-5 or 2), string.format("%s %s: %g", dtype, table.concat(case, "x"), d))
         end
      end
      local w5 = (ml.randn({ 6, 6 }) * 100):to("float8_e5m2")
      local s5 = ml.tensor({ { 0.5, 2 }, { 4, 0.25 } })
      assert.are.equal(0, N.max_abs_diff(F.dequantize_fp8_blocks(w5, s5, { 3, 3 }), by_hand(w5, s5, 3, 3)))
   end)

   it("names shapes and dtypes that do not go together", function()
      local w = ml.zeros({ 24, 40 }):to("float8_e4m3fn")
      local function fails(fn, msg)
         local ok, err = pcall(fn)
         assert.is_false(ok)
         assert.truthy(tostring(err):find(msg, 1, true), err)
      end
      fails(function() F.dequantize_fp8_blocks(w, ml.ones({ 2, 2 }), { 16, 16 }) end,
         "dequantize_fp8_blocks: weight float8_e4m3fn [24, 40] and scales float32 [2, 2] do not go together (a float8 (O, I) weight and float32 scales (ceil(O / 16), ceil(I / 16)))")
      fails(function() F.dequantize_fp8_blocks(ml.zeros({ 24, 40 }), ml.ones({ 2, 3 }), { 16, 16 }) end,
         "weight float32 [24, 40]")
      fails(function() F.dequantize_fp8_blocks(w, ml.ones({ 2, 3 }), { 16, 16 }, "int8") end,
         "dequantize_fp8_blocks: the output dtype must be float32, float16 or bfloat16, got int8")
      fails(function() F.dequantize_fp8_blocks(w, ml.ones({ 2, 3 }), { 0, 16 }) end,
         "dequantize_fp8_blocks: block sizes must be positive, got 0 x 16")
   end)
end)

describe("fp8_linear", function()
   -- the same product through the expanded weight (float32)
   local function expanded(x, w, s, block, b)
      return F.linear(x:float(), F.dequantize_fp8_blocks(w, s, block), b and b:float())
   end

   it("multiplies a few rows straight from the float8 bytes as the expanded weight does", function()
      ml.manual_seed(21)
      for _, fmt in ipairs({ "float8_e4m3fn", "float8_e5m2" }) do
         for _, case in ipairs({ { 1, 96, 300, 16, 128 }, { 3, 40, 72, 16, 16 }, { 16, 33, 50, 7, 9 }, { 5, 8, 20, 128, 128 } }) do
            local M, O, K, bo, bi = case[1], case[2], case[3], case[4], case[5]
            -- values spread over float8's range (e4m3's subnormals, below 2^-6, included)
            local w = (ml.randn({ O, K }) * (ml.rand({ O, K }) * 8.3 - 4.2):exp()):to(fmt)
            local s = ml.rand({ math.ceil(O / bo), math.ceil(K / bi) }) + 0.05
            local x, b = ml.randn({ M, K }), ml.randn({ O })
            local want = expanded(x, w, s, { bo, bi }, b)
            local got = F.fp8_linear(x, w, s, { bo, bi }, b)
            local scale = want:abs():max():item()
            assert.is_true(N.max_abs_diff(got, want:tolist()) <= 1e-5 * scale, fmt .. " " .. table.concat(case, "x"))
         end
      end
   end)

   it("gives the same products on the AVX2 path as on AVX-512 (MOONLOAD_NO_AVX512=1, in a process of its own)", function()
      local script = [[
         local ml = require("moonload")
         local F = ml.nn.functional
         ml.manual_seed(23)
         local worst = 0
         for _, fmt in ipairs({ "float8_e4m3fn", "float8_e5m2" }) do
            local w = (ml.randn({ 40, 300 }) * (ml.rand({ 40, 300 }) * 8.3 - 4.2):exp()):to(fmt)
            local s = ml.rand({ 3, 3 }) + 0.05
            local x = ml.randn({ 5, 300 })
            local want = F.linear(x, F.dequantize_fp8_blocks(w, s, { 16, 128 }))
            local got = F.fp8_linear(x, w, s, { 16, 128 })
            worst = math.max(worst, ((got - want):abs():max() / want:abs():max()):item())
         end
         print(worst)
      ]]
      local worst, out = N.printed_under({ "MOONLOAD_NO_AVX512=1", "MOONLOAD_NO_AVX512=0" }, script)
      for env, text in pairs(out) do assert.is_true(worst[env] ~= nil and worst[env] < 1e-5, env .. ": " .. text) end
   end)

   it("keeps the input's dtype and shape, and takes the GEMM past 16 rows", function()
      ml.manual_seed(22)
      local w = (ml.randn({ 24, 64 }) * 30):to("float8_e4m3fn")
      local s = ml.rand({ 2, 4 }) + 0.1
      for _, rows in ipairs({ 2, 40 }) do
         local x = ml.randn({ 2, rows / 2, 64 })
         local y = F.fp8_linear(x:to("bfloat16"), w, s, { 16, 16 })
         assert.are.equal("bfloat16", y.dtype)
         assert.are.same({ 2, rows / 2, 24 }, y.shape)
         local want = expanded(x, w, s, { 16, 16 })
         assert.is_true(N.max_abs_diff(y:float(), want:tolist()) <= 0.02 * want:abs():max():item())
         -- a strided input (a transposed view) reads as its values
         local xt = ml.randn({ 64, rows }):t()
         assert.is_true(N.max_abs_diff(F.fp8_linear(xt, w, s, { 16, 16 }), expanded(xt, w, s, { 16, 16 }):tolist()) < 1e-3)
      end
   end)

   it("names what does not fit", function()
      local w = ml.zeros({ 24, 64 }):to("float8_e4m3fn")
      local ok, err = pcall(F.fp8_linear, ml.zeros({ 1, 63 }), w, ml.ones({ 2, 4 }), { 16, 16 })
      assert.is_false(ok)
      assert.truthy(err:find("fp8_linear: input of shape [1, 63] does not match weight of shape [24, 64]", 1, true), err)
      ok, err = pcall(F.fp8_linear, ml.zeros({ 1, 64 }), w, ml.ones({ 2, 2 }), { 16, 16 })
      assert.is_false(ok)
      assert.truthy(err:find("do not go together", 1, true), err)
      ok, err = pcall(F.fp8_linear, ml.zeros({ 1, 64 }, { dtype = "int32" }), w, ml.ones({ 2, 4 }), { 16, 16 })
      assert.is_false(ok)
      assert.truthy(err:find("fp8_linear: the input must be float32, float16 or bfloat16, got int32", 1, true), err)
   end)
end)

describe("nn.Fp8Linear", function()
   it("computes x W^T + b with W its float8 values times their tile's scale, in the input's dtype", function()
      ml.manual_seed(5)
      local lin = ml.nn.Fp8Linear(40, 24, { block = { 16, 16 }, bias = true })
      local w = ml.randn({ 24, 40 }) * 10
      lin.weight = w:to("float8_e4m3fn")
      lin.weight_scale_inv = ml.rand({ 2, 3 }) + 0.1
      lin.bias = ml.randn({ 24 })
      local x = ml.randn({ 3, 40 })
      local dense = F.dequantize_fp8_blocks(lin.weight, lin.weight_scale_inv, { 16, 16 })
      assert.is_true(N.max_abs_diff(lin(x), F.linear(x, dense, lin.bias):tolist()) < 1e-4)
      local y16 = lin(x:to("bfloat16"))
      assert.are.equal("bfloat16", y16.dtype)
      assert.is_true(N.max_abs_diff(y16:float(), F.linear(x, dense, lin.bias):tolist()) < 0.5)
      assert.are.equal("Fp8Linear(in_features=40, out_features=24, bias=True, float8_e4m3fn in blocks of 16 x 16)",
         tostring(lin):match("^[^\n]*"))
   end)

   it("names a bad block or format", function()
      local ok, err = pcall(ml.nn.Fp8Linear, 4, 4, { block = { 0, 2 } })
      assert.is_false(ok)
      assert.truthy(err:find("Fp8Linear: block must be {block_o, block_i}, two positive integers", 1, true), err)
      ok, err = pcall(ml.nn.Fp8Linear, 4, 4, { fmt = "e3m4" })
      assert.is_false(ok)
      assert.truthy(err:find('Fp8Linear: fmt must be "e4m3" or "e5m2", got e3m4', 1, true), err)
   end)
end)

describe("FP8 layers quantized again to int8 or int4", function()
   local models = require("moonload.models")
   local H = require("models_helpers")

   it("turns an Fp8Linear into int8 within int8's rounding of its float8 values times their scales", function()
      ml.manual_seed(31)
      local lin = ml.nn.Fp8Linear(64, 24, { block = { 16, 16 }, bias = true })
      lin.weight = (ml.randn({ 24, 64 }) * 40):to("float8_e4m3fn")
      lin.weight_scale_inv = ml.rand({ 2, 4 }) + 0.1
      lin.bias = ml.randn({ 24 })
      local q = ml.nn.QuantizedLinear.from_float(lin, 8)
      local x = ml.randn({ 3, 64 })
      local want = lin(x)
      assert.is_true(N.max_abs_diff(q(x), want:tolist()) < 0.02 * want:abs():max():item())
   end)

   it("from_pretrained(quantize = ...) requantizes an FP8 checkpoint's layers whose rows split into 32s", function()
      for _, q in ipairs({ "int8", "int4" }) do
         local m = models.from_pretrained(H.FIX .. "/deepseek_v3_fp8_tiny", { quantize = q })
         local attn = m.model.layers[2].self_attn
         assert.are.equal("QuantizedLinear", attn.q_a_proj.__name)               -- in_features 32
         assert.are.equal(q == "int8" and 8 or 4, attn.q_a_proj.bits)
         assert.are.equal("Fp8Linear", attn.kv_b_proj.__name)                    -- in_features 16: stays
         local exp = H.expected("deepseek_v3_fp8_tiny")
         local logits = m(ml.tensor(exp.input_ids, { dtype = "int64" }))
         local s = logits:abs():sum():item()
         assert.is_true(s == s and s < math.huge, "finite logits")
      end
      -- saving both kinds in one folder is refused, naming one of each
      local m = models.from_pretrained(H.FIX .. "/deepseek_v3_fp8_tiny", { quantize = "int8" })
      local dir = H.tmpdir()
      local ok, err = pcall(ml.save_model, m, dir)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('save_model: one quantization_config cannot describe both FP8 layers ("model.layers.0.self_attn.q_b_proj") and int8/int4 ones ("model.layers.0.self_attn.q_a_proj")', 1, true), err)
      H.rmdir(dir)
   end)
end)
