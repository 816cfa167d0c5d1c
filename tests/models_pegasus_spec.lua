-- Pegasus (models/bart.lua's PegasusForConditionalGeneration) against transformers'
-- PegasusForConditionalGeneration (tests/fixtures/gen_models.py, pegasus()): pegasus_tiny as
-- google/pegasus-xsum has it (pre-norm, a final norm on each stack, sinusoidal positions stored
-- in the checkpoint, scaled embeddings, ReLU, a bias on the logits; 3 beams, length penalty 0.6).
local ml = require("moonload")
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local bart = require("moonload.models.bart")

local NAME = "pegasus_tiny"

local function logits_after(fn) return S.logits_after(NAME, fn) end

describe("models.pegasus (pegasus_tiny)", function()
   local model, e = S.load(NAME), H.expected(NAME)
   S.it_matches_transformers(NAME, 90000)

   it("builds PegasusForConditionalGeneration under transformers' names, holding the checkpoint's tensors", function()
      assert.are.equal("PegasusForConditionalGeneration", model.__name)
      assert.are.same({ "PegasusEncoderLayer", "PegasusDecoderLayer" }, model.no_split_modules)
      assert.are.equal("PegasusEncoder", model.model.encoder.__name)
      assert.are.equal(model.model.shared.weight, model.lm_head.weight)
      assert.is_nil(model.model.decoder.layernorm_embedding)
      assert.are.same({ 32 }, model.model.decoder.layer_norm.weight.shape)
      local stored = ml.safetensors.load_file(H.FIX .. "/" .. NAME .. "/model.safetensors")
      stored["lm_head.weight"], stored["model.encoder.embed_tokens.weight"] = true, true
      stored["model.decoder.embed_tokens.weight"] = true
      assert.are.same(H.sorted_keys(stored), H.sorted_keys((model:state_dict())))
   end)

   it("runs its stored position tables, the sinusoids transformers computes", function()
      local computed = bart.sinusoid_table("sinusoidal", 40, 32)
      assert.is_true(H.max_abs_diff(model.model.encoder.embed_positions.weight, computed:tolist()) < 1e-6)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, stack in ipairs({ m.model.encoder, m.model.decoder }) do stack.embed_positions.weight:fill_(0) end
      end), e.logits) > 1e-3)
   end)

   it("needs its norms before the blocks and its final norms", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, stack in ipairs({ m.model.encoder, m.model.decoder }) do
            for _, layer in ipairs(stack.layers) do rawset(layer, "pre_norm", false) end
         end
      end), e.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         m.model.encoder.layer_norm = nil
         m.model.decoder.layer_norm = nil
      end), e.logits) > 1e-3)
   end)
end)

describe("models.pegasus bad config", function()
   it("names the head count, the activation and what a key must be", function()
      local read = function(r) return bart.config(r) end
      local dir = H.FIX .. "/" .. NAME
      H.assert_config_fails(read, dir, { encoder_attention_heads = 3 },
         "models.pegasus: d_model 32 is not a multiple of encoder_attention_heads 3")
      H.assert_config_fails(read, dir, { scale_embedding = 1 }, 'models.pegasus: config key "scale_embedding"')
      H.assert_config_fails(read, dir, { activation_function = "relu7" }, "relu7")
   end)

   it("defaults as transformers' PegasusConfig does", function()
      local raw = H.read_json(H.FIX .. "/" .. NAME .. "/config.json")
      raw.decoder_start_token_id, raw.activation_function = nil, nil
      local cfg = bart.config(raw)
      assert.are.equal(0, cfg.decoder_start_token_id)
      assert.are.equal("gelu", cfg.activation_function)
      assert.is_true(cfg.pre_norm)
   end)
end)

describe("models.pegasus on cuda #cuda", function()
   S.it_generates_on_cuda(NAME, { ["model.shared"] = 0, ["model.encoder.embed_tokens"] = 0,
      ["model.decoder.embed_tokens"] = 0, lm_head = 0, ["model.encoder.embed_positions"] = "cpu",
      ["model.encoder.layers.0"] = 0, ["model.encoder.layers.1"] = "disk", ["model.encoder.layer_norm"] = "cpu",
      ["model.decoder.embed_positions"] = 0, ["model.decoder.layers.0"] = "cpu", ["model.decoder.layers.1"] = 0,
      ["model.decoder.layer_norm"] = "disk", final_logits_bias = 0 })
end)
