-- PLBart (models/bart.lua, model_type "plbart") against transformers'
-- PLBartForConditionalGeneration (tests/fixtures/gen_models.py, plbart()): BART's layers with
-- scale_embedding on by default and no decoder_start_token_id in its folder (generate starts from
-- bos_token_id); 2 beams and 2-gram blocking from its generation config.
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local bart = require("moonload.models.bart")

local NAME = "plbart_tiny"

describe("models.bart (plbart_tiny)", function()
   local e = H.expected(NAME)

   it("builds transformers' PLBart: BART's norms, scaled embeddings, started from bos_token_id", function()
      local model = S.load(NAME)
      assert.are.equal("PLBartForConditionalGeneration", model.__name)
      assert.are.equal(model.model.shared.weight, model.lm_head.weight)
      assert.is_nil(H.read_json(H.FIX .. "/" .. NAME .. "/config.json").decoder_start_token_id)
      assert.are.same({ 0, math.sqrt(32) }, { model.config.decoder_start_token_id, model.model.encoder.embed_scale })
      assert.is_nil(model.model.encoder.layer_norm)
      assert.are.same({ 42, 32 }, model.model.decoder.embed_positions.weight.shape)
   end)

   S.it_matches_transformers(NAME, 120000)

   it("scales its embeddings: unscaled ones give other logits", function()
      local unscaled = S.logits_after(NAME, function(m)
         rawset(m.model.encoder, "embed_scale", 1)
         rawset(m.model.decoder, "embed_scale", 1)
      end)
      assert.is_true(H.max_abs_diff(unscaled, e.logits) > 1e-3)
   end)

   it("reads transformers' PLBartConfig defaults and names bad values", function()
      local dir = H.FIX .. "/" .. NAME
      local raw = H.read_json(dir .. "/config.json")
      raw.scale_embedding, raw.bos_token_id = nil, 5
      local cfg = bart.config(raw)
      assert.are.same({ true, 5, 1024 }, { cfg.scale_embedding, cfg.decoder_start_token_id,
         bart.config({ model_type = "plbart", vocab_size = 8, d_model = 8, encoder_layers = 1, decoder_layers = 1,
            encoder_attention_heads = 2, decoder_attention_heads = 2, encoder_ffn_dim = 8, decoder_ffn_dim = 8 })
            .max_position_embeddings })
      H.assert_config_fails(bart.config, dir, { scale_embedding = "yes" },
         'models.plbart: config key "scale_embedding" in config table must be a boolean, got string "yes"')
      H.assert_config_fails(bart.config, dir, { d_model = 30 },
         "models.plbart: d_model 30 is not a multiple of encoder_attention_heads 4")
   end)
end)

describe("models.bart (plbart_tiny) on cuda #cuda", function()
   S.it_generates_on_cuda(NAME, { ["model.shared"] = 0, ["model.encoder.embed_tokens"] = 0,
      ["model.decoder.embed_tokens"] = 0, lm_head = 0, ["model.encoder.embed_positions"] = "cpu",
      ["model.encoder.layers.0"] = "disk", ["model.encoder.layers.1"] = 0, ["model.encoder.layernorm_embedding"] = 0,
      ["model.decoder.embed_positions"] = 0, ["model.decoder.layers.0"] = 0, ["model.decoder.layers.1"] = "cpu",
      ["model.decoder.layernorm_embedding"] = "disk", final_logits_bias = 0 })
end)
