-- ml.models MiMo-V2-Flash (mimo_v2_flash): sliding layers with twice the key/value heads and
-- attention sinks beside full ones, values narrower than the keys and scaled, partial rotary
-- embeddings per layer type, dense and sparse MLPs with DeepSeek-V3's routing; logits and greedy
-- generation against transformers' MiMoV2FlashForCausalLM (tests/fixtures/gen_models.py
-- mimo_v2_flash). The fixture's prompts run past its sliding layers' 4-key window.
local ml = require("moonload")
local models = require("moonload.models")
local mimo = require("moonload.models.mimo_v2_flash")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "mimo_v2_flash_tiny"
local DIR = H.FIX .. "/" .. NAME

-- A copy of the fixture whose config.json is changed by change(raw): the folder.
local function with_config(change)
   local dir = H.tmpdir()
   H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
   local raw = H.read_json(DIR .. "/config.json")
   change(raw)
   H.write(dir .. "/config.json", require("cjson").encode(raw))
   return dir
end

-- The fixture's logits with its weights under a changed config.
local function logits_with_config(change)
   local dir = with_config(change)
   local logits = models.from_pretrained(dir)(H.expected(NAME).input_ids)
   H.rmdir(dir)
   return logits
end

describe("models.mimo_v2_flash (tests/fixtures/models/mimo_v2_flash_tiny: sinks and doubled kv heads on a 4-key window, v_head_dim 8, V3's routing)", function()
   H.collect_warnings()                       -- (the disk offload note) kept quiet
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds MiMoV2FlashForCausalLM with every tensor of the checkpoint, under the hub's names", function()
      assert.are.equal("MiMoV2FlashForCausalLM", model.__name)
      assert.are.same({ "MiMoV2FlashDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layers = model.model.layers
      assert.are.same({ "MiMoV2FlashMLP", "MiMoV2FlashMoE", "MiMoV2FlashMLP", "MiMoV2FlashMoE" },
         { layers[1].mlp.__name, layers[2].mlp.__name, layers[3].mlp.__name, layers[4].mlp.__name })
      assert.is_nil(layers[2].mlp.shared_experts)
      assert.are.same({ false, 4, 4, false }, model.config.layer_windows)
      -- full layers: 1 key/value head, no sinks; sliding layers: 2, and a sink per query head
      for i, want in ipairs({ 1, 2, 2, 1 }) do
         local attn = layers[i].self_attn
         assert.are.equal(want, attn.n_kv_head)
         assert.are.same({ want * 12, 32 }, attn.k_proj.weight.shape)
         assert.are.same({ want * 8, 32 }, attn.v_proj.weight.shape)
         assert.are.same({ 32, 4 * 8 }, attn.o_proj.weight.shape)
         assert.are.equal(want == 2, attn.attention_sink_bias ~= nil)
      end
      -- int(12 x 0.334) = 4 rotary dims on full layers, int(12 x 0.5) = 6 on sliding ones
      assert.are.same({ 4, 6 }, { model.config.rotary_dim, model.config.local_rotary_dim })
      assert.are.same({ 2, 3 }, { model.model.rotary_emb.inv_freq:numel(), model.model.rotary_emb.local_inv_freq:numel() })
   end)

   H.it_matches_expected(model, NAME, " (10 tokens past the window)")
   H.it_matches_padded(model, NAME, "positions")

   it("decodes one token at a time from the first through the cache, past the window, as a full forward", function()
      for _, row in ipairs({ 1, 2 }) do
         assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[row], 1), { exp.logits[row] }) < TOL)
      end
      -- the sliding layers keep at most the first forward's tokens + 2 windows, with their own heads and widths
      local cache = model:new_cache()
      model({ exp.input_ids[2] }, { cache = cache })
      for i = 1, 12 do model({ { i } }, { cache = cache }) end
      assert.are.same({ 1, 1, 22, 12 }, cache.k[1]:narrow(3, 1, cache.length).shape)
      assert.are.same({ 1, 1, 22, 8 }, cache.v[4]:narrow(3, 1, cache.length).shape)
      local k, v = cache.k[3], cache.v[2]
      assert.are.same({ 2, 12, 2, 8 }, { k:size(2), k:size(4), v:size(2), v:size(4) })
      assert.is_true(v:size(3) <= 10 + 2 * 4, tostring(v:size(3)))
   end)

   it("counts each layer's cache as generate allocates it (kv heads and widths per layer), float and int8", function()
      local rm = require("moonload.utils.runtime_memory")
      local B, P, max_length = 2, 5, 40
      for _, dtype in ipairs({ false, "int8" }) do
         local sizes = rm.kv_cache_sizes(model, { batch_size = B, max_length = max_length, prompt_length = P,
            kv_cache_dtype = dtype or nil })
         local cache = model:new_cache(max_length, nil, dtype or nil)
         model(H.padded_prompts(model, B, P), { cache = cache })
         for i = 1, 4 do
            local held = cache.k[i]:nbytes() + cache.v[i]:nbytes() + (dtype and cache.ks[i]:nbytes() + cache.vs[i]:nbytes() or 0)
            assert.are.equal(held, sizes["model.layers." .. (i - 1) .. ".self_attn"], i)
         end
      end
   end)

   it("decodes the same under a block schedule and with prompt-lookup drafts (blocks and crops of the cache)", function()
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false, micro_batch_size = 1, prefill_chunk_size = 3 }))
      assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false, prompt_lookup_num_tokens = 3 }))
   end)

   describe("needs each of its particularities (without one, other logits)", function()
      it("the sliding layers' sinks", function()
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for i = 2, 3 do m.model.layers[i].self_attn.attention_sink_bias:fill_(-math.huge) end
         end), exp.logits) > 0.05)
      end)

      it("the values' scale (attention_value_scale; null scales nothing)", function()
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for _, layer in ipairs(m.model.layers) do rawset(layer.self_attn, "value_scale", 1) end
         end), exp.logits) > 0.05)
         local unscaled = logits_with_config(function(raw) raw.attention_value_scale = require("cjson").null end)
         assert.is_true(H.max_abs_diff(unscaled, exp.logits) > 0.05)
      end)

      it("the sliding layers' second key/value head (queries 3 and 4 read it)", function()
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for i = 2, 3 do
               local attn = m.model.layers[i].self_attn
               attn.k_proj.weight:narrow(1, 13, 12):copy_(attn.k_proj.weight:narrow(1, 1, 12))
               attn.v_proj.weight:narrow(1, 9, 8):copy_(attn.v_proj.weight:narrow(1, 1, 8))
            end
         end), exp.logits) > 0.05)
      end)

      it("the partial rotary embedding, and each layer type's own", function()
         local whole = logits_with_config(function(raw)
            for _, p in pairs(raw.rope_parameters) do p.partial_rotary_factor = 1 end
         end)
         assert.is_true(H.max_abs_diff(whole, exp.logits) > 0.05)
         local same = logits_with_config(function(raw) raw.rope_parameters.sliding_attention = raw.rope_parameters.full_attention end)
         assert.is_true(H.max_abs_diff(same, exp.logits) > 0.05)
      end)

      it("the window, and the router's correction bias", function()
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for i = 2, 3 do rawset(m.model.layers[i].self_attn, "window", false) end
         end), exp.logits) > 1e-3)
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for i = 2, 4, 2 do m.model.layers[i].mlp.gate.e_score_correction_bias:fill_(0) end
         end), exp.logits) > 1e-3)
      end)
   end)

   it("runs only the experts the router picked: 2 a token in each sparse layer", function()
      local m = models.from_pretrained(DIR)
      local ran = {}
      for name, module in m:named_modules() do
         local layer = name:match("^model%.layers%.(%d+)%.mlp%.experts%.%d+$")
         if layer then
            local f = module.forward
            module.forward = function(self, x) ran[layer] = (ran[layer] or 0) + x:size(1); return f(self, x) end
         end
      end
      m({ { 1, 7, 9 } })
      assert.are.same({ ["1"] = 6, ["3"] = 6 }, ran)              -- rows through experts, per sparse layer
   end)

   it("reads transformers' stacked layout too, and leaves out the hub's multi-token-prediction layers", function()
      local dir = H.copy_with_stacked_experts(DIR, { "model.layers.1.mlp.experts", "model.layers.3.mlp.experts" }, 8, nil,
         { ["model.mtp.layers.0.input_layernorm.weight"] = ml.ones({ 32 }) })
      local stacked = models.from_pretrained(dir)
      assert.are.equal("StackedExperts", stacked.model.layers[2].mlp.experts.__name)
      assert.is_true(H.max_abs_diff(stacked(ids), exp.logits) < TOL)
      local ran = H.experts_run(stacked.model.layers[4].mlp.experts, function() stacked({ { 7 } }) end)
      assert.are.equal(2, #ran)                      -- top 2 of 8 for one token
      assert.are_not.equal(ran[1], ran[2])
      H.rmdir(dir)
   end)

   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, overrides_budget = 400000,
      places = { ["model.layers.1.mlp.experts.0"] = "disk" } })

   it("loads bfloat16 with the router's weight and correction bias kept float32", function()
      local bf = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local gate = bf.model.layers[2].mlp.gate
      assert.are.equal("float32", gate.weight.dtype)
      assert.are.equal("float32", gate.e_score_correction_bias.dtype)
      assert.are.equal("bfloat16", bf.model.layers[2].self_attn.attention_sink_bias.dtype)
      assert.are.same({ unpack(exp.greedy_ids[1], 1, 13) }, bf:generate(exp.input_ids[1], { max_new_tokens = 3, eos_token_id = false }))
   end)

   describe("config", function()
      it("reads MiMoV2FlashConfig's defaults: layer types, MLP types, per-type rotary tables, value heads", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "layer_types", "mlp_layer_types", "rope_parameters", "sliding_window", "head_dim", "v_head_dim",
                              "attention_value_scale", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok",
                              "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor" }) do
            raw[k] = nil
         end
         raw.num_hidden_layers, raw.num_attention_heads = 12, 8
         local cfg = mimo.config(raw)
         -- the first layer and every 6th full, the first layer dense
         assert.are.same({ false, 129, 129, 129, 129, false, 129, 129, 129, 129, 129, false }, cfg.layer_windows)
         assert.are.same({ false, true, true, true, true, true, true, true, true, true, true, true }, cfg.sparse_layers)
         assert.are.same({ 192, 128, 0.707, 64, 64 }, { cfg.head_dim, cfg.v_head_dim, cfg.attention_value_scale,
            cfg.rotary_dim, cfg.local_rotary_dim })
         assert.are.same({ 5000000, 10000 }, { cfg.rope.rope_theta, cfg.rope_local.rope_theta })
         assert.are.same({ 256, 2048, 8, 1, 1, true, 1, 0 }, { cfg.n_routed_experts, cfg.moe_intermediate_size,
            cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor,
            cfg.n_shared_experts })
      end)

      it("reads the original code's sliding_window_size (keys before the query) as one more, and a null value scale as 1", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.sliding_window, raw.sliding_window_size = nil, 128
         assert.are.same({ false, 129, 129, false }, mimo.config(raw).layer_windows)
         raw.attention_value_scale = require("cjson").null
         assert.are.equal(1, mimo.config(raw).attention_value_scale)
         -- the default partial_rotary_factor of an entry without one: int(12 x 0.334) = 4
         raw.rope_parameters.sliding_attention.partial_rotary_factor = nil
         assert.are.equal(4, mimo.config(raw).local_rotary_dim)
      end)

      it("names a malformed field and the file", function()
         local function fails(change, msg) H.assert_config_fails(mimo.config, DIR, change, msg) end
         fails(function(raw) raw.rope_parameters.full_attention.rope_type = "yarn" end,
            'models.mimo_v2_flash: rope type "yarn" of rope_parameters.full_attention is not supported (supported: default)')
         fails(function(raw) raw.rope_parameters.sliding_attention = nil end,
            'config key "rope_parameters.sliding_attention" must be an object (each layer type rotates by its own)')
         fails(function(raw) raw.rope_parameters.sliding_attention.rope_theta = "x" end,
            'config key "rope_parameters.sliding_attention.rope_theta" must be a positive number, got x')
         fails(function(raw) raw.rope_parameters.full_attention.partial_rotary_factor = 0 end,
            'config key "rope_parameters.full_attention.partial_rotary_factor" must be a number in (0, 1], got 0')
         fails(function(raw) raw.rope_parameters.full_attention.partial_rotary_factor = 0.25 end,
            "the rotary dims of a head (3 of head_dim 12) must be even")
         fails({ num_key_value_heads = 4 }, "num_attention_heads 4 is not a multiple of 8, the sliding layers' key/value heads")
         fails({ layer_types = { "full_attention", "chunked_attention", "full_attention", "full_attention" } },
            'layer_types[2] is "chunked_attention" (supported: full_attention, sliding_attention)')
         fails({ mlp_layer_types = { "dense", "moe", "dense", "dense" } }, 'mlp_layer_types[2] must be "dense" or "sparse", got moe')
         fails({ attention_value_scale = "x" }, 'config key "attention_value_scale" must be a positive number or null, got x')
         fails({ v_head_dim = 0 }, 'config key "v_head_dim" must be an integer >= 1, got 0')
         fails({ sliding_window_size = -1 }, 'config key "sliding_window_size" must be an integer >= 0, got -1')
         fails({ num_experts_per_tok = 9 }, "models.mimo_v2_flash: num_experts_per_tok 9 is more than n_routed_experts 8")
         local dir = with_config(function(raw) raw.v_head_dim = 0 end)
         local ok, err = pcall(models.from_pretrained, dir)
         assert.is_false(ok)
         assert.truthy(tostring(err):find('config key "v_head_dim" must be an integer >= 1, got 0 in ' .. dir .. "/config.json", 1, true), err)
         H.rmdir(dir)
      end)
   end)
end)
