-- ml.models BitNet b1.58 (Llama's layers with RMSNorms before o_proj and down_proj, a ReLU²-gated
-- MLP) against transformers (tests/fixtures/gen_models.py bitnet): names, logits, greedy ids, the
-- cache, a padded batch, a CPU + disk split, what its sub-norms change, the packed ternary checkpoint
-- refused, and its configs.
local ml = require("moonload")
local models = require("moonload.models")
local llama = require("moonload.models.llama")
local H = require("models_helpers")

local NAME = "bitnet_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.bitnet (tests/fixtures/models/bitnet_tiny: attn_sub_norm, ffn_sub_norm, ReLU² gate, float weights)", function()
   H.collect_warnings()                       -- (the disk split warns of weights on meta)
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds BitNetForCausalLM with the sub-norms where transformers has them", function()
      assert.are.equal("BitNetForCausalLM", model.__name)
      assert.are.same({ "BitNetDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[1]
      assert.are.same({ 32 }, layer.self_attn.attn_sub_norm.weight.shape)
      assert.are.same({ 64 }, layer.mlp.ffn_sub_norm.weight.shape)
      assert.is_not_nil(layer.self_attn.o_proj.bias)
      assert.is_nil(layer.mlp.gate_proj.bias)
      assert.are.equal("ReLUSquaredActivation", layer.mlp.act_fn.__name)
      local names = H.param_names(model)
      assert.are.same({ "model.layers.0.self_attn.o_proj.bias", "model.layers.0.self_attn.attn_sub_norm.weight",
         "model.layers.0.mlp.gate_proj.weight" }, { names[9], names[10], names[11] })
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 70000, overrides = { ["%.mlp$"] = "disk" },
      places = { ["model.layers.0.mlp"] = "disk" } })

   it("needs both sub-norms and the ReLU² gate", function()
      local function identity(_, x) return x end
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do l.self_attn.attn_sub_norm.forward = identity end
      end), exp.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do l.mlp.ffn_sub_norm.forward = identity end
      end), exp.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do l.mlp.act_fn = ml.nn.SiLU() end
      end), exp.logits) > 1e-3)
   end)

   it("refuses the packed ternary checkpoint (quantization_config quant_method \"bitnet\"), naming it", function()
      local dir = H.tmpdir()
      local raw = H.read_json(DIR .. "/config.json")
      raw.quantization_config = { quant_method = "bitnet", linear_class = "bitlinear", quantization_mode = "offline" }
      H.write(dir .. "/config.json", require("cjson").encode(raw))
      H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
      local ok, err = pcall(models.from_pretrained, dir)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('quantization_config in ' .. dir .. '/config.json has quant_method "bitnet"', 1, true), err)
      H.rmdir(dir)
   end)

   it("reads transformers' defaults and names a head size the sub-norm cannot take", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.hidden_act, raw.rms_norm_eps, raw.rope_parameters, raw.num_key_value_heads = nil, nil, nil, nil
      raw.num_attention_heads, raw.hidden_size = 10, 40
      local cfg = llama.config(raw, "bitnet")
      assert.are.same({ "relu2", 1e-5, 500000, 5, false, false }, { cfg.hidden_act, cfg.rms_norm_eps, cfg.rope_theta,
         cfg.num_key_value_heads, cfg.mlp_bias, cfg.tie_word_embeddings })
      H.assert_config_fails(function(r) return llama.config(r, "bitnet") end, DIR, { head_dim = 16 },
         "models.bitnet: num_attention_heads 4 x head_dim 16 must equal hidden_size 32 in config table")
   end)
end)
