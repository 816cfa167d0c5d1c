-- ml.models Apertus (Llama's attention with per-head q/k norms before the rotary embedding, its
-- pre-norms named attention_layernorm and feedforward_layernorm, an MLP without a gate:
-- down(xielu(up x)) with xIELU's learned parameters) against transformers
-- (tests/fixtures/gen_models.py apertus): names, logits, greedy ids, the cache, a padded batch, configs.
local ml = require("moonload")
local models = require("moonload.models")
local llama = require("moonload.models.llama")
local H = require("models_helpers")

local NAME = "apertus_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.apertus (tests/fixtures/models/apertus_tiny: q/k norms, xIELU learned per layer, llama3 rope)", function()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds ApertusForCausalLM with every tensor of the checkpoint, xIELU's parameters and buffers too", function()
      assert.are.equal("ApertusForCausalLM", model.__name)
      assert.are.same({ "ApertusDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[2]
      assert.are.same({ 8 }, layer.self_attn.q_norm.weight.shape)      -- (per head)
      assert.are.equal("XIELUActivation", layer.mlp.act_fn.__name)
      assert.is_true(math.abs(layer.mlp.act_fn.alpha_p:tolist()[1] - 0.5) < 1e-7)   -- (as set in the fixture)
      assert.is_nil(layer.mlp.gate_proj)
      assert.are.equal("llama3", model.config.rope.rope_type)
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("needs its q/k norms, each layer's learned xIELU and its norms", function()
      local changes = {
         function(m) for _, l in ipairs(m.model.layers) do l.self_attn.k_norm.weight:fill_(1) end end,
         function(m) m.model.layers[1].mlp.act_fn.alpha_n:fill_(0.5) end,
         function(m) m.model.layers[2].mlp.act_fn.alpha_p:fill_(0.3) end,
         function(m) m.model.layers[1].feedforward_layernorm.weight:fill_(1) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("takes transformers' default rope without one in the file, and names a bad activation", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.rope_parameters, raw.rope_theta, raw.hidden_act = nil, 1000, nil
      local cfg = llama.config(raw, "apertus")
      assert.are.same({ "llama3", 12000000, 8, 8192, "xielu" },
         { cfg.rope.rope_type, cfg.rope.rope_theta, cfg.rope.factor, cfg.rope.original_max_position_embeddings, cfg.hidden_act })
      raw = H.read_json(DIR .. "/config.json")
      raw.hidden_act = "xielu2"
      local ok, err = pcall(llama.config, raw, "apertus")
      assert.is_false(ok)
      assert.truthy(tostring(err):find('models.apertus: activation "xielu2" in config table is not supported', 1, true), err)
   end)
end)
