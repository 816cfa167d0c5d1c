-- int8 weights (core/src/cpu/q8.c, nn.QuantizedLinear, ml.quantize): the kernels against float
-- products with the dequantized weights, the rounding bound, whole models against their float
-- selves, and what is left in floats and why.
local ml = require("moonload")
local F = ml.nn.F
local H = require("models_helpers")

-- The float weight the int8 values and scales stand for.
local function dequantize(q, scales)
   local N, K = q:size(1), q:size(2)
   return (q:to("float32"):view(N, K / 32, 32) * scales:view(N, K / 32, 1)):view(N, K)
end

local function rel(a, b) return ((a - b):abs():max() / b:abs():max()):item() end

describe("int8 linear layers", function()
   it("rounds each weight to within half its block's scale, the scale being max |w| / 127", function()
      ml.manual_seed(1)
      local w = ml.randn(7, 96)
      w[3][5] = 0
      local q, s = F.quantize_q8(w)
      assert.are.equal("int8", q.dtype)
      assert.are.same({ 7, 3 }, s.shape)
      local err = (dequantize(q, s) - w):abs():view(7, 3, 32):max(3)
      assert.are.equal(21, err:le(s / 2 + 1e-7):sum():item())
      assert.is_true(ml.equal(s, w:abs():view(7, 3, 32):max(3) / 127))
      assert.are.equal(127, q:abs():max():item())
      -- a block of zeros: scale 0, values 0
      local z, zs = F.quantize_q8(ml.zeros(1, 32))
      assert.are.equal(0, zs:item())
      assert.are.equal(0, z:abs():max():item())
   end)

   it("multiplies as float32 with the dequantized weight, decoding rows and GEMM rows alike", function()
      ml.manual_seed(2)
      -- up to 16 rows widen in registers (8 at a time), more go through float32 panels of 256 columns
      for _, c in ipairs({ { 1, 32, 1 }, { 3, 96, 7 }, { 4, 64, 70 }, { 5, 64, 300 }, { 17, 96, 513 } }) do
         local M, K, N = c[1], c[2], c[3]
         local w, x, b = ml.randn(N, K), ml.randn(2, M, K), ml.randn(N)
         local q, s = F.quantize_q8(w)
         local want = F.linear(x, dequantize(q, s), b)
         local got = F.q8_linear(x, q, s, b)
         assert.are.same(want.shape, got.shape)
         assert.is_true(rel(got, want) < 1e-5, table.concat(c, "x"))
         assert.is_true(rel(F.q8_linear(x, q, s), F.linear(x, dequantize(q, s))) < 1e-5)
         -- bfloat16 inputs give bfloat16 outputs
         local gb = F.q8_linear(x:to("bfloat16"), q, s, b)
         assert.are.equal("bfloat16", gb.dtype)
         assert.is_true(rel(gb:to("float32"), want) < 0.03)
         -- a strided input
         local xt = ml.randn(K, M):t()
         assert.is_true(rel(F.q8_linear(xt, q, s), F.linear(xt, dequantize(q, s))) < 1e-5)
      end
   end)

   it("names what does not fit", function()
      local q, s = F.quantize_q8(ml.randn(4, 64))
      local cases = {
         { function() F.quantize_q8(ml.randn(4, 40)) end, "quantize_q8: in_features 40 is not a multiple of 32" },
         { function() F.quantize_q8(ml.ones(4, 32, { dtype = "int64" })) end, "quantize_q8: expected a 2-D floating weight" },
         { function() F.q8_linear(ml.randn(2, 32), q, s) end, "q8_linear: input float32 [2, 32] does not match weight of shape [4, 64]" },
         { function() F.q8_linear(ml.randn(2, 64), q, ml.ones(4, 3)) end, "q8_linear: scales of shape [4, 3] do not go with an int8 weight of shape [4, 64]" },
         { function() F.q8_linear(ml.randn(2, 64), q:to("float32"), s) end, "q8_linear: the weight must be a contiguous 2-D int8 tensor" },
         { function() F.q8_linear(ml.randn(2, 64), q, s, ml.ones(5)) end, "q8_linear: bias of shape [5] does not match out_features 4" },
         { function() ml.nn.QuantizedLinear(40, 4) end, "QuantizedLinear: in_features must be a positive multiple of 32, got 40" },
      }
      for _, c in ipairs(cases) do
         local ok, err = pcall(c[1])
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[2], 1, true), tostring(err))
      end
   end)

   it("makes a QuantizedLinear from a Linear and from GPT-2's Conv1D", function()
      ml.manual_seed(3)
      local x = ml.randn(3, 64)
      local lin = ml.nn.Linear(64, 10)
      local ql = ml.nn.QuantizedLinear.from_float(lin)
      assert.is_true(rel(ql(x), lin(x)) < 0.02)
      assert.are.equal(lin.bias, ql.bias)
      assert.are.equal("QuantizedLinear(in_features=64, out_features=10, bias=True, int8 in blocks of 32)", tostring(ql))
      local sd = ql:state_dict()
      assert.are.equal("int8", sd.weight.dtype)
      assert.are.same({ 10, 2 }, sd.weight_scale.shape)
      local conv = ml.nn.Conv1D(10, 64)
      local qc = ml.nn.QuantizedLinear.from_float(conv)
      assert.are.same({ 10, 64 }, qc.weight.shape)
      assert.is_true(rel(qc(x), conv(x)) < 0.02)
   end)
end)

describe("ml.quantize", function()
   H.collect_warnings()         -- (dispatching with disk offload warns of weights on meta)
   it("turns a model's linear layers into int8 ones, close to the float model", function()
      local model = ml.models.from_pretrained("tests/fixtures/models/llama_tiny_untied")
      local P, mask = H.padded_prompts(model, 3, 10)
      local ids = ml.tensor(P, { dtype = "int64" })
      local want = model(ids, { attention_mask = mask })
      local _, report = ml.quantize(model)
      assert.are.equal(15, #report.quantized)       -- 7 per layer and the head
      assert.are.same({}, report.skipped)
      assert.are.equal(86528, report.bytes_before)
      assert.are.equal(86528 / 4 + 86528 / 32, report.bytes_after)
      assert.are.equal("QuantizedLinear", model.model.layers[1].mlp.down_proj.__name)
      local got = model(ids, { attention_mask = mask })
      -- each weight moves by at most half a scale (1/254 of its block's largest); through two
      -- layers of a tiny random model that is a few percent of the largest logit
      assert.is_true(rel(got, want) < 0.1)
      local agree = got:argmax(3):eq(want:argmax(3)):sum():item()
      assert.is_true(agree >= 27, agree .. " of 30 top tokens agree")
      -- generation runs on the int8 layers
      assert.are.equal(13, #model:generate({ 5, 17, 42 }, { max_new_tokens = 10 }))
      -- in bfloat16 the scales stay float32, the int8 weights int8
      model:to("bfloat16")
      assert.are.equal("float32", model.model.layers[1].mlp.down_proj.weight_scale.dtype)
      assert.are.equal("int8", model.model.layers[1].mlp.down_proj.weight.dtype)
      assert.is_true(rel(model(ids, { attention_mask = mask }):to("float32"), want) < 0.15)
   end)

   it("leaves tied, skipped, offloaded and odd-sized layers in floats, saying why", function()
      local tied = ml.models.from_pretrained("tests/fixtures/models/gpt2_tiny")
      local _, report = ml.quantize(tied, { skip = { "%.c_proj$" } })
      assert.are.equal("tied to transformer.wte.weight", report.skipped.lm_head)
      assert.are.equal('matches skip pattern "%.c_proj$"', report.skipped["transformer.h.0.attn.c_proj"])
      assert.are.equal("Conv1D", tied.transformer.h[1].mlp.c_proj.__name)
      assert.are.equal("QuantizedLinear", tied.transformer.h[1].mlp.c_fc.__name)
      local phi = ml.models.from_pretrained("tests/fixtures/models/phi_tiny")
      _, report = ml.quantize(phi)
      assert.are.equal("in_features 40 is not a multiple of 32", report.skipped.lm_head)
      local dir = H.tmpdir()
      local offloaded = ml.models.from_pretrained("tests/fixtures/models/llama_tiny_untied", {
         device_map = { ["model.embed_tokens"] = "cpu", ["model.layers.0"] = "disk", ["model.layers.1"] = "cpu",
            ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" }, offload_folder = dir })
      _, report = ml.quantize(offloaded)
      assert.are.equal("offloaded to disk (give offload_folder to write its quantized weights there)",
         report.skipped["model.layers.0.self_attn.q_proj"])
      assert.are.equal("QuantizedLinear", offloaded.model.layers[2].self_attn.q_proj.__name)
      H.rmdir(dir)
      assert.has_error(function() ml.quantize(phi, { bits = 4 }) end, 'quantize: unknown option "bits" (expected dtype, skip, offload_folder, embeddings)')
      local ok, err = pcall(ml.quantize, phi, { skip = { "mlp[" } })
      assert.is_false(ok)
      assert.truthy(err:find('quantize: skip pattern "mlp[": malformed pattern', 1, true), err)
      assert.has_error(function() ml.quantize(phi, { skip = { 3 } }) end, "quantize: skip patterns must be Lua patterns (strings), got number")
      assert.has_error(function() ml.quantize(phi, { offload_folder = 3 }) end, "quantize: offload_folder must be a folder path, got number")
   end)

   it("plans a device map with int8 sizes, so what fits in RAM as int8 stays there", function()
      local fixture = "tests/fixtures/models/llama_tiny_untied"
      local plain = ml.models.from_pretrained(fixture)
      local dir = H.tmpdir()
      -- the model is 99984 bytes in float32; its 15 linear layers 86528, as int8 24336
      local floats = ml.models.from_pretrained(fixture, { device_map = "auto", max_memory = { cpu = 80000 }, offload_folder = dir })
      local int8 = ml.models.from_pretrained(fixture, { device_map = "auto", max_memory = { cpu = 80000 }, offload_folder = dir,
         quantize = "int8" })
      local on_disk = 0
      for _, d in pairs(floats.hf_device_map) do if d == "disk" then on_disk = on_disk + 1 end end
      assert.is_true(on_disk > 0)
      for name, d in pairs(int8.hf_device_map) do assert.are.equal("cpu", d, name) end
      local n = 0
      for _, m in ipairs(int8:modules_list()) do if m.__name == "QuantizedLinear" then n = n + 1 end end
      assert.are.equal(15, n)
      local ids = ml.tensor({ { 5, 17, 42, 3 } }, { dtype = "int64" })
      assert.is_true(rel(int8(ids), plain(ids)) < 0.1)
      -- a layer is planned at its int8 weights and their scales ("q8": 36 bytes per 32), which is
      -- what the quantized layer holds
      local skeleton = ml.init_empty_weights(function() return ml.models.from_config(fixture .. "/config.json") end)
      local planned = ml.utils.compute_module_sizes(skeleton, { special_dtypes = {
         ["model.layers.0.mlp.down_proj.weight"] = "q8" } })["model.layers.0.mlp.down_proj"]
      assert.are.equal(ml.utils.compute_module_sizes(int8)["model.layers.0.mlp.down_proj"], planned)
      assert.are.equal(1.125, ml.utils.dtype_byte_size("q8"))
      H.rmdir(dir)
   end)

   it("writes the int8 weights of disk-offloaded layers to the offload folder and reads them from there", function()
      local fixture = "tests/fixtures/models/llama_tiny_untied"
      local plain = ml.models.from_pretrained(fixture)
      local dir = H.tmpdir()
      local model = ml.models.from_pretrained(fixture, { offload_folder = dir, quantize = "int8", device_map = {
         ["model.embed_tokens"] = "cpu", ["model.layers.0"] = "disk", ["model.layers.1"] = "cpu",
         ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" } })
      local down = model.model.layers[1].mlp.down_proj
      assert.are.equal("QuantizedLinear", down.__name)
      assert.is_true(down.weight:is_meta())                  -- materialized by its hook at each forward
      local f = ml.safetensors.load_file(dir .. "/model.layers.0.mlp.down_proj.q8.safetensors")
      assert.are.equal("int8", f.weight.dtype)
      assert.are.same({ 32, 2 }, f.weight_scale.shape)
      local ids = ml.tensor({ { 5, 17, 42, 3 } }, { dtype = "int64" })
      local before = require("moonload.hooks").runtime_stats()
      local logits = model(ids)
      local after = require("moonload.hooks").runtime_stats()
      assert.is_true(rel(logits, plain(ids)) < 0.1)
      -- the disk layer hands out its 9216 int8 weights, their 1152 bytes of scales and its two
      -- float32 norms: 10624 bytes, where float32 weights were 37120
      assert.are.equal(9216 + 1152 + 2 * 32 * 4, after.bytes_viewed - before.bytes_viewed)
      H.rmdir(dir)
   end)

   it("uses an int8 file of the offload folder again while its checkpoint is the same", function()
      local fixture = H.tmpdir()
      for _, f in ipairs({ "config.json", "model.safetensors.index.json", "model-00001-of-00003.safetensors",
                           "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors" }) do
         H.copy("tests/fixtures/models/llama_tiny_untied/" .. f, fixture .. "/" .. f)
      end
      local folder = H.tmpdir()
      local map = { ["model.embed_tokens"] = "cpu", ["model.layers.0"] = "disk", ["model.layers.1"] = "cpu",
         ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" }
      local function load()
         local model = ml.models.from_pretrained(fixture, { device_map = map, offload_folder = folder })
         local _, report = ml.quantize(model, { offload_folder = folder })
         return model, report
      end
      local first, r1 = load()
      assert.are.equal(0, #r1.reused)
      local file = folder .. "/model.layers.0.mlp.up_proj.q8.safetensors"
      local meta = ml.safetensors.safe_open(file):metadata()
      assert.truthy(meta.source:find("model-0000", 1, true), meta.source)
      local second, r2 = load()
      assert.are.equal(7, #r2.reused)               -- the disk layer's linear layers, read as written
      local ids = ml.tensor({ { 5, 17, 42, 3 } }, { dtype = "int64" })
      assert.is_true(ml.equal(first(ids), second(ids)))
      -- a checkpoint written again (its modification time moves): quantized again
      for i = 1, 3 do
         os.execute(string.format("sleep 0.01; touch '%s/model-%05d-of-00003.safetensors'", fixture, i))
      end
      local _, r3 = load()
      assert.are.equal(0, #r3.reused)
      H.rmdir(fixture)
      H.rmdir(folder)
   end)

   it("is from_pretrained's quantize = \"int8\"", function()
      local model = ml.models.from_pretrained("tests/fixtures/models/qwen3_tiny", { quantize = "int8" })
      assert.are.equal("QuantizedLinear", model.model.layers[1].self_attn.q_proj.__name)
      local ok, err = pcall(ml.models.from_pretrained, "tests/fixtures/models/qwen3_tiny", { quantize = "int2" })
      assert.is_false(ok)
      assert.truthy(err:find('from_pretrained: quantize must be "int8" or "int4", got int2', 1, true), err)
      -- load_checkpoint_and_dispatch checks it before loading, whatever the map
      local skeleton = ml.init_empty_weights(function() return ml.models.from_config("tests/fixtures/models/qwen3_tiny/config.json") end)
      ok, err = pcall(ml.load_checkpoint_and_dispatch, skeleton, "tests/fixtures/models/qwen3_tiny", { quantize = 8 })
      assert.is_false(ok)
      assert.truthy(err:find('load_checkpoint_and_dispatch: quantize must be "int8" or "int4", got 8', 1, true), err)
      assert.is_true(skeleton.lm_head.weight:is_meta())
   end)
end)

describe("int8 weights on cuda #cuda", function()
   local DEV = "cuda:0"

   it("quantizes on the device to the CPU's bytes, from any floating dtype and strides", function()
      ml.manual_seed(4)
      local w = ml.randn(9, 128)
      w[{ 2, { 33, 64 } }] = 0                                   -- a block of zeros: scale 0
      for _, c in ipairs({ { w, "float32" }, { w:to("bfloat16"), "bfloat16" }, { ml.randn(128, 9):t(), "transposed" } }) do
         local q, s = F.quantize_q8(c[1])
         local qd, sd = F.quantize_q8(c[1]:to(DEV))
         assert.are.equal(DEV, qd.device)
         assert.are.equal(DEV, sd.device)
         assert.is_true(ml.equal(qd:cpu(), q), c[2])
         assert.is_true(ml.equal(sd:cpu(), s), c[2])
      end
   end)

   it("multiplies on the device as the CPU does, decoding rows and GEMM rows alike", function()
      ml.manual_seed(5)
      -- up to 8 rows read the int8 bytes in a block per four columns (K = 4160: past one step of
      -- the block's 4096 values); more widen the weight for cuBLAS
      for _, c in ipairs({ { 1, 32, 1 }, { 3, 96, 7 }, { 2, 1056, 5 }, { 8, 160, 70 }, { 1, 4160, 6 }, { 9, 64, 33 },
                           { 17, 96, 130 } }) do
         local M, K, N = c[1], c[2], c[3]
         local w, x, b = ml.randn(N, K), ml.randn(2, M, K), ml.randn(N)
         local q, s = F.quantize_q8(w)
         local qd, sd, xd, bd = q:to(DEV), s:to(DEV), x:to(DEV), b:to(DEV)
         local want = F.q8_linear(x, q, s, b)
         local got = F.q8_linear(xd, qd, sd, bd)
         assert.are.equal(DEV, got.device)
         assert.is_true(rel(got:cpu(), want) < 1e-5, table.concat(c, "x"))
         assert.is_true(rel(F.q8_linear(xd, qd, sd):cpu(), F.q8_linear(x, q, s)) < 1e-5)
         local gb = F.q8_linear(xd:to("bfloat16"), qd, sd, bd)
         assert.are.equal("bfloat16", gb.dtype)
         assert.is_true(rel(gb:cpu():to("float32"), want) < 0.03)
         local xt = ml.randn(K, M):t()
         assert.is_true(rel(F.q8_linear(xt:to(DEV), qd, sd):cpu(), F.q8_linear(xt, q, s)) < 1e-5)
         local xh = x:to("float16")
         assert.is_true(rel(F.q8_linear(xh:to(DEV), qd, sd, bd):cpu():to("float32"), F.q8_linear(xh, q, s, b)) < 2e-3)
      end
      -- activations that start off a 16-byte boundary (one element into their storage) take the
      -- element loads
      local w2, x2 = ml.randn(6, 64), ml.randn(2 * 64 + 1)
      local q2, s2 = F.quantize_q8(w2)
      local xoff = x2:to(DEV):narrow(1, 2, 2 * 64):view(2, 64)
      assert.is_true(rel(F.q8_linear(xoff, q2:to(DEV), s2:to(DEV)):cpu(), F.q8_linear(x2:narrow(1, 2, 128):view(2, 64), q2, s2))
         < 1e-5)
      -- a weight whose bytes start off a 16-byte boundary (a view one byte into its storage)
      local w = ml.randn(5, 64)
      local q, s = F.quantize_q8(w)
      local flat = ml.zeros(5 * 64 + 1, { dtype = "int8", device = DEV })
      local shifted = flat:narrow(1, 2, 5 * 64):view(5, 64)
      shifted:copy_(q:to(DEV))
      local x = ml.randn(2, 64)
      assert.is_true(rel(F.q8_linear(x:to(DEV), shifted, s:to(DEV)):cpu(), F.q8_linear(x, q, s)) < 1e-5)
   end)

   it("names the operand on another device", function()
      local q, s = F.quantize_q8(ml.randn(4, 64))
      local ok, err = pcall(F.q8_linear, ml.randn(2, 64):to(DEV), q, s)
      assert.is_false(ok)
      assert.truthy(err:find("q8_linear: the input is on cuda:0 but the weight is on cpu", 1, true), err)
      ok, err = pcall(F.q8_linear, ml.randn(2, 64):to(DEV), q:to(DEV), s)
      assert.is_false(ok)
      assert.truthy(err:find("q8_linear: the input is on cuda:0 but the scales is on cpu", 1, true), err)
   end)

   local fixture = "tests/fixtures/models/llama_tiny_untied"
   local ids = ml.tensor({ { 5, 17, 42, 3, 8, 1 } }, { dtype = "int64" })
   local hooks = require("moonload.hooks")
   local function settle() collectgarbage(); collectgarbage() end

   it("loads int8 over cuda:0 + cpu + disk: quantized on the CPU before moving, the rest streamed as int8", function()
      local cpu_model = ml.models.from_pretrained(fixture, { quantize = "int8" })
      local want = cpu_model(ids)
      local want_tokens = cpu_model:generate({ 5, 17, 42 }, { max_new_tokens = 6 })
      local folder = H.tmpdir()
      settle()
      ml.reset_peak_memory(DEV)
      local base = ml.memory_allocated(DEV)
      local model = ml.models.from_pretrained(fixture, { quantize = "int8", offload_folder = folder, device_map = {
         ["model.embed_tokens"] = 0, ["model.layers.0"] = 0, ["model.layers.1"] = "cpu", ["model.norm"] = 0,
         ["model.rotary_emb"] = 0, lm_head = "disk" } })
      local _, peak = ml.memory_allocated(DEV)
      -- on cuda:0: the embedding (8192 bytes), the norms, layer 0's 7 linear layers in int8 (10368
      -- bytes with their scales); their float32 weights (36864 bytes) were never there
      local on_gpu = model.model.layers[1].self_attn.q_proj
      assert.are.equal("QuantizedLinear", on_gpu.__name)
      assert.are.equal(DEV, on_gpu.weight.device)
      assert.is_true(peak - base < 8192 + 36864, "peak " .. (peak - base))
      -- layer 1 is streamed from int8 weights in CPU memory, lm_head from the offload folder
      local streamed = model.model.layers[2].mlp.up_proj
      assert.are.equal("QuantizedLinear", streamed.__name)
      local wm = hooks.weights_map_get(rawget(streamed, "_hf_hook").weights_map, "weight")
      assert.are.equal("int8", wm.dtype)
      assert.are.equal("cpu", wm.device)
      assert.are.equal("QuantizedLinear", model.lm_head.__name)
      assert.truthy(io.open(folder .. "/lm_head.q8.safetensors"))
      local before = hooks.runtime_stats()
      local got = model(ids)
      local after = hooks.runtime_stats()
      assert.is_true(rel(got:cpu(), want) < 1e-4)
      -- moved per forward: layer 1's int8 weights, scales and norms (9216 + 1152 + 256), lm_head's
      -- (3200 + 400): 14224 bytes, where float32 weights were 37120 + 12800
      assert.are.equal(9216 + 1152 + 256 + 3200 + 400, (after.bytes_copied + after.bytes_viewed)
         - (before.bytes_copied + before.bytes_viewed))
      assert.are.same(want_tokens, model:generate({ 5, 17, 42 }, { max_new_tokens = 6 }))
      H.rmdir(folder)
   end)

   it("quantizes before moving to the GPU also when the checkpoint's names are mapped (Gemma 3 multimodal)", function()
      local dir = "tests/fixtures/models/gemma3_multimodal_tiny"
      local want = ml.models.from_pretrained(dir, { quantize = "int8" })(ids)
      local floats = 0
      for _, p in ml.models.from_pretrained(dir):named_parameters() do floats = floats + p:nbytes() end
      settle()
      ml.reset_peak_memory(DEV)
      local base = ml.memory_allocated(DEV)
      local model = ml.models.from_pretrained(dir, { quantize = "int8", device_map = "auto", max_memory = { [0] = 10 ^ 8 } })
      local _, peak = ml.memory_allocated(DEV)
      assert.is_true(peak - base < floats / 2, string.format("peak %d of %d float bytes", peak - base, floats))
      assert.is_true(rel(model(ids):cpu(), want) < 1e-4)
   end)

   it("plans int8 sizes on a GPU budget, so more of the model fits there", function()
      local function on_gpu(opts)
         local folder = H.tmpdir()
         opts.offload_folder, opts.device_map, opts.max_memory = folder, "auto", { [0] = 40000, cpu = 10 ^ 9 }
         local model = ml.models.from_pretrained(fixture, opts)
         local n = 0
         for _, d in pairs(model.hf_device_map) do if d == 0 then n = n + 1 end end
         H.rmdir(folder)
         return n, model
      end
      local floats = on_gpu({})
      local n, int8 = on_gpu({ quantize = "int8" })
      assert.is_true(n > floats, n .. " entries on cuda:0 in int8, " .. floats .. " in floats")
      assert.is_true(rel(int8(ids):cpu(), ml.models.from_pretrained(fixture, { quantize = "int8" })(ids)) < 1e-4)
   end)

   it("quantizes a model on the device in place, and one streamed by cpu_offload into CPU memory", function()
      local want = ml.models.from_pretrained(fixture, { quantize = "int8" })(ids)
      local resident = ml.models.from_pretrained(fixture):to(DEV)
      local _, report = ml.quantize(resident)
      assert.are.equal(15, #report.quantized)
      assert.are.equal(DEV, resident.lm_head.weight.device)
      assert.is_true(rel(resident(ids:to(DEV)):cpu(), want) < 1e-4)
      local streamed = ml.models.from_pretrained(fixture)
      ml.cpu_offload(streamed, { execution_device = DEV })
      local function moved()
         local before = hooks.runtime_stats()
         local out = streamed(ids)
         local after = hooks.runtime_stats()
         return out, (after.bytes_copied + after.bytes_viewed) - (before.bytes_copied + before.bytes_viewed)
      end
      local _, float_bytes = moved()
      _, report = ml.quantize(streamed)
      assert.are.equal(15, #report.quantized)
      local got, int8_bytes = moved()
      assert.is_true(rel(got:cpu(), want) < 1e-4)
      -- the linear layers move 21632 int8 bytes and 2704 of scales instead of 86528
      assert.are.equal(float_bytes - 86528 + 21632 + 2704, int8_bytes)
   end)

   it("moves a QuantizedLinear to the device with its module", function()
      ml.manual_seed(6)
      local lin = ml.nn.Linear(64, 12)
      local ql = ml.nn.QuantizedLinear.from_float(lin)
      local x = ml.randn(3, 64)
      local want = ql(x)
      ql:to(DEV)
      assert.are.equal("int8", ql.weight.dtype)
      assert.are.equal(DEV, ql.weight_scale.device)
      assert.is_true(rel(ql(x:to(DEV)):cpu(), want) < 1e-5)
   end)
end)
