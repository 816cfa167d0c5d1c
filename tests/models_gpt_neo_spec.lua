-- ml.models GPT-Neo (EleutherAI gpt-neo-125M, 1.3B, 2.7B): Hugging Face names under attn.attention,
-- unscaled scores, local layers attending through a window of window_size keys (their cache keeping
-- only those), logits and greedy generation against transformers (tests/fixtures/gen_models.py
-- gpt_neo: local, global, local layers, window 4, prompts of 10 tokens), left-padded batches, device
-- maps, int8, bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local gpt_neo = require("moonload.models.gpt_neo")
local H = require("models_helpers")

local NAME = "gpt_neo_tiny"
local DIR = H.FIX .. "/" .. NAME
local TOL = 1e-4

local function tiny(over)
   local c = { vocab_size = 50, hidden_size = 32, num_layers = 2, num_heads = 4, max_position_embeddings = 16 }
   for k, v in pairs(over or {}) do c[k] = v end
   return c
end

-- the rows of a (B, T, V) tensor's batch row b from position first (1-based) on, as Lua lists
local function rows_from(t, b, first)
   return t:select(1, b):narrow(1, first, t:size(2) - first + 1):tolist()
end

describe("models.gpt_neo", function()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   describe("structure", function()
      it("uses transformers' parameter names, in registration order, and holds every checkpoint tensor", function()
         local names = H.param_names(model)
         assert.are.equal("transformer.wte.weight", names[1])
         assert.are.equal("transformer.wpe.weight", names[2])
         assert.are.equal("transformer.h.0.ln_1.weight", names[3])
         assert.are.equal("transformer.h.0.attn.attention.k_proj.weight", names[5])
         assert.are.equal("transformer.h.0.attn.attention.q_proj.weight", names[7])
         assert.are.equal("transformer.h.0.attn.attention.out_proj.bias", names[9])
         assert.are.equal("transformer.h.0.mlp.c_fc.weight", names[12])
         assert.are.equal("transformer.ln_f.bias", names[#names])
         H.assert_holds_checkpoint(model, DIR, true)
         assert.are.equal(gpt_neo.GPTNeoForCausalLM, getmetatable(model))
      end)

      it("has no q/k/v biases, nn.Linear (out, in) weights and a head tied to transformer.wte", function()
         local attn = model.transformer.h[1].attn.attention
         assert.is_nil(attn.q_proj.bias)
         assert.are.same({ 32 }, attn.out_proj.bias.shape)
         assert.are.same({ 64, 32 }, model.transformer.h[1].mlp.c_fc.weight.shape)    -- intermediate_size 64
         assert.are.equal(model.transformer.wte.weight, model.lm_head.weight)
      end)

      it("prints as transformers' module tree", function()
         local text = tostring(model)
         assert.truthy(text:find("GPTNeoForCausalLM(\n  (transformer): GPTNeoModel(\n    (wte): Embedding(100, 32)", 1, true))
         assert.truthy(text:find("(0-2): 3 x GPTNeoBlock(", 1, true))
         assert.truthy(text:find("(attn): GPTNeoAttention(\n          (attention): GPTNeoSelfAttention(\n"
            .. "            (k_proj): Linear(in_features=32, out_features=32, bias=False)", 1, true))
         assert.truthy(text:find("(mlp): GPTNeoMLP(\n          (c_fc): Linear(in_features=32, out_features=64, bias=True)", 1, true))
         assert.truthy(text:find("(act): GELU(approximate='tanh')", 1, true))
         assert.truthy(text:find("(lm_head): Linear(in_features=32, out_features=100, bias=False)", 1, true))
      end)

      it("gives the local layers a window of window_size keys and every layer unscaled scores", function()
         local kinds, windows = {}, {}
         for i = 1, 3 do
            local attn = model.transformer.h[i].attn
            kinds[i], windows[i] = attn.attention_type, attn.attention.window or false
            assert.are.equal(1, attn.attention.scale)
         end
         assert.are.same({ "local", "global", "local" }, kinds)
         assert.are.same({ 4, false, 4 }, windows)
      end)

      it("keeps blocks whole in device maps and plans each attention's cache, a local one's window only", function()
         assert.are.same({ "GPTNeoBlock" }, model.no_split_modules)
         assert.are.same({ 4, 8, 4, false }, { model.transformer.h[1].attn.attention:kv_cache_heads() })
         assert.are.equal(64, model:max_length())
         local sizes = ml.utils.kv_cache_sizes(model, { max_length = 64, prompt_length = 2 })
         assert.are.same({ "transformer.h.0.attn.attention", "transformer.h.1.attn.attention", "transformer.h.2.attn.attention" }, H.sorted_keys(sizes))
         assert.are.equal(2 * 10 * 4 * 8 * 4, sizes["transformer.h.0.attn.attention"])     -- prompt + 2 windows
         assert.are.equal(2 * 64 * 4 * 8 * 4, sizes["transformer.h.1.attn.attention"])
      end)

      it("builds from a config table with transformers' defaults: 24 layers alternating global and local", function()
         local cfg = gpt_neo.config(tiny({ num_layers = 24 }))
         assert.are.equal(256, cfg.window_size)
         assert.are.equal(128, cfg.intermediate_size)
         assert.are.equal("gelu_new", cfg.activation_function)
         assert.are.same({ "global", "local", "global" }, { cfg.attention_layers[1], cfg.attention_layers[2], cfg.attention_layers[3] })
         assert.are.same({ false, 256 }, { cfg.layer_windows[23], cfg.layer_windows[24] })
         local m = gpt_neo.GPTNeoForCausalLM(tiny({ attention_types = { { { "local" }, 2 } } }))
         assert.are.same({ 128, 32 }, m.transformer.h[1].mlp.c_fc.weight.shape)
         assert.are.equal(256, m.transformer.h[2].attn.attention.window)
         assert.are.equal(m.transformer.wte.weight, m.lm_head.weight)
      end)

      it("reads attention_layers before attention_types, as transformers does", function()
         local cfg = gpt_neo.config(tiny({ attention_types = { { { "global" }, 2 } }, attention_layers = { "local", "local" } }))
         assert.are.same({ "local", "local" }, cfg.attention_layers)
      end)

      it("loads checkpoints that still hold the old attention mask buffers", function()
         local dir = H.tmpdir()
         H.copy(DIR .. "/config.json", dir .. "/config.json")
         local sd = ml.safetensors.load_file(DIR .. "/model.safetensors")
         for i = 0, 2 do
            sd["transformer.h." .. i .. ".attn.attention.bias"] = ml.ones({ 1, 1, 64, 64 }, { dtype = "bool" })
            sd["transformer.h." .. i .. ".attn.attention.masked_bias"] = ml.tensor(-1e9)
         end
         ml.safetensors.save_file(sd, dir .. "/model.safetensors")
         assert.is_true(H.max_abs_diff(models.from_pretrained(dir)(ids), exp.logits) < TOL)
         H.rmdir(dir)
      end)
   end)

   describe("against transformers (gpt_neo_tiny)", function()
      H.it_matches_expected(model, NAME, " (batch of 2, prompts of 10 tokens over windows of 4)")
      H.it_matches_padded(model, NAME, "learned positions and windows")

      it("differs from transformers without the window, with a window one key wider, or with scaled scores", function()
         -- the first window_size positions see no more than window_size keys: no window changes them
         local unwindowed = logits_after(function(m)
            for _, i in ipairs({ 1, 3 }) do rawset(m.transformer.h[i].attn.attention, "window", false) end
         end)
         assert.is_true(H.max_abs_diff(unwindowed:narrow(2, 1, 4), { { unpack(exp.logits[1], 1, 4) }, { unpack(exp.logits[2], 1, 4) } }) < TOL)
         assert.is_true(H.max_abs_diff(unwindowed, exp.logits) > 0.1)
         local wider = logits_after(function(m)
            for _, i in ipairs({ 1, 3 }) do rawset(m.transformer.h[i].attn.attention, "window", 5) end
         end)
         assert.is_true(H.max_abs_diff(wider:narrow(2, 1, 4), { { unpack(exp.logits[1], 1, 4) }, { unpack(exp.logits[2], 1, 4) } }) < TOL)
         assert.is_true(H.max_abs_diff(wider, exp.logits) > 0.1)
         local scaled = logits_after(function(m)
            for i = 1, 3 do rawset(m.transformer.h[i].attn.attention, "scale", 1 / math.sqrt(8)) end
         end)
         assert.is_true(H.max_abs_diff(scaled, exp.logits) > 0.1)
      end)

      it("handles several new tokens after a cached prefix (the window's band below the causal mask)", function()
         local full = model(exp.input_ids[1])
         local cache = model:new_cache(2)   -- small capacity: the buffers grow, the local ones slide
         model({ unpack(exp.input_ids[1], 1, 3) }, { cache = cache })
         local rest = model({ unpack(exp.input_ids[1], 4, 10) }, { cache = cache })
         assert.is_true(H.max_abs_diff(rest:select(1, 1), rows_from(full, 1, 4)) < 1e-5)
      end)

      it("caches a local layer's window only, decoding many windows as full forwards do", function()
         local prompt, new = { 3, 17, 5, 9, 11, 2 }, 30
         local seq = { unpack(prompt) }
         for _ = 1, new do                                       -- no cache: the whole sequence each step
            local _, best = model({ seq }):select(2, -1):max(-1)
            seq[#seq + 1] = best:item()
         end
         assert.are.same(seq, model:generate(prompt, { max_new_tokens = new, eos_token_id = false }))
         local cache = model:new_cache()
         model({ prompt }, { cache = cache })
         for i = 1, new do model({ { seq[#prompt + i] } }, { cache = cache }) end
         assert.are.equal(#prompt + new, cache.length)
         assert.is_true(cache.k[1]:size(3) <= #prompt + 2 * 4 + 1, "local layer 1 keeps " .. cache.k[1]:size(3))
         assert.is_true(cache.k[3]:size(3) <= #prompt + 2 * 4 + 1, "local layer 3 keeps " .. cache.k[3]:size(3))
         assert.is_true(cache.k[2]:size(3) >= #prompt + new, "the global layer keeps every key")
      end)

      it("gives the same greedy ids with prompts in chunks shorter than the window, and with prompt lookup", function()
         local n = exp.max_new_tokens
         assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = n, eos_token_id = false,
            micro_batch_size = 1, prefill_chunk_size = 3 }))
         -- (drafts rejected crop the cache: a local layer that no longer holds the window starts over)
         for b = 1, 2 do
            local stats = {}
            local out = model:generate(exp.input_ids[b], { max_new_tokens = n, eos_token_id = false,
               prompt_lookup_num_tokens = 3, max_matching_ngram_size = 1, assistant_stats = stats })
            assert.are.same(exp.greedy_ids[b], out)
            assert.are.equal(n, stats.accepted + stats.forwards)
         end
      end)
   end)

   describe("loading options", function()
      H.collect_warnings()                    -- kept quiet

      it("splits over CPU and disk at block boundaries under a CPU budget, same logits and greedy ids", function()
         local off = H.tmpdir()
         local m = models.from_pretrained(DIR, { device_map = "auto", max_memory = { cpu = 110000 }, offload_folder = off })
         local map = m.hf_device_map
         for name in pairs(map) do assert.is_nil(name:find("^transformer%.h%.%d+%."), name .. " splits a block") end
         assert.are.same({ "cpu", "disk", "disk" }, { tostring(map["transformer.h.0"]), tostring(map["transformer.h.1"]),
            tostring(map["transformer.h.2"]) })
         assert.is_true(H.max_abs_diff(m(ids), exp.logits) < TOL)
         assert.are.same(exp.greedy_ids[1], m:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
         H.rmdir(off)
      end)

      it("saved and loaded back gives transformers' logits; int8 and bfloat16 stay close", function()
         local dir = H.tmpdir()
         ml.save_model(model, dir)
         assert.are.same(H.read_json(DIR .. "/config.json").attention_types, H.read_json(dir .. "/config.json").attention_types)
         assert.is_true(H.max_abs_diff(models.from_pretrained(dir)(ids), exp.logits) < TOL)
         H.rmdir(dir)
         -- (measured 0.28 for both: unscaled scores are sqrt(8) times larger than scaled ones, their rounding too)
         assert.is_true(H.max_abs_diff(models.from_pretrained(DIR, { quantize = "int8" })(ids), exp.logits) < 0.6)
         local logits = models.from_pretrained(DIR, { dtype = "bfloat16" })(ids)
         assert.are.equal("bfloat16", logits.dtype)
         assert.is_true(H.max_abs_diff(logits:float(), exp.logits) < 0.6)
      end)
   end)

   describe("bad input", function()
      it("rejects token ids outside the vocabulary and sequences past max_position_embeddings", function()
         assert.has_error(function() model({ 1, 100 }) end,
            "models.gpt_neo.forward: token id 100 is out of range for vocab_size 100 (ids are 0-based)")
         local long = {}
         for i = 1, 65 do long[i] = i % 100 end
         assert.has_error(function() model(long) end,
            "models.gpt_neo: sequence of 65 tokens (0 cached + 65 new) exceeds max_position_embeddings 64")
         local cache = model:new_cache()
         model({ 1, 2, 3 }, { cache = cache })
         assert.has_error(function() model({ unpack(long, 1, 62) }, { cache = cache }) end,
            "models.gpt_neo: sequence of 65 tokens (3 cached + 62 new) exceeds max_position_embeddings 64")
         assert.are.equal(3, cache.length)
      end)

      it("names a missing config key, a value of the wrong kind, and the file", function()
         H.assert_config_fails(gpt_neo.config, DIR, function(raw) raw.num_heads = nil end,
            'models.gpt_neo: config key "num_heads" is missing in config table')
         H.assert_config_fails(gpt_neo.config, DIR, { window_size = 0 },
            'models.gpt_neo: config key "window_size" in config table must be a positive integer, got number 0')
         local dir = H.tmpdir()
         H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
         H.write(dir .. "/config.json", '{"model_type": "gpt_neo", "vocab_size": 100, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "window_size": "4"}')
         assert.has_error(function() models.from_pretrained(dir) end,
            'models.gpt_neo: config key "window_size" in ' .. dir .. '/config.json must be a positive integer, got string "4"')
         H.rmdir(dir)
      end)

      it("rejects layer kinds that do not fit num_layers or are not global or local", function()
         H.assert_config_fails(gpt_neo.config, DIR, function(raw) raw.attention_layers = nil; raw.num_layers = 4 end,
            'models.gpt_neo: config key "attention_types" gives 3 layer kinds, num_layers is 4 in config table')
         H.assert_config_fails(gpt_neo.config, DIR, { attention_layers = { "local", "global" } },
            'models.gpt_neo: config key "attention_layers" gives 2 layer kinds, num_layers is 3 in config table')
         H.assert_config_fails(gpt_neo.config, DIR, { attention_layers = { "local", "sparse", "global" } },
            'models.gpt_neo: config key "attention_layers" gives layer 1 the kind "sparse" (supported: "global", "local") in config table')
         H.assert_config_fails(gpt_neo.config, DIR, function(raw) raw.attention_layers = nil; raw.attention_types = { { "local", 3 } } end,
            'models.gpt_neo: config key "attention_types" must be a list of [[kind, ...], count] pairs in config table')
      end)

      it("rejects head counts that do not divide hidden_size and unknown activations", function()
         assert.has_error(function() gpt_neo.GPTNeoForCausalLM(tiny({ num_heads = 5 })) end,
            "models.gpt_neo: hidden_size 32 is not divisible by num_heads 5 in config table")
         local ok, err = pcall(gpt_neo.GPTNeoForCausalLM, tiny({ activation_function = "swiglu" }))
         assert.is_false(ok)
         assert.truthy(err:find('models.gpt_neo: activation "swiglu" in config table is not supported (supported: ', 1, true), err)
      end)
   end)
end)
