-- ml.models DiffLlama (Llama's layers with differential attention: two value halves, the second half
-- of the heads subtracted times a learned lambda, a weightless RMSNorm per head pair) against
-- transformers (tests/fixtures/gen_models.py diffllama): names, logits, greedy ids, the cache, a padded
-- batch, a CPU + disk split, what each part of the differential attention changes, and its configs.
local ml = require("moonload")
local diffllama = require("moonload.models.diffllama")
local H = require("models_helpers")

local NAME = "diffllama_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.diffllama (tests/fixtures/models/diffllama_tiny: 4 heads over 2 kv heads, biased attention)", function()
   H.collect_warnings()                       -- (the disk split warns of weights on meta)
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds DiffLlamaForCausalLM: Llama's layers, the lambdas and a weightless group norm in each attention", function()
      assert.are.equal("DiffLlamaForCausalLM", model.__name)
      assert.are.same({ "DiffLlamaDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local attn = model.model.layers[2].self_attn
      assert.are.same({ "DiffLlamaAttention", "DiffLlamaMLP" }, { attn.__name, model.model.layers[2].mlp.__name })
      assert.are.same({ 16 }, attn.lambda_q1.shape)
      assert.is_nil(attn.groupnorm.weight)
      assert.are.equal(32, attn.groupnorm.normalized_shape[1])
      assert.is_not_nil(attn.o_proj.bias)
      assert.is_nil(model.model.layers[1].mlp.up_proj.bias)
      -- lambda_init by layer (from 0): 0.8 - 0.6 exp(-0.3 layer)
      assert.is_true(math.abs(model.model.layers[1].self_attn.lambda_init - 0.2) < 1e-15)
      assert.is_true(math.abs(model.model.layers[3].self_attn.lambda_init - (0.8 - 0.6 * math.exp(-0.6))) < 1e-15)
      assert.is_true(math.abs(model.model.layers[1].self_attn:lambda() - -0.4970) < 1e-4)   -- (the generator prints it)
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 300000, overrides = { ["%.mlp$"] = "disk" }, overrides_budget = 200000,
      places = { ["model.layers.1.mlp"] = "disk" } })

   it("needs the learned lambda, the value halves, the group norm and its 1 - lambda_init scale", function()
      local changes = {
         function(m) for _, l in ipairs(m.model.layers) do l.self_attn.lambda_q2:zero_() end end,
         function(m)
            for _, l in ipairs(m.model.layers) do
               local a = l.self_attn
               rawset(a, "lambda", function(self) return self.lambda_init end)
            end
         end,
         function(m)        -- (each head over its own kv head's value twice: no halves)
            local base = require("moonload.models.llama").LlamaAttention.attend_heads
            for _, l in ipairs(m.model.layers) do
               rawset(l.self_attn, "attend_heads", function(self, q, k, v, past, pad)
                  local y = base(self, q, k, ml.cat({ v, v }, 4), past, pad)
                  local B, L, Hd, D = y:size(1), y:size(2), self.n_head, self.head_dim
                  y = y:view(B, L, Hd, 2 * D)
                  local diff = y:narrow(3, 1, Hd / 2) - y:narrow(3, Hd / 2 + 1, Hd / 2) * self:lambda()
                  return (self.groupnorm(diff) * (1 - self.lambda_init)):reshape(B, L, Hd * D)
               end)
            end
         end,
         function(m) for _, l in ipairs(m.model.layers) do l.self_attn.groupnorm.forward = function(_, x) return x end end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.self_attn, "lambda_init", 0.5) end end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("reads DiffLlamaConfig's defaults and refuses what transformers refuses", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.rms_norm_eps, raw.num_key_value_heads, raw.head_dim, raw.mlp_bias, raw.max_position_embeddings = nil, nil, nil, true, nil
      local cfg = diffllama.config(raw)
      assert.are.same({ 1e-5, 4, 16, false, 2048 }, { cfg.rms_norm_eps, cfg.num_key_value_heads, cfg.head_dim, cfg.mlp_bias,
         cfg.max_position_embeddings })
      -- DiffLlamaConfig() (transformers 5.24: 1204885504 parameters, an untied head)
      H.assert_matches_skeleton(function() return diffllama.DiffLlamaForCausalLM({ model_type = "diffllama" }) end,
         { parameters = 1204885504, shapes = { ["model.layers.0.self_attn.lambda_q1"] = { 64 },
            ["lm_head.weight"] = { 32000, 2048 }, ["model.layers.0.mlp.gate_proj.weight"] = { 8192, 2048 } } })
      local function fails(change, msg) H.assert_config_fails(diffllama.config, DIR, change, msg) end
      fails({ num_key_value_heads = 1 }, 'models.diffllama: config key "num_key_value_heads" must be even (the values split in two halves), got 1')
      fails({ attention_dropout = 0.1 }, 'models.diffllama: config key "attention_dropout" must be 0')
      fails({ num_key_value_heads = 3 }, "models.diffllama: num_attention_heads 4 is not a multiple of num_key_value_heads 3")
      fails({ hidden_act = "relu3" }, 'models.diffllama: activation "relu3"')
   end)
end)
