-- ml.models GraniteMoeShared (GraniteMoE's multipliers and stacked experts, plus a shared MLP every
-- token goes through) against transformers (tests/fixtures/gen_models.py granitemoeshared): names,
-- the checkpoint's tensors, logits, greedy ids, the cache, a left-padded batch, a CPU + disk split,
-- what the shared MLP changes, and configs.
local models = require("moonload.models")
local moe = require("moonload.models.moe")
local H = require("models_helpers")

local NAME = "granitemoeshared_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.granitemoeshared (tests/fixtures/models/granitemoeshared_tiny: 4 stacked experts, top 2, a shared MLP of 24)", function()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds GraniteMoeSharedForCausalLM with every tensor of the checkpoint, the hub's names as transformers renames them", function()
      assert.are.equal("GraniteMoeSharedForCausalLM", model.__name)
      assert.are.same({ "GraniteMoeSharedDecoderLayer" }, model.no_split_modules)
      local map = models.name_mapper(model)
      local mapped = { ["lm_head.weight"] = true }               -- (tied: stored once, as the embedding)
      for name in pairs(require("moonload").safetensors.load_file(DIR .. "/model.safetensors")) do mapped[map(name)] = true end
      assert.are.same(H.sorted_keys(mapped), H.sorted_keys((model:state_dict())))
      local layer = model.model.layers[1]
      assert.are.same({ 48, 32 }, layer.shared_mlp.input_linear.weight.shape)   -- (gate + up rows, hidden)
      assert.are.same({ 32, 24 }, layer.shared_mlp.output_linear.weight.shape)
      assert.are.same({ 4, 32, 32 }, layer.block_sparse_moe.experts.gate_up_proj.shape)
      assert.are.equal(0.25, layer.self_attn.scale)
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 60000, overrides = { ["%.block_sparse_moe%.experts$"] = "disk" },
      places = { ["model.layers.1.block_sparse_moe.experts"] = "disk" } })

   it("needs the shared MLP, added before the residual multiplier, and the experts' routing", function()
      local changes = {
         function(m) for _, l in ipairs(m.model.layers) do l.shared_mlp = nil end end,
         function(m)
            for _, l in ipairs(m.model.layers) do
               local shared = l.shared_mlp
               local forward = shared.forward
               shared.forward = function(self, x) return forward(self, x) * 2 end   -- (as if added after the multiplier 0.5)
            end
         end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.block_sparse_moe, "top_k", 1) end end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("has no shared MLP without shared_intermediate_size (transformers' default 0), and names bad values", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.shared_intermediate_size = nil
      local cfg = moe.config(raw, "granitemoeshared")
      assert.are.equal(0, cfg.shared_intermediate_size)
      assert.is_nil(moe.GraniteMoeSharedForCausalLM(cfg).model.layers[1].shared_mlp)
      local read = function(r) return moe.config(r, "granitemoeshared") end
      H.assert_config_fails(read, DIR, { shared_intermediate_size = -1 },
         'models.granitemoeshared: config key "shared_intermediate_size" must be an integer >= 0, got -1')
      H.assert_config_fails(read, DIR, { num_experts_per_tok = 5 },
         "models.granitemoeshared: num_experts_per_tok 5 is more than num_experts 4")
      H.assert_config_fails(read, DIR, { embedding_multiplier = 0 },
         'models.granitemoeshared: config key "embedding_multiplier" must be a positive number, got 0')
   end)
end)
