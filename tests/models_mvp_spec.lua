-- MVP (models/bart.lua, model_type "mvp") against transformers' MvpForConditionalGeneration
-- (tests/fixtures/gen_models.py, mvp()): mvp_tiny, BART's layers (use_prompt false), and
-- mvp_tiny_prompt, whose prompts give every layer's attention keys and values of its own before
-- the tokens' (the encoder's as transformers 4 builds it; 5.24 builds none, and reads a folder
-- without one); 3 beams, length penalty 1.5 and 3-gram blocking from the generation config.
local ml = require("moonload")
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local bart = require("moonload.models.bart")

describe("models.bart (mvp_tiny)", function()
   it("builds transformers' MVP: BART's norms and positions, the head tied to the embedding", function()
      local model = S.load("mvp_tiny")
      assert.are.equal("MvpForConditionalGeneration", model.__name)
      assert.are.equal(model.model.shared.weight, model.lm_head.weight)
      assert.is_nil(model.model.encoder.layer_norm)
      assert.is_not_nil(model.model.decoder.layernorm_embedding)
      assert.are.same({ 42, 32 }, model.model.decoder.embed_positions.weight.shape)
      assert.is_false(model.config.use_prompt)
      assert.is_nil(model.model.decoder.self_attn_prompt)
   end)

   S.it_matches_transformers("mvp_tiny", 120000)

   it("names bad config values", function()
      local dir = H.FIX .. "/mvp_tiny"
      H.assert_config_fails(bart.config, dir, { use_prompt = "no" },
         'models.mvp: config key "use_prompt" in config table must be a boolean, got string "no"')
      H.assert_config_fails(bart.config, dir, { use_prompt = true, prompt_length = 0 },
         'models.mvp: config key "prompt_length" in config table must be a positive integer, got number 0')
      H.assert_config_fails(bart.config, dir, { decoder_layers = 0 },
         'models.mvp: config key "decoder_layers" in config table must be a positive integer, got number 0')
   end)
end)

describe("models.bart (mvp_tiny_prompt)", function()
   local NAME = "mvp_tiny_prompt"
   local e = H.expected(NAME)

   it("builds each stack's prompt under transformers' names", function()
      local model = S.load(NAME)
      assert.are.same({ 3, 32 }, model.model.encoder.self_attn_prompt.prompt_embedding.weight.shape)
      assert.are.same({ 2 * 2 * 32, 16 }, model.model.decoder.cross_attn_prompt.prompt_trans[3].weight.shape)
      assert.is_nil(model.model.encoder.cross_attn_prompt)
   end)

   S.it_matches_transformers(NAME, 150000)

   it("needs each prompt: without the encoder's, the cross-attention's or the decoder's the logits differ", function()
      for _, off in ipairs({ { encoder = { "self_attn_prompt" } }, { decoder = { "cross_attn_prompt" } },
         { decoder = { "self_attn_prompt", "cross_attn_prompt" } } }) do
         local without = S.logits_after(NAME, function(m)
            for stack, prompts in pairs(off) do
               for _, p in ipairs(prompts) do rawset(m.model[stack], p, false) end      -- (hides the module)
            end
         end)
         assert.is_true(H.max_abs_diff(without, e.logits) > 1e-3)
      end
   end)

   it("reads a folder without the encoder's prompt (as transformers 5.24 writes it) as 5.24 does", function()
      local dir = H.tmpdir()
      H.copy(H.FIX .. "/" .. NAME .. "/config.json", dir .. "/config.json")
      local sd = ml.safetensors.load_file(H.FIX .. "/" .. NAME .. "/model.safetensors")
      for _, name in ipairs(H.sorted_keys(sd)) do
         if name:find("^model%.encoder%.self_attn_prompt%.") then sd[name] = nil end
      end
      ml.safetensors.save_file(sd, dir .. "/model.safetensors")
      local m = ml.models.from_pretrained(dir)
      assert.is_nil(m.model.encoder.self_attn_prompt)
      local logits = m(e.input_ids, { attention_mask = e.attention_mask, decoder_input_ids = e.decoder_input_ids })
      assert.is_true(H.max_abs_diff(logits, e.logits_without_encoder_prompt) < 1e-4)
      H.rmdir(dir)
   end)
end)

describe("models.bart (mvp_tiny_prompt) on cuda #cuda", function()
   S.it_generates_on_cuda("mvp_tiny_prompt", { ["model.shared"] = 0, ["model.encoder.embed_tokens"] = 0,
      ["model.decoder.embed_tokens"] = 0, lm_head = 0, ["model.encoder.embed_positions"] = 0,
      ["model.encoder.self_attn_prompt"] = "disk", ["model.decoder.self_attn_prompt"] = "cpu",
      ["model.decoder.cross_attn_prompt"] = 0,
      ["model.encoder.layers.0"] = "cpu", ["model.encoder.layers.1"] = 0, ["model.encoder.layernorm_embedding"] = "disk",
      ["model.decoder.embed_positions"] = "cpu", ["model.decoder.layers.0"] = 0, ["model.decoder.layers.1"] = "disk",
      ["model.decoder.layernorm_embedding"] = 0, final_logits_bias = 0 })
end)
