-- ml.models XGLM (OPT's pre-norm layers after scaled word embeddings and fairseq's sinusoidal
-- positions two rows down) against transformers (tests/fixtures/gen_models.py xglm): names, the
-- checkpoint's tensors, logits, greedy ids, the cache, a left-padded batch, a CPU + disk split,
-- what each difference changes, and configs.
local ml = require("moonload")
local xglm = require("moonload.models.xglm")
local H = require("models_helpers")

local NAME = "xglm_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.xglm (tests/fixtures/models/xglm_tiny: d_model 48, 4 heads, scaled embeddings)", function()
   local exp, model, _, logits_after = H.fixture_model(NAME)

   it("builds XGLMForCausalLM with transformers' names, computed positions and a tied head", function()
      assert.are.equal("XGLMForCausalLM", model.__name)
      assert.are.same({ "XGLMDecoderLayer" }, model.no_split_modules)
      assert.are.equal(xglm.XGLMForCausalLM, ml.models.xglm.XGLMForCausalLM)
      H.assert_holds_checkpoint(model, DIR, true)                       -- (no table of positions)
      assert.are.equal(model.lm_head.weight, model.model.embed_tokens.weight)
      local layer = model.model.layers[2]
      assert.are.equal("XGLMAttention", layer.self_attn.__name)
      assert.are.same({ 48 }, layer.self_attn.out_proj.bias.shape)
      assert.are.same({ 96, 48 }, layer.fc1.weight.shape)
      assert.are.same({ 48 }, model.model.layer_norm.bias.shape)
      assert.are.equal(math.sqrt(48), model.config.embed_scale)
      assert.is_nil(model:max_length())
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 100000, overrides = { ["^model%.layers%.0$"] = "disk" },
      places = { ["model.layers.0"] = "disk" } })

   it("needs the embedding scale", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m) m.config.embed_scale = 1 end), exp.logits) > 1e-3)
   end)

   it("reads its sinusoids two rows down, sines then cosines, the padding row zero", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         rawset(m.model.embed_positions, "forward", function(self, pos) return xglm.sinusoids(pos, self.inv_freq) end)
      end), exp.logits) > 1e-3)
      -- row 0 (position -2): sin 0 = 0, then cos 0 = 1; row 1 (position -1): pad_token_id's, zeros
      local rows = model.model.embed_positions(ml.tensor({ -2, -1, 3 }, { dtype = "int64" }))
      assert.are.same({ 3, 48 }, rows.shape)
      local r0, r1, r = rows:select(1, 1):tolist(), rows:select(1, 2):tolist(), rows:select(1, 3):tolist()
      for i = 1, 48 do
         assert.are.equal(i <= 24 and 0 or 1, r0[i])
         assert.are.equal(0, r1[i])
      end
      -- position 3, row 5: the first frequency is 1, the last 1/10000
      assert.is_true(math.abs(r[1] - math.sin(5)) < 1e-6 and math.abs(r[25] - math.cos(5)) < 1e-6)
      assert.is_true(math.abs(r[24] - math.sin(5e-4)) < 1e-6 and math.abs(r[48] - math.cos(5e-4)) < 1e-6)
   end)

   it("reads transformers' defaults and names what it refuses", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.ffn_dim, raw.scale_embedding, raw.activation_function, raw.max_position_embeddings = nil, nil, nil, nil
      local cfg = xglm.config(raw)
      assert.are.same({ 192, math.sqrt(48), "gelu", 2048 }, { cfg.ffn_dim, cfg.embed_scale, cfg.activation_function,
         cfg.max_position_embeddings })
      raw.scale_embedding = false
      assert.are.equal(1, xglm.config(raw).embed_scale)
      local function fails(change, msg) H.assert_config_fails(xglm.config, DIR, change, msg) end
      fails({ attention_heads = 5 }, "models.xglm: d_model 48 is not a multiple of attention_heads 5")
      fails({ add_cross_attention = true }, 'models.xglm: config key "add_cross_attention" must be false')
      fails({ activation_function = "gelu2" }, 'models.xglm: activation "gelu2" in config table is not supported')
      fails({ pad_token_id = -1 }, 'models.xglm: config key "pad_token_id" must be an integer >= 0, got -1')
      fails({ d_model = "48" }, 'models.xglm: config key "d_model" in config table must be')
   end)
end)
