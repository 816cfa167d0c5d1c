-- BlenderbotSmall (models/bart.lua, model_type "blenderbot-small") against transformers'
-- BlenderbotSmallForConditionalGeneration (tests/fixtures/gen_models.py, blenderbot_small()):
-- BART's post-norm layers with learned positions from row 0, a norm on the encoder's embeddings
-- + positions but on the decoder's token embeddings alone (transformers 5.24 leaves the decoder's
-- unscaled, which that norm cancels); 3 beams, length penalty 0.65, min_length and 3-gram blocking
-- from its generation config.
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local bart = require("moonload.models.bart")

local NAME = "blenderbot_small_tiny"

describe("models.bart (blenderbot_small_tiny)", function()
   local e = H.expected(NAME)

   it("builds transformers' BlenderbotSmall: post-norm, norms on the embeddings, 40 position rows", function()
      local model = S.load(NAME)
      assert.are.equal("BlenderbotSmallForConditionalGeneration", model.__name)
      assert.are.equal(model.model.shared.weight, model.lm_head.weight)
      for _, stack in ipairs({ model.model.encoder, model.model.decoder }) do
         assert.is_nil(stack.layer_norm)
         assert.is_not_nil(stack.layernorm_embedding)
         assert.are.same({ 40, 32 }, stack.embed_positions.weight.shape)
      end
   end)

   S.it_matches_transformers(NAME, 120000)

   it("needs each of its particularities: without one the logits differ", function()
      local changes = {
         function(m) rawset(m.model.encoder, "position_offset", 2) end,           -- BART's offset
         function(m) rawset(m.model.decoder, "norms_tokens", false) end,          -- the norm over tokens + positions
      }
      for i, change in ipairs(changes) do
         assert.is_true(H.max_abs_diff(S.logits_after(NAME, change), e.logits) > 1e-3, i)
      end
   end)

   it("names bad config values and reads the family's defaults", function()
      local dir = H.FIX .. "/" .. NAME
      local raw = H.read_json(dir .. "/config.json")
      raw.max_position_embeddings, raw.decoder_start_token_id = nil, nil
      local cfg = bart.config(raw)
      assert.are.same({ 512, 1, false, 0 }, { cfg.max_position_embeddings, cfg.decoder_start_token_id, cfg.pre_norm == true,
         cfg.position_offset })
      H.assert_config_fails(bart.config, dir, { encoder_attention_heads = 3 },
         "models.blenderbot_small: d_model 32 is not a multiple of encoder_attention_heads 3")
      H.assert_config_fails(bart.config, dir, { d_model = "32" },
         'models.blenderbot_small: config key "d_model" in config table must be a positive integer, got string "32"')
   end)
end)

describe("models.bart (blenderbot_small_tiny) on cuda #cuda", function()
   S.it_generates_on_cuda(NAME, { ["model.shared"] = 0, ["model.encoder.embed_tokens"] = 0,
      ["model.decoder.embed_tokens"] = 0, lm_head = 0, ["model.encoder.embed_positions"] = "cpu",
      ["model.encoder.layers.0"] = 0, ["model.encoder.layers.1"] = "disk", ["model.encoder.layernorm_embedding"] = 0,
      ["model.decoder.embed_positions"] = 0, ["model.decoder.layers.0"] = "cpu", ["model.decoder.layers.1"] = 0,
      ["model.decoder.layernorm_embedding"] = "disk", final_logits_bias = 0 })
end)
