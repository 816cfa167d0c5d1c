-- PEGASUS-X (models/pegasus_x.lua) against transformers' PegasusXForConditionalGeneration
-- (tests/fixtures/gen_models.py, pegasus_x()): pegasus_x_tiny with blocks of 4 tokens, 3 global
-- tokens, 3 encoder layers (the second staggered by half a block), 11 input tokens padded to 3
-- blocks, a right-padded batch; 2 beams, length penalty 0.8.
local ml = require("moonload")
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local bart = require("moonload.models.bart")
local pegasus_x = require("moonload.models.pegasus_x")

local NAME = "pegasus_x_tiny"

describe("models.pegasus_x (pegasus_x_tiny)", function()
   local e = H.expected(NAME)

   it("builds PegasusXForConditionalGeneration under transformers' names, holding the checkpoint's tensors", function()
      local model = S.load(NAME)
      assert.are.equal("PegasusXForConditionalGeneration", model.__name)
      assert.are.same({ "PegasusXEncoderLayer", "PegasusXDecoderLayer" }, model.no_split_modules)
      assert.are.equal(model.model.shared.weight, model.lm_head.weight)
      assert.are.same({ false, true, false }, { model.model.encoder.layers[1].staggered,
         model.model.encoder.layers[2].staggered, model.model.encoder.layers[3].staggered })
      local stored = ml.safetensors.load_file(H.FIX .. "/" .. NAME .. "/model.safetensors")
      stored["lm_head.weight"], stored["model.encoder.embed_tokens.weight"] = true, true
      stored["model.decoder.embed_tokens.weight"] = true
      assert.are.same(H.sorted_keys(stored), H.sorted_keys((model:state_dict())))
   end)

   S.it_matches_transformers(NAME, 120000)

   it("computes the positions as fairseq's sinusoids, for any length", function()
      local computed = pegasus_x.positions(0, 300, 32, "float32", "cpu")
      assert.is_true(H.max_abs_diff(computed, bart.sinusoid_table("fairseq", 300, 32):tolist()) < 1e-4)
   end)

   it("attends in blocks: one block over all the tokens gives other logits", function()
      assert.is_true(H.max_abs_diff(S.logits_after(NAME, function(m)
         rawset(m.model.encoder, "block_size", 12)
         for _, layer in ipairs(m.model.encoder.layers) do
            rawset(layer, "block_size", 12)
            rawset(layer.self_attn, "block_size", 12)
         end
      end), e.logits) > 1e-3)
   end)

   it("needs its staggered layers", function()
      assert.is_true(H.max_abs_diff(S.logits_after(NAME, function(m)
         rawset(m.model.encoder.layers[2], "staggered", false)
      end), e.logits) > 1e-3)
   end)

   it("needs its global tokens", function()
      assert.is_true(H.max_abs_diff(S.logits_after(NAME, function(m)
         m.model.encoder.embed_global.weight:fill_(0)
      end), e.logits) > 1e-3)
   end)
end)

describe("models.pegasus_x bad config", function()
   local dir = H.FIX .. "/" .. NAME

   it("names an odd staggered block, the head count and a bad key", function()
      H.assert_config_fails(pegasus_x.config, dir, { block_size = 5 },
         'models.pegasus_x: config key "block_size" must be even with stagger_local_blocks, got 5')
      assert.are.equal(5, pegasus_x.config((function()
         local raw = H.read_json(dir .. "/config.json")
         raw.block_size, raw.stagger_local_blocks = 5, false
         return raw
      end)()).block_size)
      H.assert_config_fails(pegasus_x.config, dir, { encoder_attention_heads = 3 },
         "models.pegasus_x: d_model 32 is not a multiple of encoder_attention_heads 3")
      H.assert_config_fails(pegasus_x.config, dir, { num_global_tokens = 0 },
         'models.pegasus_x: config key "num_global_tokens" in config table must be a positive integer, got number 0')
   end)

   it("defaults as transformers' PegasusXConfig does", function()
      local cfg = pegasus_x.config({ model_type = "pegasus_x" })
      assert.are.same({ 96103, 1024, 16, 16, 4096, 16384, 32, 512, true, true, "gelu", 0 }, { cfg.vocab_size,
         cfg.d_model, cfg.encoder_layers, cfg.decoder_attention_heads, cfg.encoder_ffn_dim, cfg.max_position_embeddings,
         cfg.num_global_tokens, cfg.block_size, cfg.stagger_local_blocks, cfg.scale_embedding,
         cfg.activation_function, cfg.decoder_start_token_id })
   end)
end)

describe("models.pegasus_x on cuda #cuda", function()
   S.it_generates_on_cuda(NAME, { ["model.shared"] = 0, ["model.encoder.embed_tokens"] = 0,
      ["model.decoder.embed_tokens"] = 0, lm_head = 0, ["model.encoder.embed_global"] = "cpu",
      ["model.encoder.layers.0"] = 0, ["model.encoder.layers.1"] = "disk", ["model.encoder.layers.2"] = "cpu",
      ["model.encoder.layer_norm"] = "cpu", ["model.decoder.layers.0"] = "cpu", ["model.decoder.layers.1"] = 0,
      ["model.decoder.layer_norm"] = "disk" })
end)
