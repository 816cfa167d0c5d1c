-- T5Gemma (models/t5gemma.lua) against transformers' T5GemmaForConditionalGeneration
-- (tests/fixtures/gen_models.py, t5gemma()): t5gemma_tiny, a 3-layer encoder of hidden size 48 and
-- a 2-layer decoder of 32 (each its own sub-config), grouped heads, sliding_window 3 on every other
-- layer, soft-capped scores and logits, the head tied to the decoder's embedding, the decoder
-- started from bos_token_id 2; a right-padded batch of 9 tokens, 2 beams with 2-gram blocking.
local ml = require("moonload")
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local t5gemma = require("moonload.models.t5gemma")

local NAME = "t5gemma_tiny"

--- Sets field key to value on the self-attention of each layer of the named stacks.
local function logits_with(stacks, key, value)
   return S.logits_after(NAME, function(m)
      for _, side in ipairs(stacks) do
         for _, layer in ipairs(m.model[side].layers) do rawset(layer.self_attn, key, value) end
      end
   end)
end

describe("models.t5gemma (t5gemma_tiny)", function()
   local e = H.expected(NAME)

   it("reads the folder as transformers 5 does: a config per stack, the head tied to the decoder embedding", function()
      local model = S.load(NAME)
      assert.are.equal("T5GemmaForConditionalGeneration", model.__name)
      assert.are.same({ "T5GemmaEncoderLayer", "T5GemmaDecoderLayer" }, model.no_split_modules)
      assert.are.equal(model.model.decoder.embed_tokens.weight, model.lm_head.out_proj.weight)
      assert.are.same({ 100, 48 }, model.model.encoder.embed_tokens.weight.shape)
      assert.are.same({ 16, 48 }, model.model.decoder.layers[1].cross_attn.k_proj.weight.shape)
      assert.are.same({ 2, 48, 32, 3, false }, { model.config.decoder_start_token_id, model.config.encoder.hidden_size,
         model.config.decoder.hidden_size, model.model.encoder.layers[1].self_attn.window,
         model.model.encoder.layers[2].self_attn.window or false })
      local stored = ml.safetensors.load_file(H.FIX .. "/" .. NAME .. "/model.safetensors")
      stored["lm_head.out_proj.weight"] = true
      assert.are.same(H.sorted_keys(stored), H.sorted_keys((model:state_dict())))
   end)

   S.it_matches_transformers(NAME, 200000)

   it("masks the encoder's pad_token_id tokens when given no attention_mask, as transformers does", function()
      local model = S.load(NAME)
      local bare = model:encode(e.input_ids)
      assert.is_true(H.max_abs_diff(bare, e.encoder_last_hidden_state) < 1e-4)
   end)

   it("needs the encoder's two-sided window: without it the logits differ", function()
      assert.is_true(H.max_abs_diff(logits_with({ "encoder" }, "window", false), e.logits) > 1e-3)
   end)

   it("needs the decoder's causal window", function()
      assert.is_true(H.max_abs_diff(logits_with({ "decoder" }, "window", false), e.logits) > 1e-3)
   end)

   it("needs its soft caps: on the scores and on the logits", function()
      assert.is_true(H.max_abs_diff(logits_with({ "encoder", "decoder" }, "softcap", nil), e.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(S.logits_after(NAME, function(m)
         m.config.decoder.final_logit_softcapping = nil
      end), e.logits) > 1e-3)
   end)
end)

describe("models.t5gemma bad config", function()
   local dir = H.FIX .. "/" .. NAME

   it("needs both sub-configs and names the stack of a bad key", function()
      H.assert_config_fails(t5gemma.config, dir, function(raw) raw.decoder = nil end,
         'models.t5gemma: config key "decoder" is missing in config table')
      H.assert_config_fails(t5gemma.config, dir, function(raw) raw.encoder.num_attention_heads = 0 end,
         'config key "num_attention_heads" in config table (encoder) must be a positive integer, got number 0')
      H.assert_config_fails(t5gemma.config, dir, function(raw) raw.decoder.attn_logit_softcapping = -1 end,
         'config key "attn_logit_softcapping" in config table (decoder) must be a positive number or null')
   end)

   it("starts the decoder from decoder_start_token_id, else bos_token_id", function()
      local raw = H.read_json(dir .. "/config.json")
      raw.decoder_start_token_id = 5
      assert.are.equal(5, t5gemma.config(raw).decoder_start_token_id)
      raw.decoder_start_token_id, raw.bos_token_id = nil, nil
      assert.are.equal(2, t5gemma.config(raw).decoder_start_token_id)
   end)
end)

describe("models.t5gemma on cuda #cuda", function()
   S.it_generates_on_cuda(NAME, { ["model.encoder.embed_tokens"] = 0, ["model.encoder.layers.0"] = 0,
      ["model.encoder.layers.1"] = "disk", ["model.encoder.layers.2"] = "cpu", ["model.encoder.norm"] = 0,
      ["model.encoder.rotary_emb"] = 0, ["model.decoder.embed_tokens"] = 0, ["model.decoder.layers.0"] = "cpu",
      ["model.decoder.layers.1"] = 0, ["model.decoder.norm"] = "disk", ["model.decoder.rotary_emb"] = 0, lm_head = 0 })
end)
