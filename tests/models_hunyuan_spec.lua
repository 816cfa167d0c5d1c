-- ml.models HunYuan MoE (Hunyuan-A13B's network: the dense model's attention, a float32 softmax
-- router over experts with a per-layer top-k, a shared MLP) against transformers
-- (tests/fixtures/gen_models.py hunyuan_v1_moe): names, logits, greedy ids, padded batches, both
-- expert layouts, the router's dtype, Hunyuan-A13B's sizes, configs. (The dense model:
-- models_llama_family_spec.lua.)
local ml = require("moonload")
local models = require("moonload.models")
local hunyuan = require("moonload.models.hunyuan")
local H = require("models_helpers")

local TOL = 1e-4
local DIR = H.FIX .. "/hunyuan_v1_moe_tiny"

local function logits_of(model, exp) return model(ml.tensor(exp.input_ids, { dtype = "int64" })) end

describe("models.hunyuan_v1_moe (tests/fixtures/models/hunyuan_v1_moe_tiny: 6 experts, top 2 then 3, a shared MLP)", function()
   local exp = H.expected("hunyuan_v1_moe_tiny")
   local model = models.from_pretrained(DIR)

   it("reads the hub's config form and layout with every tensor: one module per expert, the router at mlp.gate.wg", function()
      assert.are.equal("HunYuanMoEV1ForCausalLM", model.__name)
      assert.are.same(H.sorted_keys(ml.safetensors.load_file(DIR .. "/model.safetensors")), H.sorted_keys((model:state_dict())))
      local block = model.model.layers[1].mlp
      assert.are.equal("HunYuanMoEV1Moe", block.__name)
      assert.are.equal("ModuleList", block.experts.__name)
      assert.are.same({ 6, 32 }, block.gate.wg.weight.shape)
      assert.are.same({ 2, 3 }, { block.top_k, model.model.layers[2].mlp.top_k })     -- moe_topk per layer
      assert.are.equal("HunYuanMoEV1Attention", model.model.layers[1].self_attn.__name)
      assert.are.same({ "HunYuanMoEV1DecoderLayer" }, model.no_split_modules)
      -- rope_scaling's "dynamic" with alpha 1000: transformers' frequencies
      local inv_freq = model.model.rotary_emb.inv_freq:tolist()
      for i, f in ipairs(exp.inv_freq) do assert.is_true(math.abs(inv_freq[i] / f - 1) < 1e-6, i) end
   end)

   it("gives transformers' logits and greedy ids, and decodes with the cache as a full forward", function()
      assert.is_true(H.max_abs_diff(logits_of(model, exp), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      local ids = exp.input_ids[1]
      local full = model({ ids })
      assert.is_true(H.max_abs_diff(H.decoded_logits(model, ids, 5), full:tolist()) < 2e-5)
   end)

   H.it_matches_padded(model, "hunyuan_v1_moe_tiny", "positions")

   it("needs the shared MLP and the per-layer top-k", function()
      local m = models.from_pretrained(DIR)
      m.model.layers[2].mlp.shared_mlp.down_proj.weight:fill_(0)
      assert.is_true(H.max_abs_diff(logits_of(m, exp), exp.logits) > 1e-3)
      m = models.from_pretrained(DIR)
      rawset(m.model.layers[2].mlp, "top_k", 2)
      assert.is_true(H.max_abs_diff(logits_of(m, exp), exp.logits) > 1e-3)
   end)

   it("keeps the router in float32 in a bfloat16 model", function()
      local m = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local block = m.model.layers[1].mlp
      assert.are.equal("float32", block.gate.wg.weight.dtype)
      assert.are.equal("bfloat16", block.shared_mlp.up_proj.weight.dtype)
      local ref = logits_of(model, exp)
      local got = logits_of(m, exp):float()
      assert.is_true(((got - ref):abs():max() / ref:abs():max()):item() < 0.05)
   end)

   it("reads transformers' in-memory layout too (experts stacked per projection)", function()
      local dir = H.copy_with_stacked_experts(DIR, { "model.layers.0.mlp.experts", "model.layers.1.mlp.experts" }, 6)
      local m = models.from_pretrained(dir)
      assert.are.equal("StackedExperts", m.model.layers[2].mlp.experts.__name)
      assert.is_true(H.max_abs_diff(logits_of(m, exp), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("names a per-layer list it cannot read, an expert count per layer, a top-k past the experts", function()
      local function fails(change, msg)
         local raw = H.read_json(DIR .. "/config.json")
         change(raw)
         local ok, err = pcall(hunyuan.config, raw)
         assert.is_false(ok)
         assert.truthy(tostring(err):find(msg, 1, true), err)
      end
      fails(function(c) c.moe_topk = { 2 } end,
         'models.hunyuan_v1_moe: config key "moe_topk" must be an integer or a list of 2 (one per layer), got a list of 1')
      fails(function(c) c.moe_topk = { 2, 7 } end, "moe_topk 7 (layer 2) is more than num_experts 6")
      fails(function(c) c.moe_intermediate_size = { 32, "32" } end,
         'config key "moe_intermediate_size[2]" must be an integer >= 1, got 32')
      fails(function(c) c.num_experts = { 6, 6 } end, 'config key "num_experts" must be one integer')
      fails(function(c) c.num_experts = nil; c.moe_topk = 2 end, "moe_topk 2 (layer 1) is more than num_experts 1")
      fails(function(c) c.use_mixed_mlp_moe = 1 end, 'config key "use_mixed_mlp_moe" must be a boolean, got 1')
      fails(function(c) c.moe_layer_num_skipped = 1 end, 'config key "moe_layer_num_skipped" must be 0')
      fails(function(c) c.rope_scaling.alpha = nil end, 'rope type "dynamic" needs "alpha"')
      -- one number for all layers, and no shared MLP without use_mixed_mlp_moe
      local raw = H.read_json(DIR .. "/config.json")
      raw.moe_topk, raw.use_mixed_mlp_moe = 4, false
      local cfg = hunyuan.config(raw)
      assert.are.same({ 4, 0 }, { cfg.layer_moe[2].num_experts_per_tok, cfg.layer_moe[2].shared_intermediate_size })
   end)
end)

describe("hub config (Hunyuan-A13B's sizes: 64 experts, 8 per token, a shared MLP, built empty)", function()
   it("gives transformers' parameter count and shapes", function()
      local fix = H.read_json(DIR .. "/hub_config.json")
      -- 80.39 B, the head tied; the experts stacked, as transformers holds them
      local m = H.assert_matches_skeleton(function()
         return hunyuan.HunYuanMoEV1ForCausalLM(fix.config, { experts_layout = "out_in" })
      end, fix)
      assert.are.equal(8, m.model.layers[32].mlp.top_k)
      assert.are.equal("ntk_alpha", m.config.rope.rope_type)
   end)
end)
