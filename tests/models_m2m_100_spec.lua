-- M2M100 (models/bart.lua's M2M100ForConditionalGeneration) against transformers'
-- M2M100ForConditionalGeneration (tests/fixtures/gen_models.py, m2m_100()): m2m_100_tiny as
-- facebook/m2m100_418M and the dense NLLB-200 folders have it (pre-norm, final norms, fairseq's
-- sinusoidal positions counted from pad_token_id + 1 over the tokens that are not padding, scaled
-- embeddings, ReLU, no logits bias), generated forced to a target-language token after the start
-- (forced_bos_token_id in the generation config) with 2 beams. The decoder's second row holds a pad
-- id, which shifts the positions after it.
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local bart = require("moonload.models.bart")

local NAME = "m2m_100_tiny"

local function logits_after(fn) return S.logits_after(NAME, fn) end

describe("models.m2m_100 (m2m_100_tiny)", function()
   local model, e = S.load(NAME), H.expected(NAME)
   S.it_matches_transformers(NAME, 90000)

   it("builds M2M100ForConditionalGeneration under transformers' names, with no table stored and no logits bias", function()
      assert.are.equal("M2M100ForConditionalGeneration", model.__name)
      assert.are.same({ "M2M100EncoderLayer", "M2M100DecoderLayer" }, model.no_split_modules)
      assert.are.equal("M2M100SinusoidalPositionalEmbedding", model.model.encoder.embed_positions.__name)
      assert.are.equal(model.model.shared.weight, model.lm_head.weight)
      assert.is_nil(model.final_logits_bias)
      assert.is_nil(model.model.encoder.layernorm_embedding)
      assert.is_not_nil(model.model.decoder.layer_norm)
      local stored = require("moonload").safetensors.load_file(H.FIX .. "/" .. NAME .. "/model.safetensors")
      stored["lm_head.weight"], stored["model.encoder.embed_tokens.weight"] = true, true
      stored["model.decoder.embed_tokens.weight"] = true
      assert.are.same(H.sorted_keys(stored), H.sorted_keys((model:state_dict())))
   end)

   it("computes fairseq's table: sin then cos of pos * exp(-k log(10000) / (d/2 - 1)), the padding row zero", function()
      local w = model.model.encoder.embed_positions.weights
      assert.are.same({ 42, 32 }, w.shape)
      for _, p in ipairs({ 0, 2, 9, 41 }) do
         for _, k in ipairs({ 0, 1, 7, 15 }) do
            local a = p * math.exp(-k * math.log(10000) / 15)
            assert.is_true(math.abs(w[{ p + 1, k + 1 }]:item() - math.sin(a)) < 1e-5)
            assert.is_true(math.abs(w[{ p + 1, 16 + k + 1 }]:item() - math.cos(a)) < 1e-5)
         end
      end
      assert.are.equal(0, w[2]:abs():sum():item())
   end)

   it("needs its positions counted from pad_token_id + 1 past the padding, its final norms and its embedding scale", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         rawset(m.model.decoder.embed_positions, "padding_idx", -1)
      end), e.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         m.model.encoder.layer_norm = nil
         m.model.decoder.layer_norm = nil
      end), e.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         rawset(m.model.encoder, "embed_scale", 1)
         rawset(m.model.decoder, "embed_scale", 1)
      end), e.logits) > 1e-3)
   end)

   it("forces the generation config's target language after the start, or the call's", function()
      assert.are.equal(90, e.configured_ids[1][2])
      local ids = model:generate(e.input_ids, { attention_mask = e.attention_mask, forced_bos_token_id = 91,
         max_new_tokens = 3, num_beams = 1 })
      assert.are.same({ 91, 91 }, { ids[1][2], ids[2][2] })
   end)

   it("runs past max_position_embeddings, its table grown as transformers grows it", function()
      local ids = model:generate(e.input_ids, { attention_mask = e.attention_mask, max_new_tokens = 45, num_beams = 1,
         eos_token_id = false })
      assert.are.same(e.long_ids, ids)
      local longer = rawget(model.model.decoder.embed_positions, "longer")
      assert.is_true(longer:size(1) >= 47)          -- (the 46th position is row 1 + 46)
      assert.is_true(H.max_abs_diff(longer:narrow(1, 1, 42), model.model.decoder.embed_positions.weights:tolist()) == 0)
   end)
end)

describe("models.m2m_100 bad config", function()
   it("names pad_token_id, the head count and the activation", function()
      local read = function(r) return bart.config(r) end
      local dir = H.FIX .. "/" .. NAME
      H.assert_config_fails(read, dir, { pad_token_id = -1 }, 'models.m2m_100: config key "pad_token_id"')
      H.assert_config_fails(read, dir, { decoder_attention_heads = 6 },
         "models.m2m_100: d_model 32 is not a multiple of decoder_attention_heads 6")
      H.assert_config_fails(read, dir, { activation_function = "relu3" }, "relu3")
   end)

   it("defaults as transformers' M2M100Config does", function()
      local raw = H.read_json(H.FIX .. "/" .. NAME .. "/config.json")
      raw.activation_function, raw.scale_embedding, raw.pad_token_id, raw.decoder_start_token_id = nil, nil, nil, nil
      local cfg = bart.config(raw)
      assert.are.same({ "relu", true, 1, 2 }, { cfg.activation_function, cfg.scale_embedding, cfg.pad_token_id,
         cfg.decoder_start_token_id })
   end)
end)

describe("models.m2m_100 on cuda #cuda", function()
   S.it_generates_on_cuda(NAME, { ["model.shared"] = 0, ["model.encoder.embed_tokens"] = 0,
      ["model.decoder.embed_tokens"] = 0, lm_head = 0, ["model.encoder.embed_positions"] = "cpu",
      ["model.encoder.layers.0"] = 0, ["model.encoder.layers.1"] = "disk", ["model.encoder.layer_norm"] = 0,
      ["model.decoder.embed_positions"] = 0, ["model.decoder.layers.0"] = "cpu", ["model.decoder.layers.1"] = 0,
      ["model.decoder.layer_norm"] = "cpu" })
end)
