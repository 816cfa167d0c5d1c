-- ml.models Gemma 4 against transformers (tests/fixtures/gen_models.py gemma4, gemma4_moe,
-- gemma4_multimodal): names, logits, greedy ids, decoding through the cache (layers that reuse
-- earlier layers' keys and values), padded batches, beams and assisted generation, offload, the
-- experts beside the MLP, the language model of a multimodal checkpoint, the hub's way of
-- writing the full layers' geometry, and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local gemma4 = require("moonload.models.gemma4")
local H = require("models_helpers")

local NAME = "gemma4_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.gemma4 (tests/fixtures/models/gemma4_tiny: per-layer inputs, the last two layers reusing keys and values)", function()
   H.collect_warnings()
   local exp = H.expected(NAME)
   local model = models.from_pretrained(DIR)

   it("builds Gemma4ForCausalLM with every tensor of the checkpoint, under its names, the head tied", function()
      assert.are.equal("Gemma4ForCausalLM", model.__name)
      H.assert_holds_checkpoint(model, DIR, true)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      local layers = model.model.layers
      -- sliding layers: 4 heads of 8, 2 key/value heads; full ones: heads of 16, one key head that is the value
      assert.are.same({ 16, 32 }, layers[1].self_attn.k_proj.weight.shape)
      assert.are.same({ 64, 32 }, layers[2].self_attn.q_proj.weight.shape)
      assert.are.same({ 16, 32 }, layers[2].self_attn.k_proj.weight.shape)
      assert.is_nil(layers[2].self_attn.v_proj)
      -- layers 3 and 4 (0-based) reuse layer 2's and layer 1's keys and values, with MLPs twice as wide
      assert.is_nil(layers[4].self_attn.k_proj)
      assert.are.equal(3, layers[4].self_attn.kv_source)
      assert.are.equal(2, layers[5].self_attn.kv_source)
      assert.are.equal(96, layers[5].mlp.gate_proj.out_features)
      assert.are.equal(48, layers[3].mlp.gate_proj.out_features)
      assert.are.same({ 100, 40 }, model.model.embed_tokens_per_layer.weight.shape)
   end)

   H.it_matches_expected(model, NAME, " (the reusing layers read the cache of the layers they reuse)")
   H.it_matches_padded(model, NAME, "positions and padding, the reusing layers too,")

   it("keeps no keys or values for the layers that reuse others', and generates with beams and prompt lookup", function()
      local cache = model:new_cache()
      model(exp.input_ids, { cache = cache })
      for i = 1, 3 do assert.truthy(cache.k[i], "layer " .. i) end
      assert.is_nil(cache.k[4])
      assert.is_nil(cache.k[5])
      local sizes = ml.utils.kv_cache_sizes(model, { max_length = 16 })
      assert.is_nil(sizes["model.layers.3.self_attn"])
      assert.is_true(sizes["model.layers.1.self_attn"] > 0)
      local greedy = exp.greedy_ids
      assert.are.same({ greedy[1] }, model:generate({ exp.input_ids[1] }, { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false, prompt_lookup_num_tokens = 2, max_matching_ngram_size = 1 }))
      local beams = model:generate({ exp.input_ids[1] }, { max_new_tokens = 4, num_beams = 3, eos_token_id = false })
      assert.are.equal(#exp.input_ids[1] + 4, #beams[1])
   end)

   it("runs the layers that reuse keys and values on the kept positions only, with the same logits there", function()
      local seen = {}
      local last = model.model.layers[5]
      rawset(last, "forward", function(self, x, ...)
         seen[#seen + 1] = x:size(2)
         return getmetatable(self).forward(self, x, ...)
      end)
      local full = model(exp.input_ids)
      local kept = model(exp.input_ids, { logits_to_keep = 3 })
      rawset(last, "forward", nil)
      assert.are.same({ 9, 3 }, seen)
      assert.is_true(H.max_abs_diff(kept, full:narrow(2, 7, 3):tolist()) < 1e-5)
      -- and after a cache holds the first tokens, and under a padding mask
      local cache = model:new_cache()
      model({ { 2, 7, 9, 33 } }, { cache = cache })
      local later = model({ { 51, 4, 80, 14, 3 } }, { cache = cache, logits_to_keep = 2 })
      assert.is_true(H.max_abs_diff(later, { { exp.logits[1][8], exp.logits[1][9] } }) < 1e-4)
      local pad = H.read_json(DIR .. "/padded.json")
      local masked = model(pad.input_ids, { attention_mask = pad.attention_mask, logits_to_keep = 2 })
      assert.is_true(H.max_abs_diff(masked, { { pad.logits[1][7], pad.logits[1][8] },
         { pad.logits[2][7], pad.logits[2][8] } }) < 1e-4)
   end)

   it("runs split over CPU and disk, and in bfloat16 close to float32", function()
      local off = H.tmpdir()
      local split = models.from_pretrained(DIR, { device_map = H.alternating_layers("model", 5, {
         ["model.embed_tokens"] = "cpu", ["model.embed_tokens_per_layer"] = "disk", ["model.per_layer_model_projection"] = "cpu",
         ["model.per_layer_projection_norm"] = "disk", ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" }),
         offload_folder = off })
      assert.is_true(H.max_abs_diff(split(exp.input_ids), exp.logits) < 1e-4)
      assert.are.same(exp.greedy_ids, split:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(off)
      local bf = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local d = H.max_abs_diff(bf(exp.input_ids):float(), exp.logits)
      assert.is_true(d < 1.0, "bfloat16 logits off by " .. d)
   end)

   it("runs in a block schedule (each block reading its own rows' and tokens' shared keys) with the same tokens", function()
      for _, blocks in ipairs({ { micro_batch_size = 1 }, { prefill_chunk_size = 4 }, { micro_batch_size = 1, prefill_chunk_size = 2 } }) do
         local opts = { max_new_tokens = exp.max_new_tokens, eos_token_id = false }
         for k, v in pairs(blocks) do opts[k] = v end
         assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, opts))
         local logits = model(exp.input_ids, blocks)
         assert.is_true(H.max_abs_diff(logits, exp.logits) < 1e-4)
      end
      local pad = H.read_json(DIR .. "/padded.json")
      assert.are.same(pad.greedy_ids, model:generate(pad.input_ids, { attention_mask = pad.attention_mask,
         max_new_tokens = pad.max_new_tokens, eos_token_id = false, micro_batch_size = 1, prefill_chunk_size = 3 }))
      -- with an int8 cache, the sliding layer's copies keep their scales
      local want = model:generate(exp.input_ids, { max_new_tokens = 4, eos_token_id = false, kv_cache_dtype = "int8" })
      assert.are.same(want, model:generate(exp.input_ids, { max_new_tokens = 4, eos_token_id = false,
         kv_cache_dtype = "int8", prefill_chunk_size = 2 }))
   end)

   it("reads the hub's global_head_dim and num_global_key_value_heads where transformers writes per_layer_config", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.per_layer_config = nil
      raw.global_head_dim, raw.num_global_key_value_heads = 16, 1
      local cfg = gemma4.config(raw)
      assert.are.same({ 8, 16, 8, 8, 16 }, cfg.layer_head_dims)
      assert.are.same({ 2, 1, 2, 2, 1 }, cfg.layer_kv_heads)
      raw.attention_k_eq_v = false             -- (the global key/value heads come with keys as values)
      assert.are.same({ 2, 2, 2, 2, 2 }, gemma4.config(raw).layer_kv_heads)
      raw.global_head_dim = nil                 -- transformers' default: 512
      assert.are.equal(512, gemma4.config(raw).layer_head_dims[2])
   end)

   it("attends fully on the last layer whatever layer_types says, as transformers forces it", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.layer_types[5] = "sliding_attention"
      local cfg = gemma4.config(raw)
      assert.are.equal("full_attention", cfg.layer_types[5])
      assert.is_false(cfg.layer_windows[5])
   end)

   it("saves and loads back the same model, its config's per-layer geometry included", function()
      local out = H.tmpdir()
      ml.save_model(model, out)
      local back = models.from_pretrained(out)
      assert.are.same({ 8, 16, 8, 8, 16 }, back.config.layer_head_dims)
      assert.is_true(ml.equal(back(exp.input_ids), model(exp.input_ids)))
      H.rmdir(out)
   end)

   it("names what is wrong in a config", function()
      local cases = {
         { { num_kv_shared_layers = 4 }, "layer 1 (full_attention) shares keys and values, but no earlier layer of that kind computes them" },
         { { num_kv_shared_layers = 6 }, "num_kv_shared_layers 6 is more than num_hidden_layers 5" },
         { { layer_types = { "sliding_attention", "chunked_attention", "sliding_attention", "sliding_attention", "full_attention" } },
           'layer_types[2] is "chunked_attention" (supported: sliding_attention, full_attention)' },
         { { use_bidirectional_attention = "all" }, 'use_bidirectional_attention "all" is not supported' },
         { { per_layer_config = { ["1"] = { intermediate_size = 8 } } },
           'per_layer_config["1"].intermediate_size is not supported (supported: head_dim, num_key_value_heads)' },
         { { per_layer_config = { ["1"] = { num_key_value_heads = 3 } } },
           "num_attention_heads 4 is not a multiple of layer 1's 3 key/value heads" },
         { { per_layer_config = { ["1"] = { head_dim = 16 } } }, "the full_attention layers' head sizes differ (16 and 8)" },
         { { rope_parameters = { full_attention = { rope_type = "yarn", rope_theta = 10 } } },
           'rope_parameters.full_attention: rope type "yarn" is not supported (supported: default, linear, proportional)' },
         { { enable_moe_block = true, num_experts = 2, top_k_experts = 3, moe_intermediate_size = 8 },
           "top_k_experts 3 is more than num_experts 2" },
         { { enable_moe_block = true }, 'config key "num_experts" must be an integer >= 1, got nil' },
         { { hidden_size_per_layer_input = -1 }, 'config key "hidden_size_per_layer_input" in' },
      }
      for _, c in ipairs(cases) do H.assert_config_fails(gemma4.config, DIR, c[1], c[2]) end
   end)
end)

describe("models.gemma4 (tests/fixtures/models/gemma4_moe_tiny: 4 experts, top 2, beside each MLP)", function()
   H.collect_warnings()
   local name = "gemma4_moe_tiny"
   local dir = H.FIX .. "/" .. name
   local model = models.from_pretrained(dir)

   it("builds the router and the stacked experts under transformers' names", function()
      H.assert_holds_checkpoint(model, dir, true)
      local layer = model.model.layers[1]
      assert.are.equal("Gemma4TextRouter", layer.router.__name)
      assert.are.same({ 4, 32, 32 }, layer.experts.gate_up_proj.shape)
      assert.is_nil(model.model.embed_tokens_per_layer)
   end)

   H.it_matches_expected(model, name)

   it("quantizes to int8, the experts split into one module each, with logits close to transformers'", function()
      local exp = H.expected(name)
      local q = models.from_pretrained(dir, { quantize = "int8" })
      assert.are.equal("QuantizedLinear", q.model.layers[1].experts[1].gate_proj.__name)
      assert.is_true(H.max_abs_diff(q(exp.input_ids), exp.logits) < 0.5)
   end)

   it("runs the prompt in a block schedule, and split over CPU and disk, with the same tokens", function()
      local exp = H.expected(name)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false, micro_batch_size = 1, prefill_chunk_size = 3 }))
      local off = H.tmpdir()
      local split = models.from_pretrained(dir, { device_map = H.alternating_layers("model", 6, {
         ["model.embed_tokens"] = "cpu", ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" }),
         offload_folder = off })
      assert.are.same(exp.greedy_ids, split:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(off)
   end)
end)

describe("models.gemma4 (tests/fixtures/models/gemma4_multimodal_tiny: the language model of a gemma4 checkpoint)", function()
   H.collect_warnings()
   local name = "gemma4_multimodal_tiny"
   local model = models.from_pretrained(H.FIX .. "/" .. name)

   it("loads model.language_model.* alone, leaving the vision tower", function()
      assert.are.equal("Gemma4ForCausalLM", model.__name)
      for k in pairs(model:state_dict()) do assert.is_nil(k:find("vision", 1, true), k) end
      assert.truthy(model.config._source:find("(text_config)", 1, true))
   end)

   it("gives transformers' logits and greedy ids", function()
      local exp = H.expected(name)
      assert.is_true(H.max_abs_diff(model(exp.input_ids), exp.logits) < 1e-4)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)
end)

describe("examples/gemma4.lua on a multimodal Gemma 4 folder", function()
   it("puts the per-layer embedding on disk, names each layer's kind and reuse, prints the greedy tokens and the cache", function()
      local dir = H.FIX .. "/gemma4_multimodal_tiny"
      local p = assert(io.popen("luajit examples/gemma4.lua " .. dir .. " 2>/dev/null"))
      local text = p:read("*a")
      p:close()
      local disk = text:match("Gemma4ForCausalLM, [%d.]+ MB of weights in RAM, ([%d.]+) MB on disk")
      assert.truthy(disk, text)
      assert.is_true(tonumber(disk) > 0, text)
      assert.truthy(text:find("layers: sliding8 full16 sliding8 sliding8<-2 full16<-1", 1, true), text)
      local want = models.from_pretrained(dir, { dtype = "bfloat16" }):generate({ 2, 5, 17, 42, 3 },
         { max_new_tokens = 16, eos_token_id = false })
      assert.are.same({ unpack(want, 6) }, H.printed_ids(text))
      -- 21 tokens (a first forward's buffers hold them all) of 2 heads x 8 dims in layers 0 and 2, of
      -- 1 head x 16 in layer 1, keys and values in bfloat16: 3 x 1344 bytes; layers 3 and 4 nothing
      assert.truthy(text:find("21 tokens; cache: 3.9 KB of keys and values in 3 of 5 layers (6.6 KB", 1, true), text)
   end)
end)
