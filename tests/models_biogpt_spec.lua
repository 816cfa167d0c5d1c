-- ml.models BioGPT (XGLM's network with learned positions two rows down and a head named
-- output_projection) against transformers (tests/fixtures/gen_models.py biogpt): names, the
-- checkpoint's tensors, logits, greedy ids, the cache, a left-padded batch, a CPU + disk split, what
-- each difference changes, the sequence limit and configs.
local ml = require("moonload")
local biogpt = require("moonload.models.biogpt")
local H = require("models_helpers")

local NAME = "biogpt_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.biogpt (tests/fixtures/models/biogpt_tiny: hidden 48, 4 heads, 64 positions)", function()
   local exp, model, _, logits_after = H.fixture_model(NAME)

   it("builds BioGptForCausalLM with transformers' names and output_projection tied to the embeddings", function()
      assert.are.equal("BioGptForCausalLM", model.__name)
      assert.are.same({ "BioGptDecoderLayer" }, model.no_split_modules)
      assert.are.equal(biogpt.BioGptForCausalLM, ml.models.biogpt.BioGptForCausalLM)
      local stored = ml.safetensors.load_file(DIR .. "/model.safetensors")
      stored["output_projection.weight"] = true
      assert.are.same(H.sorted_keys(stored), H.sorted_keys((model:state_dict())))
      assert.are.equal(model.output_projection.weight, model.biogpt.embed_tokens.weight)
      assert.are.same({ 66, 48 }, model.biogpt.embed_positions.weight.shape)
      assert.are.equal("BioGptAttention", model.biogpt.layers[1].self_attn.__name)
      assert.are.equal(1e-5, model.biogpt.layers[1].final_layer_norm.eps)      -- (not layer_norm_eps 1e-12)
      assert.are.equal(64, model:max_length())
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 100000, overrides = { ["^biogpt%.layer_norm$"] = "cpu" },
      places = { ["biogpt.layer_norm"] = "cpu" } })

   it("needs the embedding scale and the positions two rows down", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m) m.config.embed_scale = 1 end), exp.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         rawset(m.biogpt.embed_positions, "forward", ml.nn.Embedding.forward)
      end), exp.logits) > 1e-3)
   end)

   it("runs within max_position_embeddings and names a longer sequence", function()
      local long = {}
      for i = 1, 65 do long[i] = i % 90 + 1 end
      local ok, err = pcall(model, { long })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("models.biogpt: sequence of 65 tokens (0 cached + 65 new) exceeds max_position_embeddings 64", 1, true), err)
   end)

   it("reads transformers' defaults and names what it refuses", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.intermediate_size, raw.scale_embedding, raw.hidden_act, raw.max_position_embeddings = nil, nil, nil, nil
      local cfg = biogpt.config(raw)
      assert.are.same({ 192, math.sqrt(48), "gelu", 1024 }, { cfg.ffn_dim, cfg.embed_scale, cfg.activation_function,
         cfg.max_position_embeddings })
      local function fails(change, msg) H.assert_config_fails(biogpt.config, DIR, change, msg) end
      fails({ num_attention_heads = 5 }, "models.biogpt: hidden_size 48 is not a multiple of num_attention_heads 5")
      fails({ hidden_act = "gelu2" }, 'models.biogpt: activation "gelu2" in config table is not supported')
      fails({ num_hidden_layers = 2.5 }, 'models.biogpt: config key "num_hidden_layers" in config table must be')
   end)
end)
