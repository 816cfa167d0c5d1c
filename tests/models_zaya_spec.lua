-- ml.models ZAYA1 (Compressed Convolutional Attention: queries and keys through causal convolutions
-- plus residual paths, half the values delayed a token; L2-normed queries and keys with a learned key
-- scale; top-1 MoE whose router carries a state from layer to layer and has a skip class; float32
-- residuals joined by learned scales) against transformers (tests/fixtures/gen_models.py zaya):
-- names, logits, greedy ids with and without the cache, a padded batch, the state the cache carries,
-- what each particularity does, CPU + disk, configs.
local ml = require("moonload")
local zaya = require("moonload.models.zaya")
local H = require("models_helpers")

local NAME = "zaya_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.zaya (tests/fixtures/models/zaya_tiny: 3 layers, the middle one sliding (3), 4 experts + a skip class)",
   function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds ZayaForCausalLM holding the checkpoint's tensors (stacked experts, a biased head)", function()
      assert.are.equal("ZayaForCausalLM", model.__name)
      assert.are.same({ "ZayaDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[2]
      assert.are.equal("StackedExperts", layer.mlp.experts.__name)
      assert.are.equal("float32", layer.mlp.gate.balancing_biases.dtype)
      assert.is_nil(model.model.layers[1].mlp.gate.router_states_scale)     -- (the first layer's router has no state in)
      assert.are.same({ false, 3, false }, model.config.layer_windows)
      assert.are.equal(4, model.config.rotary_dim)
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions and the padding zeroed before the convolutions")

   it("carries the convolutions' last inputs and the last delayed value in the cache, beside the keys and values", function()
      local cache = model:new_cache(16)
      model(ids, { cache = cache })
      local st = cache.states[2]
      assert.are.same({ 2, 3, 48 }, st.conv.shape)                  -- (taps 2 + 3 - 2; (4 + 2) heads x 8)
      assert.are.same({ 2, 8 }, st.v.shape)
      assert.is_not_nil(cache.k[2])
      assert.is_false(cache:can_crop(4))
   end)

   it("needs the convolutions, the delayed values, the key scale, the router's state, the skip class, the residual "
      .. "scales, the head's bias and the local rope base", function()
      local function layers(m, fn) for i = 1, 3 do fn(m.model.layers[i]) end end
      local changes = {
         function(m) layers(m, function(l) l.self_attn.qkv_proj.conv_qk_grouped.weight:fill_(0) end) end,
         function(m) layers(m, function(l) l.self_attn.qkv_proj.v_proj_delayed.weight:fill_(0) end) end,
         function(m) layers(m, function(l) l.self_attn.qk_norm.temp:fill_(1) end) end,
         function(m) for i = 2, 3 do m.model.layers[i].mlp.gate.router_states_scale:fill_(0) end end,
         function(m) layers(m, function(l) l.mlp.gate.balancing_biases:narrow(1, 5, 1):fill_(10) end) end,
         function(m) layers(m, function(l) l.post_mlp_residual_scale.residual_scale:fill_(1) end) end,
         function(m) m.lm_head.bias:fill_(0) end,
         function(m) m.model.rotary_emb.local_inv_freq:copy_(m.model.rotary_emb.inv_freq) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   -- (a CPU budget of 150000 bytes leaves some layers to the disk)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, overrides = { ["%.mlp%.experts$"] = "disk" },
      places = { ["model.layers.1.mlp.experts"] = "disk" } })

   describe("config", function()
      it("reads ZayaConfig's defaults: every layer hybrid, half of each head rotated", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                              "head_dim", "max_position_embeddings", "moe_intermediate_size", "num_experts",
                              "router_hidden_size", "cca_time0", "cca_time1", "layer_types", "rope_parameters",
                              "tie_word_embeddings", "lm_head_bias", "rms_norm_eps", "sliding_window" }) do
            raw[k] = nil
         end
         local cfg = zaya.config(raw)
         assert.are.same({ 262272, 2048, 40, 8, 2, 128, 131072, 2048, 16, 256, 2, 2 }, { cfg.vocab_size, cfg.hidden_size,
            cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.max_position_embeddings, cfg.moe_intermediate_size, cfg.num_experts, cfg.router_hidden_size,
            cfg.cca_time0, cfg.cca_time1 })
         assert.are.same({ true, false, 1e-5, 64, 5000000, 10000 }, { cfg.tie_word_embeddings, cfg.lm_head_bias,
            cfg.rms_norm_eps, cfg.rotary_dim, cfg.rope.rope_theta, cfg.rope_local.rope_theta })
         for i = 1, 40 do assert.is_false(cfg.layer_windows[i]) end
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(zaya.config, DIR, change, msg) end
         fails({ num_experts_per_tok = 2 }, 'models.zaya: config key "num_experts_per_tok" is 2 (supported: 1)')
         fails({ layer_types = { "hybrid", "full_attention", "hybrid" } },
            'models.zaya: layer_types[2] is "full_attention" (supported: hybrid, hybrid_sliding)')
         fails(function(raw) raw.sliding_window = nil end, 'models.zaya: layer_types[2] is "hybrid_sliding" without "sliding_window"')
         fails(function(raw) raw.rope_parameters.hybrid.partial_rotary_factor = 1 end,
            "models.zaya: the layer types' partial_rotary_factor differ (1, 0.5)")
         fails({ cca_time1 = 0 }, 'models.zaya: config key "cca_time1" must be an integer >= 1, got 0')
      end)
   end)
end)
