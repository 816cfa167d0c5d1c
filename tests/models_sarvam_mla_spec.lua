-- ml.models Sarvam MLA (sarvam-105b: DeepSeek-V3's latent attention without a query bottleneck,
-- YaRN, a dense first layer, then V3's grouped sigmoid routing beside a shared expert) against
-- transformers (tests/fixtures/gen_models.py sarvam_mla): the hub's config format as transformers
-- translates it, logits, greedy ids with and without the cache, a padded batch, both ways of
-- attending, what the config's particularities do, experts on disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local deepseek = require("moonload.models.deepseek")
local H = require("models_helpers")

local NAME = "sarvam_mla_tiny"
local DIR = H.FIX .. "/" .. NAME

-- A copy of the fixture with its config.json changed by change(raw).
local function with_config(change)
   local dir = H.tmpdir()
   local raw = H.read_json(DIR .. "/config.json")
   change(raw)
   H.write(dir .. "/config.json", require("cjson").encode(raw))
   H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
   return dir
end

describe("models.sarvam_mla (tests/fixtures/models/sarvam_mla_tiny: the hub's config format, 2 of 8 experts in 2 groups)", function()
   H.collect_warnings()
   local exp, model, ids = H.fixture_model(NAME)

   it("builds SarvamMLAForCausalLM with every tensor of the checkpoint: queries without a bottleneck", function()
      assert.are.equal("SarvamMLAForCausalLM", model.__name)
      assert.are.same({ "SarvamMLADecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local attn = model.model.layers[1].self_attn
      assert.is_not_nil(attn.q_proj)
      assert.is_nil(attn.q_a_proj)
      assert.are.equal("SarvamMLAMLP", model.model.layers[1].mlp.__name)
      assert.are.equal("SarvamMLAMoE", model.model.layers[2].mlp.__name)
      assert.are.same({ false, true, true }, model.config.sparse_layers)
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   H.it_attends_both_ways(model, NAME)

   it("reads rope_scaling of type deepseek_yarn as YaRN (its frequencies and softmax scale), with the top-level rope_theta", function()
      local cfg = model.config
      assert.are.same({ "yarn", 4, 32, 1, 20000 }, { cfg.rope.rope_type, cfg.rope.factor, cfg.rope.original_max_position_embeddings,
         cfg.rope.mscale_all_dim, cfg.rope_theta })
      local changes = {
         function(raw) raw.rope_scaling = nil end,                             -- (no YaRN)
         function(raw) raw.rope_scaling.mscale_all_dim = nil end,              -- (YaRN, the softmax unscaled)
         function(raw) raw.rope_theta = nil end,
      }
      for i, change in ipairs(changes) do
         local dir = with_config(change)
         assert.is_true(H.max_abs_diff(models.from_pretrained(dir)(ids), exp.logits) > 1e-3, i)
         H.rmdir(dir)
      end
   end)

   it("needs the correction bias, the groups and the shared expert", function()
      local function sparse(m, fn) for i = 2, 3 do fn(m.model.layers[i].mlp) end end
      local changes = {
         function(b) b.gate.e_score_correction_bias:fill_(0) end,
         function(b) rawset(b, "topk_group", 2) end,
         function(b) b.shared_experts.down_proj.weight:fill_(0) end,
      }
      for i, change in ipairs(changes) do
         local m = models.from_pretrained(DIR)
         sparse(m, change)
         assert.is_true(H.max_abs_diff(m(ids), exp.logits) > 1e-3, i)
      end
   end)

   -- (a CPU budget of 150000 bytes leaves some layers to the disk)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, places = { ["model.layers.1.mlp.experts.3"] = "disk" } })

   describe("config", function()
      it("reads SarvamMLAConfig's defaults (DeepSeek-V3's where it has none)", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_experts", "num_shared_experts", "moe_intermediate_size", "kv_lora_rank", "qk_rope_head_dim",
                              "qk_nope_head_dim", "v_head_dim", "n_group", "topk_group", "first_k_dense_replace",
                              "num_experts_per_tok", "routed_scaling_factor", "norm_topk_prob", "rope_scaling", "head_dim",
                              "q_head_dim" }) do
            raw[k] = nil
         end
         local cfg = deepseek.sarvam_mla_config(raw)
         assert.are.same({ 262144, 4096, 16384, 32, 64 }, { cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size,
            cfg.num_hidden_layers, cfg.num_attention_heads })
         assert.are.same({ 128, 1, 2048, 8, 1, 1, 1, 2.5, true }, { cfg.n_routed_experts, cfg.n_shared_experts,
            cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.first_k_dense_replace,
            cfg.routed_scaling_factor, cfg.norm_topk_prob })
         assert.are.same({ 512, 64, 128, 128, 64 }, { cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim,
            cfg.v_head_dim, cfg.head_dim })
         assert.is_nil(cfg.q_lora_rank)
         assert.is_true(cfg.rope_interleave)
         assert.are.equal("default", cfg.rope.rope_type)
      end)

      it("reads transformers' own format too (rope_parameters, n_routed_experts, n_shared_experts, num_mtp_layers)", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.rope_parameters = { rope_type = "yarn", rope_theta = 20000 }
         for k, v in pairs(raw.rope_scaling) do if k ~= "type" then raw.rope_parameters[k] = v end end
         raw.rope_scaling, raw.rope_theta, raw.head_dim, raw.q_head_dim = nil, nil, nil, nil
         raw.n_routed_experts, raw.n_shared_experts, raw.num_experts, raw.num_shared_experts = 8, 2, nil, nil
         raw.num_mtp_layers, raw.num_nextn_predict_layers = 1, nil
         local cfg = deepseek.sarvam_mla_config(raw)
         assert.are.same({ "yarn", 20000, 8, 2, 1 }, { cfg.rope.rope_type, cfg.rope_theta, cfg.n_routed_experts,
            cfg.n_shared_experts, cfg.num_nextn_predict_layers })
         assert.are.same(model.config.softmax_scale, cfg.softmax_scale)
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(deepseek.sarvam_mla_config, DIR, change, msg) end
         fails({ num_experts_per_tok = 9 }, "models.sarvam_mla: num_experts_per_tok 9 is more than n_routed_experts 8")
         fails({ num_experts = 3 }, "models.sarvam_mla: n_routed_experts 3 is not a multiple of n_group 2")
         fails({ kv_lora_rank = 0 }, 'models.sarvam_mla: config key "kv_lora_rank" must be an integer >= 1, got 0')
         fails({ qk_rope_head_dim = 7 }, "models.sarvam_mla: qk_rope_head_dim must be even, got 7")
         fails(function(raw) raw.rope_scaling.type = "deepseek_ntk" end, 'models.sarvam_mla: rope type "deepseek_ntk" is not supported')
         fails(function(raw) raw.rope_scaling.factor = -1 end, 'models.sarvam_mla: config key "rope_parameters.factor"')
         fails({ routed_scaling_factor = 0 }, 'models.sarvam_mla: config key "routed_scaling_factor" must be a positive number, got 0')
      end)
   end)
end)
