-- models.kv_cache: per-layer key/value buffers that grow and hand out views of the past.
local ml = require("moonload")
local KVCache = require("moonload.models.kv_cache")

describe("models.kv_cache", function()
   it("appends steps and returns views of everything cached", function()
      local c = KVCache.new(2, 4)
      local k1 = ml.arange(0, 12, { dtype = "float32" }):view(1, 2, 3, 2)
      local k, v = c:update(1, k1, k1 * 10)
      assert.are.same({ 1, 2, 3, 2 }, k.shape)
      assert.is_true(k:equal(k1))
      assert.is_true(v:equal(k1 * 10))
      c:advance(3)
      local k2 = ml.full({ 1, 2, 1, 2 }, -1)
      k, v = c:update(1, k2, k2)
      assert.are.same({ 1, 2, 4, 2 }, k.shape)
      assert.is_true(k:narrow(3, 1, 3):equal(k1))
      assert.is_true(k:narrow(3, 4, 1):equal(k2))
      assert.are.equal("KVCache(layers=2, length=3)", tostring(c))
   end)

   it("keeps a joined layer's keys and values side by side, through growth, blocks and reorders", function()
      local c = KVCache.new(1, 2)
      c:join(1)
      local k1, v1 = ml.randn(2, 1, 2, 3), ml.randn(2, 1, 2, 5)
      local k, v, kv = c:update(1, k1, v1)
      assert.are.same({ 2, 1, 2, 8 }, kv.shape)
      assert.is_true(kv:narrow(4, 1, 3):equal(k) and kv:narrow(4, 4, 5):equal(v))
      c:advance(2)
      local k2, v2 = ml.randn(2, 1, 3, 3), ml.randn(2, 1, 3, 5)   -- past the capacity of 2: grows
      k, v, kv = c:update(1, k2, v2)
      c:advance(3)
      assert.are.same({ 2, 1, 5, 8 }, kv.shape)
      assert.is_true(kv:narrow(4, 1, 3):equal(ml.cat({ k1, k2 }, 3)))
      assert.is_true(kv:narrow(4, 4, 5):equal(ml.cat({ v1, v2 }, 3)))
      assert.are.equal(kv:data_ptr(), c.k[1]:data_ptr())              -- the keys are the joint buffer's first columns
      -- a block of row 2 sees its rows of the joint buffer
      local k3, v3 = ml.randn(1, 1, 1, 3), ml.randn(1, 1, 1, 5)
      local _, _, kvb = c:block(2, 2, 0):update(1, k3, v3)
      assert.are.same({ 1, 1, 6, 8 }, kvb.shape)
      assert.is_true(kvb:narrow(3, 6, 1):narrow(4, 1, 3):equal(k3))
      -- rows swapped in place stay joined; a new row count puts them apart
      c:reorder({ 1, 0 })
      assert.is_not_nil(c.kv[1])
      c:reorder({ 0, 0, 1 })
      assert.is_nil(c.kv[1])
      local _, _, none = c:update(1, ml.randn(3, 1, 1, 3), ml.randn(3, 1, 1, 5))
      assert.is_nil(none)
      -- an int8 cache keeps them apart
      local q = KVCache.new(1, 4, nil, "int8")
      q:join(1)
      assert.is_nil(select(3, q:update(1, ml.randn(1, 1, 2, 32), ml.randn(1, 1, 2, 32))))
   end)

   it("grows past its capacity, keeping the cached values", function()
      local c = KVCache.new(1, 2)
      local a = ml.randn(1, 1, 2, 3)
      c:update(1, a, a)
      c:advance(2)
      local b = ml.randn(1, 1, 3, 3)
      local k = c:update(1, b, b)
      c:advance(3)
      assert.are.same({ 1, 1, 5, 3 }, k.shape)
      assert.is_true(k:narrow(3, 1, 2):equal(a))
      assert.is_true(k:narrow(3, 3, 3):equal(b))
      assert.are.equal(5, c.length)
   end)

   -- keys tagged with their position: row p of a step holds the value p
   local function step(c, from, n)
      local k = ml.arange(from, from + n, { dtype = "float32" }):view(1, 1, n, 1)
      local kk, vv = c:update(1, k, k * 10, 3)
      c:advance(n)
      return kk, vv
   end

   it("keeps a sliding layer's last window - 1 keys and this step's, in a bounded buffer", function()
      local c = KVCache.new(1, 100)
      local k = step(c, 0, 5)                                  -- a 5-token prompt: every key
      assert.are.same({ 0, 1, 2, 3, 4 }, k:view(5):tolist())
      assert.are.equal(5 + 2 * 3, c.k[1]:size(3))               -- not 100
      for p = 5, 40 do
         k = step(c, p, 1)
         assert.are.same({ p - 2, p - 1, p }, k:view(3):tolist())
      end
      assert.are.equal(11, c.k[1]:size(3))
      -- a chunk of 4 after that: its first query sees 2 keys back
      local kk, vv = step(c, 41, 4)
      assert.are.same({ 39, 40, 41, 42, 43, 44 }, kk:view(6):tolist())
      assert.are.same({ 390, 400, 410, 420, 430, 440 }, vv:view(6):tolist())
      assert.are.equal(11, KVCache.layer_capacity(100, 5, 3))
      assert.are.equal(100, KVCache.layer_capacity(100, 5, nil))
   end)

   it("hands a block of rows its part of the batch's buffers, after the tokens of earlier chunks", function()
      local c = KVCache.new(1, 8)
      local rows1 = ml.full({ 2, 1, 3, 1 }, 1)
      local rows2 = ml.full({ 1, 1, 3, 1 }, 2)
      local k = c:block(1, 3, 0):update(1, rows1, rows1)
      assert.are.same({ 2, 1, 3, 1 }, k.shape)
      k = c:block(3, 3, 0):update(1, rows2, rows2)
      assert.are.same({ 1, 1, 3, 1 }, k.shape)
      -- the next chunk of 2 tokens, first 2 rows: 3 keys before it
      local nxt = ml.full({ 2, 1, 2, 1 }, 5)
      local b = c:block(1, 3, 3)
      assert.are.equal(3, b.length)
      k = b:update(1, nxt, nxt)
      assert.are.same({ 1, 1, 1, 5, 5 }, k:select(1, 2):view(5):tolist())
      assert.are.same({ 3, 1, 8, 1 }, c.k[1].shape)
      assert.are.same({ 2, 2, 2 }, c.k[1]:select(1, 3):view(8):narrow(1, 1, 3):tolist())
   end)

   it("keeps keys and values on its own device whatever device computes them", function()
      local c = KVCache.new(1, 4, "cpu")
      assert.are.equal("cpu", c.device)
      local k = c:update(1, ml.ones(1, 1, 2, 2), ml.ones(1, 1, 2, 2))
      assert.are.equal("cpu", k.device)
   end)
end)

describe("generate with kv_cache_device", function()
   local model = ml.models.from_pretrained("tests/fixtures/models/llama_tiny_untied")

   it("gives the same tokens with the cache on the CPU", function()
      local want = model:generate({ 5, 17, 42 }, { max_new_tokens = 6 })
      assert.are.same(want, model:generate({ 5, 17, 42 }, { max_new_tokens = 6, kv_cache_device = "cpu" }))
   end)

   it("names a device that is not one or does not exist", function()
      local ok, err = pcall(model.generate, model, { 1, 2 }, { kv_cache_device = "gpu" })
      assert.is_false(ok)
      assert.truthy(err:find('generate: kv_cache_device: unknown device "gpu"', 1, true), err)
      ok, err = pcall(model.generate, model, { 1, 2 }, { kv_cache_device = 7 })
      assert.is_false(ok)
      assert.truthy(err:find("generate: kv_cache_device cuda:7 does not exist", 1, true), err)
   end)
end)

-- int8 keys and values (B, Hk, S, D) as an int8 cache hands them out: int8 views carrying their scales
local function q8_views(x, block)
   local q = ml.empty(x.shape, { dtype = "int8", device = x.device })
   local sshape = x.shape
   sshape[4] = x:size(4) / block
   local s = ml.empty(sshape, { device = x.device })
   ml.nn.F.quantize_q8_into(x, q, s)
   rawset(q, "_q8_scales", s)
   return q
end

describe("int8 key-value cache", function()
   local F = ml.nn.F

   it("stores int8 and a scale per block of the head dim, and hands out what was stored", function()
      ml.manual_seed(7)
      local c = KVCache.new(1, 8, nil, "int8")
      local k1, v1 = ml.randn(2, 3, 5, 64), ml.randn(2, 3, 5, 64)
      local k8, v8 = c:update(1, k1, v1)
      c:advance(5)
      assert.are.equal("int8", c.k[1].dtype)
      assert.are.same({ 2, 3, 8, 2 }, c.ks[1].shape)                     -- 64 = 2 blocks of 32
      -- int8 views of the slots seen, carrying their scales; floats on request
      assert.are.equal("int8", k8.dtype)
      assert.are.same({ 2, 3, 5, 64 }, k8.shape)
      local k, v = KVCache.floats(k8, "float32"), KVCache.floats(v8, "float32")
      assert.are.equal("float32", k.dtype)
      assert.are.equal(k1, KVCache.floats(k1, "float32"))
      -- each value within half its block's scale, the scale being the block's max |x| / 127
      local err = (k - k1):abs():view(2, 3, 5, 2, 32):max(5)
      local half = k1:abs():view(2, 3, 5, 2, 32):max(5) / 254
      assert.are.equal(2 * 3 * 5 * 2, err:le(half + 1e-7):sum():item())
      assert.is_true(ml.equal(v, F.dequantize_q8(c.v[1]:narrow(3, 1, 5), c.vs[1]:narrow(3, 1, 5))))
      -- a step appended: the first 5 come back as they were
      local k2 = ml.randn(2, 3, 1, 64)
      local kk = KVCache.floats((c:update(1, k2, k2)), "float32")
      assert.is_true(ml.equal(kk:narrow(3, 1, 5), k))
      assert.are.equal(2 * (2 * 3 * 8 * 64) + 2 * (2 * 3 * 8 * 2 * 4), c:nbytes())
      assert.are.equal("KVCache(layers=1, length=5, dtype=int8)", tostring(c))
      -- blocks of the largest width up to 32 dividing the head dim
      assert.are.same({ 32, 8, 20, 1 }, { KVCache.q8_block(128), KVCache.q8_block(8), KVCache.q8_block(80), KVCache.q8_block(37) })
      assert.are.equal(1.125, KVCache.value_bytes("int8", 128, 2))
      assert.are.equal(2, KVCache.value_bytes(nil, 128, 2))
      -- what does not fit is named
      local q8, sc = ml.empty({ 2, 64 }, { dtype = "int8" }), ml.empty(2, 2)
      for _, c in ipairs({
         { function() F.dequantize_q8(q8, sc, "int32") end, "dequantize_q8: the output dtype must be float32, float16 or bfloat16, got int32" },
         { function() F.dequantize_q8(q8, ml.empty(2, 3)) end, "dequantize_q8: int8 values int8 [2, 64] and float32 scales float32 [2, 3] do not go together" },
         { function() F.quantize_q8_into(ml.randn(2, 32), q8, sc) end, "quantize_q8_into: input float32 [2, 32] does not fit int8 values of shape [2, 64]" },
         { function() KVCache.new(1, 4, nil, "int4") end, 'KVCache: dtype must be "int8" or nil (the computing dtype), got int4' },
      }) do
         local ok, err = pcall(c[1])
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[2], 1, true), tostring(err))
      end
   end)

   it("slides a window and grows with its scales", function()
      local c = KVCache.new(1, 100, nil, "int8")
      local function step(from, n)
         local k = ml.arange(from, from + n, { dtype = "float32" }):view(1, 1, n, 1) + 1
         local kk = c:update(1, k, k * 10, 3)
         c:advance(n)
         return KVCache.floats(kk, "float32")
      end
      step(0, 5)
      local k
      for p = 5, 40 do k = step(p, 1) end
      for i, x in ipairs(k:view(3):tolist()) do assert.is_true(math.abs(x - (38 + i)) < 1e-4, tostring(x)) end
      assert.are.equal(11, c.k[1]:size(3))
      assert.are.equal(11, c.ks[1]:size(3))
      local g = KVCache.new(1, 2, nil, "int8")
      local a, b = ml.randn(1, 1, 2, 32), ml.randn(1, 1, 3, 32)
      local ka = KVCache.floats((g:update(1, a, a)), "float32")
      g:advance(2)
      local kb = KVCache.floats((g:update(1, b, b)), "float32")
      assert.is_true(ml.equal(kb:narrow(3, 1, 2), ka))
   end)

   it("attends over int8 keys and values as over their dequantized floats", function()
      local common = require("moonload.models.common")
      ml.manual_seed(9)
      -- head dims in blocks of 32, 8 and 20 (no SIMD), grouped heads, masks, causal, bfloat16
      for _, c in ipairs({ { 64, 32, 1 }, { 16, 8, 4 }, { 40, 20, 3 }, { 64, 32, 20 }, { 64, 32, 40 } }) do
         local D, block, L = c[1], c[2], c[3]
         local q, k, v = ml.randn(2, 4, L, D), ml.randn(2, 2, 9, D), ml.randn(2, 2, 9, D)
         local k8, v8 = q8_views(k, block), q8_views(v, block)
         local kf, vf = KVCache.floats(k8, "float32"), KVCache.floats(v8, "float32")
         local pad = ml.ones({ 2, 9 }, { dtype = "bool" })
         pad[{ 1, 1 }] = false
         local mask = common.padded_causal_mask(pad, L, 9)
         for _, m in ipairs({ { nil, false }, { mask, false }, { nil, L > 1 } }) do
            local want = common.attention(q, kf, vf, m[1], m[2], 0.3)
            local got = common.attention(q, k8, v8, m[1], m[2], 0.3)
            assert.is_true(((got - want):abs():max()):item() < 1e-5, table.concat(c, " "))
         end
         local gb = common.attention(q:to("bfloat16"), k8, v8, mask, false, 0.3)
         assert.are.equal("bfloat16", gb.dtype)
         local want = common.attention(q, kf, vf, mask, false, 0.3)
         assert.is_true(((gb:to("float32") - want):abs():max()):item() < 0.03)
      end
      local ok, err = pcall(function()
         local C = require("moonload.C")
         local k8 = q8_views(ml.randn(1, 1, 4, 32), 32)
         C.check(C.lib.ml_sdpa_q8(ml.randn(1, 1, 1, 32)._c, k8._c, ml.ones(1, 1, 4, 3)._c, k8._c,
            rawget(k8, "_q8_scales")._c, nil, nil, false, 0, C.ffi.new("ml_tensor*[1]")))
      end)
      assert.is_false(ok)
      assert.truthy(err:find("sdpa_q8: key int8 [1, 1, 4, 32] with scales float32 [1, 1, 4, 3]", 1, true), err)
   end)

   local families = { "llama_tiny_untied", "gpt2_tiny", "gpt_neox_tiny", "phi_tiny", "mistral_tiny", "gemma2_tiny",
                      "qwen3_moe_tiny", "opt_tiny", "bloom_tiny", "falcon_tiny", "gptj_tiny",
                      "deepseek_v3_tiny", "deepseek_v2_lite_tiny", "glm4_moe_tiny", "deepseek_v32_tiny",
                      "glm_moe_dsa_tiny", "glm4_moe_lite_tiny", "llama4_tiny", "ernie4_5_moe_tiny", "hunyuan_v1_moe_tiny", "cohere2_tiny", "granitemoe_tiny", "olmoe_tiny", "phimoe_tiny", "internlm3_tiny", "arcee_tiny", "apertus_tiny", "gemma_tiny", "ministral_tiny", "helium_tiny", "glm_tiny", "olmo_tiny", "nemotron_tiny", "stablelm_tiny", "stablelm_12b_tiny", "gpt_bigcode_tiny", "gpt_bigcode_mha_tiny", "exaone_tiny", "vaultgemma_tiny", "mpt_tiny", "solar_open_tiny", "dbrx_tiny", "gpt_neo_tiny", "codegen_tiny", "flex_olmo_tiny", "cohere2_moe_tiny", "cohere2_moe_sigmoid_tiny", "afmoe_tiny", "hy_v3_tiny", "mimo_v2_flash_tiny", "longcat_flash_tiny", "laguna_tiny", "laguna_per_element_tiny", "exaone_moe_tiny", "minicpm3_tiny", "youtu_tiny", "diffllama_tiny", "doge_tiny", "doge_moe_tiny", "gpt_neox_japanese_tiny", "axk2_tiny", "dory_tiny", "apertus1p5_text_tiny", "apertus1p5_multimodal_tiny", "cohere_compass_text_tiny", "cohere_compass_multimodal_tiny", "jetmoe_tiny", "sarvam_moe_tiny", "sarvam_mla_tiny", "kolibri1_tiny", "flint_tiny", "axk1_tiny", "mellum_tiny", "persimmon_tiny", "xglm_tiny", "biogpt_tiny", "openai_gpt_tiny", "ctrl_tiny", "gpt_sw3_tiny", "iquestcoder_tiny", "cwm_tiny", "jais2_tiny", "bitnet_tiny", "nanochat_tiny", "granitemoeshared_tiny", "granite_swa_tiny", "granitemoe_swa_tiny", "hyperclovax_tiny",
                      "glm4v_multimodal_tiny", "glm4v_moe_multimodal_tiny", "dots1_tiny" }
   for _, name in ipairs(families) do
      it(name .. " decodes with an int8 cache close to its float cache", function()
         local model = ml.models.from_pretrained("tests/fixtures/models/" .. name)
         local function steps(dtype)
            local cache = model:new_cache(16, nil, dtype)
            local out = { model(ml.tensor({ { 5, 17, 42, 3, 8 } }, { dtype = "int64" }), { cache = cache }) }
            for _, t in ipairs({ 7, 11, 2, 9 }) do
               out[#out + 1] = model(ml.tensor({ { t } }, { dtype = "int64" }), { cache = cache })
            end
            return out, cache
         end
         local want, float_cache = steps(nil)
         local got, int8_cache = steps("int8")
         -- (the prompt too attends to what the cache stored)
         for i = 1, #want do
            local r = ((got[i] - want[i]):abs():max() / want[i]:abs():max()):item()
            -- a value moves by at most 1/254 of its block's largest; through two layers of a tiny
            -- random model that is 0.2-6% of the largest logit (a MoE router may pick another expert)
            assert.is_true(r > 0 and r < 0.1, string.format("step %d: %.4f", i, r))
         end
         assert.is_true(int8_cache:nbytes() < float_cache:nbytes() / 2)
      end)
   end

   it("gives the same tokens in a block schedule, and names what it cannot hold", function()
      local model = ml.models.from_pretrained("tests/fixtures/models/llama_tiny_untied")
      local prompts = { { 5, 17, 42, 3 }, { 9, 8, 7, 6 } }
      local want = model:generate(prompts, { max_new_tokens = 5, kv_cache_dtype = "int8" })
      assert.are.same(want, model:generate(prompts, { max_new_tokens = 5, kv_cache_dtype = "int8", micro_batch_size = 1,
         prefill_chunk_size = 2 }))
      local ok, err = pcall(model.generate, model, { 1, 2 }, { kv_cache_dtype = "int4" })
      assert.is_false(ok)
      assert.truthy(err:find('generate: kv_cache_dtype must be "int8" (or nil: the computing dtype), got int4', 1, true), err)
      model:to("float64")
      ok, err = pcall(model.generate, model, { 1, 2 }, { kv_cache_dtype = "int8" })
      assert.is_false(ok)
      assert.truthy(err:find("KVCache: an int8 cache holds float32, float16 or bfloat16 keys and values, got float64", 1, true), err)
   end)
end)

describe("int8 key-value cache on cuda #cuda", function()
   local F = ml.nn.F
   local DEV = "cuda:0"

   it("quantizes into strided slots on the device to the CPU's bytes, and dequantizes to its values", function()
      ml.manual_seed(8)
      local x = ml.randn(2, 3, 5, 40)
      for _, dt in ipairs({ "float32", "bfloat16" }) do
         local q, s = ml.zeros({ 2, 3, 9, 40 }, { dtype = "int8" }), ml.zeros(2, 3, 9, 2)
         local qd, sd = q:to(DEV), s:to(DEV)
         F.quantize_q8_into(x:to(dt), q:narrow(3, 3, 5), s:narrow(3, 3, 5))
         F.quantize_q8_into(x:to(dt):to(DEV), qd:narrow(3, 3, 5), sd:narrow(3, 3, 5))
         assert.is_true(ml.equal(qd:cpu(), q), dt)
         assert.is_true(ml.equal(sd:cpu(), s), dt)
         local want = F.dequantize_q8(q:narrow(3, 3, 5), s:narrow(3, 3, 5), dt)
         local got = F.dequantize_q8(qd:narrow(3, 3, 5), sd:narrow(3, 3, 5), dt)
         assert.are.equal(DEV, got.device)
         assert.is_true(ml.equal(got:cpu(), want), dt)
      end
   end)

   it("attends over int8 keys and values on the device as the CPU does", function()
      local common = require("moonload.models.common")
      ml.manual_seed(10)
      -- head dims in blocks of 32 and 20, grouped heads, a padding mask, causal rows, bfloat16
      for _, c in ipairs({ { 64, 32, 1 }, { 40, 20, 3 }, { 64, 32, 20 } }) do
         local D, block, L = c[1], c[2], c[3]
         local q, k, v = ml.randn(2, 4, L, D), ml.randn(2, 2, 9, D), ml.randn(2, 2, 9, D)
         local pad = ml.ones({ 2, 9 }, { dtype = "bool" })
         pad[{ 1, 1 }] = false
         local mask = common.padded_causal_mask(pad, L, 9)
         local kc, vc = q8_views(k, block), q8_views(v, block)
         local kd, vd = q8_views(k:to(DEV), block), q8_views(v:to(DEV), block)
         for _, m in ipairs({ { nil, false }, { mask, false }, { nil, L > 1 } }) do
            local want = common.attention(q, kc, vc, m[1], m[2], 0.3)
            local got = common.attention(q:to(DEV), kd, vd, m[1] and m[1]:to(DEV), m[2], 0.3)
            assert.are.equal(DEV, got.device)
            assert.is_true(((got:cpu() - want):abs():max()):item() < 1e-5, table.concat(c, " "))
         end
         local gb = common.attention(q:to(DEV):to("bfloat16"), kd, vd, mask:to(DEV), false, 0.3)
         assert.are.equal("bfloat16", gb.dtype)
         local want = common.attention(q, kc, vc, mask, false, 0.3)
         assert.is_true(((gb:cpu():to("float32") - want):abs():max()):item() < 0.03)
      end
   end)

   it("generates the CPU's tokens with the int8 cache on the GPU, and in host memory", function()
      local dir = "tests/fixtures/models/mistral_tiny"
      local prompts = { { 5, 17, 42, 3 }, { 9, 8, 7, 6 } }
      local want = ml.models.from_pretrained(dir):generate(prompts, { max_new_tokens = 6, kv_cache_dtype = "int8" })
      local model = ml.models.from_pretrained(dir):to(DEV)
      assert.are.same(want, model:generate(prompts, { max_new_tokens = 6, kv_cache_dtype = "int8" }))
      assert.are.same(want, model:generate(prompts, { max_new_tokens = 6, kv_cache_dtype = "int8", kv_cache_device = "cpu" }))
   end)
end)
