-- BART and mBART (models/bart.lua) against transformers' BartForConditionalGeneration and
-- MBartForConditionalGeneration (tests/fixtures/gen_models.py, bart()): encoder states and logits
-- over a right-padded batch, greedy generate, and generate as the folder's generation config
-- says (bart_tiny as bart-large-cnn: forced BOS and EOS, 3-gram blocking, 3 beams, length
-- penalty 2, min_length, early stopping; mbart_tiny: 2 beams, forced EOS).
local ml = require("moonload")
local H = require("models_helpers")
local S = require("seq2seq_helpers")

local function load(name, opts) return ml.models.from_pretrained(H.FIX .. "/" .. name, opts) end

for _, name in ipairs({ "bart_tiny", "mbart_tiny" }) do
   describe("models.bart (" .. name .. ")", function()
      local model = load(name)

      it("builds the stacks under transformers' names, with the norms where the family has them", function()
         assert.are.equal(model.model.shared.weight, model.lm_head.weight)
         assert.are.equal(model.model.shared.weight, model.model.encoder.embed_tokens.weight)
         assert.are.same({ 1, 100 }, model.final_logits_bias.shape)
         assert.are.equal(name == "mbart_tiny", model.model.encoder.layer_norm ~= nil)
         assert.are.equal(name == "mbart_tiny", model.model.decoder.layer_norm ~= nil)
      end)

      S.it_matches_transformers(name, 90000)
   end)
end

describe("models.bart bad input", function()
   it("names the head count, the positions and what generate cannot take", function()
      local bart = require("moonload.models.bart")
      assert.has_error(function()
         bart.BartForConditionalGeneration({ model_type = "bart", vocab_size = 10, d_model = 30, encoder_layers = 1,
            decoder_layers = 1, encoder_attention_heads = 4, decoder_attention_heads = 3, encoder_ffn_dim = 8,
            decoder_ffn_dim = 8 })
      end, "models.bart: d_model 30 is not a multiple of encoder_attention_heads 4 in config table")
      local m = load("bart_tiny")
      assert.has_error(function() m:generate({ 0, 5, 2 }, { max_new_tokens = 45 }) end,
         "generate: prompt of 1 tokens + max_new_tokens 45 exceeds the model's 40 positions")
      assert.has_error(function() m:generate({ 0, 5, 2 }, { assistant_model = m }) end,
         "generate: BART does not support assistant_model")
      assert.has_error(function() m:generate({ 0, 5, 2 }, { forced_eos_token_id = -2 }) end,
         "generate: forced_eos_token_id must be an integer >= 0, got -2")
   end)
end)

describe("models.bart on cuda #cuda", function()
   it("gives transformers' tokens with layers over cuda:0, cpu and disk", function()
      local e = H.expected("bart_tiny")
      local dir = H.tmpdir()
      local m = load("bart_tiny", { offload_folder = dir, device_map = { ["model.shared"] = 0,
         ["model.encoder.embed_tokens"] = 0, ["model.decoder.embed_tokens"] = 0, lm_head = 0,
         ["model.encoder.embed_positions"] = "cpu", ["model.encoder.layers.0"] = 0, ["model.encoder.layers.1"] = "disk",
         ["model.encoder.layernorm_embedding"] = 0, ["model.decoder.embed_positions"] = 0,
         ["model.decoder.layers.0"] = "cpu", ["model.decoder.layers.1"] = 0, ["model.decoder.layernorm_embedding"] = "cpu",
         final_logits_bias = 0 } })
      assert.are.same(e.configured_ids, (m:generate(e.input_ids, { attention_mask = e.attention_mask })))
      H.rmdir(dir)
   end)
end)
