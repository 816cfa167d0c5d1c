-- ml.models Persimmon (a fused query_key_value with each head's q, k and v side by side, q/k
-- LayerNorms over each head's dims, half of each head rotated, a ReLU² MLP) against transformers
-- (tests/fixtures/gen_models.py persimmon): names, the checkpoint's tensors, logits, greedy ids,
-- the cache, a left-padded batch, a CPU + disk split, what each difference changes, and configs.
local ml = require("moonload")
local persimmon = require("moonload.models.persimmon")
local H = require("models_helpers")

local NAME = "persimmon_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.persimmon (tests/fixtures/models/persimmon_tiny: 4 heads of 12, 6 dims rotated, q/k LayerNorms)", function()
   local exp, model, _, logits_after = H.fixture_model(NAME)

   it("builds PersimmonForCausalLM with transformers' names, biased LayerNorms and an untied head", function()
      assert.are.equal("PersimmonForCausalLM", model.__name)
      assert.are.same({ "PersimmonDecoderLayer" }, model.no_split_modules)
      assert.are.equal(persimmon.PersimmonForCausalLM, ml.models.persimmon.PersimmonForCausalLM)
      H.assert_holds_checkpoint(model, DIR)
      local attn = model.model.layers[2].self_attn
      assert.are.same({ 144, 48 }, attn.query_key_value.weight.shape)
      assert.are.same({ 144 }, attn.query_key_value.bias.shape)
      assert.are.same({ 12 }, attn.q_layernorm.bias.shape)                    -- one for all heads
      assert.are.same({ 12 }, attn.k_layernorm.weight.shape)
      assert.are.equal("ReLUSquaredActivation", model.model.layers[1].mlp.act.__name)
      assert.are.same({ 48 }, model.model.final_layernorm.bias.shape)
      assert.are.same({ 6, 25000 }, { model.config.rotary_dim, model.config.rope_theta })
      assert.are_not.equal(model.lm_head.weight, model.model.embed_tokens.weight)
      assert.is_nil(model:max_length())
      local names = H.param_names(model)
      assert.are.equal("model.layers.0.self_attn.query_key_value.weight", names[2])
      assert.are.equal("model.layers.0.self_attn.q_layernorm.weight", names[6])
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 100000, overrides = { ["^model%.layers%.0$"] = "disk" },
      places = { ["model.layers.0"] = "disk" } })

   it("needs the q/k LayerNorms", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do l.self_attn.q_layernorm, l.self_attn.k_layernorm = nil, nil end
      end), exp.logits) > 1e-3)
   end)

   it("rotates only the first half of each head", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         local cfg = {}
         for k, v in pairs(m.config) do cfg[k] = v end
         cfg.rotary_dim = cfg.head_dim
         m.model.rotary_emb = persimmon.PersimmonRotaryEmbedding(cfg)
      end), exp.logits) > 1e-3)
   end)

   it("reads each head's q, k and v side by side in query_key_value", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do
            rawset(l.self_attn, "project", function(self, x, B, L)
               local qkv = self.query_key_value(x)              -- (all the q, then all the k, then all the v)
               local function heads(i) return qkv:narrow(3, i * 48 + 1, 48):contiguous():view(B, L, 4, 12) end
               return self.q_layernorm(heads(0)), self.k_layernorm(heads(1)), heads(2)
            end)
         end
      end), exp.logits) > 1e-3)
   end)

   it("squares its ReLU", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do l.mlp.act = ml.nn.ReLU() end
      end), exp.logits) > 1e-3)
   end)

   it("reads the hub's top-level rope_theta and partial_rotary_factor, transformers' defaults, and names what it refuses", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.rope_parameters, raw.rope_theta, raw.partial_rotary_factor = nil, 25000, 1
      local cfg = persimmon.config(raw)
      assert.are.same({ 25000, 12 }, { cfg.rope_theta, cfg.rotary_dim })
      raw.partial_rotary_factor, raw.rope_theta, raw.hidden_act, raw.qk_layernorm, raw.max_position_embeddings = nil, nil, nil, nil, nil
      cfg = persimmon.config(raw)
      assert.are.same({ 10000, 6, "relu2", true, 16384 }, { cfg.rope_theta, cfg.rotary_dim, cfg.hidden_act, cfg.qk_layernorm,
         cfg.max_position_embeddings })
      local function fails(change, msg) H.assert_config_fails(persimmon.config, DIR, change, msg) end
      fails({ num_attention_heads = 5 }, "models.persimmon: hidden_size 48 is not a multiple of num_attention_heads 5")
      fails(function(r) r.rope_parameters.partial_rotary_factor = 0.25 end,
         "models.persimmon: the rotary dims of a head (3 of head_dim 12) must be even")
      fails(function(r) r.rope_parameters.rope_type = "dynamic" end, 'models.persimmon: rope type "dynamic" is not supported')
      fails({ hidden_act = "relu3" }, 'models.persimmon: activation "relu3" in config table is not supported')
      fails({ qk_layernorm = "yes" }, 'models.persimmon: config key "qk_layernorm"')
   end)
end)
