-- ml.models CWM (Meta's Code World Model: Llama's layers with Qwen2's sliding attention, unbiased)
-- against transformers (tests/fixtures/gen_models.py cwm): names, logits, greedy ids, the cache, a
-- padded batch, a CPU + disk split, what its windows change, and its configs.
local llama = require("moonload.models.llama")
local H = require("models_helpers")

local NAME = "cwm_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.cwm (tests/fixtures/models/cwm_tiny: window 3 on layers 2 and 3, llama3 rope, biased MLP)", function()
   H.collect_warnings()                       -- (the disk split warns of weights on meta)
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds CwmForCausalLM: unbiased attention, the windows layer_types names", function()
      assert.are.equal("CwmForCausalLM", model.__name)
      assert.are.same({ "CwmDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[1]
      assert.is_nil(layer.self_attn.q_proj.bias)
      assert.is_nil(layer.self_attn.o_proj.bias)
      assert.is_not_nil(layer.mlp.up_proj.bias)
      assert.are.same({ false, 3, 3 }, model.config.layer_windows)
      assert.are.equal("llama3", model.config.rope.rope_type)
   end)

   H.it_matches_expected(model, NAME, " past the window")
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 70000, overrides = { ["%.mlp$"] = "disk" },
      places = { ["model.layers.2.mlp"] = "disk" } })

   it("needs the window on the layers that slide, and none on the full one", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         rawset(m.model.layers[2].self_attn, "window", false)
      end), exp.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         rawset(m.model.layers[1].self_attn, "window", 3)
      end), exp.logits) > 1e-3)
   end)

   it("reads transformers' defaults: every 4th layer full, window 8192, llama3 rope, 8 key/value heads", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.layer_types, raw.sliding_window, raw.rope_parameters, raw.num_key_value_heads, raw.head_dim =
         nil, nil, nil, nil, nil
      raw.num_hidden_layers, raw.num_attention_heads = 5, 16
      local cfg = llama.config(raw, "cwm")
      assert.are.same({ false, 8192, 8192, 8192, false }, cfg.layer_windows)
      assert.are.same({ "llama3", 1000000, 16, 8192, 4, 1 }, { cfg.rope.rope_type, cfg.rope.rope_theta, cfg.rope.factor,
         cfg.rope.original_max_position_embeddings, cfg.rope.high_freq_factor, cfg.rope.low_freq_factor })
      assert.are.same({ 8, 128, 1e-5 }, { cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps })
   end)

   it("names bad layer types and windows", function()
      local read = function(r) return llama.config(r, "cwm") end
      H.assert_config_fails(read, DIR, { layer_types = { "full_attention" } },
         'models.cwm: config key "layer_types" must list 3 layer types')
      H.assert_config_fails(read, DIR, { layer_types = { "full_attention", "chunked_attention", "sliding_attention" } },
         'models.cwm: layer_types[2] is "chunked_attention" (supported: full_attention, sliding_attention)')
      H.assert_config_fails(read, DIR, { sliding_window = 0 },
         'models.cwm: config key "sliding_window" in config table must be a positive integer or null, got 0')
   end)
end)
