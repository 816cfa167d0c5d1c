-- ml.models dots.llm1 (dots1): Qwen3's attention (per-head q/k norms, the layers from
-- max_window_layers on sliding) with DeepSeek-V3's routing after the first dense layers; logits
-- and greedy generation against transformers' Dots1ForCausalLM (tests/fixtures/gen_models.py dots1).
-- The fixture's prompts run past its last layer's 3-key window.
local models = require("moonload.models")
local dots1 = require("moonload.models.dots1")
local H = require("models_helpers")

describe("models.dots1 (tests/fixtures/models/dots1_tiny: q/k norms, a 3-key window on the last layer, V3's routing)", function()
   local name = "dots1_tiny"
   local dir = H.FIX .. "/" .. name
   local exp, model, _, logits_after = H.fixture_model(name)

   it("builds Dots1ForCausalLM with every tensor of the checkpoint: a dense first layer, then experts", function()
      assert.are.equal("Dots1ForCausalLM", model.__name)
      H.assert_holds_checkpoint(model, dir)
      assert.are.equal("Dots1MLP", model.model.layers[1].mlp.__name)
      assert.are.equal("Dots1MoE", model.model.layers[2].mlp.__name)
      assert.are.same({ false, false, 3 }, model.config.layer_windows)
      assert.is_nil(model.model.layers[1].self_attn.q_proj.bias)
   end)

   H.it_matches_expected(model, name)
   H.it_matches_padded(model, name, "positions")

   it("needs the q/k norms, the last layer's window and the router's correction bias", function()
      local unnormed = logits_after(function(m)
         for _, layer in ipairs(m.model.layers) do rawset(layer.self_attn, "q_norm", false) end
      end)
      assert.is_true(H.max_abs_diff(unnormed, exp.logits) > 1e-3)
      local unwindowed = logits_after(function(m) rawset(m.model.layers[3].self_attn, "window", false) end)
      assert.is_true(H.max_abs_diff(unwindowed, exp.logits) > 1e-3)
      local unbiased = logits_after(function(m)
         for i = 2, 3 do m.model.layers[i].mlp.gate.e_score_correction_bias:fill_(0) end
      end)
      assert.is_true(H.max_abs_diff(unbiased, exp.logits) > 1e-3)
   end)

   it("slides from max_window_layers without layer_types (transformers' 62, no use_sliding_window), as sliding_window says", function()
      local raw = H.read_json(dir .. "/config.json")
      raw.layer_types = nil
      assert.are.same({ false, false, 3 }, dots1.config(raw).layer_windows)
      raw.max_window_layers = nil
      assert.are.same({ false, false, false }, dots1.config(raw).layer_windows)
      raw.max_window_layers, raw.sliding_window = 1, nil
      assert.are.same({ false, 4096, 4096 }, dots1.config(raw).layer_windows)
   end)

   it("names a malformed field", function()
      H.assert_config_fails(dots1.config, dir, { topk_group = 5 }, "topk_group 5 is more than n_group 4")
      H.assert_config_fails(dots1.config, dir, { num_experts_per_tok = 9 },
         "num_experts_per_tok 9 is more than n_routed_experts 8")
      H.assert_config_fails(dots1.config, dir, { layer_types = { "full_attention" } },
         'config key "layer_types" must list 3 layer types')
   end)
end)
