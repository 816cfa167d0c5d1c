-- ml.models MPT (BLOOM's ALiBi attention with MPT's slopes, a fused and clipped Wqkv, LayerNorms and
-- projections without biases) against transformers (tests/fixtures/gen_models.py mpt): names, the
-- checkpoint's tensors, logits, greedy ids, the cache, a left-padded batch, what each difference
-- changes, the sequence limit and configs.
local ml = require("moonload")
local mpt = require("moonload.models.mpt")
local H = require("models_helpers")

local NAME = "mpt_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.mpt (tests/fixtures/models/mpt_tiny: 6 heads, clip_qkv 0.5)", function()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds MptForCausalLM with transformers' names, no biases and a tied head", function()
      assert.are.equal("MptForCausalLM", model.__name)
      assert.are.same({ "MptBlock" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR, true)
      for name in model:named_parameters() do assert.is_nil(name:find("bias"), name) end
      assert.are.equal(model.lm_head.weight, model.transformer.wte.weight)
      assert.are.equal(64, model:max_length())
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "ALiBi positions")

   it("gives MPT's slopes (BLOOM's when alibi_bias_max is 8), and needs them", function()
      -- transformers' build_mpt_alibi_tensor for 6 heads: 2^-(i * 8 / 8) for i = 2, 4, 6, 8, 1, 3
      assert.are.same({ 2 ^ -2, 2 ^ -4, 2 ^ -6, 2 ^ -8, 2 ^ -1, 2 ^ -3 }, mpt.alibi_slopes(6, 8))
      for _, n in ipairs({ 1, 4, 6, 12, 32, 40 }) do
         assert.is_true(H.max_abs_diff(ml.tensor(mpt.alibi_slopes(n, 8)), require("moonload.models.bloom").alibi_slopes(n)) < 1e-6)
      end
      assert.are.same({ 2 ^ -1, 2 ^ -2, 2 ^ -3, 2 ^ -4 }, mpt.alibi_slopes(4, 4))
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         rawset(m.transformer, "slopes", mpt.alibi_slopes(6, 4))
      end), exp.logits) > 1e-3)
   end)

   it("needs the clipping of q, k and v", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, b in ipairs(m.transformer.blocks) do rawset(b.attn, "clip_qkv", nil) end
      end), exp.logits) > 1e-3)
   end)

   it("runs within max_seq_len and names a longer sequence", function()
      local long = {}
      for i = 1, 65 do long[i] = i % 90 + 1 end
      local ok, err = pcall(model, { long })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("models.mpt: sequence of 65 tokens (0 cached + 65 new) exceeds max_seq_len 64", 1, true), err)
   end)

   it("reads transformers' defaults and names what it refuses", function()
      local read = function(r) return mpt.config(r) end
      local function fails(change, msg) H.assert_config_fails(read, DIR, change, msg) end
      fails({ n_heads = 5 }, "models.mpt: d_model 48 is not a multiple of n_heads 5")
      fails({ logit_scale = 2 }, 'models.mpt: config key "logit_scale" is not supported')
      fails(function(r) r.attn_config.clip_qkv = -1 end, 'models.mpt: config key "attn_config.clip_qkv" must be a positive number or null, got -1')
      fails(function(r) r.attn_config.qk_ln = true end, 'models.mpt: config key "attn_config.qk_ln" must be false')
      fails(function(r) r.attn_config.alibi = false end, 'models.mpt: config key "attn_config.alibi" must be true')
      fails(function(r) r.attn_config.prefix_lm = true end, 'models.mpt: config key "attn_config.prefix_lm" must be false')
      local raw = H.read_json(DIR .. "/config.json")
      raw.attn_config, raw.max_seq_len = nil, nil
      local cfg = mpt.config(raw)
      assert.are.same({ 2048, 8, 8 }, { cfg.max_seq_len, cfg.alibi_bias_max, cfg.head_dim })
      assert.is_nil(cfg.clip_qkv)
   end)
end)
