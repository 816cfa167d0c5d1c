-- ml.models DistilBERT against transformers' DistilBertModel on a tiny random checkpoint saved as
-- the hub's are, from DistilBertForMaskedLM (tests/fixtures/models/distilbert_tiny, gen_models.py
-- distilbert): hidden states and sentence embeddings of a right-padded batch.
local ml = require("moonload")
local models = require("moonload.models")
local distilbert = require("moonload.models.distilbert")
local H = require("models_helpers")

local TOL = 1e-4
local DIR = H.FIX .. "/distilbert_tiny"

describe("models.distilbert", function()
   H.collect_warnings()
   local exp = H.expected("distilbert_tiny")
   local model = models.from_pretrained(DIR)
   local ids = ml.tensor(exp.input_ids, { dtype = "int64" })

   it("loads the base model of a masked-LM checkpoint under transformers' names", function()
      assert.are.equal("DistilBertModel", getmetatable(model).__name)
      assert.is_not_nil(model:get_parameter("transformer.layer.1.attention.out_lin.weight"))
      assert.is_not_nil(model:get_parameter("transformer.layer.0.sa_layer_norm.bias"))
      assert.is_not_nil(model:get_parameter("transformer.layer.0.ffn.lin2.weight"))
      assert.is_nil(model.pooler)
   end)

   it("matches last_hidden_state of a right-padded batch and gives mean-pooled, normalized embeddings", function()
      local out = model(ids, { attention_mask = exp.attention_mask })
      assert.are.same({ 2, 8, 32 }, out.last_hidden_state.shape)
      assert.is_true(H.max_abs_diff(out.last_hidden_state, exp.last_hidden_state) < TOL)
      local emb = model:sentence_embedding(exp.input_ids, { attention_mask = exp.attention_mask })
      assert.is_true(H.max_abs_diff(emb, exp.sentence_embedding) < TOL)
   end)

   it("normalizes after each residual (post-norm): norms first give other states", function()
      local m = models.from_pretrained(DIR)
      local blocks = m.transformer.layer
      local pre = getmetatable(blocks[1])
      local saved = pre.forward
      pre.forward = function(self, x, mask)
         local a = self.attention(self.sa_layer_norm(x), mask) + x
         return self.ffn(self.output_layer_norm(a)) + a
      end
      local ok, h = pcall(function() return m(ids, { attention_mask = exp.attention_mask }).last_hidden_state end)
      pre.forward = saved
      assert.is_true(ok, h)
      assert.is_true(H.max_abs_diff(h, exp.last_hidden_state) > 1e-2)
   end)

   H.it_splits_encoder("distilbert_tiny", 60000)

   it("refuses token types and a sequence past its positions, naming them", function()
      assert.has_error(function() model({ 1, 5, 2 }, { token_type_ids = { 0, 0, 0 } }) end,
         "models.distilbert.forward: DistilBERT has no token types (token_type_ids given)")
      local long = {}
      for i = 1, 25 do long[i] = 5 end
      assert.has_error(function() model(long) end,
         "models.distilbert.forward: sequence of 25 tokens exceeds the model's 24 positions")
   end)

   it("names what is wrong in a config", function()
      H.assert_config_file_fails(distilbert.config, DIR, { n_heads = 5 },
         "models.distilbert: dim 32 is not a multiple of n_heads 5")
      H.assert_config_file_fails(distilbert.config, DIR, { activation = "swish2" }, 'models.distilbert: activation "swish2"')
   end)
end)

H.describe_encoder_on_cuda("distilbert_tiny", { embeddings = 0, ["transformer.layer.0"] = "disk",
   ["transformer.layer.1"] = 0 })
