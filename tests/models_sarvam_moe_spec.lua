-- ml.models Sarvam MoE (sarvam-30b: GLM-4.5's layers with the whole head rotated and per-head q/k
-- norms, a dense first layer, then DeepSeek-V3's grouped sigmoid routing beside a shared expert)
-- against transformers (tests/fixtures/gen_models.py sarvam_moe): the hub's names and fused q|k|v as
-- transformers converts them, logits, greedy ids with and without the cache, a padded batch, what
-- each particularity does, transformers' own layout, experts on disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local glm4_moe = require("moonload.models.glm4_moe")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "sarvam_moe_tiny"
local DIR = H.FIX .. "/" .. NAME

-- transformers' names for the hub's (its conversion mapping's renames; the fused projection split)
local function transformers_names(key)
   local n = key:gsub("^model%.word_embeddings%.", "model.embed_tokens."):gsub("%.attention%.dense%.", ".self_attn.o_proj.")
      :gsub("%.attention%.query_layernorm%.", ".self_attn.q_norm."):gsub("%.attention%.key_layernorm%.", ".self_attn.k_norm.")
      :gsub("%.mlp%.gate%.expert_bias$", ".mlp.gate.e_score_correction_bias")
   local base, field = n:match("^(.*)%.attention%.query_key_value%.(%a+)$")
   if base then
      return { base .. ".self_attn.q_proj." .. field, base .. ".self_attn.k_proj." .. field, base .. ".self_attn.v_proj." .. field }
   end
   return { n }
end

describe("models.sarvam_moe (tests/fixtures/models/sarvam_moe_tiny: a dense layer, then 2 of 8 experts in 2 groups)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds SarvamMoEForCausalLM with the hub's tensors under transformers' names, q|k|v split", function()
      assert.are.equal("SarvamMoEForCausalLM", model.__name)
      assert.are.same({ "SarvamMoEDecoderLayer" }, model.no_split_modules)
      local file = ml.safetensors.load_file(DIR .. "/model.safetensors")
      local want = {}
      for key in pairs(file) do for _, n in ipairs(transformers_names(key)) do want[n] = true end end
      assert.is_true(want["model.layers.0.self_attn.v_proj.bias"] and want["model.layers.1.mlp.gate.e_score_correction_bias"])
      assert.are.same(H.sorted_keys(want), H.sorted_keys((model:state_dict())))
      -- the fused rows: 4 query heads, then 2 key heads, then 2 value heads, of 8
      local fused, attn = file["model.layers.0.attention.query_key_value.weight"], model.model.layers[1].self_attn
      assert.are.equal(0, (attn.q_proj.weight - fused:narrow(1, 1, 32)):abs():max():item())
      assert.are.equal(0, (attn.k_proj.weight - fused:narrow(1, 33, 16)):abs():max():item())
      assert.are.equal(0, (attn.v_proj.weight - fused:narrow(1, 49, 16)):abs():max():item())
      assert.are.same({ 8 }, attn.q_norm.weight.shape)
      assert.is_nil(attn.o_proj.bias)
      assert.are.equal("SarvamMoEMLP", model.model.layers[1].mlp.__name)
      assert.are.equal("SarvamMoEMoE", model.model.layers[2].mlp.__name)
      assert.are.same({ false, true, true }, model.config.sparse_layers)
      assert.are.same({ 8, 8 }, { model.config.rotary_dim, model.config.head_dim })
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("needs the whole head rotated, and its q/k norms", function()
      local dir = H.tmpdir()
      local raw = H.read_json(DIR .. "/config.json")
      raw.rope_parameters.partial_rotary_factor = 0.5                 -- (GLM-4.5's default)
      H.write(dir .. "/config.json", require("cjson").encode(raw))
      H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
      assert.is_true(H.max_abs_diff(models.from_pretrained(dir)(ids), exp.logits) > 1e-3)
      H.rmdir(dir)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do rawset(l.self_attn, "qk_norm_in_project", true) end   -- (skipped)
      end), exp.logits) > 1e-3)
   end)

   it("needs the correction bias, the groups, routed_scaling_factor, two experts a token and the shared expert", function()
      local function sparse(m, fn) for i = 2, 3 do fn(m.model.layers[i].mlp) end end
      local changes = {
         function(m) sparse(m, function(b) b.gate.e_score_correction_bias:fill_(0) end) end,
         function(m) sparse(m, function(b) rawset(b, "topk_group", 2) end) end,
         function(m) sparse(m, function(b) rawset(b, "routed_scaling_factor", 1) end) end,
         function(m) sparse(m, function(b) rawset(b, "top_k", 1) end) end,
         function(m) sparse(m, function(b) b.shared_experts.down_proj.weight:fill_(0) end) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("saves transformers' layout (q_proj, k_proj, v_proj) and loads it back", function()
      local out = H.tmpdir()
      ml.save_model(models.from_pretrained(DIR), out)
      local stored = ml.safetensors.load_file(out .. "/model.safetensors")
      assert.is_not_nil(stored["model.layers.2.self_attn.k_proj.weight"])
      assert.is_nil(stored["model.layers.2.attention.query_key_value.weight"])
      local back = models.from_pretrained(out)
      assert.is_true(H.max_abs_diff(back(ids), exp.logits) < TOL)
      H.rmdir(out)
   end)

   it("reads transformers' stacked experts (gate_up_proj, down_proj per layer), running 2 experts a token", function()
      local dir = H.copy_with_stacked_experts(DIR, { "model.layers.1.mlp.experts", "model.layers.2.mlp.experts" }, 8)
      local stacked = models.from_pretrained(dir)
      assert.is_true(H.max_abs_diff(stacked(ids), exp.logits) < TOL)
      local experts = stacked.model.layers[3].mlp.experts
      assert.are.equal("StackedExperts", experts.__name)
      assert.are.equal(2, #H.experts_run(experts, function() stacked({ { 7 } }) end))
      H.rmdir(dir)
   end)

   -- (a CPU budget of 150000 bytes leaves some layers to the disk; the split q, k and v are written
   -- to the offload folder)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, places = { ["model.layers.1.mlp.experts.5"] = "disk" } })

   describe("config", function()
      it("reads SarvamMoEConfig's defaults", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                              "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok",
                              "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace", "norm_topk_prob",
                              "use_qk_norm", "attention_bias", "num_nextn_predict_layers" }) do
            raw[k] = nil
         end
         local cfg = glm4_moe.sarvam_moe_config(raw)
         assert.are.same({ 262144, 4096, 8192, 19, 64, 4, 64, 131072, 1e-6, 8000000, 64 }, { cfg.vocab_size, cfg.hidden_size,
            cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.max_position_embeddings, cfg.rms_norm_eps, cfg.rope_theta, cfg.rotary_dim })
         assert.are.same({ 128, 1, 1024, 6, 2.5, 1, 1, true, 0 }, { cfg.n_routed_experts, cfg.n_shared_experts,
            cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.routed_scaling_factor, cfg.n_group, cfg.topk_group,
            cfg.norm_topk_prob, cfg.num_nextn_predict_layers })
         assert.are.same({ true, false, false }, { cfg.qk_norm, cfg.qkv_bias, cfg.o_bias })
         assert.is_false(cfg.sparse_layers[1])
         assert.is_true(cfg.sparse_layers[2])
      end)

      it("reads the original config's names (num_experts, num_shared_experts, use_qkv_bias, num_mtp_layers)", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.n_routed_experts, raw.n_shared_experts, raw.attention_bias, raw.num_nextn_predict_layers = nil, nil, nil, nil
         raw.num_experts, raw.num_shared_experts, raw.use_qkv_bias, raw.num_mtp_layers = 4, 2, true, 1
         local cfg = glm4_moe.sarvam_moe_config(raw)
         assert.are.same({ 4, 2, true, 1 }, { cfg.n_routed_experts, cfg.n_shared_experts, cfg.qkv_bias,
            cfg.num_nextn_predict_layers })
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(glm4_moe.sarvam_moe_config, DIR, change, msg) end
         fails({ num_experts_per_tok = 9 }, "models.sarvam_moe: num_experts_per_tok 9 is more than n_routed_experts 8")
         fails({ n_group = 3 }, "models.sarvam_moe: n_routed_experts 8 is not a multiple of n_group 3")
         fails({ topk_group = 3 }, "models.sarvam_moe: topk_group 3 is more than n_group 2")
         fails({ routed_scaling_factor = 0 }, 'models.sarvam_moe: config key "routed_scaling_factor" must be a positive number, got 0')
         fails({ use_qk_norm = "yes" }, 'models.sarvam_moe: config key "use_qk_norm" must be a boolean, got yes')
         fails({ moe_intermediate_size = 0 }, 'models.sarvam_moe: config key "moe_intermediate_size" must be an integer >= 1, got 0')
         fails({ rope_parameters = { rope_type = "dynamic", factor = 2 } }, 'models.sarvam_moe: rope type "dynamic" is not supported')
         fails({ num_attention_heads = 3 }, "models.sarvam_moe: num_attention_heads 3 is not a multiple of num_key_value_heads 2")
      end)

      it("names the file a bad config.json came from", function()
         H.assert_config_file_fails(glm4_moe.sarvam_moe_config, DIR, { routed_scaling_factor = -2 }, '"routed_scaling_factor" must be a positive number, got -2')
      end)
   end)
end)
