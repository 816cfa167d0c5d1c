-- ml.models IQuest-Coder (model_type iquestcoder: Llama's layers, which transformers builds as a
-- LlamaForCausalLM, under its own config defaults) against transformers
-- (tests/fixtures/gen_models.py iquestcoder): names, logits, greedy ids, the cache, a padded batch,
-- a CPU + disk split, what its settings change, and its configs.
local llama = require("moonload.models.llama")
local H = require("models_helpers")

local NAME = "iquestcoder_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.iquestcoder (tests/fixtures/models/iquestcoder_tiny: head_dim 16 of hidden 32, llama3 rope, biases)", function()
   H.collect_warnings()                       -- (the disk split warns of weights on meta)
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds IQuestCoderForCausalLM with every tensor of the checkpoint", function()
      assert.are.equal("IQuestCoderForCausalLM", model.__name)
      assert.are.same({ "IQuestCoderDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[1]
      assert.are.same({ 64, 32 }, layer.self_attn.q_proj.weight.shape)       -- 4 heads of 16
      assert.is_not_nil(layer.self_attn.o_proj.bias)
      assert.is_not_nil(layer.mlp.down_proj.bias)
      assert.are.equal("llama3", model.config.rope.rope_type)
   end)

   H.it_matches_expected(model, NAME, " past the rope's original length")
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 70000, overrides = { ["%.mlp$"] = "disk" },
      places = { ["model.layers.0.mlp"] = "disk" } })

   it("needs the llama3 frequencies and the biases", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         local plain = llama.LlamaRotaryEmbedding({ head_dim = 16, rope_theta = 500000 })
         m.model.rotary_emb.inv_freq = plain.inv_freq
      end), exp.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do l.self_attn.o_proj.bias:zero_() end
      end), exp.logits) > 1e-3)
   end)

   it("reads transformers' defaults (head_dim 128, eps 1e-5, 131072 positions)", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.head_dim, raw.rms_norm_eps, raw.max_position_embeddings, raw.num_key_value_heads = nil, nil, nil, nil
      local cfg = llama.config(raw, "iquestcoder")
      assert.are.same({ 128, 1e-5, 131072, 4 },
         { cfg.head_dim, cfg.rms_norm_eps, cfg.max_position_embeddings, cfg.num_key_value_heads })
   end)

   it("refuses the original code's clip_qkv and sliding window, as transformers does", function()
      local read = function(r) return llama.config(r, "iquestcoder") end
      H.assert_config_fails(read, DIR, { clip_qkv = 8 },
         'models.iquestcoder: config key "clip_qkv" is not supported (IQuest-Coder runs as a Llama), got 8 in config table')
      H.assert_config_fails(read, DIR, { use_sliding_window = true, sliding_window = 4096 },
         'models.iquestcoder: config key "use_sliding_window" is not supported (IQuest-Coder runs as a Llama), got true')
      assert.are.same({ false, false }, read((function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.use_sliding_window = false
         return raw
      end)()).layer_windows)
   end)
end)
