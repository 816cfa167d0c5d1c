-- ml.models ERNIE 4.5 (biased projections, rotary pairs of neighbouring dims) and ERNIE 4.5 MoE (a
-- float32 router choosing by probability + correction bias, shared experts) against transformers
-- (tests/fixtures/gen_models.py ernie4_5, ernie4_5_moe): names, logits, greedy ids, padded batches,
-- both expert layouts, the bias's effect, configs.
local ml = require("moonload")
local models = require("moonload.models")
local ernie = require("moonload.models.ernie4_5")
local H = require("models_helpers")

local TOL = 1e-4
local DENSE, MOE = H.FIX .. "/ernie4_5_tiny", H.FIX .. "/ernie4_5_moe_tiny"

local function logits_of(model, exp) return model(ml.tensor(exp.input_ids, { dtype = "int64" })) end

describe("models.ernie4_5 (tests/fixtures/models/ernie4_5_tiny: biases everywhere, a tied head)", function()
   local exp = H.expected("ernie4_5_tiny")
   local model = models.from_pretrained(DENSE)

   it("builds Ernie4_5ForCausalLM with biased projections and rotary pairs of neighbouring dims", function()
      assert.are.equal("Ernie4_5ForCausalLM", model.__name)
      local attn = model.model.layers[1].self_attn
      assert.are.same({ 32 }, attn.q_proj.bias.shape)
      assert.are.same({ 32 }, attn.o_proj.bias.shape)
      assert.are.same({ 64 }, model.model.layers[1].mlp.gate_proj.bias.shape)
      assert.is_true(rawget(attn, "pairs_interleaved"))
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
   end)

   it("gives transformers' logits and greedy ids", function()
      assert.is_true(H.max_abs_diff(logits_of(model, exp), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)

   H.it_matches_padded(model, "ernie4_5_tiny", "positions")

   it("needs the pairs of neighbouring dims: rotating halves gives other logits", function()
      local m = models.from_pretrained(DENSE)
      for _, layer in ipairs(m.model.layers) do rawset(layer.self_attn, "pairs_interleaved", false) end
      assert.is_true(H.max_abs_diff(logits_of(m, exp), exp.logits) > 1e-3)
   end)
end)

describe("models.ernie4_5_moe (tests/fixtures/models/ernie4_5_moe_tiny: a dense first layer, then 6 experts, top 2, and shared ones)", function()
   H.collect_warnings()
   local exp = H.expected("ernie4_5_moe_tiny")
   local model = models.from_pretrained(MOE)

   it("reads the hub's layout with every tensor: one module per expert, the bias at mlp.moe_statics", function()
      assert.are.equal("Ernie4_5_MoeForCausalLM", model.__name)
      assert.are.same({ false, true, true }, model.config.sparse_layers)
      assert.are.equal("Ernie4_5_MoeMLP", model.model.layers[1].mlp.__name)
      local block = model.model.layers[2].mlp
      assert.are.equal("Ernie4_5_MoeSparseMoeBlock", block.__name)
      assert.are.equal("ModuleList", block.experts.__name)
      assert.are.same({ 32, 32 }, block.shared_experts.gate_proj.weight.shape)      -- 2 shared experts of 16
      local file = ml.safetensors.load_file(MOE .. "/model.safetensors")
      assert.are.equal(#H.sorted_keys(file), #H.sorted_keys((model:state_dict())))
      assert.is_true(ml.equal(file["model.layers.1.mlp.moe_statics.e_score_correction_bias"],
         block.gate.moe_statics.e_score_correction_bias))
      assert.are.same({ "Ernie4_5_MoeDecoderLayer" }, model.no_split_modules)
   end)

   it("gives transformers' logits and greedy ids", function()
      assert.is_true(H.max_abs_diff(logits_of(model, exp), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)

   H.it_matches_padded(model, "ernie4_5_moe_tiny", "positions")

   it("chooses by probability + correction bias and weighs by the probabilities alone, renormalized", function()
      local m = models.from_pretrained(MOE)
      for _, i in ipairs({ 2, 3 }) do m.model.layers[i].mlp.gate.moe_statics.e_score_correction_bias:fill_(0) end
      assert.is_true(H.max_abs_diff(logits_of(m, exp), exp.logits) > 1e-3)
      -- 3 experts, probabilities (0.5, 0.3, 0.2); the bias picks the third over the second
      local router = m.model.layers[2].mlp.gate
      local probe = ernie.Ernie4_5_MoeTopKRouter({ num_experts = 3, hidden_size = 2, num_experts_per_tok = 2,
         moe_norm_min = 1e-12 })
      probe.weight:copy_(ml.tensor({ { math.log(0.5), 0 }, { math.log(0.3), 0 }, { math.log(0.2), 0 } }))
      probe.moe_statics.e_score_correction_bias:copy_(ml.tensor({ { 0, 0, 0.2 } }))
      local w, idx = probe(ml.tensor({ { 1, 0 } }))
      assert.are.same({ { 0, 2 } }, idx)
      assert.is_true(H.max_abs_diff(w, { { 0.5 / 0.7, 0.2 / 0.7 } }) < 1e-6)
      assert.are.equal("Ernie4_5_MoeTopKRouter", router.__name)
   end)

   it("keeps the router in float32 in a bfloat16 model", function()
      local m = models.from_pretrained(MOE, { dtype = "bfloat16" })
      local gate = m.model.layers[2].mlp.gate
      assert.are.equal("float32", gate.weight.dtype)
      assert.are.equal("float32", gate.moe_statics.e_score_correction_bias.dtype)
      assert.are.equal("bfloat16", m.model.layers[2].mlp.shared_experts.up_proj.weight.dtype)
      local ref = logits_of(model, exp)
      local got = logits_of(m, exp):float()
      assert.is_true(((got - ref):abs():max() / ref:abs():max()):item() < 0.05)
   end)

   it("reads transformers' own layout too (experts stacked, the bias under the router), and leaves mtp out", function()
      local dir = H.copy_with_stacked_experts(MOE, { "model.layers.1.mlp.experts", "model.layers.2.mlp.experts" }, 6,
         function(k) return (k:gsub("%.mlp%.moe_statics%.", ".mlp.gate.moe_statics.")) end,
         { ["model.mtp_block.0.input_layernorm.weight"] = ml.ones(32) })              -- (the hub's MTP layers)
      local m = models.from_pretrained(dir)
      assert.are.equal("StackedExperts", m.model.layers[2].mlp.experts.__name)
      assert.is_true(H.max_abs_diff(logits_of(m, exp), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("names a bad expert count or norm floor", function()
      local raw = H.read_json(MOE .. "/config.json")
      raw.moe_k = 7
      local ok, err = pcall(ernie.config, raw)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("moe_k 7 is more than moe_num_experts 6", 1, true), err)
      raw.moe_k, raw.moe_norm_min = 2, -1
      ok, err = pcall(ernie.config, raw)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('config key "moe_norm_min" must be a number >= 0, got -1', 1, true), err)
   end)
end)

describe("hub config (transformers' default ERNIE 4.5 MoE config, ERNIE-4.5-21B-A3B's, built empty)", function()
   it("gives transformers' parameter count, names and shapes", function()
      local fix = H.read_json(H.FIX .. "/ernie4_5_hub_configs.json").ernie_4_5_21b_a3b
      -- 21.83 B, the head tied
      local m = H.assert_matches_skeleton(function() return ernie.Ernie4_5_MoeForCausalLM(fix.config) end, fix)
      assert.are.equal("float32", m.model.layers[2].mlp.gate.weight.dtype)
   end)
end)
