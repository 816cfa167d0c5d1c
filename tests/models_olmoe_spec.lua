-- ml.models OLMoE (OLMo 2's RMSNorms over the whole query and key projections in Llama's pre-norm
-- layers, q, k and v clipped to clip_qkv; every layer sparse, a float32 softmax router whose top-k
-- weights stay unnormalized) against transformers (tests/fixtures/gen_models.py olmoe): names,
-- logits, greedy ids with and without the cache, a padded batch, both expert layouts, configs; and
-- FlexOlmo (its experts in OLMo 2's layers: tests/fixtures/gen_models.py flex_olmo).
local ml = require("moonload")
local models = require("moonload.models")
local moe = require("moonload.models.moe")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "olmoe_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.olmoe (tests/fixtures/models/olmoe_tiny: 2 layers of 6 experts, top 3, clip_qkv 1.5)", function()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds OlmoeForCausalLM with every tensor of the checkpoint: one module per expert, as the hub holds them", function()
      assert.are.equal("OlmoeForCausalLM", model.__name)
      assert.are.same({ "OlmoeDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[1]
      assert.are.equal("OlmoeAttention", layer.self_attn.__name)
      assert.are.same({ 32 }, layer.self_attn.q_norm.weight.shape)      -- (the whole projection, not a head)
      assert.are.same({ 16 }, layer.self_attn.k_norm.weight.shape)
      assert.are.equal("OlmoeSparseMoeBlock", layer.mlp.__name)
      assert.are.equal("ModuleList", layer.mlp.experts.__name)
      assert.are.same({ 3, false }, { layer.mlp.top_k, layer.mlp.norm_topk_prob })
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("needs its q/k norms, the clipping, three experts a token and their weights as they are", function()
      local changes = {
         function(m) for _, l in ipairs(m.model.layers) do l.self_attn.q_norm.weight:fill_(1) end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.self_attn, "clip_qkv", nil) end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.mlp, "top_k", 2) end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.mlp, "norm_topk_prob", true) end end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("reads transformers' in-memory layout too (experts stacked per projection)", function()
      local dir = H.copy_with_stacked_experts(DIR, { "model.layers.0.mlp.experts", "model.layers.1.mlp.experts" }, 6)
      local m = models.from_pretrained(dir)
      assert.are.equal("StackedExperts", m.model.layers[2].mlp.experts.__name)
      assert.is_true(H.max_abs_diff(m(ids), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("names a bad clip_qkv, norm_topk_prob or expert count", function()
      local read = function(raw) return moe.config(raw, "olmoe") end
      local function fails(change, msg) H.assert_config_fails(read, DIR, change, msg) end
      fails({ clip_qkv = -1 }, 'models.olmoe: config key "clip_qkv" must be a positive number or null, got -1')
      fails({ norm_topk_prob = "yes" }, 'models.olmoe: config key "norm_topk_prob" must be a boolean, got yes')
      fails({ num_experts_per_tok = 7 }, "models.olmoe: num_experts_per_tok 7 is more than num_experts 6")
      -- without clip_qkv (the hub's OLMoE-1B-7B): no clipping; experts as wide as intermediate_size
      local raw = H.read_json(DIR .. "/config.json")
      raw.clip_qkv = nil
      local cfg = moe.config(raw, "olmoe")
      assert.are.same({ 16, false }, { cfg.moe_intermediate_size, cfg.norm_topk_prob })
      assert.is_nil(cfg.clip_qkv)
   end)
end)

describe("models.flex_olmo (tests/fixtures/models/flex_olmo_tiny: OLMoE's experts, 2 of 4, in OLMo 2's layers)", function()
   local exp, model, ids, logits_after = H.fixture_model("flex_olmo_tiny")
   local dir = H.FIX .. "/flex_olmo_tiny"

   it("builds FlexOlmoForCausalLM: norms after attention and MLP only, one module per expert as the hub holds them", function()
      assert.are.equal("FlexOlmoForCausalLM", model.__name)
      assert.are.same({ "FlexOlmoDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, dir)
      local layer = model.model.layers[1]
      assert.is_nil(layer.input_layernorm)
      assert.is_not_nil(layer.post_feedforward_layernorm)
      assert.are.equal(4, #layer.mlp.experts)
      assert.is_nil(rawget(layer.self_attn, "clip_qkv"))
   end)

   H.it_matches_expected(model, "flex_olmo_tiny")
   H.it_matches_padded(model, "flex_olmo_tiny", "positions")

   -- (the router's top two weights here sum to nearly 1: renormalizing them would change little)
   it("needs its q/k norms, its norms after attention and two experts a token", function()
      local changes = {
         function(m) for _, l in ipairs(m.model.layers) do l.self_attn.q_norm.weight:fill_(1) end end,
         function(m) for _, l in ipairs(m.model.layers) do l.post_attention_layernorm.weight:fill_(1) end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.mlp, "top_k", 1) end end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("reads transformers' in-memory layout too (experts stacked per projection)", function()
      local stacked = H.copy_with_stacked_experts(dir, { "model.layers.0.mlp.experts", "model.layers.1.mlp.experts" }, 4)
      local m = models.from_pretrained(stacked)
      assert.are.equal("StackedExperts", m.model.layers[1].mlp.experts.__name)
      assert.is_true(H.max_abs_diff(m(ids), exp.logits) < TOL)
      H.rmdir(stacked)
   end)
end)
