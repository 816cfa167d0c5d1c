-- int4 weights (core/src/cpu/q8.c's Q4_0 layout, nn.QuantizedLinear bits 4, ml.quantize dtype
-- "int4"): the bytes against a Lua reading of the layout, the kernels against float products with
-- the weights those bytes stand for, whole models against float models holding the same weights,
-- planning, offloading, saving, and the GPU kernels against the CPU's.
local ml = require("moonload")
local F = ml.nn.F
local H = require("models_helpers")
local bit = require("bit")

local fixture = "tests/fixtures/models/llama_tiny_untied"

-- The float weight int4 values and scales stand for, read from the bytes here: in each block of
-- 32, byte j holds value j in its low nibble and value j + 16 in its high one, stored + 8.
local function unpack_q4(q, scales)
   local N, half = q:size(1), q:size(2)
   local bytes, sc = q:tolist(), scales:tolist()
   local rows = {}
   for n = 1, N do
      local row = {}
      for blk = 0, half / 16 - 1 do
         local s = sc[n][blk + 1]
         for j = 1, 16 do
            local b = bytes[n][blk * 16 + j]
            row[blk * 32 + j] = (bit.band(b, 15) - 8) * s
            row[blk * 32 + 16 + j] = (bit.rshift(b, 4) - 8) * s
         end
      end
      rows[n] = row
   end
   return ml.tensor(rows)
end

local function rel(a, b) return ((a - b):abs():max() / b:abs():max()):item() end

describe("int4 linear layers", function()
   it("stores two values a byte in Q4_0's order, the block's largest magnitude exact as -8 scales", function()
      ml.manual_seed(11)
      local w = ml.randn(5, 64)
      w[2][1] = 5                    -- a block whose largest magnitude is positive
      w[3][40] = -6                  -- and one where it is negative
      local q, s = F.quantize_q4(w)
      assert.are.equal("uint8", q.dtype)
      assert.are.same({ 5, 32 }, q.shape)
      assert.are.same({ 5, 2 }, s.shape)
      local deq = unpack_q4(q, s)
      assert.is_true(ml.equal(F.dequantize_q4(q, s), deq))
      -- the scale is the largest-magnitude value / -8, so that value comes back exactly
      local sl, dl = s:tolist(), deq:tolist()
      assert.are.equal(5 / -8, sl[2][1])
      assert.are.equal(6 / 8, sl[3][2])
      assert.are.equal(5, dl[2][1])
      assert.are.equal(-6, dl[3][40])
      -- the others round to the nearest step (within half a scale), or clamp at 7 steps (within one)
      local err = (deq - w):abs():view(5, 2, 32)
      local step = s:abs():view(5, 2, 1)
      assert.are.equal(320, err:le(step + 1e-6):sum():item())
      local within_half = err:le(step / 2 + 1e-6):sum():item()
      assert.is_true(within_half >= 300, within_half .. " of 320 within half a step")
      -- a block of zeros: values 8 (zero), scale 0
      local z, zs = F.quantize_q4(ml.zeros(1, 32))
      assert.are.equal(0, zs:abs():item())
      assert.is_true(ml.equal(z, ml.full({ 1, 16 }, 0x88, { dtype = "uint8" })))
      -- float16, bfloat16 and strided (transposed) weights give the bytes of their float32 values
      local wt = ml.randn(64, 6):t()
      local qa, sa = F.quantize_q4(wt)
      local qb, sb = F.quantize_q4(wt:contiguous())
      assert.is_true(ml.equal(qa, qb) and ml.equal(sa, sb))
      local wb = w:to("bfloat16")
      local qc, sc = F.quantize_q4(wb)
      local qd, sd = F.quantize_q4(wb:to("float32"))
      assert.is_true(ml.equal(qc, qd) and ml.equal(sc, sd))
      assert.is_true(ml.equal(F.dequantize_q4(q, s, "bfloat16"), deq:to("bfloat16")))
   end)

   it("multiplies as float32 with the weight its bytes stand for, decoding rows and GEMM rows alike", function()
      ml.manual_seed(12)
      for _, c in ipairs({ { 1, 32, 1 }, { 3, 96, 7 }, { 4, 64, 70 }, { 5, 64, 300 }, { 17, 96, 513 } }) do
         local M, K, N = c[1], c[2], c[3]
         local w, x, b = ml.randn(N, K), ml.randn(2, M, K), ml.randn(N)
         local q, s = F.quantize_q4(w)
         local deq = unpack_q4(q, s)
         local want = F.linear(x, deq, b)
         local got = F.q4_linear(x, q, s, b)
         assert.are.same(want.shape, got.shape)
         assert.is_true(rel(got, want) < 1e-5, table.concat(c, "x"))
         assert.is_true(rel(F.q4_linear(x, q, s), F.linear(x, deq)) < 1e-5)
         local gb = F.q4_linear(x:to("bfloat16"), q, s, b)
         assert.are.equal("bfloat16", gb.dtype)
         assert.is_true(rel(gb:to("float32"), want) < 0.03)
         local xt = ml.randn(K, M):t()
         assert.is_true(rel(F.q4_linear(xt, q, s), F.linear(xt, deq)) < 1e-5)
      end
   end)

   it("names what does not fit", function()
      local q, s = F.quantize_q4(ml.randn(4, 64))
      local cases = {
         { function() F.quantize_q4(ml.randn(4, 40)) end, "quantize_q4: in_features 40 is not a multiple of 32" },
         { function() F.quantize_q4(ml.ones(4, 32, { dtype = "int64" })) end, "quantize_q4: expected a 2-D floating weight" },
         { function() F.q4_linear(ml.randn(2, 32), q, s) end, "q4_linear: input float32 [2, 32] does not match weight of shape [4, 32] (in_features 64)" },
         { function() F.q4_linear(ml.randn(2, 64), q, ml.ones(4, 3)) end, "q4_linear: scales of shape [4, 3] do not go with an int4 weight of shape [4, 32]" },
         { function() F.q4_linear(ml.randn(2, 64), q:to("int8"), s) end, "q4_linear: the weight must be a contiguous 2-D uint8 tensor (two int4 values a byte), got int8" },
         { function() F.q4_linear(ml.randn(2, 64), q, s, ml.ones(5)) end, "q4_linear: bias of shape [5] does not match out_features 4" },
         { function() F.dequantize_q4(q, ml.ones(4, 3)) end, "dequantize_q4: int4 values uint8 [4, 32] and scales float32 [4, 3] do not go together" },
         { function() F.dequantize_q4(q, s, "int8") end, "dequantize_q4: the output dtype must be float32, float16 or bfloat16, got int8" },
         { function() ml.nn.QuantizedLinear(64, 4, { bits = 3 }) end, "QuantizedLinear: bits must be 8 or 4, got 3" },
         { function() ml.quantize(ml.nn.Linear(64, 4), { dtype = "int3" }) end, 'quantize: dtype must be "int8" or "int4", got int3' },
      }
      for _, c in ipairs(cases) do
         local ok, err = pcall(c[1])
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[2], 1, true), tostring(err))
      end
   end)

   it("makes a 4-bit QuantizedLinear from a Linear and from GPT-2's Conv1D", function()
      ml.manual_seed(13)
      local x = ml.randn(3, 64)
      local lin = ml.nn.Linear(64, 10)
      local ql = ml.nn.QuantizedLinear.from_float(lin, 4)
      assert.is_true(rel(ql(x), F.linear(x, unpack_q4(ql.weight, ql.weight_scale), lin.bias)) < 1e-5)
      assert.are.equal("QuantizedLinear(in_features=64, out_features=10, bias=True, int4 in blocks of 32)", tostring(ql))
      local sd = ql:state_dict()
      assert.are.equal("uint8", sd.weight.dtype)
      assert.are.same({ 10, 32 }, sd.weight.shape)
      local conv = ml.nn.Conv1D(10, 64)
      local qc = ml.nn.QuantizedLinear.from_float(conv, 4)
      assert.are.same({ 10, 32 }, qc.weight.shape)
      assert.is_true(rel(qc(x), F.linear(x, unpack_q4(qc.weight, qc.weight_scale), conv.bias)) < 1e-5)
      -- a fresh layer computes zero (its values are the nibble 8) plus its bias
      local fresh = ml.nn.QuantizedLinear(32, 3, { bits = 4, bias = false })
      assert.are.equal(0, fresh(ml.randn(2, 32)):abs():max():item())
   end)
end)

describe("quantized embeddings", function()
   it("look up int8 and int4 rows widened to the model's dtype, the rows of the float table rounded", function()
      ml.manual_seed(15)
      local e = ml.nn.Embedding(50, 64)
      local ids = ml.tensor({ { 3, 0, 49 }, { 7, 7, 1 } }, { dtype = "int64" })
      for _, bits in ipairs({ 8, 4 }) do
         local q = ml.nn.QuantizedEmbedding.from_float(e, bits)
         local table_ = bits == 8 and F.dequantize_q8(q.weight, q.weight_scale) or unpack_q4(q.weight, q.weight_scale)
         local got = q(ids)
         assert.are.same({ 2, 3, 64 }, got.shape)
         assert.is_true(ml.equal(got, F.embedding(ids, table_)))
         assert.is_true(rel(got, e(ids)) < (bits == 8 and 0.01 or 0.2))
         q:to("bfloat16")
         assert.are.equal("bfloat16", q(ids).dtype)
         assert.are.equal("float32", q.weight_scale.dtype)
      end
      assert.has_error(function() ml.nn.QuantizedEmbedding(10, 40) end,
         "QuantizedEmbedding: embedding_dim must be a positive multiple of 32, got 40")
      local ok, err = pcall(ml.nn.QuantizedEmbedding.from_float(e, 4), ml.tensor({ 50 }, { dtype = "int64" }))
      assert.is_false(ok)
      assert.truthy(tostring(err):find("50", 1, true), tostring(err))
   end)

   it("ml.quantize {embeddings = true} quantizes the table once and ties the head to it; saved and loaded back", function()
      local tied = H.FIX .. "/llama_tiny_tied"
      local ids = ml.tensor({ { 1, 7, 9, 33, 51, 2, 80 } }, { dtype = "int64" })
      -- the embedding alone (linear layers skipped): a float model holding the rounded table
      -- computes the same
      local m = ml.models.from_pretrained(tied)
      local _, report = ml.quantize(m, { embeddings = true, skip = { "proj" } })
      assert.are.same({ "model.embed_tokens", "lm_head" }, report.quantized)
      assert.are.equal("QuantizedEmbedding", m.model.embed_tokens.__name)
      assert.is_true(rawequal(m.lm_head.weight, m.model.embed_tokens.weight))
      assert.are.equal(100 * 32 + 100 * 4, report.bytes_after)          -- the head adds no bytes
      local twin = ml.models.from_pretrained(tied)
      local table_ = F.dequantize_q8(m.model.embed_tokens.weight, m.model.embed_tokens.weight_scale)
      twin.model.embed_tokens.weight, twin.lm_head.weight = table_, table_
      assert.is_true(rel(m(ids), twin(ids)) < 1e-5)
      -- the whole model in int4, saved and loaded back (the head's tensors are written once)
      local q = ml.models.from_pretrained(tied, { quantize = "int4", quantize_embeddings = true })
      assert.are.equal("uint8", q.model.embed_tokens.weight.dtype)
      local out = H.tmpdir()
      ml.save_model(q, out)
      local back = ml.models.from_pretrained(out)
      assert.are.equal("QuantizedEmbedding", back.model.embed_tokens.__name)
      assert.are.equal("QuantizedLinear", back.lm_head.__name)
      assert.is_true(ml.equal(back(ids), q(ids)))
      H.rmdir(out)
      -- a table and its tied head offloaded to disk: the int4 table goes to the offload folder once,
      -- and both hooks hand out its tensors
      local folder = H.tmpdir()
      local on_disk = ml.models.from_pretrained(tied, { quantize = "int4", quantize_embeddings = true, offload_folder = folder,
         device_map = { ["model.embed_tokens"] = "disk", ["model.layers"] = "cpu", ["model.norm"] = "cpu",
            ["model.rotary_emb"] = "cpu", lm_head = "disk" } })
      assert.are.equal("QuantizedEmbedding", on_disk.model.embed_tokens.__name)
      assert.are.equal("QuantizedLinear", on_disk.lm_head.__name)
      assert.truthy(io.open(folder .. "/model.embed_tokens.q4.safetensors"))
      assert.is_nil(io.open(folder .. "/lm_head.q4.safetensors"))
      assert.is_true(ml.equal(on_disk(ids), q(ids)))
      H.rmdir(folder)
      -- without embeddings the tie keeps both in floats, as before
      local _, plain = ml.quantize(ml.models.from_pretrained(tied))
      assert.are.equal("tied to model.embed_tokens.weight", plain.skipped.lm_head)
      -- planned with the table's quantized size: a budget the float table does not fit
      local dir = H.tmpdir()
      local placed = ml.models.from_pretrained(tied, { device_map = "auto", max_memory = { cpu = 22000 },
         offload_folder = dir, quantize = "int4", quantize_embeddings = true })
      for name, d in pairs(placed.hf_device_map) do assert.are.equal("cpu", d, name) end
      H.rmdir(dir)
      assert.has_error(function() ml.models.from_pretrained(tied, { quantize_embeddings = true }) end,
         "from_pretrained: quantize_embeddings must be a boolean, with quantize set, got true")
   end)
end)

-- A float model whose linear weights are those the int4 model's bytes stand for.
local function float_twin(quantized)
   local twin = ml.models.from_pretrained(fixture)
   for _, e in ipairs(quantized:named_modules_list()) do
      if e[2].__name == "QuantizedLinear" then
         twin:get_submodule(e[1]).weight = unpack_q4(e[2].weight, e[2].weight_scale)
      end
   end
   return twin
end

describe("ml.quantize with dtype int4", function()
   H.collect_warnings()
   local ids = ml.tensor({ { 5, 17, 42, 3 }, { 9, 8, 7, 6 } }, { dtype = "int64" })

   it("turns a model's linear layers into int4 ones: an eighth of the float32 bytes, plus scales", function()
      local model = ml.models.from_pretrained(fixture)
      local _, report = ml.quantize(model, { dtype = "int4" })
      assert.are.equal(15, #report.quantized)
      assert.are.equal(86528, report.bytes_before)
      assert.are.equal(86528 / 8 + 86528 / 32, report.bytes_after)
      assert.are.equal(4, model.model.layers[1].mlp.down_proj.bits)
      -- the model computes what a float model with the weights its bytes stand for computes
      assert.is_true(rel(model(ids), float_twin(model)(ids)) < 1e-5)
      assert.are.equal(14, #model:generate({ 5, 17, 42, 3 }, { max_new_tokens = 10 }))
      -- from_pretrained's quantize = "int4" is the same model
      local loaded = ml.models.from_pretrained(fixture, { quantize = "int4" })
      assert.is_true(ml.equal(loaded(ids), model(ids)))
   end)

   it("plans with int4 sizes and writes disk layers' int4 weights to the offload folder", function()
      local plain = ml.models.from_pretrained(fixture)
      local dir = H.tmpdir()
      -- 86528 float32 bytes of linear layers: 24336 as int8, 13520 as int4 (with scales); the
      -- rest of the model 13456. A 30000-byte budget holds the model in int4, not in int8.
      local maps = {}
      for _, q in ipairs({ "int8", "int4" }) do
         local m = ml.models.from_pretrained(fixture, { device_map = "auto", max_memory = { cpu = 30000 },
            offload_folder = dir, quantize = q })
         local disk = 0
         for _, d in pairs(m.hf_device_map) do if d == "disk" then disk = disk + 1 end end
         maps[q] = disk
      end
      assert.is_true(maps.int8 > 0)
      assert.are.equal(0, maps.int4)
      assert.are.equal(0.625, ml.utils.dtype_byte_size("q4"))
      -- a disk layer's int4 weights come from <name>.q4.safetensors
      local model = ml.models.from_pretrained(fixture, { offload_folder = dir, quantize = "int4", device_map = {
         ["model.embed_tokens"] = "cpu", ["model.layers.0"] = "disk", ["model.layers.1"] = "cpu",
         ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" } })
      local f = ml.safetensors.load_file(dir .. "/model.layers.0.mlp.down_proj.q4.safetensors")
      assert.are.equal("uint8", f.weight.dtype)
      assert.are.same({ 32, 32 }, f.weight.shape)
      local before = require("moonload.hooks").runtime_stats()
      local got = model(ids)
      local after = require("moonload.hooks").runtime_stats()
      local in_memory = ml.models.from_pretrained(fixture, { quantize = "int4" })
      assert.is_true(rel(got, in_memory(ids)) < 1e-5)
      assert.is_true(rel(got, plain(ids)) < 1)
      -- the disk layer hands out 9216 weights in 4608 bytes, their 1152 bytes of scales and its
      -- two float32 norms
      assert.are.equal(4608 + 1152 + 2 * 32 * 4, after.bytes_viewed - before.bytes_viewed)
      H.rmdir(dir)
   end)

   it("saves int4 (and mixed int8 and int4) models that load back as they were", function()
      local model = ml.models.from_pretrained(fixture, { quantize = "int4" })
      local out = H.tmpdir()
      ml.save_model(model, out)
      local f = io.open(out .. "/config.json", "rb")
      local cfg = require("cjson").decode(f:read("*a"))
      f:close()
      assert.are.equal("moonload_q4", cfg.quantization_config.quant_method)
      assert.are.equal(4, cfg.quantization_config.bits)
      local back = ml.models.from_pretrained(out)
      assert.are.equal(4, back.lm_head.bits)
      assert.is_true(ml.equal(back(ids), model(ids)))
      -- the query projections in int8, the rest in int4: most layers are int4, the others listed
      local mixed = ml.models.from_pretrained(fixture)
      ml.quantize(mixed, { skip = { "mlp", "lm_head", "[kvo]_proj" } })
      ml.quantize(mixed, { dtype = "int4" })
      ml.save_model(mixed, out)
      f = io.open(out .. "/config.json", "rb")
      cfg = require("cjson").decode(f:read("*a"))
      f:close()
      assert.are.equal("moonload_q4", cfg.quantization_config.quant_method)
      assert.are.equal(8, cfg.quantization_config.bits_per_module["model.layers.0.self_attn.q_proj"])
      assert.is_nil(cfg.quantization_config.bits_per_module["model.layers.0.mlp.up_proj"])
      back = ml.models.from_pretrained(out)
      assert.are.equal(8, back.model.layers[1].self_attn.q_proj.bits)
      assert.are.equal(4, back.model.layers[1].self_attn.o_proj.bits)
      assert.are.equal(4, back.model.layers[1].mlp.gate_proj.bits)
      assert.is_true(ml.equal(back(ids), mixed(ids)))
      -- a width other than 8 or 4 is named
      cfg.quantization_config.bits_per_module["model.layers.0.self_attn.q_proj"] = 2
      f = io.open(out .. "/config.json", "wb")
      f:write(require("cjson").encode(cfg))
      f:close()
      local ok, err = pcall(ml.models.from_pretrained, out)
      assert.is_false(ok)
      assert.truthy(err:find('gives "model.layers.0.self_attn.q_proj" 2 bits (8 or 4)', 1, true), err)
      H.rmdir(out)
   end)
end)

describe("int4 weights on cuda #cuda", function()
   local cuda_fixture = fixture

   it("quantizes on the device to the CPU's bytes and multiplies as the CPU does", function()
      ml.manual_seed(14)
      for _, dt in ipairs({ "float32", "bfloat16", "float16" }) do
         local w = ml.randn(70, 96):to(dt)
         local q, s = F.quantize_q4(w)
         local qg, sg = F.quantize_q4(w:to("cuda:0"))
         assert.are.equal("cuda:0", qg.device)
         assert.is_true(ml.equal(qg:to("cpu"), q), dt)
         assert.is_true(ml.equal(sg:to("cpu"), s), dt)
         local wt = ml.randn(96, 70):t()
         local qt = F.quantize_q4(wt:to("cuda:0"))
         assert.is_true(ml.equal(qt:to("cpu"), (F.quantize_q4(wt))))
      end
      local w = ml.randn(300, 128)
      local q, s = F.quantize_q4(w)
      local qg, sg = q:to("cuda:0"), s:to("cuda:0")
      local b = ml.randn(300)
      assert.is_true(ml.equal(F.dequantize_q4(qg, sg):to("cpu"), F.dequantize_q4(q, s)))
      assert.is_true(ml.equal(F.dequantize_q4(qg, sg, "bfloat16"):to("cpu"), F.dequantize_q4(q, s, "bfloat16")))
      -- up to 8 rows: a block per four columns; more: widened for cuBLAS
      for _, M in ipairs({ 1, 5, 8, 9, 33 }) do
         local x = ml.randn(M, 128)
         local want = F.q4_linear(x, q, s, b)
         local got = F.q4_linear(x:to("cuda:0"), qg, sg, b:to("cuda:0"))
         assert.is_true(rel(got:to("cpu"), want) < 1e-5, "rows " .. M)
         local gb = F.q4_linear(x:to("bfloat16"):to("cuda:0"), qg, sg)
         assert.are.equal("bfloat16", gb.dtype)
         assert.is_true(rel(gb:to("cpu"):to("float32"), F.q4_linear(x, q, s)) < 0.03)
      end
      -- K = 8224: past one step of the block's 8192 values
      local wk = ml.randn(5, 8224)
      local qk, sk = F.quantize_q4(wk)
      local xk = ml.randn(3, 8224)
      assert.is_true(rel(F.q4_linear(xk:to("cuda:0"), qk:to("cuda:0"), sk:to("cuda:0")):to("cpu"), F.q4_linear(xk, qk, sk))
         < 1e-5)
      -- an unaligned weight view takes the byte loads
      local big = ml.zeros(301, 64, { dtype = "uint8" }):to("cuda:0")
      local view = big:narrow(1, 2, 300)
      view:copy_(qg)
      local x = ml.randn(2, 128)
      assert.is_true(rel(F.q4_linear(x:to("cuda:0"), view, sg):to("cpu"), F.q4_linear(x, q, s)) < 1e-5)
   end)

   it("loads int4 over cuda:0 + cpu + disk and gives the CPU model's logits", function()
      local ids = ml.tensor({ { 5, 17, 42, 3 } }, { dtype = "int64" })
      local want = ml.models.from_pretrained(cuda_fixture, { quantize = "int4" })(ids)
      local dir = H.tmpdir()
      local model = ml.models.from_pretrained(cuda_fixture, { quantize = "int4", offload_folder = dir, device_map = {
         ["model.embed_tokens"] = 0, ["model.layers.0"] = 0, ["model.layers.1"] = "cpu",
         ["model.norm"] = "disk", ["model.rotary_emb"] = 0, lm_head = "disk" } })
      assert.are.equal("uint8", model.model.layers[1].mlp.up_proj.weight.dtype)
      assert.are.equal("cuda:0", model.model.layers[1].mlp.up_proj.weight.device)
      assert.is_true(rel(model(ids:to("cuda:0")):to("cpu"), want) < 1e-4)
      H.rmdir(dir)
   end)
end)
