-- BART and mBART (models/bart.lua) against transformers' BartForConditionalGeneration and
-- MBartForConditionalGeneration (tests/fixtures/gen_models.py, bart()): encoder states and logits
-- over a right-padded batch, greedy generate, and generate as the folder's generation config
-- says (bart_tiny as bart-large-cnn: forced BOS and EOS, 3-gram blocking, 3 beams, length
-- penalty 2, min_length, early stopping; mbart_tiny: 2 beams, forced EOS).
local ml = require("moonload")
local H = require("models_helpers")

local function load(name, opts) return ml.models.from_pretrained(H.FIX .. "/" .. name, opts) end

for _, name in ipairs({ "bart_tiny", "mbart_tiny" }) do
   describe("models.bart (" .. name .. ")", function()
      local model = load(name)
      local e = H.expected(name)
      local mask = e.attention_mask

      it("builds the stacks under transformers' names, with the norms where the family has them", function()
         assert.are.equal(model.model.shared.weight, model.lm_head.weight)
         assert.are.equal(model.model.shared.weight, model.model.encoder.embed_tokens.weight)
         assert.are.same({ 1, 100 }, model.final_logits_bias.shape)
         assert.are.equal(name == "mbart_tiny", model.model.encoder.layer_norm ~= nil)
         assert.are.equal(name == "mbart_tiny", model.model.decoder.layer_norm ~= nil)
      end)

      it("gives transformers' encoder states and logits", function()
         local enc = model:encode(e.input_ids, { attention_mask = mask })
         assert.is_true(H.max_abs_diff(enc, e.encoder_last_hidden_state) < 1e-4)
         local logits = model(e.input_ids, { attention_mask = mask, decoder_input_ids = e.decoder_input_ids })
         assert.are.same({ 2, 5, 100 }, logits.shape)
         assert.is_true(H.max_abs_diff(logits, e.logits) < 1e-4)
      end)

      it("generates transformers' tokens, greedy and as its generation config says", function()
         assert.is_true(e.greedy_min_margin > 1e-3)
         assert.are.same(e.greedy_ids, model:generate(e.input_ids, { attention_mask = mask, max_new_tokens = e.max_new_tokens,
            num_beams = 1, no_repeat_ngram_size = 0, min_length = 0 }))
         local ids, scores = model:generate(e.input_ids, { attention_mask = mask })
         assert.are.same(e.configured_ids, ids)
         for i, s in ipairs(e.configured_scores or {}) do assert.is_true(math.abs(s - scores[i]) < 1e-4) end
      end)

      it("keeps its tokens with layers on the CPU and the disk, and through save_model", function()
         local dir = H.tmpdir()
         local off = load(name, { device_map = "auto", max_memory = { cpu = 90000 }, offload_folder = dir })
         local placed = {}
         for _, d in pairs(off.hf_device_map) do placed[d] = true end
         assert.is_true(placed.disk, "a 90 kB budget should send some layers to the disk")
         assert.are.same(e.configured_ids, (off:generate(e.input_ids, { attention_mask = mask })))
         H.rmdir(dir)
         local saved = H.tmpdir()
         ml.save_model(model, saved)
         local back = ml.models.from_pretrained(saved)
         local o = { attention_mask = mask, decoder_input_ids = e.decoder_input_ids }
         assert.is_true(back(e.input_ids, o):equal(model(e.input_ids, o)))
         assert.are.same(e.configured_ids, (back:generate(e.input_ids, { attention_mask = mask })))
         H.rmdir(saved)
      end)
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
