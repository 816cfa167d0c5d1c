-- ml.models Cohere Compass (cohere_compass_text, and the cohere_compass multimodal checkpoint's language
-- model: Cohere 2's parallel block rotating halves of each head, each layer type by a rope of its own
-- or not at all, logits times logit_scale) against transformers (tests/fixtures/gen_models.py
-- cohere_compass_text cohere_compass_multimodal): names, logits, greedy ids, the cache, a padded batch,
-- configs.
local ml = require("moonload")
local models = require("moonload.models")
local H = require("models_helpers")

local TEXT, MULTI = "cohere_compass_text_tiny", "cohere_compass_multimodal_tiny"

-- Every layer's rotary pairing set to neighbouring dims (Cohere 2's) instead of halves.
local function pairs_interleaved(m)
   for _, layer in ipairs(m.model.layers) do rawset(layer.self_attn, "pairs_interleaved", true) end
end

describe("models.cohere_compass (tests/fixtures/models/cohere_compass_text_tiny: a rope per layer type, rotary halves)", function()
   local dir = H.FIX .. "/" .. TEXT
   local exp, model, _, logits_after = H.fixture_model(TEXT)
   local LM = models.class_for("cohere_compass_text", dir)
   local function read(raw) return LM:read_config(raw) end

   it("builds CohereCompassForCausalLM with every tensor of the checkpoint (its head tied), Cohere 2's block", function()
      assert.are.equal("CohereCompassForCausalLM", model.__name)
      assert.are.same({ "CohereCompassDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, dir, true)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      assert.are.equal("CohereLayerNorm", model.model.layers[1].input_layernorm.__name)
      assert.is_nil(model.model.layers[1].post_attention_layernorm)
      assert.are.same({ 4, 4, false, 4 }, model.config.layer_windows)
      assert.are.same({ "linear", 300, "default", 50000 }, { model.config.rope.rope_type, model.config.rope.rope_theta,
         model.config.rope_local.rope_type, model.config.rope_local.rope_theta })
      assert.are.same({ false, false, false, false }, model.config.nope_layers)
   end)

   H.it_matches_expected(model, TEXT)
   H.it_matches_padded(model, TEXT, "positions")
   H.it_splits_over_cpu_and_disk(TEXT, { budget = 100000, overrides = { ["%.mlp$"] = "disk" },
      places = { ["model.layers.0.mlp"] = "disk" } })

   it("needs the halves, each type's own rope, the window and logit_scale", function()
      local changes = {
         pairs_interleaved,
         function(m) m.model.rotary_emb.inv_freq:copy_(m.model.rotary_emb.local_inv_freq) end,   -- (full as sliding)
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.self_attn, "window", false) end end,
         function(m) m.config.logit_scale = 1 end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("reads transformers' defaults: every layer full, logit_scale 1, the stray rope keys beside the entries dropped", function()
      local raw = H.read_json(dir .. "/config.json")
      raw.layer_types, raw.logit_scale, raw.sliding_window = nil, nil, nil
      raw.rope_parameters.rope_theta, raw.rope_parameters.rope_type = 7, "default"
      local cfg = read(raw)
      assert.are.same({ false, false, false, false }, cfg.layer_windows)
      assert.are.same({ 1, 4096, "linear", 300 }, { cfg.logit_scale, cfg.sliding_window, cfg.rope.rope_type, cfg.rope_theta })
      assert.are.same({ false, false, false, false }, cfg.nope_layers)
   end)

   it("names a rope for all layer types, a malformed entry, an unknown layer type and a bad logit_scale", function()
      H.assert_config_fails(read, dir, { rope_parameters = { rope_type = "default", rope_theta = 10000 } },
         'models.cohere_compass: config key "rope_parameters" must hold an entry per layer type (full_attention, '
         .. "sliding_attention), not one rope for all")
      H.assert_config_fails(read, dir, function(raw) raw.rope_parameters.full_attention = "linear" end,
         'models.cohere_compass: config key "rope_parameters.full_attention" must be a table or null, got linear')
      H.assert_config_fails(read, dir, function(raw) raw.rope_parameters.sliding_attention.rope_type = "su" end,
         'models.cohere_compass: rope type "su" is not supported')
      H.assert_config_fails(read, dir, function(raw) raw.layer_types[2] = "chunked_attention" end,
         'layer_types[2] is "chunked_attention" (supported: full_attention, sliding_attention)')
      H.assert_config_fails(read, dir, { logit_scale = -1 }, 'config key "logit_scale" must be a positive number, got -1')
   end)
end)

describe("models.cohere_compass (tests/fixtures/models/cohere_compass_multimodal_tiny: its language model alone, a NoPE full layer)", function()
   local dir = H.FIX .. "/" .. MULTI
   local exp, model, _, logits_after = H.fixture_model(MULTI)
   local LM = models.class_for("cohere_compass", dir)

   it("builds CohereCompassForCausalLM from text_config with every language-model tensor, the vision tower left out", function()
      assert.are.equal("CohereCompassForCausalLM", model.__name)
      assert.truthy(model.config._source:find("(text_config)", 1, true))
      local want = {}
      for k in pairs(ml.safetensors.load_file(dir .. "/model.safetensors")) do
         if not k:find("^model%.visual%.") then want[#want + 1] = (k:gsub("^model%.language_model%.", "model.")) end
      end
      table.sort(want)
      assert.are.same(want, H.sorted_keys((model:state_dict())))
      assert.are_not.equal(model.model.embed_tokens.weight, model.lm_head.weight)     -- a head of its own
      assert.are.same({ false, false, true, false }, model.config.nope_layers)
      assert.are.equal(1, model.config.logit_scale)
   end)

   H.it_matches_expected(model, MULTI)
   H.it_matches_padded(model, MULTI, "positions")

   it("needs its full layer without a position embedding, and the halves", function()
      local rotated = logits_after(function(m) rawset(m.model.layers[3].self_attn, "nope", false) end)
      assert.is_true(H.max_abs_diff(rotated, exp.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(pairs_interleaved), exp.logits) > 1e-3)
   end)

   it("names a malformed field of its text_config, and a missing one", function()
      local function read(raw) return LM:read_config(raw) end
      H.assert_config_fails(read, dir, function(raw) raw.text_config.num_key_value_heads = 3 end,
         "num_attention_heads 4 is not a multiple of num_key_value_heads 3")
      H.assert_config_fails(read, dir, function(raw) raw.text_config = nil end, 'a cohere_compass config needs its "text_config"')
   end)
end)
