-- ml.models PhiMoE (Llama's attention with biases and a sliding window, LayerNorms with biases, a
-- biased head; every layer sparse behind sparsemixer routing; transformers' PhiMoE LongRoPE: short
-- factors, cos/sin times short_mscale or long_mscale) against transformers
-- (tests/fixtures/gen_models.py phimoe): names, logits, greedy ids across the mscale switch, the
-- cache, a padded batch, the routing, configs.
local ml = require("moonload")
local models = require("moonload.models")
local moe = require("moonload.models.moe")
local H = require("models_helpers")

local NAME = "phimoe_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.phimoe (tests/fixtures/models/phimoe_tiny: 2 layers of 4 experts, window 6, LongRoPE from 16 positions)", function()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds PhimoeForCausalLM with every tensor of the checkpoint, under the hub's names", function()
      assert.are.equal("PhimoeForCausalLM", model.__name)
      assert.are.same({ "PhimoeDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[1]
      assert.are.equal("LayerNorm", layer.input_layernorm.__name)
      assert.are.equal("LayerNorm", model.model.norm.__name)
      assert.are.equal("PhimoeSparseMoeBlock", layer.block_sparse_moe.__name)
      assert.are.same({ 100 }, model.lm_head.bias.shape)
      assert.are.same({ 6, 6 }, model.config.layer_windows)
      assert.is_nil(model.model.rotary_emb.long_inv_freq)          -- (transformers' PhiMoE: short factors only)
   end)

   H.it_matches_expected(model, NAME, " (past 16 positions: long_mscale, the cache rebuilt)")

   it("rebuilds its cache where the rotary scale switches, as transformers does", function()
      assert.are.equal(17, model:recompute_cache_at())
   end)

   H.it_matches_padded(model, NAME, "positions")

   it("needs sparsemixer's threshold (tighter or none), the biases, the window and short_mscale", function()
      local changes = {
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.block_sparse_moe, "jitter_eps", 0.01) end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.block_sparse_moe, "jitter_eps", 100) end end,
         function(m) m.lm_head.bias:fill_(0) end,
         function(m) m.model.layers[1].input_layernorm.bias:fill_(0) end,
         function(m) m.model.layers[1].self_attn.o_proj.bias:fill_(0) end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.self_attn, "window", false) end end,
         function(m) rawget(m.model.rotary_emb, "mscales").short = 1 end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
      -- past the original length, long_mscale
      local long = models.from_pretrained(DIR)
      local before = H.decoded_logits(long, exp.greedy_ids[1], 17)
      rawget(long.model.rotary_emb, "mscales").long = 1.1
      assert.is_true(H.max_abs_diff(H.decoded_logits(long, exp.greedy_ids[1], 17), before:tolist()) > 1e-3)
   end)

   it("names a bad top-k, mscale, rope type, jitter or head bias", function()
      local read = function(raw) return moe.config(raw, "phimoe") end
      local function fails(change, msg) H.assert_config_fails(read, DIR, change, msg) end
      fails(function(c) c.num_experts_per_tok = 3 end,
         "models.phimoe: num_experts_per_tok 3 is not supported: PhiMoE's sparsemixer routes to 2 experts")
      fails(function(c) c.rope_parameters.long_mscale = nil end,
         'models.phimoe: config key "rope_parameters.long_mscale" must be a positive number with rope type "longrope", got nil')
      fails(function(c) c.rope_parameters = { rope_type = "linear", factor = 2, rope_theta = 10000 } end,
         'models.phimoe: rope type "linear" is not supported (supported: default, longrope)')
      fails(function(c) c.router_jitter_noise = -1 end, 'models.phimoe: config key "router_jitter_noise" must be a number >= 0, got -1')
      fails(function(c) c.lm_head_bias = 1 end, 'models.phimoe: config key "lm_head_bias" must be a boolean, got 1')
   end)
end)
