-- ml.models GPTBigCode (StarCoder's family): Hugging Face names, nn.Linear layout, multi-query
-- attention with one cached key/value head, the multi-head layout, logits and greedy generation
-- against transformers (tests/fixtures/gen_models.py gpt_bigcode), left-padded batches, device
-- maps, int8, bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local bigcode = require("moonload.models.gpt_bigcode")
local H = require("models_helpers")

local DIR = H.FIX .. "/gpt_bigcode_tiny"
local MHA_DIR = H.FIX .. "/gpt_bigcode_mha_tiny"
local TOL = 1e-4

local function tiny(over)
   local c = { vocab_size = 50, n_positions = 16, n_embd = 32, n_layer = 1, n_head = 4 }
   for k, v in pairs(over or {}) do c[k] = v end
   return c
end

describe("models.gpt_bigcode", function()
   local model = models.from_pretrained(DIR)
   local mha = models.from_pretrained(MHA_DIR)

   describe("structure", function()
      it("uses transformers' parameter names, in registration order, and holds every checkpoint tensor", function()
         local names = H.param_names(model)
         assert.are.equal("transformer.wte.weight", names[1])
         assert.are.equal("transformer.wpe.weight", names[2])
         assert.are.equal("transformer.h.0.ln_1.weight", names[3])
         assert.are.equal("transformer.h.0.attn.c_attn.weight", names[5])
         assert.are.equal("transformer.ln_f.bias", names[#names])
         H.assert_holds_checkpoint(model, DIR, true)
         H.assert_holds_checkpoint(mha, MHA_DIR, false)
      end)

      it("ties lm_head to transformer.wte by default, and not with tie_word_embeddings false", function()
         assert.are.equal(model.transformer.wte.weight, model.lm_head.weight)
         assert.are_not.equal(mha.transformer.wte.weight, mha.lm_head.weight)
         assert.is_false(mha.lm_head.weight:equal(mha.transformer.wte.weight))
      end)

      it("has nn.Linear (out, in) weights: c_attn holds 4 query heads then one key and one value head", function()
         local attn = model.transformer.h[1].attn
         assert.are.equal("Linear", attn.c_attn.__name)
         assert.are.same({ 32 + 2 * 8, 32 }, attn.c_attn.weight.shape)
         assert.are.same({ 48, 32 }, model.transformer.h[2].mlp.c_fc.weight.shape)          -- n_inner 48
         assert.are.same({ 3 * 32, 32 }, mha.transformer.h[1].attn.c_attn.weight.shape)
         assert.are.same({ 128, 32 }, mha.transformer.h[3].mlp.c_fc.weight.shape)           -- 4 * n_embd
         assert.are.equal(bigcode.GPTBigCodeForCausalLM, getmetatable(model))
      end)

      it("prints as transformers' module tree", function()
         local text = tostring(model)
         assert.truthy(text:find("GPTBigCodeForCausalLM(\n  (transformer): GPTBigCodeModel(\n    (wte): Embedding(100, 32)", 1, true))
         assert.truthy(text:find("(0-1): 2 x GPTBigCodeBlock(", 1, true))
         assert.truthy(text:find("(attn): GPTBigCodeAttention(\n          (c_attn): Linear(in_features=32, out_features=48, bias=True)", 1, true))
         assert.truthy(text:find("(act): GELU(approximate='tanh')", 1, true))
         assert.truthy(text:find("(lm_head): Linear(in_features=32, out_features=100, bias=False)", 1, true))
         assert.truthy(tostring(mha):find("(act): GELU(approximate='none')", 1, true))
      end)

      it("keeps blocks whole in device maps and plans one key/value head with multi_query", function()
         assert.are.same({ "GPTBigCodeBlock" }, model.no_split_modules)
         assert.are.same({ 1, 8, 4, false }, { model.transformer.h[1].attn:kv_cache_heads() })
         assert.are.same({ 4, 8, 4, false }, { mha.transformer.h[1].attn:kv_cache_heads() })
         assert.are.equal(64, model:max_length())
      end)

      it("builds from a config table with transformers' defaults", function()
         local m = bigcode.GPTBigCodeForCausalLM(tiny())
         assert.is_true(m.config.multi_query)
         assert.are.same({ 48, 32 }, m.transformer.h[1].attn.c_attn.weight.shape)
         assert.are.same({ 128, 32 }, m.transformer.h[1].mlp.c_fc.weight.shape)
         assert.are.equal("gelu_pytorch_tanh", m.config.activation_function)
         assert.are.equal(1 / math.sqrt(8), m.transformer.h[1].attn.scale)
         assert.are.equal(1, bigcode.GPTBigCodeForCausalLM(tiny({ scale_attn_weights = false })).transformer.h[1].attn.scale)
         assert.are.equal(m.transformer.wte.weight, m.lm_head.weight)
      end)

      it("builds StarCoder's shape (15.5 B) with transformers' parameter count and shapes", function()
         local fix = H.read_json(DIR .. "/hub_config.json")
         local m = H.assert_matches_skeleton(function() return bigcode.GPTBigCodeForCausalLM(fix.config) end, fix)
         assert.are.same({ 6144 + 2 * 128, 6144 }, m.transformer.h[1].attn.c_attn.weight.shape)
         assert.are.equal(8192, m:max_length())
      end)
   end)

   describe("multi-query (gpt_bigcode_tiny) against transformers", function()
      local exp = H.expected("gpt_bigcode_tiny")

      H.it_matches_expected(model, "gpt_bigcode_tiny", " (batch of 2)")

      it("accepts Lua lists of ids and keeps only the last positions' logits with logits_to_keep", function()
         local one = model(exp.input_ids[2])
         assert.are.same({ 1, 8, 100 }, one.shape)
         assert.is_true(H.max_abs_diff(one:select(1, 1), exp.logits[2]) < TOL)
         local last = model(exp.input_ids, { logits_to_keep = 2 })
         assert.are.same({ 2, 2, 100 }, last.shape)
         assert.is_true(H.max_abs_diff(last:select(1, 1), { exp.logits[1][7], exp.logits[1][8] }) < TOL)
      end)

      H.it_matches_padded(model, "gpt_bigcode_tiny", "learned positions")

      it("caches one key/value head per layer, not one per query head", function()
         local cache = model:new_cache()
         model({ exp.input_ids[1] }, { cache = cache })
         for i = 1, 2 do
            assert.are.same({ 1, 1, 8 }, { cache.k[i]:size(1), cache.k[i]:size(2), cache.k[i]:size(4) })
            assert.are.same({ 1, 1, 8 }, { cache.v[i]:size(1), cache.v[i]:size(2), cache.v[i]:size(4) })
         end
         assert.are.equal(8, cache.length)
         -- an int8 cache too: its one head quantized, decoding close to transformers' logits
         local q8 = model:new_cache(nil, nil, "int8")
         assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[2], 5, q8), { exp.logits[2] }) < 0.3)
         assert.are.equal(1, q8.k[1]:size(2))
      end)

      it("handles several new tokens after a cached prefix (bottom-right causal mask)", function()
         local ids = exp.input_ids[2]
         local full = model(ids)
         local cache = model:new_cache(2)   -- small capacity: the buffers grow
         model({ ids[1], ids[2] }, { cache = cache })
         local rest = model({ ids[3], ids[4], ids[5], ids[6], ids[7], ids[8] }, { cache = cache })
         assert.is_true(H.max_abs_diff(rest, full:narrow(2, 3, 6):tolist()) < 1e-5)
      end)

      it("gives the same greedy ids in a block schedule and with prompt lookup (the cache cropped)", function()
         assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens,
            eos_token_id = false, micro_batch_size = 1, prefill_chunk_size = 3 }))
         local stats = {}
         assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens,
            eos_token_id = false, prompt_lookup_num_tokens = 3, assistant_stats = stats }))
         assert.are.equal(exp.max_new_tokens, stats.accepted + stats.forwards)
      end)
   end)

   describe("multi-head (gpt_bigcode_mha_tiny: multi_query false, unscaled scores, GELU, untied head)", function()
      H.it_matches_expected(mha, "gpt_bigcode_mha_tiny", " (3 layers, q, k, v side by side per head)")
      H.it_matches_padded(mha, "gpt_bigcode_mha_tiny", "learned positions")

      it("caches every head", function()
         local cache = mha:new_cache()
         mha({ 1, 2, 3 }, { cache = cache })
         assert.are.equal(4, cache.k[3]:size(2))
      end)
   end)

   describe("loading options", function()
      H.collect_warnings()                    -- kept quiet

      it("splits over CPU and disk at block boundaries under a CPU budget, same logits and greedy ids", function()
         local exp = H.expected("gpt_bigcode_mha_tiny")
         local off = H.tmpdir()
         local m = models.from_pretrained(MHA_DIR, { device_map = "auto", max_memory = { cpu = 150000 }, offload_folder = off })
         local map = m.hf_device_map
         for name in pairs(map) do assert.is_nil(name:find("^transformer%.h%.%d+%."), name .. " splits a block") end
         assert.are.same({ "cpu", "disk", "disk" }, { tostring(map["transformer.h.0"]), tostring(map["transformer.h.1"]),
            tostring(map["transformer.h.2"]) })
         assert.is_true(H.max_abs_diff(m(exp.input_ids), exp.logits) < TOL)
         assert.are.same(exp.greedy_ids[1], m:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
         H.rmdir(off)
      end)

      it("runs multi-query blocks placed by a custom map (the first on disk), same logits and greedy ids", function()
         local exp = H.expected("gpt_bigcode_tiny")
         local off = H.tmpdir()
         local m = models.from_pretrained(DIR, { offload_folder = off, device_map = {
            ["transformer.wte"] = "cpu", ["transformer.wpe"] = "cpu", ["transformer.h.0"] = "disk",
            ["transformer.h.1"] = "cpu", ["transformer.ln_f"] = "disk", lm_head = "cpu" } })
         assert.are.equal("disk", tostring(m.hf_device_map["transformer.h.0"]))
         assert.is_true(H.max_abs_diff(m(exp.input_ids), exp.logits) < TOL)
         assert.are.same(exp.greedy_ids, m:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
         H.rmdir(off)
      end)

      for _, name in ipairs({ "gpt_bigcode_tiny", "gpt_bigcode_mha_tiny" }) do
         it(name .. ": saved and loaded back gives transformers' logits; int8 and bfloat16 stay close", function()
            local exp = H.expected(name)
            local dir = H.tmpdir()
            ml.save_model(models.from_pretrained(H.FIX .. "/" .. name), dir)
            assert.is_true(H.max_abs_diff(models.from_pretrained(dir)(exp.input_ids), exp.logits) < TOL)
            H.rmdir(dir)
            -- (measured 0.10 multi-query, 0.56 multi-head: its unscaled scores are sqrt(8) times larger, errors too)
            local int8_tol = name == "gpt_bigcode_tiny" and 0.3 or 0.8
            assert.is_true(H.max_abs_diff(models.from_pretrained(H.FIX .. "/" .. name, { quantize = "int8" })(exp.input_ids), exp.logits) < int8_tol)
            local bf = models.from_pretrained(H.FIX .. "/" .. name, { dtype = "bfloat16" })
            local logits = bf(exp.input_ids)
            assert.are.equal("bfloat16", logits.dtype)
            assert.is_true(H.max_abs_diff(logits:float(), exp.logits) < 0.25)
         end)
      end
   end)

   describe("bad input", function()
      it("rejects token ids outside the vocabulary and sequences past n_positions", function()
         assert.has_error(function() model({ 1, 100 }) end,
            "models.gpt_bigcode.forward: token id 100 is out of range for vocab_size 100 (ids are 0-based)")
         local ids = {}
         for i = 1, 65 do ids[i] = i % 100 end
         assert.has_error(function() model(ids) end,
            "models.gpt_bigcode: sequence of 65 tokens (0 cached + 65 new) exceeds n_positions 64")
         local cache = model:new_cache()
         model({ 1, 2, 3 }, { cache = cache })
         local rest = {}
         for i = 1, 62 do rest[i] = i end
         assert.has_error(function() model(rest, { cache = cache }) end,
            "models.gpt_bigcode: sequence of 65 tokens (3 cached + 62 new) exceeds n_positions 64")
         assert.are.equal(3, cache.length)
         assert.has_error(function() model:generate({ 1, 2 }, { max_new_tokens = 63 }) end,
            "generate: prompt of 2 tokens + max_new_tokens 63 exceeds the model's 64 positions")
      end)

      it("names a missing config key, a value of the wrong kind, and the file", function()
         local dir = H.tmpdir()
         H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
         H.write(dir .. "/config.json", '{"model_type": "gpt_bigcode", "vocab_size": 100, "n_positions": 64, "n_layer": 2, "n_head": 4}')
         assert.has_error(function() models.from_pretrained(dir) end,
            'models.gpt_bigcode: config key "n_embd" is missing in ' .. dir .. "/config.json")
         H.write(dir .. "/config.json", '{"model_type": "gpt_bigcode", "vocab_size": 100, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "multi_query": "yes"}')
         assert.has_error(function() models.from_pretrained(dir) end,
            'models.gpt_bigcode: config key "multi_query" in ' .. dir .. '/config.json must be a boolean, got string "yes"')
         H.write(dir .. "/config.json", '{"model_type": "gpt_bigcode", "vocab_size": 100, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "attention_softmax_in_fp32": 1}')
         assert.has_error(function() models.from_pretrained(dir) end,
            'models.gpt_bigcode: config key "attention_softmax_in_fp32" in ' .. dir .. '/config.json must be a boolean, got number 1')
         H.rmdir(dir)
      end)

      it("rejects head counts that do not divide n_embd, cross-attention and unknown activations", function()
         assert.has_error(function() bigcode.GPTBigCodeForCausalLM(tiny({ n_head = 5 })) end,
            "models.gpt_bigcode: n_embd 32 is not divisible by n_head 5 in config table")
         assert.has_error(function() bigcode.GPTBigCodeForCausalLM(tiny({ add_cross_attention = true, multi_query = false })) end,
            "models.gpt_bigcode: add_cross_attention = true (cross-attention to an encoder) is not supported in config table")
         local ok, err = pcall(bigcode.GPTBigCodeForCausalLM, tiny({ activation_function = "swiglu" }))
         assert.is_false(ok)
         assert.truthy(err:find('models.gpt_bigcode: activation "swiglu" in config table is not supported (supported: ', 1, true), err)
      end)

      it("refuses the multi-head checkpoint for a multi-query config (c_attn's shapes differ)", function()
         local raw = H.read_json(MHA_DIR .. "/config.json")
         raw.multi_query = true
         local m = bigcode.GPTBigCodeForCausalLM(raw)
         local before = m.transformer.wte.weight:clone()
         local ok, err = pcall(models.load_checkpoint, m, MHA_DIR .. "/model.safetensors")
         assert.is_false(ok)
         assert.truthy(err:find('"transformer.h.0.attn.c_attn.weight" (checkpoint [96, 32], model [48, 32])', 1, true), err)
         assert.is_true(m.transformer.wte.weight:equal(before))
      end)
   end)
end)
