-- ml.models GraniteMoE (Granite's embedding, residual, attention and logits multipliers; every
-- layer sparse, a softmax over each token's top router logits weighing its experts, stacked per
-- projection under the hub's names) against transformers (tests/fixtures/gen_models.py granitemoe):
-- names, logits, greedy ids with and without the cache, a padded batch, the routing.
local ml = require("moonload")
local models = require("moonload.models")
local moe = require("moonload.models.moe")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "granitemoe_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.granitemoe (tests/fixtures/models/granitemoe_tiny: 2 layers of 4 stacked experts, top 2)", function()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds GraniteMoeForCausalLM with every tensor of the checkpoint, the hub's names as transformers renames them", function()
      assert.are.equal("GraniteMoeForCausalLM", model.__name)
      assert.are.equal("GraniteMoeDecoderLayer", model.model.layers[1].__name)
      local map = models.name_mapper(model)
      local mapped = { ["lm_head.weight"] = true }               -- (tied: stored once, as the embedding)
      for name in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do mapped[map(name)] = true end
      assert.are.same(H.sorted_keys(mapped), H.sorted_keys((model:state_dict())))
      local block = model.model.layers[1].block_sparse_moe
      assert.are.same({ 4, 32, 32 }, block.experts.gate_up_proj.shape)    -- (experts, gate + up rows, hidden)
      assert.are.same({ 4, 32, 16 }, block.experts.down_proj.shape)
      assert.are.equal(0.25, model.model.layers[1].self_attn.scale)
   end)

   it("gives transformers' logits and greedy ids, and decodes with the cache to a full forward's logits", function()
      assert.is_true(H.max_abs_diff(model(ids), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[2], 5), { exp.logits[2] }) < TOL)
   end)

   H.it_matches_padded(model, NAME, "positions")

   it("needs its routing (two experts, their weights renormalized) and Granite's multipliers", function()
      local changes = {
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.block_sparse_moe, "top_k", 1) end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.block_sparse_moe, "norm_topk_prob", false) end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l, "residual_multiplier", 1) end end,
         function(m) m.config.embedding_multiplier = 1 end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
      local undivided = logits_after(function(m) m.config.logits_scaling = 1 end)
      assert.is_true(H.max_abs_diff(undivided / 2, exp.logits) < TOL)
   end)

   it("names a bad expert count or multiplier", function()
      local function fails(over, msg)
         local raw = H.read_json(DIR .. "/config.json")
         for k, v in pairs(over) do raw[k] = v end
         local ok, err = pcall(moe.config, raw, "granitemoe")
         assert.is_false(ok)
         assert.truthy(tostring(err):find(msg, 1, true), err)
      end
      fails({ num_experts_per_tok = 5 }, "models.granitemoe: num_experts_per_tok 5 is more than num_experts 4")
      fails({ residual_multiplier = "0.22" }, 'models.granitemoe: config key "residual_multiplier" must be a positive number, got 0.22')
   end)
end)
