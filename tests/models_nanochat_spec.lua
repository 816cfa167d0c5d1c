-- ml.models NanoChat (Llama's layers with weightless RMSNorms, one on the embeddings too, q/k norms
-- after a rotary embedding that turns the other way, an ungated ReLU² MLP, soft-capped logits)
-- against transformers (tests/fixtures/gen_models.py nanochat): names, logits, greedy ids, the cache,
-- a padded batch, a CPU + disk split, what each difference changes, and its configs.
local ml = require("moonload")
local nanochat = require("moonload.models.nanochat")
local H = require("models_helpers")

local NAME = "nanochat_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.nanochat (tests/fixtures/models/nanochat_tiny: soft cap 5, biased attention, 2 key/value heads)", function()
   H.collect_warnings()                       -- (the disk split warns of weights on meta)
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds NanoChatForCausalLM: no norm weights, an fc1/fc2 MLP, transformers' names", function()
      assert.are.equal("NanoChatForCausalLM", model.__name)
      assert.are.same({ "NanoChatDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      for name in model:named_parameters() do assert.is_nil(name:find("norm"), name) end
      local layer = model.model.layers[1]
      assert.are.equal("NanoChatRMSNorm", layer.self_attn.q_norm.__name)
      assert.are.equal("NanoChatRMSNorm(eps=1e-06)", tostring(model.model.norm))
      assert.are.equal("ReLUSquaredActivation", layer.mlp.activation_fn.__name)
      assert.is_nil(layer.mlp.fc1.bias)
      assert.is_not_nil(layer.self_attn.o_proj.bias)
      assert.are.equal(5, model.config.final_logit_softcapping)
      assert.are.equal(nanochat.NanoChatForCausalLM, ml.models.nanochat.NanoChatForCausalLM)
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 70000, overrides = { ["%.mlp$"] = "disk" },
      places = { ["model.layers.1.mlp"] = "disk" } })

   it("needs the norm on the embeddings, the flipped rotary turn, the q/k norms and the soft cap", function()
      local changes = {
         function(m) rawset(m.model, "norms_embeddings", false) end,
         function(m) m.model.rotary_emb.forward = ml.models.llama.LlamaRotaryEmbedding.forward end,
         function(m) for _, l in ipairs(m.model.layers) do l.self_attn.k_norm.forward = function(_, x) return x end end end,
         function(m) rawset(m.config, "final_logit_softcapping", nil) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
      -- (capped: every logit within +-5)
      assert.is_true(model(ids):abs():max():item() < 5)
   end)

   it("reads transformers' defaults: a cap of 15, none when the file says null, relu2, eps 1e-6", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.final_logit_softcapping, raw.hidden_act, raw.rms_norm_eps = nil, nil, nil
      local cfg = nanochat.config(raw)
      assert.are.same({ 15, "relu2", 1e-6 }, { cfg.final_logit_softcapping, cfg.hidden_act, cfg.rms_norm_eps })
      raw.final_logit_softcapping = require("cjson").null
      assert.is_nil(nanochat.config(raw).final_logit_softcapping)
      local dir = H.tmpdir()
      H.write(dir .. "/config.json", '{"model_type": "nanochat", "vocab_size": 100, "hidden_size": 32, '
         .. '"intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "final_logit_softcapping": null}')
      assert.is_nil(nanochat.config(dir).final_logit_softcapping)
      H.rmdir(dir)
   end)

   it("names a bad cap and activation", function()
      H.assert_config_fails(nanochat.config, DIR, { final_logit_softcapping = -1 },
         'models.nanochat: config key "final_logit_softcapping" must be a positive number or null, got -1 in config table')
      H.assert_config_fails(nanochat.config, DIR, { hidden_act = "relu3" },
         'models.nanochat: activation "relu3" in config table is not supported')
   end)
end)
