-- ml.models StableLM (Llama's network with LayerNorms with biases, rotary embeddings over the
-- first partial_rotary_factor of each head, biased q/k/v by use_qkv_bias; StableLM 2 12B's per-head
-- q/k LayerNorms and parallel attention + MLP) against transformers
-- (tests/fixtures/gen_models.py stablelm): names, logits, greedy ids, the cache, a padded batch,
-- offloaded per-head norms, configs.
local ml = require("moonload")
local models = require("moonload.models")
local stablelm = require("moonload.models.stablelm")
local H = require("models_helpers")
local null = require("cjson").null

local TOL = 1e-4

describe("models.stablelm (tests/fixtures/models/stablelm_tiny: sequential layers, biased q/k/v, 4 of 8 dims rotated)", function()
   local NAME = "stablelm_tiny"
   local DIR = H.FIX .. "/" .. NAME
   local exp, model, _, logits_after = H.fixture_model(NAME)

   it("builds StableLmForCausalLM with every tensor of the checkpoint under transformers' names", function()
      assert.are.equal("StableLmForCausalLM", model.__name)
      assert.are.same({ "StableLmDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[3]
      assert.are.equal("StableLmDecoderLayer", layer.__name)
      assert.are.same({ 32 }, layer.self_attn.q_proj.bias.shape)
      assert.is_nil(layer.self_attn.o_proj.bias)
      assert.is_nil(layer.self_attn.q_layernorm)
      assert.are.same({ 32 }, layer.post_attention_layernorm.bias.shape)     -- LayerNorms with biases
      assert.are.equal("LayerNorm", model.model.norm.__name)
      assert.are.same({ 32 }, model.model.norm.bias.shape)
      assert.is_nil(layer.mlp.gate_proj.bias)
      assert.are.equal(4, model.config.rotary_dim)                            -- 0.5 of head_dim 8
      assert.are_not.equal(model.lm_head.weight, model.model.embed_tokens.weight)   -- untied
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("needs its norms' biases, its q/k/v biases and each norm after attention", function()
      local changes = {
         function(m) m.model.layers[1].input_layernorm.bias:fill_(0) end,
         function(m) m.model.layers[2].post_attention_layernorm.bias:fill_(0) end,
         function(m) m.model.norm.bias:fill_(0) end,
         function(m) m.model.layers[1].self_attn.k_proj.bias:fill_(0) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)
end)

describe("models.stablelm (tests/fixtures/models/stablelm_12b_tiny: as StableLM 2 12B, q/k LayerNorms per head, parallel)", function()
   local NAME = "stablelm_12b_tiny"
   local DIR = H.FIX .. "/" .. NAME
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds one bias-free LayerNorm per query and key head, and one input norm per layer", function()
      H.assert_holds_checkpoint(model, DIR)
      local attn = model.model.layers[1].self_attn
      assert.are.equal("StableLmLayerNormPerHead", attn.q_layernorm.__name)
      assert.are.equal(4, #attn.q_layernorm.norms)
      assert.are.equal(2, #attn.k_layernorm.norms)                            -- 2 key/value heads
      assert.are.same({ 16 }, attn.k_layernorm.norms[2].weight.shape)
      assert.is_nil(attn.k_layernorm.norms[2].bias)
      assert.are.same({ 32 }, attn.k_proj.bias.shape)
      assert.is_nil(model.model.layers[2].post_attention_layernorm)
      assert.are.equal(4, model.config.rotary_dim)                            -- the default 0.25 of 16
      assert.are.equal(50000, model.config.rope_theta)
      local names = H.param_names(model)
      assert.are.equal("model.layers.0.self_attn.q_layernorm.norms.0.weight", names[9])
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("needs each head's own q/k norm, and adds attention and MLP from the one input norm", function()
      local changes = {
         function(m) m.model.layers[1].self_attn.q_layernorm.norms[3].weight:fill_(1) end,
         function(m) m.model.layers[2].self_attn.k_layernorm.norms[2].weight:fill_(1) end,
         function(m) rawset(m.model.layers[1], "parallel", false)
            m.model.layers[1].post_attention_layernorm = m.model.layers[1].input_layernorm end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("normalizes the heads at once as each head's own LayerNorm does", function()
      local norm = model.model.layers[2].self_attn.q_layernorm
      local x = ml.randn({ 2, 3, 4, 16 })
      assert.is_true(H.max_abs_diff(norm(x), norm:per_head(x):tolist()) < 1e-6)
   end)

   it("gives transformers' logits split over CPU and disk (offloaded q/k norms load head by head)", function()
      local off = H.tmpdir()
      local split = models.from_pretrained(DIR, { offload_folder = off, device_map = H.alternating_layers("model", 2,
         { ["model.embed_tokens"] = "cpu", ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" }) })
      assert.are.equal("disk", tostring(split.hf_device_map["model.layers.0"]))
      assert.is_true(H.max_abs_diff(split(ids), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, split:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(off)
   end)

   it("saves and loads back to transformers' logits", function()
      local dir = H.tmpdir()
      ml.save_model(model, dir)
      assert.is_true(H.max_abs_diff(models.from_pretrained(dir)(ids), exp.logits) < TOL)
      H.rmdir(dir)
   end)
end)

describe("models.stablelm config", function()
   local DIR = H.FIX .. "/stablelm_tiny"

   local function hub(over)          -- StableLM-3B-4E1T's keys, shrunk
      local c = { model_type = "stablelm", vocab_size = 50, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2,
         num_attention_heads = 2, num_key_value_heads = 2, rope_theta = 10000, partial_rotary_factor = 0.25 }
      for k, v in pairs(over or {}) do c[k] = v end
      return c
   end

   it("reads transformers' defaults: 0.25 of each head rotated, LayerNorm eps 1e-5, no biases, sequential layers", function()
      local cfg = stablelm.config(hub({ partial_rotary_factor = null, rope_theta = null }))
      assert.are.same({ 16, 4, 10000, "default", 1e-5, 1e-5, false, false, false, false, 4096 },
         { cfg.head_dim, cfg.rotary_dim, cfg.rope_theta, cfg.rope.rope_type, cfg.layer_norm_eps, cfg.rms_norm_eps,
           cfg.qkv_bias, cfg.o_bias, cfg.use_parallel_residual, cfg.tie_word_embeddings, cfg.max_position_embeddings })
      assert.are.same({ false, false }, cfg.layer_windows)
   end)

   it("takes rope_parameters' values over the top level's, and rope_scaling in place of rope_parameters", function()
      local cfg = stablelm.config(hub({ rope_parameters = { rope_type = "default", partial_rotary_factor = 0.5 } }))
      assert.are.same({ 8, 10000 }, { cfg.rotary_dim, cfg.rope_theta })
      cfg = stablelm.config(hub({ rope_theta = 1000000, rope_parameters = { rope_theta = 500000 } }))
      assert.are.equal(500000, cfg.rope_theta)
      cfg = stablelm.config(hub({ rope_parameters = { partial_rotary_factor = 0.5 },
         rope_scaling = { rope_type = "linear", factor = 2 } }))
      assert.are.same({ "linear", 2, 4 }, { cfg.rope.rope_type, cfg.rope.factor, cfg.rotary_dim })
   end)

   it("names the key and the file of a bad value", function()
      local dir = H.tmpdir()
      local path = dir .. "/config.json"
      H.write(path, require("cjson").encode(hub({ partial_rotary_factor = 1.5 })))
      assert.has_error(function() stablelm.StableLmForCausalLM(path) end,
         'models.stablelm: config key "partial_rotary_factor" in ' .. path .. " must be a number in (0, 1], got 1.5")
      H.rmdir(dir)
   end)

   it("refuses configs it cannot run", function()
      local function fails(change, msg) H.assert_config_fails(stablelm.config, DIR, change, msg) end
      fails({ partial_rotary_factor = "0.25", rope_parameters = null },
         'models.stablelm: config key "partial_rotary_factor" in config table must be a number in (0, 1], got string "0.25"')
      fails({ rope_parameters = { rope_type = "default", partial_rotary_factor = 0 } },
         'models.stablelm: config key "rope_parameters.partial_rotary_factor" in config table must be a number in (0, 1], got 0')
      fails({ rope_parameters = { partial_rotary_factor = 0.375 } },
         "models.stablelm: the rotary dims of a head (3 of head_dim 8) must be even in config table")
      fails({ use_qkv_bias = "yes" }, 'models.stablelm: config key "use_qkv_bias" in config table must be a boolean, got string "yes"')
      fails({ qk_layernorm = 1 }, 'models.stablelm: config key "qk_layernorm" in config table must be a boolean, got number 1')
      fails({ use_parallel_residual = "true" },
         'models.stablelm: config key "use_parallel_residual" in config table must be a boolean, got string "true"')
      fails({ layer_norm_eps = 0 }, 'models.stablelm: config key "layer_norm_eps" in config table must be a positive number, got number 0')
      fails({ num_attention_heads = 5 },
         'models.stablelm: config key "num_attention_heads" in config table must be a divisor of hidden_size 32, got 5')
      fails({ num_key_value_heads = 3 },
         'models.stablelm: config key "num_key_value_heads" in config table must be a divisor of num_attention_heads 4, got 3')
      fails({ hidden_act = "swish2" }, 'models.stablelm: activation "swish2" in config table is not supported')
      fails({ rope_parameters = { rope_type = "longrope", rope_theta = 10000 } },
         'models.stablelm: rope type "longrope" is not supported (supported: default, linear, llama3, yarn) in config table')
      fails({ rope_parameters = { rope_type = "dynamic", factor = 2 } },
         'models.stablelm: rope type "dynamic" is not supported (supported: default, linear, llama3, yarn) in config table')
      fails({ vocab_size = null }, 'models.stablelm: config key "vocab_size" is missing in config table')
   end)
end)
