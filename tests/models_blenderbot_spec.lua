-- Blenderbot (models/bart.lua, model_type "blenderbot") against transformers'
-- BlenderbotForConditionalGeneration (tests/fixtures/gen_models.py, blenderbot()): mBART's
-- pre-norm layers and final norms with scaled embeddings, learned positions from row 0 and no
-- norm on the embeddings; generated as the hub's folders say (3 beams, length penalty 0.65,
-- min_length, 3-gram blocking, and no 3-gram of the input in the output).
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local bart = require("moonload.models.bart")

local NAME = "blenderbot_tiny"

describe("models.bart (blenderbot_tiny)", function()
   local e = H.expected(NAME)

   it("builds transformers' Blenderbot: final norms, no norm on the embeddings, 40 position rows", function()
      local model = S.load(NAME)
      assert.are.equal("BlenderbotForConditionalGeneration", model.__name)
      assert.are.equal(model.model.shared.weight, model.lm_head.weight)
      for _, stack in ipairs({ model.model.encoder, model.model.decoder }) do
         assert.is_not_nil(stack.layer_norm)
         assert.is_nil(stack.layernorm_embedding)
         assert.are.same({ 40, 32 }, stack.embed_positions.weight.shape)
         assert.are.equal(math.sqrt(32), stack.embed_scale)
      end
   end)

   S.it_matches_transformers(NAME, 120000)

   it("counts positions from row 0: BART's offset of 2 gives other logits", function()
      local shifted = S.logits_after(NAME, function(m)
         rawset(m.model.encoder, "position_offset", 2)
         rawset(m.model.decoder, "position_offset", 2)
      end)
      assert.is_true(H.max_abs_diff(shifted, e.logits) > 1e-3)
   end)

   it("has no norm on the embeddings: BART's layernorm_embedding gives other logits", function()
      local normed = S.logits_after(NAME, function(m)
         m.model.encoder.layernorm_embedding = require("moonload.nn").LayerNorm(32)
      end)
      assert.is_true(H.max_abs_diff(normed, e.logits) > 1e-3)
   end)

   it("bans the input's 3-grams from the output (encoder_no_repeat_ngram_size), and not when told 0", function()
      local model = S.load(NAME)
      local o = { attention_mask = e.attention_mask, encoder_no_repeat_ngram_size = 0 }
      assert.are.same(e.configured_unbanned_ids, (model:generate(e.input_ids, o)))
      assert.are_not.same(e.configured_ids, e.configured_unbanned_ids)
      local greedy = { attention_mask = e.attention_mask, max_new_tokens = e.max_new_tokens, num_beams = 1,
         no_repeat_ngram_size = 0, min_length = 0, encoder_no_repeat_ngram_size = 0 }
      assert.are.same(e.greedy_unbanned_ids, model:generate(e.input_ids, greedy))
      assert.are_not.same(e.greedy_ids, e.greedy_unbanned_ids)
      assert.has_error(function() model:generate(e.input_ids, { encoder_no_repeat_ngram_size = -1 }) end,
         "generate: encoder_no_repeat_ngram_size must be an integer >= 0, got -1")
   end)

   it("names bad config values and reads the family's defaults", function()
      local dir = H.FIX .. "/" .. NAME
      local raw = H.read_json(dir .. "/config.json")
      raw.max_position_embeddings, raw.decoder_start_token_id = nil, nil
      local cfg = bart.config(raw)
      assert.are.same({ 128, 1, true, 0 }, { cfg.max_position_embeddings, cfg.decoder_start_token_id, cfg.pre_norm,
         cfg.position_offset })
      H.assert_config_fails(bart.config, dir, { decoder_attention_heads = 5 },
         "models.blenderbot: d_model 32 is not a multiple of decoder_attention_heads 5")
      H.assert_config_fails(bart.config, dir, { activation_function = "swish2" }, 'models.blenderbot: activation "swish2" in config table is not supported')
   end)
end)

describe("models.bart (blenderbot_tiny) on cuda #cuda", function()
   S.it_generates_on_cuda(NAME, { ["model.shared"] = 0, ["model.encoder.embed_tokens"] = 0,
      ["model.decoder.embed_tokens"] = 0, lm_head = 0, ["model.encoder.embed_positions"] = "cpu",
      ["model.encoder.layers.0"] = 0, ["model.encoder.layers.1"] = "disk", ["model.encoder.layer_norm"] = 0,
      ["model.decoder.embed_positions"] = 0, ["model.decoder.layers.0"] = "cpu", ["model.decoder.layers.1"] = 0,
      ["model.decoder.layer_norm"] = "disk", final_logits_bias = 0 })
end)
