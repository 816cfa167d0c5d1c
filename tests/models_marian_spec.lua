-- MarianMT (models/bart.lua's MarianMTModel) against transformers' MarianMTModel
-- (tests/fixtures/gen_models.py, marian()): marian_tiny as the Helsinki-NLP opus-mt folders have
-- it (post-norm, sinusoidal positions that the checkpoint leaves out, scaled embeddings, SiLU, a
-- bias on the logits, 4 beams) and marian_tiny_unshared (the encoder's and the decoder's own
-- embeddings, the decoder's over 80 ids, the position tables stored in the checkpoint).
local ml = require("moonload")
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local bart = require("moonload.models.bart")

local logits_after = S.logits_after

describe("models.marian (marian_tiny)", function()
   local model, e = S.load("marian_tiny"), H.expected("marian_tiny")
   S.it_matches_transformers("marian_tiny", 90000)

   it("builds MarianMTModel under transformers' names: shared embeddings, no norm on them, no table stored", function()
      assert.are.equal("MarianMTModel", model.__name)
      assert.are.same({ "MarianEncoderLayer", "MarianDecoderLayer" }, model.no_split_modules)
      assert.are.equal("MarianDecoderLayer", model.model.decoder.layers[1].__name)
      assert.are.equal(model.model.shared.weight, model.lm_head.weight)
      assert.are.equal(model.model.shared.weight, model.model.decoder.embed_tokens.weight)
      assert.is_nil(model.model.encoder.layernorm_embedding)
      assert.is_nil(model.model.encoder.layer_norm)
      assert.are.same({ 1, 100 }, model.final_logits_bias.shape)
      assert.is_nil(model:state_dict()["model.encoder.embed_positions.weight"])
      assert.are.same({ 40, 32 }, model.model.encoder.embed_positions.weight.shape)
   end)

   it("computes transformers' table: sin of pos / 10000^(2k/d) in the first half, cos in the second", function()
      local w = model.model.decoder.embed_positions.weight
      for _, p in ipairs({ 0, 1, 7, 39 }) do
         for _, k in ipairs({ 0, 1, 5, 15 }) do
            local angle = p / 10000 ^ (2 * k / 32)
            assert.is_true(math.abs(w[{ p + 1, k + 1 }]:item() - math.sin(angle)) < 1e-6)
            assert.is_true(math.abs(w[{ p + 1, 16 + k + 1 }]:item() - math.cos(angle)) < 1e-6)
         end
      end
      -- an odd width: one more sine column than cosines
      local odd = bart.sinusoid_table("sinusoidal", 3, 5)
      assert.is_true(math.abs(odd[{ 3, 3 }]:item() - math.sin(2 / 10000 ^ (4 / 5))) < 1e-6)
      assert.is_true(math.abs(odd[{ 3, 4 }]:item() - math.cos(2)) < 1e-6)
   end)

   it("needs its positions in that layout, its embedding scale and its logits bias", function()
      local function swapped(m)
         for _, stack in ipairs({ m.model.encoder, m.model.decoder }) do
            local w = stack.embed_positions.weight
            local halves = w:narrow(2, 17, 16):contiguous()
            w:narrow(2, 17, 16):copy_(w:narrow(2, 1, 16))
            w:narrow(2, 1, 16):copy_(halves)
         end
      end
      assert.is_true(H.max_abs_diff(logits_after("marian_tiny", swapped), e.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after("marian_tiny", function(m)
         rawset(m.model.encoder, "embed_scale", 1)
         rawset(m.model.decoder, "embed_scale", 1)
      end), e.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after("marian_tiny", function(m) m.final_logits_bias:fill_(0) end), e.logits) > 1e-3)
   end)

   it("names positions past max_position_embeddings", function()
      assert.has_error(function() model:generate({ 5, 6, 0 }, { max_new_tokens = 45 }) end,
         "generate: prompt of 1 tokens + max_new_tokens 45 exceeds the model's 40 positions")
      local long = {}
      for i = 1, 41 do long[i] = i end
      local ok, err = pcall(model.encode, model, { long })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("models.marian: 41 tokens (0 cached + 41 new) exceed max_position_embeddings 40", 1,
         true), err)
   end)
end)

describe("models.marian (marian_tiny_unshared)", function()
   local model, e = S.load("marian_tiny_unshared"), H.expected("marian_tiny_unshared")
   S.it_matches_transformers("marian_tiny_unshared", 90000)

   it("keeps the encoder's and the decoder's embeddings apart, the head on the decoder's", function()
      assert.is_nil(model.model.shared)
      assert.are.same({ 100, 32 }, model.model.encoder.embed_tokens.weight.shape)
      assert.are.same({ 80, 32 }, model.model.decoder.embed_tokens.weight.shape)
      assert.are.equal(model.model.decoder.embed_tokens.weight, model.lm_head.weight)
      assert.are.same({ 1, 80 }, model.final_logits_bias.shape)
      assert.are.same({ "lm_head.weight" }, (function()
         local stored = ml.safetensors.load_file(H.FIX .. "/marian_tiny_unshared/model.safetensors")
         local extra = {}
         for k in pairs(model:state_dict()) do if stored[k] == nil then extra[#extra + 1] = k end end
         return extra
      end)())
   end)

   it("reads the position tables from the checkpoint when it stores them, as transformers does", function()
      assert.is_not_nil(model:state_dict()["model.encoder.embed_positions.weight"])
      assert.is_true(H.max_abs_diff(logits_after("marian_tiny_unshared", function(m)
         local w = m.model.decoder.embed_positions.weight
         w:copy_(w * 0.5)
      end), e.logits) > 1e-3)
   end)

   it("takes encoder ids over vocab_size and decoder ids over decoder_vocab_size", function()
      assert.are.same({ 2, 5, 80 }, model(e.input_ids, { attention_mask = e.attention_mask,
         decoder_input_ids = e.decoder_input_ids }).shape)
      local ok, err = pcall(model, { { 99, 5, 0 } }, { decoder_input_ids = { { 79, 85 } } })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("85", 1, true), err)
   end)
end)

describe("models.marian text to text (marian_tiny_text: the marian_spm tokenizer, examples/translate.lua)", function()
   local dir = H.FIX .. "/marian_tiny_text"
   local model, e = S.load("marian_tiny_text"), H.expected("marian_tiny_text")
   local tok = ml.tokenizers.from_pretrained(dir)

   it("translates as transformers does: MarianTokenizer's batch, the folder's 4 beams, the pad token banned", function()
      local ids, mask = tok:encode_batch(e.texts)
      assert.are.same(e.input_ids, ids)
      assert.are.same(e.attention_mask, mask)
      local out = model:generate(ids, { attention_mask = mask })
      assert.are.same(e.sequences, out)
      for i, text in ipairs(e.translations) do assert.are.equal(text, tok:decode(out[i], { skip_special_tokens = true })) end
   end)

   it("keeps the generation config's bad_words_ids out of the output, and needs them", function()
      local ids, mask = tok:encode_batch(e.texts)
      assert.are.same(e.greedy_ids, model:generate(ids, { attention_mask = mask, num_beams = 1, max_new_tokens = 8 }))
      -- (the folder bans [[pad]]; {{0}} names only the eos id, which transformers drops from the bans)
      assert.are.same(e.greedy_unbanned_ids, model:generate(ids, { attention_mask = mask, num_beams = 1, max_new_tokens = 8,
         bad_words_ids = { { 0 } } }))
   end)

   it("runs examples/translate.lua on it", function()
      local p = io.popen("luajit examples/translate.lua 2>&1")
      local printed = p:read("*a")
      assert.is_true(p:close())
      for i, text in ipairs(e.texts) do
         assert.truthy(printed:find(text .. "\n  -> " .. e.translations[i], 1, true), printed)
      end
   end)
end)

describe("models.marian bad config", function()
   it("names the head count, what a key must be and the activation", function()
      local read = function(r) return bart.config(r) end
      local dir = H.FIX .. "/marian_tiny"
      H.assert_config_fails(read, dir, { decoder_vocab_size = 0 }, 'models.marian: config key "decoder_vocab_size"')
      H.assert_config_fails(read, dir, { decoder_attention_heads = 5 },
         "models.marian: d_model 32 is not a multiple of decoder_attention_heads 5")
      H.assert_config_fails(read, dir, { share_encoder_decoder_embeddings = "no" },
         'models.marian: config key "share_encoder_decoder_embeddings"')
      H.assert_config_fails(read, dir, { activation_function = "swishy" }, "swishy")
   end)

   it("defaults as transformers' MarianConfig does", function()
      local raw = H.read_json(H.FIX .. "/marian_tiny/config.json")
      raw.decoder_start_token_id, raw.decoder_vocab_size, raw.share_encoder_decoder_embeddings = nil, nil, nil
      local cfg = bart.config(raw)
      assert.are.equal(58100, cfg.decoder_start_token_id)
      assert.are.equal(100, cfg.decoder_vocab_size)
      assert.is_true(cfg.shared_embeddings)
      -- (shared embeddings: the decoder reads the shared table, whatever decoder_vocab_size says)
      raw.decoder_vocab_size = 80
      assert.are.equal(100, bart.config(raw).decoder_vocab_size)
   end)
end)

describe("models.marian on cuda #cuda", function()
   S.it_generates_on_cuda("marian_tiny_unshared", { ["model.encoder.embed_tokens"] = "cpu",
      ["model.decoder.embed_tokens"] = 0, lm_head = 0, ["model.encoder.embed_positions"] = 0,
      ["model.encoder.layers.0"] = 0, ["model.encoder.layers.1"] = "disk", ["model.decoder.embed_positions"] = "cpu",
      ["model.decoder.layers.0"] = "cpu", ["model.decoder.layers.1"] = 0, final_logits_bias = 0 })
end)
