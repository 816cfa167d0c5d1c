-- ml.models MPNet (all-mpnet-base-v2's encoder) against transformers' MPNetModel on a tiny random
-- checkpoint (tests/fixtures/models/mpnet_tiny, gen_models.py mpnet): hidden states, pooler and
-- sentence embeddings of a right-padded batch of 24-token rows (distances past the exact buckets),
-- and what each of MPNet's differences from BERT does.
local ml = require("moonload")
local models = require("moonload.models")
local mpnet = require("moonload.models.mpnet")
local H = require("models_helpers")

local TOL = 1e-4
local DIR = H.FIX .. "/mpnet_tiny"

describe("models.mpnet", function()
   H.collect_warnings()
   local exp = H.expected("mpnet_tiny")
   local model = models.from_pretrained(DIR)
   local ids = ml.tensor(exp.input_ids, { dtype = "int64" })

   it("loads as an MPNetModel with transformers' names, the bias table sized by the config", function()
      assert.are.equal("MPNetModel", getmetatable(model).__name)
      H.assert_holds_checkpoint(model, DIR)
      assert.is_not_nil(model:get_parameter("encoder.layer.1.attention.attn.o.weight"))
      assert.is_not_nil(model:get_parameter("encoder.layer.0.attention.LayerNorm.bias"))
      assert.are.same({ 40, 4 }, model.encoder.relative_attention_bias.weight.shape)
   end)

   it("matches last_hidden_state and pooler_output of a right-padded batch", function()
      local out = model(ids, { attention_mask = exp.attention_mask })
      assert.are.same({ 2, 24, 32 }, out.last_hidden_state.shape)
      assert.is_true(H.max_abs_diff(out.last_hidden_state, exp.last_hidden_state) < TOL)
      assert.is_true(H.max_abs_diff(out.pooler_output, exp.pooler_output) < TOL)
   end)

   it("gives sentence-transformers' mean-pooled, normalized embeddings", function()
      local emb = model:sentence_embedding(exp.input_ids, { attention_mask = exp.attention_mask })
      assert.is_true(H.max_abs_diff(emb, exp.sentence_embedding) < TOL)
   end)

   it("adds the shared relative position bias in every layer (zeroed, transformers' other states)", function()
      local m = models.from_pretrained(DIR)
      m.encoder.relative_attention_bias.weight:zero_()
      local h = m(ids, { attention_mask = exp.attention_mask }).last_hidden_state
      assert.is_true(H.max_abs_diff(h, exp.no_bias_last_hidden_state) < TOL)
      assert.is_true(H.max_abs_diff(h, exp.last_hidden_state) > 1e-1)
   end)

   it("counts positions from the padding id over the real tokens: a padded row equals the row alone", function()
      local n = 0
      for _, v in ipairs(exp.attention_mask[1]) do n = n + v end
      local alone = model(ids:narrow(1, 1, 1):narrow(2, 1, n)).last_hidden_state
      local padded = model(ids, { attention_mask = exp.attention_mask }).last_hidden_state:narrow(1, 1, 1):narrow(2, 1, n)
      assert.is_true((alone - padded):abs():max():item() < 1e-5)
   end)

   H.it_splits_encoder("mpnet_tiny", 60000)

   it("reads the pooling and normalization of a sentence-transformers folder", function()
      local dir = H.tmpdir()
      for _, f in ipairs({ "config.json", "model.safetensors" }) do H.copy(DIR .. "/" .. f, dir .. "/" .. f) end
      os.execute("mkdir -p " .. dir .. "/1_Pooling")
      H.write(dir .. "/1_Pooling/config.json", '{"word_embedding_dimension": 32, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}')
      H.write(dir .. "/modules.json", '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
         .. '{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},'
         .. '{"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]')
      local m = models.from_pretrained(dir)
      assert.are.equal("cls", m.pooling)
      local emb = m:sentence_embedding(exp.input_ids, { attention_mask = exp.attention_mask })
      local cls = ml.tensor(exp.last_hidden_state):select(2, 1)
      assert.is_true((emb - cls / (cls * cls):sum(2, true):sqrt()):abs():max():item() < TOL)
      H.rmdir(dir)
   end)

   it("refuses token types, a sequence past its positions and a wrong mask, naming them", function()
      assert.has_error(function() model({ 0, 5, 2 }, { token_type_ids = { 0, 0, 0 } }) end,
         "models.mpnet.forward: MPNet has no token types (token_type_ids given)")
      local long = {}
      for i = 1, 39 do long[i] = 5 end
      assert.has_error(function() model(long) end,
         "models.mpnet.forward: sequence of 39 tokens exceeds the model's 38 positions")
      assert.has_error(function() model({ 0, 5, 2 }, { attention_mask = { 1, 1 } }) end,
         "models.mpnet.forward: attention_mask has shape [1, 2], expected [1, 3]")
   end)

   it("names what is wrong in a config", function()
      H.assert_config_file_fails(mpnet.config, DIR, { num_attention_heads = 5 },
         "models.mpnet: hidden_size 32 is not a multiple of num_attention_heads 5")
      H.assert_config_file_fails(mpnet.config, DIR, { relative_attention_num_buckets = 16 },
         "models.mpnet: relative_attention_num_buckets 16 is below the 32 buckets the bias looks up")
      H.assert_config_file_fails(mpnet.config, DIR, { hidden_act = "swish2" }, 'models.mpnet: activation "swish2"')
   end)
end)

H.describe_encoder_on_cuda("mpnet_tiny", { embeddings = 0, ["encoder.layer.0"] = "disk", ["encoder.layer.1"] = 0,
   ["encoder.relative_attention_bias"] = 0, pooler = "cpu" })
