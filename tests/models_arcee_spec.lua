-- ml.models Arcee (Llama's attention and norms, an MLP without a gate: down(relu(up x)^2)) against
-- transformers (tests/fixtures/gen_models.py arcee): names, logits, greedy ids, the cache, a
-- padded batch, configs.
local ml = require("moonload")
local models = require("moonload.models")
local llama = require("moonload.models.llama")
local H = require("models_helpers")

local NAME = "arcee_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.arcee (tests/fixtures/models/arcee_tiny: up/down MLP, relu2)", function()
   local exp = H.expected(NAME)
   local model = models.from_pretrained(DIR)
   local ids = ml.tensor(exp.input_ids, { dtype = "int64" })

   it("builds ArceeForCausalLM with every tensor of the checkpoint: an MLP of up_proj and down_proj", function()
      assert.are.equal("ArceeForCausalLM", model.__name)
      assert.are.same({ "ArceeDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local mlp = model.model.layers[1].mlp
      assert.are.equal("ArceeMLP", mlp.__name)
      assert.is_nil(mlp.gate_proj)
      assert.are.equal("ReLUSquaredActivation", mlp.act_fn.__name)
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("needs the square of ReLU", function()
      local m = models.from_pretrained(DIR)
      for _, l in ipairs(m.model.layers) do l.mlp.act_fn = ml.nn.ReLU() end
      assert.is_true(H.max_abs_diff(m(ids), exp.logits) > 1e-3)
   end)

   it("reads transformers' defaults (relu2) and names a bad activation or bias", function()
      local read = function(raw) return llama.config(raw, "arcee") end
      local function fails(change, msg) H.assert_config_fails(read, DIR, change, msg) end
      fails({ hidden_act = "relu3" }, 'models.arcee: activation "relu3" in config table is not supported')
      fails({ mlp_bias = "no" }, 'models.arcee: config key "mlp_bias"')
      local raw = H.read_json(DIR .. "/config.json")
      raw.hidden_act, raw.mlp_bias = nil, true
      local cfg = llama.config(raw, "arcee")
      assert.are.same({ "relu2", true }, { cfg.hidden_act, cfg.mlp_bias })
   end)
end)
