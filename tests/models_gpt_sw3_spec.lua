-- ml.models GPT-SW3 (model_type gpt-sw3, which transformers' auto classes read as GPT-2) against
-- transformers (tests/fixtures/gen_models.py gpt_sw3): the class it maps to, the checkpoint's
-- tensors, logits, greedy ids, the cache, a left-padded batch, a CPU + disk split, and the hub's
-- config.
local ml = require("moonload")
local gpt2 = require("moonload.models.gpt2")
local H = require("models_helpers")

local NAME = "gpt_sw3_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models gpt-sw3 (tests/fixtures/models/gpt_sw3_tiny: GPT-2 with the exact GELU, model_type gpt-sw3)", function()
   local exp, model, _, logits_after = H.fixture_model(NAME)

   it("loads a config.json of model_type gpt-sw3 as GPT2LMHeadModel", function()
      assert.are.equal("gpt-sw3", H.read_json(DIR .. "/config.json").model_type)
      assert.are.equal(gpt2.GPT2LMHeadModel, ml.models.class_for("gpt-sw3", DIR))
      assert.are.equal("GPT2LMHeadModel", model.__name)
      H.assert_holds_checkpoint(model, DIR, true)
      assert.are.equal(model.lm_head.weight, model.transformer.wte.weight)
      assert.are.equal("GELU(approximate='none')", tostring(model.transformer.h[1].mlp.act))
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, overrides = { ["^transformer%.h%.1$"] = "disk" },
      places = { ["transformer.h.1"] = "disk" } })

   it("needs the exact GELU its config names", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, b in ipairs(m.transformer.h) do b.mlp.act = ml.nn.GELU({ approximate = "tanh" }) end
      end), exp.logits) > 1e-3)
   end)

   it("reads the hub's gpt-sw3-126m config through GPT-2's", function()
      local hub = { activation_function = "gelu", architectures = { "GPT2LMHeadModel" }, bos_token_id = 2,
         eos_token_id = 3, pad_token_id = 0, layer_norm_epsilon = 1e-5, model_type = "gpt-sw3", n_embd = 768,
         n_head = 12, n_inner = 3072, n_layer = 12, n_positions = 2048, scale_attn_by_inverse_layer_idx = false,
         scale_attn_weights = true, vocab_size = 64000 }
      local m = ml.init_empty_weights(function() return ml.models.class_for(hub.model_type, "hub")(hub) end)
      assert.are.equal("GPT2LMHeadModel", m.__name)
      assert.are.same({ 3072, 768 }, m.transformer.h[12].mlp.c_proj.weight.shape)
      assert.are.same({ 2048, 768 }, m.transformer.wpe.weight.shape)
      assert.are.equal(2048, m:max_length())
   end)
end)
