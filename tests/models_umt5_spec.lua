-- UMT5 (models/t5.lua, model_type "umt5") against transformers' UMT5ForConditionalGeneration
-- (tests/fixtures/gen_models.py, umt5()): umt5_tiny as the hub's folders are (gated GELU, a head
-- of its own, 3 encoder and 2 decoder blocks), each self-attention layer with its own relative
-- position bias; 2 beams with 2-gram blocking from its generation config.
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local t5 = require("moonload.models.t5")

local NAME = "umt5_tiny"

describe("models.t5 (umt5_tiny)", function()
   local e = H.expected(NAME)

   it("reads the folder as transformers 5 does: every block with a position bias, a head of its own", function()
      local model = S.load(NAME)
      for _, stack in ipairs({ model.encoder, model.decoder }) do
         for i = 1, stack.n_blocks do assert.is_not_nil(stack.block[i].layer[1].SelfAttention.relative_attention_bias) end
      end
      assert.are_not.equal(model.shared.weight, model.lm_head.weight)
      assert.are.same({ "gelu_new", true, false }, { model.config.dense_act_fn, model.config.is_gated_act,
         model.config.scale_decoder_outputs })
   end)

   S.it_matches_transformers(NAME, 150000, 2e-4)

   it("needs each layer's own bias: T5's first-layer bias shared by all gives other logits", function()
      local shared = S.logits_after(NAME, function(m)
         for _, stack in ipairs({ m.encoder, m.decoder }) do
            local first = stack.block[1].layer[1].SelfAttention.relative_attention_bias.weight
            for i = 2, stack.n_blocks do
               stack.block[i].layer[1].SelfAttention.relative_attention_bias.weight:copy_(first)
            end
         end
      end)
      assert.is_true(H.max_abs_diff(shared, e.logits) > 1e-3)
   end)

   it("reads the folder as UMT5EncoderModel when asked: the encoder's states alone", function()
      local enc = S.load(NAME, { architecture = "UMT5EncoderModel" })
      assert.is_nil(enc.decoder)
      local states = enc(e.input_ids, { attention_mask = e.attention_mask })
      assert.is_true(H.max_abs_diff(states, e.encoder_last_hidden_state) < 1e-4)
   end)

   it("defaults feed_forward_proj to gated-gelu and names a bad one", function()
      local raw = H.read_json(H.FIX .. "/" .. NAME .. "/config.json")
      raw.feed_forward_proj = nil
      assert.are.same({ "gelu_new", true }, { t5.config(raw).dense_act_fn, t5.config(raw).is_gated_act })
      H.assert_config_fails(t5.config, H.FIX .. "/" .. NAME, { feed_forward_proj = "gated-gelu-fast" },
         'models.t5: feed_forward_proj "gated-gelu-fast" is not "{ACT}" or "gated-{ACT}"')
      H.assert_config_fails(t5.config, H.FIX .. "/" .. NAME, { num_heads = 0 },
         'models.t5: config key "num_heads" in config table must be a positive integer, got number 0')
   end)
end)

describe("models.t5 (umt5_tiny) on cuda #cuda", function()
   S.it_generates_on_cuda(NAME, { shared = 0, ["encoder.embed_tokens"] = 0, ["decoder.embed_tokens"] = 0,
      ["encoder.block.0"] = 0, ["encoder.block.1"] = "disk", ["encoder.block.2"] = "cpu", ["encoder.final_layer_norm"] = 0,
      ["decoder.block.0"] = "cpu", ["decoder.block.1"] = 0, ["decoder.final_layer_norm"] = "disk", lm_head = 0 })
end)
