-- ml.models HyperCLOVA X (Granite's multipliers, an RMSNorm after attention and after the MLP too,
-- the logits multiplied by logits_scaling) against transformers (tests/fixtures/gen_models.py
-- hyperclovax): names, the checkpoint's tensors, logits, greedy ids, the cache, a left-padded batch,
-- a CPU + disk split, what each difference changes, and configs.
local models = require("moonload.models")
local llama = require("moonload.models.llama")
local H = require("models_helpers")

local NAME = "hyperclovax_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.hyperclovax (tests/fixtures/models/hyperclovax_tiny: post norms, logits times 2)", function()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds HyperCLOVAXForCausalLM with Granite's scale and the post norms, an untied head", function()
      assert.are.equal("HyperCLOVAXForCausalLM", model.__name)
      assert.are.same({ "HyperCLOVAXDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[1]
      assert.are.same({ 32 }, layer.post_norm1.weight.shape)
      assert.are.same({ 32 }, layer.post_norm2.weight.shape)
      assert.are.equal(0.25, layer.self_attn.scale)
      assert.are.equal(llama.HyperCLOVAXForCausalLM, models.llama.HyperCLOVAXForCausalLM)
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")

   it("gives transformers' logits and tokens split over CPU and disk by device_map auto", function()
      local off = H.tmpdir()
      local m = models.from_pretrained(DIR, { device_map = "auto", max_memory = { cpu = 60000 }, offload_folder = off })
      local on = {}
      for _, dev in pairs(m.hf_device_map) do on[tostring(dev)] = true end
      assert.is_true(on.cpu and on.disk, "a CPU + disk split")
      assert.is_true(H.max_abs_diff(m(exp.input_ids), exp.logits) < 1e-4)
      assert.are.same(exp.greedy_ids, m:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(off)
   end)

   it("needs the post norms and Granite's multipliers, and multiplies the logits by logits_scaling", function()
      local changes = {
         function(m) for _, l in ipairs(m.model.layers) do l.post_norm1 = nil end end,
         function(m) for _, l in ipairs(m.model.layers) do l.post_norm2 = nil end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l, "residual_multiplier", 1) end end,
         function(m) m.config.embedding_multiplier = 1 end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
      local unscaled = logits_after(function(m) m.config.logits_scaling = 1 end)
      assert.is_true(H.max_abs_diff(unscaled * 2, exp.logits) < 1e-4)
   end)

   it("reads transformers' defaults (post norms on, the scale 1/sqrt(head_dim)) and names what it refuses", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.use_post_norm, raw.attention_multiplier = nil, nil
      local cfg = llama.config(raw, "hyperclovax")
      assert.are.same({ true, 1 / math.sqrt(8) }, { cfg.use_post_norm, cfg.attention_multiplier })
      raw.use_post_norm = false
      assert.is_nil(llama.HyperCLOVAXForCausalLM(llama.config(raw, "hyperclovax")).model.layers[1].post_norm1)
      local read = function(r) return llama.config(r, "hyperclovax") end
      H.assert_config_fails(read, DIR, { use_post_norm = "yes" }, 'models.hyperclovax: config key "use_post_norm" must be a boolean, got yes')
      H.assert_config_fails(read, DIR, { num_attention_heads = 3, num_key_value_heads = 1 },
         "models.hyperclovax: hidden_size 32 is not a multiple of num_attention_heads 3")
      H.assert_config_fails(read, DIR, { logits_scaling = 0 }, 'models.hyperclovax: config key "logits_scaling" must be a positive number, got 0')
   end)
end)
