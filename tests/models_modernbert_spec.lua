-- ml.models ModernBERT against transformers' ModernBertModel (eager attention) on a tiny random
-- checkpoint saved as the hub's are, from ModernBertForMaskedLM (tests/fixtures/models/
-- modernbert_tiny, gen_models.py modernbert): a right-padded batch of 16 tokens over global and
-- sliding layers (4 positions either side), and what each of its particularities does.
local ml = require("moonload")
local models = require("moonload.models")
local modernbert = require("moonload.models.modernbert")
local H = require("models_helpers")

local TOL = 1e-4
local DIR = H.FIX .. "/modernbert_tiny"

describe("models.modernbert", function()
   H.collect_warnings()
   local exp = H.expected("modernbert_tiny")
   local model = models.from_pretrained(DIR)
   local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
   local function states(m) return m(ids, { attention_mask = exp.attention_mask }).last_hidden_state end
   local function with_config(change)
      local dir = H.fixture_with_config("modernbert_tiny", change)
      local m = models.from_pretrained(dir)
      H.rmdir(dir)
      return m
   end

   it("loads the base model of a masked-LM checkpoint: layer 0 without attn_norm, no biases", function()
      assert.are.equal("ModernBertModel", getmetatable(model).__name)
      assert.is_nil(model.layers[1].attn_norm)
      assert.is_not_nil(model:get_parameter("layers.1.attn_norm.weight"))
      assert.is_not_nil(model:get_parameter("layers.3.mlp.Wi.weight"))
      assert.is_nil(model.final_norm.bias)
      assert.are.same({ "full_attention", "sliding_attention", "sliding_attention", "full_attention" }, model.config.layer_types)
   end)

   it("matches last_hidden_state of a right-padded batch and gives mean-pooled, normalized embeddings", function()
      assert.is_true(H.max_abs_diff(states(model), exp.last_hidden_state) < TOL)
      local emb = model:sentence_embedding(exp.input_ids, { attention_mask = exp.attention_mask })
      assert.is_true(H.max_abs_diff(emb, exp.sentence_embedding) < TOL)
   end)

   it("needs the window of its sliding layers and the rope base of each kind of layer", function()
      local global = with_config(function(c) c.layer_types = { "full_attention", "full_attention", "full_attention", "full_attention" } end)
      assert.is_true(H.max_abs_diff(states(global), exp.last_hidden_state) > 1e-2)
      local swapped = with_config(function(c)
         c.rope_parameters.full_attention.rope_theta, c.rope_parameters.sliding_attention.rope_theta = 10000.0, 160000.0
      end)
      assert.is_true(H.max_abs_diff(states(swapped), exp.last_hidden_state) > 1e-3)
      -- the older files' keys: global_attn_every_n_layers and the two rope_theta keys
      local older = with_config(function(c)
         c.layer_types, c.rope_parameters = nil, nil
         c.global_attn_every_n_layers, c.global_rope_theta, c.local_rope_theta = 3, 160000.0, 10000.0
      end)
      assert.is_true(H.max_abs_diff(states(older), exp.last_hidden_state) < TOL)
   end)

   H.it_splits_encoder("modernbert_tiny", 60000)

   it("refuses token types, naming them", function()
      assert.has_error(function() model({ 1, 5, 2 }, { token_type_ids = { 0, 0, 0 } }) end,
         "models.modernbert.forward: ModernBERT has no token types (token_type_ids given)")
   end)

   it("names what is wrong in a config", function()
      H.assert_config_file_fails(modernbert.config, DIR, { num_attention_heads = 5 },
         "models.modernbert: hidden_size 32 is not a multiple of num_attention_heads 5")
      H.assert_config_file_fails(modernbert.config, DIR, { layer_types = { "full_attention" } },
         'models.modernbert: config key "layer_types" must list 4 layer types')
      H.assert_config_file_fails(modernbert.config, DIR,
         function(c) c.layer_types[2] = "chunked_attention" end,
         'models.modernbert: layer_types[2] is "chunked_attention" (supported: full_attention, sliding_attention)')
      H.assert_config_file_fails(modernbert.config, DIR,
         function(c) c.rope_parameters.full_attention.rope_type = "yarn" end,
         'models.modernbert: rope_parameters.full_attention: rope type "yarn" is not supported (only "default")')
      H.assert_config_file_fails(modernbert.config, DIR, { classifier_pooling = "max" },
         'models.modernbert: classifier_pooling "max" is not supported ("cls" or "mean")')
   end)
end)

H.describe_encoder_on_cuda("modernbert_tiny", { embeddings = 0, ["layers.0"] = 0, ["layers.1"] = "disk",
   ["layers.2"] = "cpu", ["layers.3"] = 0, final_norm = 0, rotary_emb = 0 })
