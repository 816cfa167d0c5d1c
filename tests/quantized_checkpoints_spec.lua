-- Checkpoints other quantizers wrote, read into moonload's quantized layers: compressed-tensors
-- (llm-compressor's int4 / int8 / FP8 models), AutoAWQ's and GPTQ's, against transformers or
-- compressed-tensors reading the same folders (tests/fixtures/gen_models.py compressed_tensors,
-- deepseek_v3_ct_int4, awq, gptq): the unpacking of int32 words and zero points, the layers built,
-- logits and greedy ids, placement over CPU and disk, saving back, scales in bfloat16, activation
-- scales dropped, and the schemes moonload cannot compute exactly, named.
local ml = require("moonload")
local F = require("moonload.nn.functional")
local models = require("moonload.models")
local cjson = require("cjson")
local H = require("models_helpers")

local TOL = 1e-4

-- A fresh folder holding a fixture's files, config.json edited by edit(cfg) and the tensors by
-- edit_tensors(sd) when given.
local function variant(fixture, edit, edit_tensors)
   local dir = H.tmpdir()
   local src = H.FIX .. "/" .. fixture
   local cfg = H.read_json(src .. "/config.json")
   if edit then edit(cfg) end
   H.write(dir .. "/config.json", cjson.encode(cfg))
   if edit_tensors then
      local sd = ml.safetensors.load_file(src .. "/model.safetensors")
      edit_tensors(sd)
      ml.safetensors.save_file(sd, dir .. "/model.safetensors")
   else
      H.copy(src .. "/model.safetensors", dir .. "/model.safetensors")
   end
   return dir
end

-- from_pretrained(dir) fails with an error holding msg; dir is removed.
local function fails(dir, msg)
   local ok, err = pcall(models.from_pretrained, dir)
   H.rmdir(dir)
   assert.is_false(ok)
   assert.truthy(tostring(err):find(msg, 1, true), err)
end

local function logits_of(model, exp)
   return model(ml.tensor(exp.input_ids, { dtype = "int64" }))
end

describe("F.unpack_int_words (compressed-tensors' pack-quantized words)", function()
   it("puts 4-bit values 2j and 2j + 1 of a row into llama.cpp's Q4_0 order", function()
      -- values 0..15, 0..15 (stored + 8: the nibbles themselves), little-endian in their words
      local words = ml.tensor({ { 0x76543210, 0xfedcba98 - 2 ^ 32, 0x76543210, 0xfedcba98 - 2 ^ 32 } }, { dtype = "int32" })
      local q = F.unpack_int_words(words, 4)
      assert.are.equal("uint8", q.dtype)
      assert.are.same({ 1, 16 }, q.shape)
      local want = {}
      for j = 0, 15 do want[j + 1] = j + 16 * j end   -- value j low, value j + 16 high
      assert.are.same({ want }, q:to("int32"):tolist())
      -- the same integers: dequantized with unit scales they are the values - 8
      local w = F.dequantize_q4(q, ml.ones(1, 1)):tolist()[1]
      for k = 1, 32 do assert.are.equal((k - 1) % 16 - 8, w[k]) end
   end)

   it("turns 8-bit values stored + 128 into int8, over leading dims", function()
      local words = ml.tensor({ { { 0x807f0100 - 2 ^ 32 } }, { { 0x00ff8001 } } }, { dtype = "int32" })
      local q = F.unpack_int_words(words, 8)
      assert.are.equal("int8", q.dtype)
      assert.are.same({ { { -128, -127, -1, 0 } }, { { -127, 0, 127, -128 } } }, q:to("int32"):tolist())
   end)

   it("gives raw values in order, or AutoAWQ's, and subtracts zero points into int4 or int8", function()
      local words = ml.tensor({ { 0x76543210 } }, { dtype = "int32" })
      assert.are.same({ { 0, 1, 2, 3, 4, 5, 6, 7 } }, F.int_words_values(words, 4):to("int32"):tolist())
      assert.are.same({ { 0, 4, 1, 5, 2, 6, 3, 7 } }, F.int_words_values(words, 4, { order = "awq" }):to("int32"):tolist())
      assert.are.same({ { 0x10, 0x32, 0x54, 0x76 } }, F.int_words_values(words, 8):to("int32"):tolist())
      -- two words of 4 bytes, packed along the rows (GPTQ's qweight) or the columns, as they are or turned
      local two = ml.tensor({ { 0x04030201, 0x08070605 } }, { dtype = "int32" })
      assert.are.same({ { 1, 5 }, { 2, 6 }, { 3, 7 }, { 4, 8 } }, F.int_words_values(two, 8, { along = "rows" }):to("int32"):tolist())
      assert.are.same({ { 1, 2, 3, 4 }, { 5, 6, 7, 8 } },
         F.int_words_values(two, 8, { along = "rows", transpose = true }):to("int32"):tolist())
      assert.are.same({ { 1 }, { 2 }, { 3 }, { 4 }, { 5 }, { 6 }, { 7 }, { 8 } },
         F.int_words_values(two, 8, { transpose = true }):to("int32"):tolist())
      -- (wider than a task's 16 words: the blocks of a transposed unpacking meet)
      local wide = (ml.rand(3, 40) * 2 ^ 20):to("int32")
      assert.are.same(F.int_words_values(wide, 4):t():contiguous():to("int32"):tolist(),
         F.int_words_values(wide, 4, { transpose = true }):to("int32"):tolist())
      assert.are.same(F.int_words_values(wide:t():contiguous(), 4):to("int32"):tolist(),
         F.int_words_values(wide, 4, { along = "rows", transpose = true }):to("int32"):tolist())
      local values = ml.tensor({ { 0, 15, 3, 9 } }, { dtype = "uint8" }):expand(2, 4):reshape(1, 8)
      values = values:expand(4, 8):reshape(1, 32):contiguous()             -- 0, 15, 3, 9, ... (32)
      local zeros = ml.tensor({ { 3 } }, { dtype = "uint8" })
      local q8 = F.int_values_to_q(values, zeros, 8):to("int32"):tolist()[1]
      assert.are.same({ -3, 12, 0, 6 }, { q8[1], q8[2], q8[3], q8[4] })
      local ok, err = pcall(F.int_values_to_q, values, zeros, 4)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("value 15 minus zero point 3 at [0, 1] is outside int4's range", 1, true), err)
      local q4 = F.int_values_to_q(ml.full({ 1, 32 }, 5):to("uint8"), 8, 4)
      assert.are.same({ ml.full({ 32 }, -3):tolist() }, F.dequantize_q4(q4, ml.ones(1, 1)):tolist())
      ok, err = pcall(F.int_values_to_q, values, ml.tensor({ { 3, 3, 3 } }, { dtype = "uint8" }), 8)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("zero points uint8 [1, 3] do not go with values [1, 32]", 1, true), err)
   end)

   it("names what it cannot unpack", function()
      local function fails(fn, msg)
         local ok, err = pcall(fn)
         assert.is_false(ok)
         assert.truthy(tostring(err):find(msg, 1, true), err)
      end
      fails(function() F.unpack_int_words(ml.zeros({ 2, 4 }, { dtype = "int32" }), 3) end, "bits must be 4 or 8, got 3")
      fails(function() F.unpack_int_words(ml.zeros(2, 4), 4) end, "expected int32 words (..., words) on the CPU")
      fails(function() F.unpack_int_words(ml.zeros({ 2, 3 }, { dtype = "int32" }), 4) end,
         "24 int4 values a row are not whole blocks of 32")
      fails(function() F.unpack_int_words(ml.zeros({ 4, 2 }, { dtype = "int32" }):t(), 4) end, "contiguous rows")
   end)
end)

describe("ml_tensor_drop_mapped_pages (the words of a mapped checkpoint, once rewritten)", function()
   local lib = require("moonload.C").lib

   it("drops the whole pages under a mapped tensor and leaves its values readable from the file", function()
      local dir = H.tmpdir()
      local want = ml.arange(0, 4096):to("int32")              -- 16 KB: whole pages inside
      ml.safetensors.save_file({ a = ml.ones(3), w = want }, dir .. "/t.safetensors")
      local mapped = ml.safetensors.load_file(dir .. "/t.safetensors")
      assert.is_true(tonumber(lib.ml_tensor_drop_mapped_pages(mapped.w._c)) >= 8192)
      assert.are.same(want:tolist(), mapped.w:tolist())
      assert.are.equal(0, tonumber(lib.ml_tensor_drop_mapped_pages(want._c)))     -- not in a mapping
      H.rmdir(dir)
   end)
end)

describe("compressed-tensors int checkpoint (llama_ct_int_tiny: int4 groups of 32, int8 channels, packed and plain)", function()
   H.collect_warnings()                       -- (the disk offload note) kept quiet
   local exp = H.expected("llama_ct_int_tiny")
   local model = models.from_pretrained(H.FIX .. "/llama_ct_int_tiny")

   it("builds each quantized layer at its width, with its integers and a float32 scale per 32", function()
      local layer = model.model.layers[2]
      for _, m in ipairs({ layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.o_proj }) do
         assert.are.equal("QuantizedLinear", m.__name)
         assert.are.equal(4, m.bits)
         assert.are.equal("uint8", m.weight.dtype)
      end
      assert.are.same({ 32, 32 }, layer.self_attn.k_proj.weight.shape)      -- 64 int4 values a row
      assert.are.same({ 32, 2 }, layer.self_attn.k_proj.weight_scale.shape)
      for _, m in ipairs({ layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj }) do
         assert.are.equal("QuantizedLinear", m.__name)
         assert.are.equal(8, m.bits)
         assert.are.equal("int8", m.weight.dtype)
      end
      -- a channel's one scale, repeated over its blocks
      local s = layer.mlp.down_proj.weight_scale:tolist()[5]
      assert.are.same({ s[1], s[1], s[1], s[1] }, s)
      assert.are.equal("Linear", model.lm_head.__name)                          -- ignored: float32
   end)

   it("gives transformers' logits and greedy ids", function()
      assert.is_true(H.max_abs_diff(logits_of(model, exp), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)

   it("runs over CPU and disk with the rewritten layers offloaded", function()
      local dir = H.tmpdir()
      local m = models.from_pretrained(H.FIX .. "/llama_ct_int_tiny",
         { device_map = "auto", max_memory = { cpu = 100000 }, offload_folder = dir })
      assert.are.equal("cpu", m.hf_device_map["model.layers.0"])
      assert.are.equal("disk", m.hf_device_map["model.layers.1"])
      assert.is_true(H.max_abs_diff(logits_of(m, exp), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("reads scales stored as bfloat16, as the hub's bfloat16 models store them", function()
      -- (the fixture's scales are bfloat16 values: the same numbers)
      local dir = variant("llama_ct_int_tiny", nil, function(sd)
         for name, t in pairs(sd) do
            if name:find("weight_scale$") then sd[name] = t:to("bfloat16") end
         end
      end)
      local m = models.from_pretrained(dir)
      assert.is_true(H.max_abs_diff(logits_of(m, exp), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("computes weight-only where the checkpoint also quantizes activations (w8a8), dropping their scales", function()
      local dir = variant("llama_ct_int_tiny", function(cfg)
         cfg.quantization_config.config_groups.group_2.input_activations = { num_bits = 8, type = "int",
            symmetric = true, strategy = "tensor", dynamic = false }
      end, function(sd)
         sd["model.layers.0.mlp.down_proj.input_scale"] = ml.tensor({ 0.05 })
         sd["model.layers.1.mlp.down_proj.input_scale"] = ml.tensor({ 0.05 })
      end)
      local m = models.from_pretrained(dir)
      assert.is_true(H.max_abs_diff(logits_of(m, exp), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("saves back as moonload's own int4 / int8 checkpoint that loads to the same model", function()
      local dir = H.tmpdir()
      ml.save_model(model, dir)
      local qc = H.read_json(dir .. "/config.json").quantization_config
      assert.are.equal("moonload_q4", qc.quant_method)             -- 8 int4 layers to 6 int8 ones
      assert.are.equal(8, qc.bits_per_module["model.layers.0.mlp.down_proj"])
      local again = models.from_pretrained(dir)
      assert.are.equal(4, again.model.layers[1].self_attn.v_proj.bits)
      assert.is_true(H.max_abs_diff(logits_of(again, exp), exp.logits) < TOL)
      H.rmdir(dir)
   end)
end)

describe("compressed-tensors FP8 checkpoint (qwen3_ct_fp8_tiny: float8 per channel and per tensor)", function()
   local exp = H.expected("qwen3_ct_fp8_tiny")
   local model = models.from_pretrained(H.FIX .. "/qwen3_ct_fp8_tiny")

   it("keeps the weights float8, each scale spread over its tiles of 1 x 128", function()
      local attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
      for _, m in ipairs({ attn.q_proj, attn.v_proj, mlp.gate_proj, mlp.down_proj }) do
         assert.are.equal("Fp8Linear", m.__name)
         assert.are.equal("float8_e4m3fn", m.weight.dtype)
      end
      assert.are.same({ 64, 1 }, attn.q_proj.weight_scale_inv.shape)
      local per_tensor = mlp.down_proj.weight_scale_inv:tolist()               -- (64, 1): one value
      for i = 2, 64 do assert.are.equal(per_tensor[1][1], per_tensor[i][1]) end
   end)

   it("gives transformers' logits and greedy ids, and saves back as an FP8 checkpoint", function()
      assert.is_true(H.max_abs_diff(logits_of(model, exp), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      local dir = H.tmpdir()
      ml.save_model(model, dir)
      local qc = H.read_json(dir .. "/config.json").quantization_config
      assert.are.equal("fp8", qc.quant_method)
      assert.are.same({ 1, 128 }, qc.weight_block_size)
      assert.is_true(H.max_abs_diff(logits_of(models.from_pretrained(dir), exp), exp.logits) < TOL)
      H.rmdir(dir)
   end)
end)

describe("compressed-tensors int4 experts (deepseek_v3_ct_int4_tiny: Kimi K2 Thinking's layout)", function()
   local exp = H.expected("deepseek_v3_ct_int4_tiny")
   local model = models.from_pretrained(H.FIX .. "/deepseek_v3_ct_int4_tiny")

   it("builds the routed experts int4 and leaves attention, shared experts and the dense layer float", function()
      local mlp = model.model.layers[3].mlp
      for _, m in ipairs({ mlp.experts[1].gate_proj, mlp.experts[8].up_proj, mlp.experts[5].down_proj }) do
         assert.are.equal("QuantizedLinear", m.__name)
         assert.are.equal(4, m.bits)
      end
      for _, m in ipairs({ mlp.shared_experts.gate_proj, model.model.layers[1].mlp.up_proj,
                           model.model.layers[2].self_attn.kv_b_proj, model.lm_head }) do
         assert.are.equal("Linear", m.__name)
      end
   end)

   it("gives the logits and greedy ids of the experts' integers times their scales", function()
      assert.is_true(H.max_abs_diff(logits_of(model, exp), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)
end)

describe("zero points (qwen2_awq_ct_tiny: compressed-tensors' AutoAWQConverter output; qwen2_awq_tiny: AutoAWQ's own)", function()
   local exp = H.expected("qwen2_awq_ct_tiny")

   for _, name in ipairs({ "qwen2_awq_ct_tiny", "qwen2_awq_tiny" }) do
      it(name .. ": int4 layers with an offset per group, the biases float; the logits and greedy ids of the decompressed weights", function()
         local model = models.from_pretrained(H.FIX .. "/" .. name)
         local attn = model.model.layers[2].self_attn
         for _, m in ipairs({ attn.q_proj, attn.o_proj, model.model.layers[1].mlp.down_proj }) do
            assert.are.equal("QuantizedLinear", m.__name)
            assert.are.equal(4, m.bits)
            assert.are.same({ m.out_features, m.in_features / 32 }, m.weight_offset.shape)   -- groups of 32
         end
         assert.are.equal("float32", attn.q_proj.bias.dtype)
         assert.are.equal("Linear", model.lm_head.__name)
         assert.is_true(H.max_abs_diff(logits_of(model, exp), exp.logits) < TOL)
         assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      end)
   end

   it("computes what its dense weights compute, and saves back as moonload's int4 with the offsets", function()
      local exp = H.expected("qwen2_awq_tiny")
      local model = models.from_pretrained(H.FIX .. "/qwen2_awq_tiny")
      local up = model.model.layers[1].mlp.up_proj
      local x = ml.randn(3, 64)
      local dense = F.linear(x, up:dense_weight())
      assert.is_true(H.max_abs_diff(up(x), dense:tolist()) < 1e-4)
      local dir = H.tmpdir()
      ml.save_model(model, dir)
      local qc = H.read_json(dir .. "/config.json").quantization_config
      assert.are.equal("moonload_q4", qc.quant_method)
      assert.are.equal(2, qc.offset_groups["model.layers.0.mlp.up_proj"])
      local again = models.from_pretrained(dir)
      assert.are.same({ 128, 2 }, again.model.layers[1].mlp.up_proj.weight_offset.shape)
      assert.is_true(H.max_abs_diff(logits_of(again, exp), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("keeps its offsets and scales float32 when the model computes in bfloat16", function()
      local exp = H.expected("qwen2_awq_tiny")
      local model = models.from_pretrained(H.FIX .. "/qwen2_awq_tiny", { dtype = "bfloat16" })
      local q = model.model.layers[2].self_attn.q_proj
      assert.are.equal("float32", q.weight_offset.dtype)
      assert.are.equal("float32", q.weight_scale.dtype)
      assert.are.equal("bfloat16", model.model.embed_tokens.weight.dtype)
      local logits = logits_of(model, exp):float()
      assert.is_true(H.max_abs_diff(logits:narrow(1, 1, 1), { exp.logits[1] }) < 0.3)
   end)

   it("reads an AWQ checkpoint without zero points as int4 (q - 8) * scale", function()
      local dir = variant("qwen2_awq_tiny", function(cfg) cfg.quantization_config.zero_point = false end, function(sd)
         for name in pairs(sd) do
            if name:find("%.qzeros$") then sd[name] = nil end
         end
      end)
      local model = models.from_pretrained(dir)
      local sd = ml.safetensors.load_file(dir .. "/model.safetensors")
      local q = model.model.layers[1].mlp.up_proj
      assert.are.equal(4, q.bits)
      -- the values in AWQ's order, minus 8, times the (64 in / 32 =) 2 group scales of each output
      local raw = F.int_words_values(sd["model.layers.0.mlp.up_proj.qweight"], 4, { order = "awq" }):to("float32")  -- (64, 128)
      local scales = sd["model.layers.0.mlp.up_proj.scales"]:to("float32")                            -- (2, 128)
      local want = ((raw - 8):view(2, 32, 128) * scales:view(2, 1, 128)):view(64, 128):t()
      assert.is_true(H.max_abs_diff(q:dense_weight(), want:tolist()) == 0)
      H.rmdir(dir)
   end)

   it("names an AWQ checkpoint it cannot read", function()
      local dir = H.tmpdir()                       -- a float checkpoint under an AWQ config
      H.copy(H.FIX .. "/qwen2_tiny/model.safetensors", dir .. "/model.safetensors")
      local cfg = H.read_json(H.FIX .. "/qwen2_tiny/config.json")
      cfg.quantization_config = { quant_method = "awq", bits = 4, group_size = 32, version = "gemm", zero_point = true }
      H.write(dir .. "/config.json", cjson.encode(cfg))
      fails(dir, "the checkpoint holds no qweight tensors")
      fails(variant("qwen2_awq_tiny", function(cfg) cfg.quantization_config.version = "gemv" end),
         'version "gemv" is not one moonload reads')
      fails(variant("qwen2_awq_tiny", function(cfg) cfg.quantization_config.bits = 8 end),
         "bits is 8; AutoAWQ's GEMM checkpoints hold 4")
      fails(variant("qwen2_awq_tiny", nil, function(sd) sd["model.layers.0.self_attn.k_proj.qzeros"] = nil end),
         '"model.layers.0.self_attn.k_proj": has qweight but no qzeros')
      fails(variant("qwen2_awq_tiny", nil, function(sd)
         sd["model.layers.0.self_attn.k_proj.scales"] = ml.ones(4, 32)
      end), '"model.layers.0.self_attn.k_proj": scales give 4 groups of in_features 64, not groups of a multiple of 32')
   end)
end)

describe("GPTQ checkpoints (llama_gptq_int4_tiny, qwen2_gptq_asym_tiny, llama_gptq_int8_tiny, llama_gptq_act_order_tiny: v1, zero points stored - 1)", function()
   H.collect_warnings()                       -- (the disk offload note) kept quiet
   for name, bits in pairs({ llama_gptq_int4_tiny = 4, qwen2_gptq_asym_tiny = 4, llama_gptq_int8_tiny = 8 }) do
      it(name .. ": " .. bits .. "-bit layers; the logits and greedy ids of scales * (q - zero)", function()
         local exp = H.expected(name)
         local model = models.from_pretrained(H.FIX .. "/" .. name)
         for _, m in ipairs({ model.model.layers[1].self_attn.k_proj, model.model.layers[2].mlp.down_proj }) do
            assert.are.equal("QuantizedLinear", m.__name)
            assert.are.equal(bits, m.bits)
            -- zero points of its own: an offset per group of 64 (symmetric ones: none)
            assert.are.equal(name == "qwen2_gptq_asym_tiny" and m.in_features / 64 or nil,
               m.weight_offset and m.weight_offset.shape[2])
         end
         assert.is_true(H.max_abs_diff(logits_of(model, exp), exp.logits) < TOL)
         assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      end)
   end

   it("reads act-order (desc_act): each layer's columns in group order, its input gathered into that order", function()
      local exp = H.expected("llama_gptq_act_order_tiny")
      local model = models.from_pretrained(H.FIX .. "/llama_gptq_act_order_tiny")
      local up = model.model.layers[1].mlp.up_proj
      assert.are.equal(4, up.bits)
      assert.are.same({ 64 }, up.input_order.shape)
      local order = up.input_order:tolist()
      local identity = true
      for i, k in ipairs(order) do identity = identity and k == i - 1 end
      assert.is_false(identity)
      assert.is_true(H.max_abs_diff(logits_of(model, exp), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      -- its dense weight is in the inputs' own order
      local x = ml.randn(3, 64)
      assert.is_true(H.max_abs_diff(up(x), F.linear(x, up:dense_weight()):tolist()) < 1e-4)
      -- and a save keeps the order
      local dir = H.tmpdir()
      ml.save_model(model, dir)
      local qc = H.read_json(dir .. "/config.json").quantization_config
      assert.are.equal(14, #qc.input_order)
      assert.is_true(H.max_abs_diff(logits_of(models.from_pretrained(dir), exp), exp.logits) < TOL)
      H.rmdir(dir)
      fails(variant("llama_gptq_act_order_tiny", nil, function(sd)
         sd["model.layers.0.self_attn.q_proj.g_idx"] = ml.zeros({ 64 }, { dtype = "int32" })
      end), '"model.layers.0.self_attn.q_proj": g_idx puts input 32 in group 0: not 2 groups of 32 inputs')
   end)

   it("rewrites its layers into the offload folder a batch at a time and loads from there, under a device_map", function()
      local exp = H.expected("llama_gptq_int4_tiny")
      local dir = H.tmpdir()
      local rewrite = require("moonload.checkpoint_rewrite")
      local saved = rewrite.BATCH_BYTES
      rewrite.BATCH_BYTES = 20000                        -- (batches of a few layers on this tiny model)
      local ok, m = pcall(models.from_pretrained, H.FIX .. "/llama_gptq_int4_tiny",
         { device_map = "auto", max_memory = { cpu = 85000 }, offload_folder = dir })
      rewrite.BATCH_BYTES = saved
      assert(ok, m)
      -- the rewritten layers in batches, the rest through a link to the source file, one index
      local files, rewritten = {}, 0
      for f in io.popen("ls " .. dir .. "/rewritten"):lines() do
         files[f] = true
         if f:find("^rewritten%-%d+%.safetensors$") then rewritten = rewritten + 1 end
      end
      assert.is_true(rewritten > 2, rewritten)
      assert.is_true(files["source-model.safetensors"] and files["model.safetensors.index.json"])
      -- the disk layers stay in those files: nothing copied out as .dat
      local dats = io.popen("ls " .. dir .. " | grep -c '[.]dat$'"):read("*a")
      assert.are.equal("0", dats:match("%d+"))
      assert.are.equal("cpu", m.hf_device_map["model.layers.0"])
      assert.are.equal("disk", m.hf_device_map["model.layers.1"])
      -- a layer kept in RAM is a view of its rewritten file, not a copy
      local lib = require("moonload.C").lib
      local k
      for name, mod in m:named_modules() do
         if mod.__name == "QuantizedLinear" and not mod.weight:is_meta() then
            k = mod
            assert.is_true(lib.ml_storage_is_borrowed(lib.ml_tensor_storage(mod.weight._c)), name)
         end
      end
      assert.is_not_nil(k, "a quantized layer in RAM")
      assert.is_true(H.max_abs_diff(logits_of(m, exp), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("uses a rewritten folder again while its source files are unchanged", function()
      local src = variant("llama_gptq_int4_tiny")
      local dir = H.tmpdir()
      local function load()
         return models.from_pretrained(src, { device_map = "auto", max_memory = { cpu = 85000 }, offload_folder = dir })
      end
      local function inode()
         return io.popen("stat -c %i " .. dir .. "/rewritten/rewritten-00001.safetensors"):read("*l")
      end
      local exp = H.expected("llama_gptq_int4_tiny")
      load()
      local first = inode()
      assert.is_true(H.max_abs_diff(logits_of(load(), exp), exp.logits) < TOL)
      assert.are.equal(first, inode())                  -- not written again
      os.execute("touch -d '2001-02-03 04:05:06' " .. src .. "/model.safetensors")
      assert.is_true(H.max_abs_diff(logits_of(load(), exp), exp.logits) < TOL)
      assert.are_not.equal(first, inode())              -- another modification time: rewritten
      H.rmdir(dir)
      H.rmdir(src)
   end)

   it("names a GPTQ checkpoint it cannot read", function()
      local k = "model.layers.0.self_attn.k_proj"
      fails(variant("llama_gptq_int4_tiny", nil, function(sd)
         local g = {}
         for i = 1, 64 do g[i] = i <= 32 and 1 or 0 end               -- the groups swapped
         sd[k .. ".g_idx"] = ml.tensor(g, { dtype = "int32" })
      end), '"' .. k .. '": g_idx puts input 0 in group 1, not 0, and desc_act is not set in the config')
      fails(variant("llama_gptq_int4_tiny", function(cfg) cfg.quantization_config.bits = 3 end),
         "bits is 3; moonload reads 4- and 8-bit GPTQ weights")
      fails(variant("llama_gptq_int4_tiny", function(cfg) cfg.quantization_config.checkpoint_format = "marlin" end),
         'checkpoint_format "marlin" is not one moonload reads')
      -- v2 reads the stored zero points (7) as they are: the symmetric values reach 15 - 7 = 8
      fails(variant("llama_gptq_int4_tiny", function(cfg) cfg.quantization_config.checkpoint_format = "gptq_v2" end),
         "minus zero point 7 at")
      -- a file that claims sym but has zero points of its own
      fails(variant("qwen2_gptq_asym_tiny", function(cfg) cfg.quantization_config.sym = true end),
         "is outside int4's range")
   end)
end)

describe("compressed-tensors checkpoints moonload cannot compute exactly", function()
   local function group(cfg, name) return cfg.quantization_config.config_groups[name] end

   it("names the group whose scheme it does not read", function()
      fails(variant("llama_ct_int_tiny", function(cfg) group(cfg, "group_1").weights.symmetric = false end),
         'group "group_1" is asymmetric (zero points) at 8 bits; moonload reads zero points of 4-bit weights only')
      fails(variant("llama_ct_int_tiny", function(cfg) group(cfg, "group_1").weights.num_bits = 2 end),
         'group "group_1" quantizes weights as 2-bit int')
      fails(variant("llama_ct_int_tiny", function(cfg) group(cfg, "group_0").format = "nvfp4-pack-quantized" end),
         'group "group_0" has format "nvfp4-pack-quantized"')
      fails(variant("qwen2_awq_tiny", function(cfg) cfg.quantization_config = H.read_json(H.FIX .. "/llama_ct_int_tiny/config.json").quantization_config end),
         "the checkpoint holds no weight_packed or weight_scale tensors")
      fails(variant("llama_ct_int_tiny", function(cfg) cfg.quantization_config.quantization_status = "frozen" end),
         'quantization_status is "frozen"')
      fails(variant("llama_ct_int_tiny", function(cfg)
         cfg.quantization_config.transform_config = { config_groups = { u = { type = "hadamard" } } }
      end), "transform_config rotates the weights")
   end)

   it("names the layer whose tensors it does not read", function()
      local q = "model.layers.1.self_attn.q_proj"
      fails(variant("llama_ct_int_tiny", nil, function(sd)
         sd["model.layers.1.mlp.up_proj.weight_zero_point"] = ml.zeros({ 32, 1 }, { dtype = "int32" })
      end), '"model.layers.1.mlp.up_proj": has weight_zero_point at 8 bits')
      fails(variant("llama_ct_int_tiny", nil, function(sd)
         sd[q .. ".weight_scale"] = ml.ones(64, 3)
      end), '"' .. q .. '": weight_scale [64, 3] does not give groups of a multiple of 32 values along in_features 64')
      fails(variant("llama_ct_int_tiny", nil, function(sd)
         sd[q .. ".weight_shape"] = ml.tensor({ 64, 96 }, { dtype = "int64" })
      end), '"' .. q .. '.weight_shape" is [64, 96]; the model\'s layer is [64, 64]')
      fails(variant("llama_ct_int_tiny", nil, function(sd)
         sd["model.norm.weight_scale"] = ml.ones(1)
      end), 'the checkpoint quantizes "model.norm", which is not a linear layer of this LlamaForCausalLM')
   end)
end)

describe("examples/quantized_checkpoint.lua", function()
   it("runs the GPTQ test folder under a RAM budget and prints its layers, placement and greedy tokens", function()
      local p = assert(io.popen("luajit examples/quantized_checkpoint.lua 2>/dev/null"))
      local text = p:read("*a")
      p:close()
      assert.truthy(text:find("LlamaForCausalLM, quant_method gptq; linear layers: 14 int4 %([%d.]+ KB%), 1 float"), text)
      assert.truthy(text:find("[%d.]+ KB of weights in RAM, [%d.]+ KB on disk"), text)
      local want = models.from_pretrained(H.FIX .. "/llama_gptq_int4_tiny"):generate({ 1, 5, 17, 42, 3 },
         { max_new_tokens = 16, eos_token_id = false })
      assert.are.same({ unpack(want, 6) }, H.printed_ids(text))
   end)
end)
