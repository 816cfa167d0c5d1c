-- LongT5 (models/longt5.lua) against transformers' LongT5ForConditionalGeneration
-- (tests/fixtures/gen_models.py, longt5()): longt5_tiny_local (local attention, ReLU, the head tied
-- to the shared embedding and fed hidden * d_model^-0.5; 3 beams, length penalty 0.8) and
-- longt5_tiny_tglobal (transient-global attention, as the hub's folders: gated GELU, a head of its
-- own; 2 beams with 2-gram blocking); local_radius 2 (blocks of 3), global blocks of 3 over 11
-- tokens, a right-padded batch.
local ml = require("moonload")
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local longt5 = require("moonload.models.longt5")

local LOCAL, TGLOBAL = "longt5_tiny_local", "longt5_tiny_tglobal"

--- The checkpoint's tensors, and the stacks' embeddings (and a tied head) that share its own.
local function assert_holds_checkpoint(model, name, tied)
   local stored = ml.safetensors.load_file(H.FIX .. "/" .. name .. "/model.safetensors")
   stored["encoder.embed_tokens.weight"], stored["decoder.embed_tokens.weight"] = true, true
   if tied then stored["lm_head.weight"] = true end
   assert.are.same(H.sorted_keys(stored), H.sorted_keys((model:state_dict())))
end

--- Sets every encoder attention's field `key` to value (a copy of the model, logits after).
local function logits_with(name, key, value)
   return S.logits_after(name, function(m)
      for i = 1, m.encoder.n_blocks do
         local sa = m.encoder.block[i].layer[1]
         rawset(sa[sa.attention_name], key, value)
      end
   end)
end

describe("models.longt5 (longt5_tiny_local)", function()
   local e = H.expected(LOCAL)

   it("reads the folder as transformers 5 does: local attention, ReLU, a tied and scaled head", function()
      local model = S.load(LOCAL)
      assert.are.equal("LongT5ForConditionalGeneration", model.__name)
      assert.are.same({ "LongT5Block" }, model.no_split_modules)
      local sa = model.encoder.block[1].layer[1]
      assert.are.equal("LongT5LayerLocalSelfAttention", sa.__name)
      assert.is_not_nil(sa.LocalSelfAttention.relative_attention_bias)
      assert.is_nil(model.encoder.block[2].layer[1].LocalSelfAttention.relative_attention_bias)
      assert.are.equal("T5LayerCrossAttention", model.decoder.block[1].layer[2].__name)
      assert.are.equal(model.shared.weight, model.lm_head.weight)
      assert.are.same({ "relu", false, true, 3 }, { model.config.dense_act_fn, model.config.is_gated_act,
         model.config.scale_decoder_outputs, sa.LocalSelfAttention.block_len })
      assert_holds_checkpoint(model, LOCAL, true)
   end)

   S.it_matches_transformers(LOCAL, 150000)

   it("attends only within local_radius: all keys in reach give other logits", function()
      assert.is_true(H.max_abs_diff(logits_with(LOCAL, "block_len", 11), e.logits) > 1e-3)
   end)
end)

describe("models.longt5 (longt5_tiny_tglobal)", function()
   local e = H.expected(TGLOBAL)

   it("reads the folder as transformers 5 does: transient-global attention, a head of its own", function()
      local model = S.load(TGLOBAL)
      local first = model.encoder.block[1].layer[1].TransientGlobalSelfAttention
      assert.is_not_nil(first.global_relative_attention_bias)
      assert.is_not_nil(first.global_input_layer_norm)
      assert.is_nil(model.encoder.block[2].layer[1].TransientGlobalSelfAttention.global_relative_attention_bias)
      assert.are_not.equal(model.shared.weight, model.lm_head.weight)
      assert.are.same({ "gelu_new", true, false }, { model.config.dense_act_fn, model.config.is_gated_act,
         model.config.scale_decoder_outputs })
      assert_holds_checkpoint(model, TGLOBAL)
   end)

   S.it_matches_transformers(TGLOBAL, 150000, 3e-4)

   it("needs its global keys: without them (blocks longer than the input) the logits differ", function()
      assert.is_true(H.max_abs_diff(logits_with(TGLOBAL, "global_block_size", 100), e.logits) > 1e-3)
   end)

   it("needs the global keys' own relative bias", function()
      assert.is_true(H.max_abs_diff(S.logits_after(TGLOBAL, function(m)
         m.encoder.block[1].layer[1].TransientGlobalSelfAttention.global_relative_attention_bias.weight:fill_(0)
      end), e.logits) > 1e-3)
   end)
end)

describe("models.longt5 bad config", function()
   local dir = H.FIX .. "/" .. TGLOBAL

   it("names an unknown encoder_attention_type and a bad key", function()
      H.assert_config_fails(longt5.config, dir, { encoder_attention_type = "global" },
         'models.longt5: config key "encoder_attention_type" is "global" (supported: local, transient-global)')
      H.assert_config_fails(longt5.config, dir, { global_block_size = 0 },
         'models.longt5: config key "global_block_size" in config table must be a positive integer, got number 0')
      H.assert_config_fails(longt5.config, dir, { feed_forward_proj = "gated-gelu-fast" },
         'models.longt5: feed_forward_proj "gated-gelu-fast" is not "{ACT}" or "gated-{ACT}"')
   end)

   it("defaults as transformers' LongT5Config does; the head's scaling follows tie_word_embeddings alone", function()
      local raw = H.read_json(dir .. "/config.json")
      raw.encoder_attention_type, raw.local_radius, raw.global_block_size = nil, nil, nil
      raw.scale_decoder_outputs = true
      local cfg = longt5.config(raw)
      assert.are.same({ "local", 127, 16, false }, { cfg.encoder_attention_type, cfg.local_radius,
         cfg.global_block_size, cfg.scale_decoder_outputs })
   end)
end)

describe("models.longt5 on cuda #cuda", function()
   for _, name in ipairs({ LOCAL, TGLOBAL }) do
      S.it_generates_on_cuda(name, { shared = 0, ["encoder.embed_tokens"] = 0, ["decoder.embed_tokens"] = 0,
         ["encoder.block.0"] = 0, ["encoder.block.1"] = "disk", ["encoder.block.2"] = "cpu",
         ["encoder.final_layer_norm"] = 0, ["decoder.block.0"] = "cpu", ["decoder.block.1"] = 0,
         ["decoder.final_layer_norm"] = "disk", lm_head = 0 })
   end
end)
