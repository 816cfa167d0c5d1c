-- ml.models GLM-4.1V (glm4v) and GLM-4.5V (glm4v_moe) multimodal checkpoints: their language model
-- alone (text_config, model.language_model.*; the vision tower under model.visual.* left out), with
-- logits and greedy generation against transformers' Glm4vForConditionalGeneration and
-- Glm4vMoeForConditionalGeneration on text (tests/fixtures/gen_models.py glm4v_multimodal
-- glm4v_moe_multimodal). Their multimodal rotary embedding (mrope_section) is the plain one for
-- text: GLM-4's neighbouring pairs for GLM-4.1V, GLM-4.5's rotated halves for GLM-4.5V.
local ml = require("moonload")
local models = require("moonload.models")
local H = require("models_helpers")

-- The checkpoint's tensors outside the vision tower, under the language model's names.
local function language_model_keys(dir)
   local want = {}
   for k in pairs(ml.safetensors.load_file(dir .. "/model.safetensors")) do
      if not k:find("^model%.visual%.") then want[#want + 1] = (k:gsub("^model%.language_model%.", "model.")) end
   end
   table.sort(want)
   return want
end

-- Every layer's rotary pairing set to interleaved (neighbouring dims) or not (halves).
local function pairing(interleaved)
   return function(m)
      for _, layer in ipairs(m.model.layers) do rawset(layer.self_attn, "pairs_interleaved", interleaved) end
   end
end

-- A spec: the family's config reader names a malformed field of text_config, and a missing one.
local function it_names_malformed_text_config(LM, dir, family)
   it("names a malformed field of its text_config", function()
      local function read(raw) return LM:read_config(raw) end
      H.assert_config_fails(read, dir, function(raw) raw.text_config.num_key_value_heads = 3 end,
         "num_attention_heads 4 is not a multiple of num_key_value_heads 3")
      H.assert_config_fails(read, dir, function(raw) raw.text_config = nil end,
         string.format('a %s config needs its "text_config"', family))
   end)
end

describe("models.glm4v (tests/fixtures/models/glm4v_multimodal_tiny: GLM-4's layers, neighbouring rotary pairs over half of each head)", function()
   local name = "glm4v_multimodal_tiny"
   local dir = H.FIX .. "/" .. name
   local exp, model, _, logits_after = H.fixture_model(name)
   local LM = models.class_for("glm4v", dir)

   it("builds Glm4vForCausalLM from text_config with every language-model tensor, the vision tower left out", function()
      assert.are.equal("Glm4vForCausalLM", model.__name)
      assert.are.equal("Glm4vDecoderLayer", model.model.layers[1].__name)
      assert.truthy(model.config._source:find("(text_config)", 1, true))
      assert.are.same(language_model_keys(dir), H.sorted_keys((model:state_dict())))
      assert.are_not.equal(model.model.embed_tokens.weight, model.lm_head.weight)     -- a head of its own
      assert.are.equal(16, model.config.head_dim)                 -- hidden_size / heads: no head_dim in its config
      assert.are.equal(8, model.config.rotary_dim)                -- partial_rotary_factor 0.5
   end)

   H.it_matches_expected(model, name)
   H.it_matches_padded(model, name, "positions")

   it("needs the norms after attention and MLP, and the pairs of neighbouring dims", function()
      local unnormed = logits_after(function(m)
         local function identity(x) return x end
         for _, layer in ipairs(m.model.layers) do
            rawset(layer, "post_self_attn_layernorm", identity)
            rawset(layer, "post_mlp_layernorm", identity)
         end
      end)
      assert.is_true(H.max_abs_diff(unnormed, exp.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(pairing(false)), exp.logits) > 1e-3)
   end)

   it("biases q/k/v whatever attention_bias says, and rotates the whole head without partial_rotary_factor", function()
      local cfg = LM:read_config(H.read_json(dir .. "/config.json"))
      assert.are.same({ true, false, true }, { cfg.qkv_bias, cfg.o_bias, cfg.rope_pairs_interleaved })
      local raw = H.read_json(dir .. "/config.json")
      raw.text_config.attention_bias = false
      raw.text_config.rope_parameters.partial_rotary_factor = nil
      cfg = LM:read_config(raw)
      assert.are.same({ true, 16 }, { cfg.qkv_bias, cfg.rotary_dim })
   end)

   it_names_malformed_text_config(LM, dir, "glm4v")
end)

describe("models.glm4v_moe (tests/fixtures/models/glm4v_moe_multimodal_tiny: GLM-4.5's layers, rotated halves over half of each head)", function()
   local name = "glm4v_moe_multimodal_tiny"
   local dir = H.FIX .. "/" .. name
   local exp, model, _, logits_after = H.fixture_model(name)
   local LM = models.class_for("glm4v_moe", dir)

   it("builds Glm4MoeForCausalLM from text_config with every language-model tensor, the vision tower left out", function()
      assert.are.equal("Glm4MoeForCausalLM", model.__name)
      assert.truthy(model.config._source:find("(text_config)", 1, true))
      assert.are.same(language_model_keys(dir), H.sorted_keys((model:state_dict())))
      assert.are.same({ false, true, false, 8 },
         { model.config.qk_norm, model.config.qkv_bias, model.config.rope_pairs_interleaved, model.config.rotary_dim })
   end)

   H.it_matches_expected(model, name)
   H.it_matches_padded(model, name, "positions")

   it("needs the rotated halves over half of each head", function()
      assert.is_true(H.max_abs_diff(logits_after(pairing(true)), exp.logits) > 1e-3)
   end)

   it("biases q/k/v unless attention_bias says not, never norms q/k, and rotates half of each head by default", function()
      local raw = H.read_json(dir .. "/config.json")
      raw.text_config.attention_bias = nil
      raw.text_config.use_qk_norm = true
      raw.text_config.rope_parameters.partial_rotary_factor = nil
      local cfg = LM:read_config(raw)
      assert.are.same({ true, false, 8 }, { cfg.qkv_bias, cfg.qk_norm, cfg.rotary_dim })
      raw.text_config.attention_bias = false
      assert.is_false(LM:read_config(raw).qkv_bias)
   end)

   it_names_malformed_text_config(LM, dir, "glm4v_moe")
end)
