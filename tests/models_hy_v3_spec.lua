-- ml.models Hy3 (Tencent's Hy3-preview: per-head q/k norms before the rotary embedding, a dense
-- first layer, then a float32 sigmoid router choosing by score + e_score_correction_bias, weighing by
-- the scores renormalized times router_scaling_factor, beside a shared MLP) against transformers
-- (tests/fixtures/gen_models.py hy_v3): names, logits, greedy ids with and without the cache, a
-- padded batch, what each particularity does, both expert layouts, the multi-token-prediction layer
-- left out, experts on disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local hy_v3 = require("moonload.models.hy_v3")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "hy_v3_tiny"
local DIR = H.FIX .. "/" .. NAME
local SPARSE = { "model.layers.1.mlp.experts", "model.layers.2.mlp.experts" }

-- transformers' names for the hub's (its conversion mapping's renames)
local function transformers_name(key)
   return (key:gsub("%.mlp%.router%.gate%.weight$", ".mlp.gate.weight"):gsub("%.mlp%.expert_bias$",
      ".mlp.e_score_correction_bias"):gsub("%.mlp%.shared_mlp%.", ".mlp.shared_experts."))
end

describe("models.hy_v3 (tests/fixtures/models/hy_v3_tiny: a dense layer, then 2 of 8 experts and a shared one)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds HYV3ForCausalLM with every tensor of the checkpoint, the hub's names renamed as transformers does", function()
      assert.are.equal("HYV3ForCausalLM", model.__name)
      assert.are.same({ "HYV3DecoderLayer" }, model.no_split_modules)
      local want = {}
      for key in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do want[transformers_name(key)] = true end
      assert.is_true(want["model.layers.1.mlp.gate.weight"] and want["model.layers.2.mlp.e_score_correction_bias"])
      assert.are.same(H.sorted_keys(want), H.sorted_keys((model:state_dict())))
      local dense, sparse = model.model.layers[1], model.model.layers[2]
      assert.are.equal("HYV3Attention", dense.self_attn.__name)
      assert.are.same({ 8 }, dense.self_attn.q_norm.weight.shape)               -- (one head's dims)
      assert.are.same({ 8 }, dense.self_attn.k_norm.weight.shape)
      assert.are.equal("HYV3MLP", dense.mlp.__name)
      assert.are.equal(64, dense.mlp.gate_proj.out_features)
      assert.are.equal("HYV3MoE", sparse.mlp.__name)
      assert.are.equal("HYV3TopKRouter", sparse.mlp.gate.__name)
      assert.are.equal("ModuleList", sparse.mlp.experts.__name)
      assert.are.equal(16, sparse.mlp.experts[8].gate_proj.out_features)
      assert.are.equal(16, sparse.mlp.shared_experts.gate_proj.out_features)  -- 1 shared expert of 16
      assert.are.same({ false, true, true }, model.config.sparse_layers)
      assert.are.same({ 2, 2.826 }, { sparse.mlp.top_k, sparse.mlp.scale })
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("keeps the router's weight and the correction bias in float32 under bfloat16, as transformers does", function()
      local m = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local block = m.model.layers[2].mlp
      assert.are.same({ "float32", "float32", "bfloat16" },
         { block.gate.weight.dtype, block.e_score_correction_bias.dtype, block.experts[1].gate_proj.weight.dtype })
      assert.is_true(H.max_abs_diff(m(ids):float(), exp.logits) < 0.5)
   end)

   it("needs its q/k norms, applied before the rotary embedding", function()
      local function attentions(m, fn) for _, l in ipairs(m.model.layers) do fn(l.self_attn) end end
      local changes = {
         function(m) attentions(m, function(a) rawset(a, "qk_norm_in_project", true) end) end,   -- (skipped)
         function(m)                                                -- after rotating, as HunYuan's
            attentions(m, function(a)
               rawset(a, "qk_norm_in_project", true)
               rawset(a, "query_layernorm", a.q_norm)
               rawset(a, "key_layernorm", a.k_norm)
            end)
         end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("needs the correction bias, renormalization, router_scaling_factor, two experts a token and the shared experts", function()
      local function sparse(m, fn) for i = 2, 3 do fn(m.model.layers[i].mlp) end end
      local function unnormalized(self, flat)            -- the same choice, weighted by the scores as they are
         local w, i = require("moonload.models.moe").biased_sigmoid_route(self.gate(flat), self.e_score_correction_bias,
            self.top_k, false, 0, self.scale)
         return w, i
      end
      local changes = {
         function(m) sparse(m, function(b) b.e_score_correction_bias:fill_(0) end) end,
         function(m) sparse(m, function(b) rawset(b, "route", unnormalized) end) end,
         function(m) sparse(m, function(b) rawset(b, "scale", 1) end) end,
         function(m) sparse(m, function(b) rawset(b, "top_k", 1) end) end,
         function(m) sparse(m, function(b) b.shared_experts.down_proj.weight:fill_(0) end) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("routes by sigmoid score + e_score_correction_bias, weighing by the scores alone renormalized, times the factor", function()
      local block = hy_v3.HYV3MoE(model.config)
      block.gate.weight:copy_(ml.randn(8, 32))
      assert.is_true((block:route(ml.randn(5, 32)):sum(2) - 2.826):abs():max():item() < 1e-5)
      -- x = e_1 gives logits (2, 1, -3, 0, ...); the bias picks the second expert over the 0s and the third
      local w, e1 = {}, {}
      for e = 1, 8 do w[e] = {} for j = 1, 32 do w[e][j] = 0 end end
      for j = 1, 32 do e1[j] = j == 1 and 1 or 0 end
      w[1][1], w[2][1], w[3][1] = 2, 1, -3
      block.gate.weight:copy_(ml.tensor(w))
      block.e_score_correction_bias:copy_(ml.tensor({ -1, 0.5, -1, -1, -1, -1, -1, -1 }))
      local top_w, top_i = block:route(ml.tensor({ e1 }))
      assert.are.same({ { 1, 0 } }, top_i)
      local function sigmoid(z) return 1 / (1 + math.exp(-z)) end
      local sum = sigmoid(1) + sigmoid(2)
      assert.is_true(H.max_abs_diff(top_w, { { 2.826 * sigmoid(1) / sum, 2.826 * sigmoid(2) / sum } }) < 1e-5)
   end)

   it("runs only the experts the router picked: 2 a token in each sparse layer", function()
      local m = models.from_pretrained(DIR)
      local rows = { 0, 0 }
      for i = 2, 3 do
         for _, e in ipairs(m.model.layers[i].mlp.experts) do
            local run = e.forward
            rawset(e, "forward", function(self, x)
               rows[i - 1] = rows[i - 1] + x:size(1)
               return run(self, x)
            end)
         end
      end
      m({ { 7 } })
      assert.are.same({ 2, 2 }, rows)                   -- rows through experts, per sparse layer
   end)

   it("reads transformers' stacked layout and names too (gate_up_proj, down_proj per layer), running 2 experts a token", function()
      local dir = H.copy_with_stacked_experts(DIR, SPARSE, 8, transformers_name)
      local stored = ml.safetensors.load_file(dir .. "/model.safetensors")
      assert.is_not_nil(stored["model.layers.1.mlp.experts.gate_up_proj"])
      local stacked = models.from_pretrained(dir)
      assert.are.same(H.sorted_keys(stored), H.sorted_keys((stacked:state_dict())))
      assert.is_true(H.max_abs_diff(stacked(ids), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, stacked:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      local per_layer = {}
      for i = 2, 3 do
         local experts = stacked.model.layers[i].mlp.experts
         assert.are.equal("StackedExperts", experts.__name)
         per_layer[i - 1] = #H.experts_run(experts, function() stacked({ { 7 } }) end)
      end
      assert.are.same({ 2, 2 }, per_layer)
      H.rmdir(dir)
   end)

   it("leaves out the multi-token-prediction layer stored after the last one, unless num_nextn_predict_layers is 0", function()
      local extra = { ["model.layers.3.eh_proj.weight"] = ml.randn(32, 64),
         ["model.layers.3.mlp.experts.0.gate_proj.weight"] = ml.randn(16, 32) }
      local dir = H.tmpdir()
      H.copy(DIR .. "/config.json", dir .. "/config.json")
      local file = ml.safetensors.load_file(DIR .. "/model.safetensors")
      for k, t in pairs(extra) do file[k] = t end
      ml.safetensors.save_file(file, dir .. "/model.safetensors")
      local m = models.from_pretrained(dir)
      assert.is_nil((m:state_dict())["model.layers.3.eh_proj.weight"])
      assert.is_true(H.max_abs_diff(m(ids), exp.logits) < TOL)
      local raw = H.read_json(dir .. "/config.json")
      raw.num_nextn_predict_layers = 0
      H.write(dir .. "/config.json", require("cjson").encode(raw))
      local ok, err = pcall(models.from_pretrained, dir)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("unexpected keys", 1, true), err)
      assert.truthy(tostring(err):find("model.layers.3.eh_proj.weight", 1, true), err)
      H.rmdir(dir)
   end)

   -- (a CPU budget of 150000 bytes leaves some layers to the disk)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, places = { ["model.layers.1.mlp.experts.5"] = "disk" } })

   describe("config", function()
      it("reads HYV3Config's defaults", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                              "num_experts", "num_experts_per_tok", "num_shared_experts", "moe_intermediate_size",
                              "router_scaling_factor", "enable_moe_fp32_combine", "mlp_layer_types" }) do
            raw[k] = nil
         end
         local cfg = hy_v3.config(raw)
         assert.are.same({ 120832, 4096, 13312, 80, 64, 8, 128, 131072, 1e-5, 11158840 }, { cfg.vocab_size, cfg.hidden_size,
            cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.max_position_embeddings, cfg.rms_norm_eps, cfg.rope_theta })
         assert.are.same({ 192, 8, 1, 1536, 2.826, true, 1 }, { cfg.num_experts, cfg.num_experts_per_tok,
            cfg.num_shared_experts, cfg.moe_intermediate_size, cfg.router_scaling_factor, cfg.enable_moe_fp32_combine,
            cfg.num_nextn_predict_layers })
         assert.is_false(cfg.sparse_layers[1])
         for i = 2, 80 do assert.is_true(cfg.sparse_layers[i], i) end
         assert.is_true(cfg.qk_norm)
         assert.are.same({ false, false }, { cfg.qkv_bias, cfg.o_bias })
      end)

      it("makes a layer dense or sparse as mlp_layer_types says, else the first first_k_dense_replace dense", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.mlp_layer_types = { "sparse", "dense", "sparse" }
         local cfg = hy_v3.config(raw)
         assert.are.same({ true, false, true }, cfg.sparse_layers)
         local m = ml.init_empty_weights(function() return hy_v3.HYV3ForCausalLM(cfg) end)
         assert.are.same({ "HYV3MoE", "HYV3MLP", "HYV3MoE" }, { m.model.layers[1].mlp.__name, m.model.layers[2].mlp.__name,
            m.model.layers[3].mlp.__name })
         raw.mlp_layer_types = nil
         raw.first_k_dense_replace = 2                   -- (the hub's older key)
         assert.are.same({ false, false, true }, hy_v3.config(raw).sparse_layers)
         raw.first_k_dense_replace = 0
         assert.are.same({ true, true, true }, hy_v3.config(raw).sparse_layers)
      end)

      it("reads the hub's expert_hidden_dim without moe_intermediate_size, and num_local_experts", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.moe_intermediate_size, raw.expert_hidden_dim = nil, 24
         raw.num_experts, raw.num_local_experts = nil, 6
         local cfg = hy_v3.config(raw)
         assert.are.same({ 24, 6 }, { cfg.moe_intermediate_size, cfg.num_experts })
      end)

      it("gives the shared experts num_shared_experts experts' width, or intermediate_size for none, as transformers does",
         function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.num_shared_experts = 3
         local block = ml.init_empty_weights(function() return hy_v3.HYV3MoE(hy_v3.config(raw)) end)
         assert.are.equal(48, block.shared_experts.gate_proj.out_features)
         raw.num_shared_experts = 0
         block = ml.init_empty_weights(function() return hy_v3.HYV3MoE(hy_v3.config(raw)) end)
         assert.are.equal(64, block.shared_experts.gate_proj.out_features)
      end)

      it("biases the dense and shared MLPs with mlp_bias, never the routed experts; q, k, v and o with attention_bias",
         function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.mlp_bias, raw.attention_bias = true, true
         local m = ml.init_empty_weights(function() return hy_v3.HYV3ForCausalLM(hy_v3.config(raw)) end)
         local layers = m.model.layers
         assert.is_not_nil(layers[1].mlp.down_proj.bias)
         assert.is_not_nil(layers[2].mlp.shared_experts.up_proj.bias)
         assert.is_nil(layers[2].mlp.experts[1].up_proj.bias)
         assert.is_not_nil(layers[1].self_attn.q_proj.bias)
         assert.is_not_nil(layers[1].self_attn.o_proj.bias)
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(hy_v3.config, DIR, change, msg) end
         fails({ num_experts_per_tok = 9 }, "models.hy_v3: num_experts_per_tok 9 is more than num_experts 8 in config table")
         fails({ num_experts = 0 }, 'models.hy_v3: config key "num_experts" must be an integer >= 1, got 0')
         fails({ num_shared_experts = -1 }, 'models.hy_v3: config key "num_shared_experts" must be an integer >= 0, got -1')
         fails({ moe_intermediate_size = 1.5 }, 'models.hy_v3: config key "moe_intermediate_size" must be an integer >= 1, got 1.5')
         fails({ router_scaling_factor = 0 }, 'models.hy_v3: config key "router_scaling_factor" must be a positive number, got 0')
         fails({ enable_moe_fp32_combine = "yes" }, 'models.hy_v3: config key "enable_moe_fp32_combine" must be a boolean, got yes')
         fails({ mlp_layer_types = { "dense", "sparse" } }, 'models.hy_v3: config key "mlp_layer_types" must list 3 layer types')
         fails({ mlp_layer_types = { "dense", "moe", "sparse" } },
            'models.hy_v3: mlp_layer_types[2] is "moe" (supported: dense, sparse) in config table')
         fails(function(raw) raw.mlp_layer_types, raw.first_k_dense_replace = nil, -1 end,
            'models.hy_v3: config key "first_k_dense_replace" must be an integer >= 0, got -1')
         fails({ num_nextn_predict_layers = -1 }, 'models.hy_v3: config key "num_nextn_predict_layers" must be an integer >= 0')
         fails({ route_norm = false }, 'models.hy_v3: config key "route_norm" is false: transformers\' Hy3 has no such variant')
         fails({ moe_router_use_sigmoid = false }, 'config key "moe_router_use_sigmoid" is false')
         fails({ qk_norm = false }, 'config key "qk_norm" is false')
         fails({ rope_parameters = { rope_type = "dynamic", factor = 2 } }, 'models.hy_v3: rope type "dynamic" is not supported')
         fails({ hidden_size = "32" }, 'models.hy_v3: config key "hidden_size" in config table must be a positive integer, got string "32"')
         fails({ num_attention_heads = 3 }, "models.hy_v3: num_attention_heads 3 is not a multiple of num_key_value_heads 2")
      end)

      it("names the file a bad config.json came from", function()
         H.assert_config_file_fails(hy_v3.config, DIR, { router_scaling_factor = -2 }, '"router_scaling_factor" must be a positive number, got -2')
      end)
   end)
end)
