-- ml.models InternLM3 (transformers builds a LlamaForCausalLM from its config: biases on every
-- projection under the hub's keys qkv_bias and bias, a head_dim of its own, the "dynamic" rope whose
-- base grows past max_position_embeddings) against transformers (tests/fixtures/gen_models.py
-- internlm3): names, logits, greedy ids past the limit, the cache, a padded batch, configs.
local ml = require("moonload")
local models = require("moonload.models")
local llama = require("moonload.models.llama")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "internlm3_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.internlm3 (tests/fixtures/models/internlm3_tiny: biased, head_dim 12, dynamic rope past 12 positions)", function()
   local exp = H.expected(NAME)
   local model = models.from_pretrained(DIR)
   local ids = ml.tensor(exp.input_ids, { dtype = "int64" })

   it("builds InternLM3ForCausalLM with every tensor of the checkpoint, its biases from the hub's keys", function()
      assert.are.equal("InternLM3ForCausalLM", model.__name)
      assert.are.same({ "InternLM3DecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[1]
      assert.are.same({ 48, 32 }, layer.self_attn.q_proj.weight.shape)         -- (4 heads of 12)
      assert.are.same({ 32 }, layer.self_attn.o_proj.bias.shape)
      assert.are.same({ 64 }, layer.mlp.gate_proj.bias.shape)
      assert.are.equal("dynamic", model.config.rope.rope_type)
   end)

   H.it_matches_expected(model, NAME, " (past 12 positions: the grown base)")

   H.it_matches_padded(model, NAME, "positions")

   it("needs the dynamic base past max_position_embeddings (and leaves the plain one within it)", function()
      local plain = models.from_pretrained(DIR)
      rawset(plain.model.rotary_emb, "dynamic", nil)
      assert.is_true(H.max_abs_diff(plain(ids), exp.logits) < TOL)
      local seq = exp.greedy_ids[1]
      local grown = H.decoded_logits(model, seq, 8)
      assert.is_true(H.max_abs_diff(H.decoded_logits(plain, seq, 8), grown:tolist()) > 1e-3)
      assert.is_true(H.max_abs_diff(H.decoded_logits(plain, seq, 8):narrow(2, 1, 12), grown:narrow(2, 1, 12):tolist()) < TOL)
   end)

   it("names bias keys that disagree and a dynamic rope without its factor", function()
      local read = function(raw) return llama.config(raw, "internlm3") end
      local function fails(change, msg) H.assert_config_fails(read, DIR, change, msg) end
      fails(function(c) c.bias = false end,
         'models.internlm3: config keys "qkv_bias" (true) and "bias" (false) differ: InternLM3 runs as a Llama')
      fails(function(c) c.rope_parameters.factor = nil end,
         'models.internlm3: config key "rope_parameters.factor" is missing in config table (needed by rope type "dynamic")')
      fails(function(c) c.rope_parameters = { rope_type = "su", rope_theta = 10000 } end,
         'models.internlm3: rope type "su" is not supported (supported: default, linear, llama3, longrope, yarn, dynamic)')
      -- without the bias keys (transformers' defaults), none; Llama itself still refuses "dynamic"
      local raw = H.read_json(DIR .. "/config.json")
      raw.qkv_bias, raw.bias, raw.head_dim = nil, nil, nil
      local cfg = llama.config(raw, "internlm3")
      assert.are.same({ false, false, false, 128 }, { cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.head_dim })
      assert.is_false(pcall(llama.config, H.read_json(DIR .. "/config.json"), "llama"))
   end)
end)
