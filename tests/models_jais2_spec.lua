-- ml.models Jais-2 (Llama's attention, biased; LayerNorms with biases; Nemotron's ungated ReLU² MLP)
-- against transformers (tests/fixtures/gen_models.py jais2): names, logits, greedy ids, the cache, a
-- padded batch, a CPU + disk split, what its norms and MLP change, and its configs.
local ml = require("moonload")
local llama = require("moonload.models.llama")
local H = require("models_helpers")

local NAME = "jais2_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.jais2 (tests/fixtures/models/jais2_tiny: biased LayerNorms, ReLU² without a gate)", function()
   H.collect_warnings()                       -- (the disk split warns of weights on meta)
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds Jais2ForCausalLM: LayerNorms with biases, an up/down MLP, biased attention", function()
      assert.are.equal("Jais2ForCausalLM", model.__name)
      assert.are.same({ "Jais2DecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[1]
      assert.are.equal("LayerNorm", layer.input_layernorm.__name)
      assert.are.equal("LayerNorm", model.model.norm.__name)
      assert.is_not_nil(layer.post_attention_layernorm.bias)
      assert.is_nil(layer.mlp.gate_proj)
      assert.is_not_nil(layer.mlp.up_proj.bias)
      assert.is_not_nil(layer.self_attn.o_proj.bias)
      assert.are.equal("ReLUSquaredActivation", layer.mlp.act_fn.__name)
      assert.are.equal(1e-4, layer.input_layernorm.eps)
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 70000, overrides = { ["%.mlp$"] = "disk" },
      places = { ["model.layers.1.mlp"] = "disk" } })

   it("needs the LayerNorms' mean and biases, and the square of the ReLU", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do l.input_layernorm.bias:zero_() end
      end), exp.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         local function rms(self, x) return ml.nn.functional.rms_norm(x, self.normalized_shape, self.weight, self.eps) + self.bias end
         for _, l in ipairs(m.model.layers) do l.post_attention_layernorm.forward = rms end
      end), exp.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do l.mlp.act_fn = ml.nn.ReLU() end
      end), exp.logits) > 1e-3)
   end)

   it("reads layer_norm_eps (not rms_norm_eps) and transformers' defaults", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.layer_norm_eps, raw.rms_norm_eps, raw.hidden_act, raw.attention_bias, raw.mlp_bias = nil, 0.5, nil, nil, nil
      raw.max_position_embeddings = nil
      local cfg = llama.config(raw, "jais2")
      assert.are.same({ 1e-5, "relu2", true, true, true, 8192 },
         { cfg.rms_norm_eps, cfg.hidden_act, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.max_position_embeddings })
      local read = function(r) return llama.config(r, "jais2") end
      H.assert_config_fails(read, DIR, { layer_norm_eps = -1 }, 'models.jais2: config key "rms_norm_eps"')
      H.assert_config_fails(read, DIR, { hidden_act = "relu3" },
         'models.jais2: activation "relu3" in config table is not supported')
   end)
end)
