-- ml.models MiniMax-M2 (OLMo 2's whole-projection q/k norms, partial rotary embeddings, every layer
-- sparse behind a sigmoid router with a correction bias on the choice) against transformers
-- (tests/fixtures/gen_models.py minimax_m2): names, logits, greedy ids, padded batches, the
-- routing, the hub's legacy rotary_dim key, experts on disk.
local ml = require("moonload")
local models = require("moonload.models")
local moe = require("moonload.models.moe")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "minimax_m2_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.minimax_m2 (tests/fixtures/models/minimax_m2_tiny: 2 layers of 6 experts, top 2)", function()
   H.collect_warnings()
   local exp = H.expected(NAME)
   local model = models.from_pretrained(DIR)

   it("builds MiniMaxM2ForCausalLM with every tensor of the checkpoint, under the hub's names", function()
      assert.are.equal("MiniMaxM2ForCausalLM", model.__name)
      assert.are.same(H.sorted_keys(ml.safetensors.load_file(DIR .. "/model.safetensors")), H.sorted_keys((model:state_dict())))
      assert.are.equal(4, model.config.rotary_dim)                       -- 0.5 of head_dim 8
      assert.are.same({ 32 }, model.model.layers[1].self_attn.q_norm.weight.shape)   -- over the whole projection
   end)

   it("gives transformers' logits and greedy ids", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)

   H.it_matches_padded(model, NAME, "positions")

   it("chooses experts by sigmoid score + e_score_correction_bias and weighs them by the scores alone", function()
      local m = models.from_pretrained(DIR)
      for _, layer in ipairs(m.model.layers) do layer.block_sparse_moe.e_score_correction_bias:fill_(0) end
      assert.is_true(H.max_abs_diff(m(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) > 1e-3)
      -- two experts, the second chosen by its bias though its score is lower
      local w, i = moe.biased_sigmoid_route(ml.tensor({ { 2, 1, -3 } }), ml.tensor({ 0, 0.5, 0 }), 2, true, 0)
      assert.are.same({ { 1, 0 } }, i)
      local s1, s2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))
      assert.is_true(math.abs(w[1][1]:item() - s1 / (s1 + s2)) < 1e-6)
   end)

   it("reads the hub's legacy rotary_dim when rope_parameters has no partial_rotary_factor", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.rope_parameters = nil
      raw.rope_theta = 5000000
      local cfg = moe.config(raw, "minimax_m2")
      assert.are.equal(4, cfg.rotary_dim)
      assert.are.equal(5000000, cfg.rope_theta)
   end)

   it("gives the same tokens with its experts on disk under a CPU budget", function()
      local dir = H.tmpdir()
      local m = models.from_pretrained(DIR, { device_map = "auto", max_memory = { cpu = 150000 }, offload_folder = dir,
         device_overrides = { ["%.block_sparse_moe%.experts%.%d+$"] = "disk" } })
      assert.are.equal("disk", m.hf_device_map["model.layers.0.block_sparse_moe.experts.0"])
      assert.are.same(exp.greedy_ids[1], m:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(dir)
   end)
end)
