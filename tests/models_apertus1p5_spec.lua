-- ml.models Apertus 1.5 (apertus1p5_text, and the apertus1p5 multimodal checkpoint's language model:
-- Apertus's layers over a vocabulary that holds the visual and audio codes, a head pruned to the first
-- output_vocab_size ids) against transformers (tests/fixtures/gen_models.py apertus1p5_text
-- apertus1p5_multimodal): names, logits, greedy ids, the cache, a padded batch, generate over the
-- pruned head, configs.
local ml = require("moonload")
local models = require("moonload.models")
local H = require("models_helpers")

local TEXT, MULTI = "apertus1p5_text_tiny", "apertus1p5_multimodal_tiny"

-- The checkpoint's tensors outside the image and audio tokenizers, under the language model's names.
local function language_model_keys(dir)
   local want = {}
   for k in pairs(ml.safetensors.load_file(dir .. "/model.safetensors")) do
      if not k:find("^model%.vision_tokenizer%.") and not k:find("^model%.audio_tokenizer%.") then
         want[#want + 1] = (k:gsub("^model%.language_model%.", "model."))
      end
   end
   table.sort(want)
   return want
end

describe("models.apertus1p5 (tests/fixtures/models/apertus1p5_text_tiny: Apertus's layers, a head pruned to 60 of 100 ids)", function()
   local dir = H.FIX .. "/" .. TEXT
   local exp, model, _, logits_after = H.fixture_model(TEXT)
   local LM = models.class_for("apertus1p5_text", dir)

   it("builds Apertus1p5TextForCausalLM with every tensor of the checkpoint, a head of output_vocab_size rows", function()
      assert.are.equal("Apertus1p5TextForCausalLM", model.__name)
      assert.are.same({ "Apertus1p5TextDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, dir)
      assert.are.same({ 100, 32 }, model.model.embed_tokens.weight.shape)
      assert.are.same({ 60, 32 }, model.lm_head.weight.shape)
      assert.are.equal("XIELUActivation", model.model.layers[1].mlp.act_fn.__name)
      assert.are.equal("llama3", model.config.rope.rope_type)
   end)

   H.it_matches_expected(model, TEXT)
   H.it_matches_padded(model, TEXT, "positions (the prompts holding ids past the head's)")
   H.it_splits_over_cpu_and_disk(TEXT, { budget = 50000, overrides = { ["%.mlp$"] = "disk" },
      places = { ["model.layers.0.mlp"] = "disk" } })

   it("searches beams and penalizes repeats over the pruned head's scores, as transformers does", function()
      local fx = H.read_json(dir .. "/pruned_head.json")
      assert.are.same(fx.beam_ids, model:generate(fx.input_ids, { max_new_tokens = 6, num_beams = 3, do_sample = false,
         eos_token_id = false, pad_token_id = 0 }))
      assert.are.same(fx.penalized_ids, model:generate(fx.input_ids, { max_new_tokens = 8, repetition_penalty = 1.5,
         eos_token_id = false }))
      -- a prompt's ids past the head (visual codes) are not among those penalized
      local ids = model:generate({ { 1, 7, 99, 80, 61 } }, { max_new_tokens = 4, repetition_penalty = 1.5, eos_token_id = false })
      for i = 6, 9 do assert.is_true(ids[1][i] < 60) end
   end)

   it("needs its q/k norms and each layer's learned xIELU", function()
      local changes = {
         function(m) for _, l in ipairs(m.model.layers) do l.self_attn.q_norm.weight:fill_(1) end end,
         function(m) m.model.layers[2].mlp.act_fn.alpha_p:fill_(0.8) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("reads a whole head without output_vocab_size, and names a bad one", function()
      local function read(raw) return LM:read_config(raw) end
      local raw = H.read_json(dir .. "/config.json")
      raw.output_vocab_size, raw.rope_parameters = nil, nil
      local cfg = read(raw)
      assert.are.same({ "llama3", 12000000, 8192 }, { cfg.rope.rope_type, cfg.rope.rope_theta,
         cfg.rope.original_max_position_embeddings })
      assert.is_nil(cfg.output_vocab_size)
      raw = H.read_json(dir .. "/config.json")
      raw.output_vocab_size = 100
      assert.is_nil(read(raw).output_vocab_size)
      H.assert_config_fails(read, dir, { output_vocab_size = 101 },
         'models.apertus1p5: config key "output_vocab_size" (101) must not exceed vocab_size (100)')
      H.assert_config_fails(read, dir, { output_vocab_size = 0 },
         'models.apertus1p5: config key "output_vocab_size" must be an integer >= 1, got 0')
      H.assert_config_fails(read, dir, { tie_word_embeddings = true },
         'models.apertus1p5: config key "output_vocab_size" (60) prunes the head: "tie_word_embeddings" must be false')
   end)
end)

describe("models.apertus1p5 (tests/fixtures/models/apertus1p5_multimodal_tiny: its language model alone)", function()
   local dir = H.FIX .. "/" .. MULTI
   local _, model = H.fixture_model(MULTI)
   local LM = models.class_for("apertus1p5", dir)

   it("builds Apertus1p5TextForCausalLM from text_config with every language-model tensor, the tokenizers left out", function()
      assert.are.equal("Apertus1p5TextForCausalLM", model.__name)
      assert.truthy(model.config._source:find("(text_config)", 1, true))
      assert.are.same(language_model_keys(dir), H.sorted_keys((model:state_dict())))
      assert.are.same({ 60, 32 }, model.lm_head.weight.shape)
   end)

   H.it_matches_expected(model, MULTI)
   H.it_matches_padded(model, MULTI, "positions")

   it("names a malformed field of its text_config, and a missing one", function()
      local function read(raw) return LM:read_config(raw) end
      H.assert_config_fails(read, dir, function(raw) raw.text_config.output_vocab_size = 200 end,
         'config key "output_vocab_size" (200) must not exceed vocab_size (100)')
      H.assert_config_fails(read, dir, function(raw) raw.text_config = nil end, 'a apertus1p5 config needs its "text_config"')
   end)
end)
