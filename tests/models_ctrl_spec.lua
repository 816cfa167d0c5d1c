-- ml.models CTRL (scaled word embeddings plus sinusoidal positions, pre-norm layers of biased
-- attention and a ReLU MLP, a tied head with a bias) against transformers
-- (tests/fixtures/gen_models.py ctrl): names, the checkpoint's tensors, logits, greedy ids, the
-- cache, a left-padded batch, a CPU + disk split, what each difference changes, the sequence limit
-- and configs.
local ml = require("moonload")
local ctrl = require("moonload.models.ctrl")
local H = require("models_helpers")

local NAME = "ctrl_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.ctrl (tests/fixtures/models/ctrl_tiny: n_embd 48, 4 heads, 64 positions)", function()
   local exp, model, _, logits_after = H.fixture_model(NAME)

   it("builds CTRLLMHeadModel with transformers' names and a tied head with its own bias", function()
      assert.are.equal("CTRLLMHeadModel", model.__name)
      assert.are.same({ "EncoderLayer" }, model.no_split_modules)
      assert.are.equal(ctrl.CTRLLMHeadModel, ml.models.ctrl.CTRLLMHeadModel)
      H.assert_holds_checkpoint(model, DIR, true)
      assert.are.equal(model.lm_head.weight, model.transformer.w.weight)
      assert.are.same({ 100 }, model.lm_head.bias.shape)
      local layer = model.transformer.h[2]
      assert.are.same({ 96, 48 }, layer.ffn[1].weight.shape)                 -- ffn.0
      assert.are.equal("ReLU", layer.ffn[2].__name)
      assert.are.same({ 48 }, layer.multi_head_attention.Wk.bias.shape)
      assert.are.same({ 1e-6, 1e-6 }, { layer.layernorm1.eps, model.transformer.layernorm.eps })
      assert.are.equal(64, model:max_length())
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 100000, overrides = { ["^transformer%.h%.1$"] = "disk" },
      places = { ["transformer.h.1"] = "disk" } })

   it("needs the embedding scale and its sinusoidal positions", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m) rawset(m.transformer, "embed_scale", 1) end), exp.logits) > 1e-3)
      local encoding = ctrl.positional_encoding
      ctrl.positional_encoding = function(pos, d) return encoding(pos, d) * 0 end
      local ok, got = pcall(logits_after, function() end)
      ctrl.positional_encoding = encoding
      assert.is_true(ok, got)
      assert.is_true(H.max_abs_diff(got, exp.logits) > 1e-3)
   end)

   it("encodes position p as sin(p / 10000^(2i/d)) for i < d/2, then the cosines", function()
      local rows = ctrl.positional_encoding(ml.tensor({ 0, 5 }, { dtype = "int64" }), 48)
      assert.are.same({ 2, 48 }, rows.shape)
      local r0, r5 = rows:select(1, 1):tolist(), rows:select(1, 2):tolist()
      for i = 0, 23 do
         assert.are.same({ 0, 1 }, { r0[i + 1], r0[i + 25] })
         local angle = 5 / 10000 ^ (2 * i / 48)
         assert.is_true(math.abs(r5[i + 1] - math.sin(angle)) < 1e-6 and math.abs(r5[i + 25] - math.cos(angle)) < 1e-6, i)
      end
   end)

   it("runs within n_positions and names a longer sequence", function()
      local long = {}
      for i = 1, 65 do long[i] = i % 90 + 1 end
      local ok, err = pcall(model, { long })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("models.ctrl: sequence of 65 tokens (0 cached + 65 new) exceeds n_positions 64", 1, true), err)
   end)

   it("reads transformers' defaults and names what it refuses", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.n_positions, raw.layer_norm_epsilon = nil, nil
      local cfg = ctrl.config(raw)
      assert.are.same({ 256, 1e-6, 12 }, { cfg.n_positions, cfg.layer_norm_epsilon, cfg.head_dim })
      local function fails(change, msg) H.assert_config_fails(ctrl.config, DIR, change, msg) end
      fails({ n_head = 5 }, "models.ctrl: n_embd 48 is not divisible by n_head 5")
      fails({ n_embd = 45, n_head = 5 }, "models.ctrl: n_embd 45 must be even")
      fails(function(r) r.dff = nil end, 'models.ctrl: config key "dff" is missing')
   end)
end)
