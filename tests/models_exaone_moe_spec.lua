-- ml.models EXAONE MoE (LG's K-EXAONE: EXAONE 4's attention with per-head q/k norms, sliding layers
-- that rotate and full ones without position embedding, in pre-norm layers; a dense first layer, then
-- DeepSeek-V3's routing by groups beside a shared expert) against transformers
-- (tests/fixtures/gen_models.py exaone_moe): names, logits, greedy ids with and without the cache, a
-- padded batch, what each particularity does, both expert layouts, the mtp.* tensors left out,
-- experts on disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local llama = require("moonload.models.llama")
local exaone_moe = require("moonload.models.exaone_moe")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "exaone_moe_tiny"
local DIR = H.FIX .. "/" .. NAME
local SPARSE = { "model.layers.1.mlp.experts", "model.layers.2.mlp.experts", "model.layers.3.mlp.experts" }

-- transformers' name for the hub's bias (its conversion mapping's rename)
local function transformers_name(key)
   return (key:gsub("%.mlp%.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias"))
end

describe("models.exaone_moe (tests/fixtures/models/exaone_moe_tiny: a dense layer, then 2 of 8 experts in groups and a shared one)",
   function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds ExaoneMoeForCausalLM with every tensor of the checkpoint, the hub's bias renamed as transformers does", function()
      assert.are.equal("ExaoneMoeForCausalLM", model.__name)
      assert.are.same({ "ExaoneMoeDecoderLayer" }, model.no_split_modules)
      local want = {}
      for key in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do want[transformers_name(key)] = true end
      assert.is_true(want["model.layers.1.mlp.gate.e_score_correction_bias"] and want["model.layers.3.mlp.experts.7.up_proj.weight"])
      assert.are.same(H.sorted_keys(want), H.sorted_keys((model:state_dict())))
      local dense, sparse = model.model.layers[1], model.model.layers[2]
      assert.are.equal("ExaoneMoeAttention", dense.self_attn.__name)
      assert.are.same({ 8 }, dense.self_attn.q_norm.weight.shape)               -- (one head's dims)
      assert.is_nil(dense.self_attn.q_proj.bias)
      assert.is_nil(dense.post_feedforward_layernorm)                             -- (EXAONE 4's norm after the MLP)
      assert.are.equal("ExaoneMoeMLP", dense.mlp.__name)
      assert.are.equal(64, dense.mlp.gate_proj.out_features)
      assert.are.equal("ExaoneMoeSparseMoEBlock", sparse.mlp.__name)
      assert.are.equal("ModuleList", sparse.mlp.experts.__name)
      assert.are.equal(16, sparse.mlp.experts[8].gate_proj.out_features)
      assert.are.equal(16, sparse.mlp.shared_experts.gate_proj.out_features)   -- 1 shared expert of 16
      assert.are.same({ false, true, true, true }, model.config.sparse_layers)
      assert.are.same({ 4, false, 4, false }, model.config.layer_windows)
      assert.are.same({ false, true, false, true }, model.config.nope_layers)
      assert.are.same({ 2, 4, 2, 2.5, true }, { sparse.mlp.top_k, sparse.mlp.n_group, sparse.mlp.topk_group,
         sparse.mlp.routed_scaling_factor, sparse.mlp.norm_topk_prob })
   end)

   H.it_matches_expected(model, NAME, " (8-token prompts past the 4-token window)")

   H.it_matches_padded(model, NAME, "positions and windows")

   it("keeps the router's weight and the correction bias in float32 under bfloat16, as transformers does", function()
      local m = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local block = m.model.layers[2].mlp
      assert.are.same({ "float32", "float32", "bfloat16" },
         { block.gate.weight.dtype, block.gate.e_score_correction_bias.dtype, block.experts[1].gate_proj.weight.dtype })
      assert.is_true(H.max_abs_diff(m(ids):float(), exp.logits) < 0.5)
   end)

   it("needs NoPE full layers, the window on the sliding ones, per-head q/k norms and norms before attention and MLP", function()
      local function attentions(m, fn) for _, l in ipairs(m.model.layers) do fn(l.self_attn) end end
      local changes = {
         function(m) for _, i in ipairs({ 2, 4 }) do rawset(m.model.layers[i].self_attn, "nope", false) end end,
         function(m) for _, i in ipairs({ 1, 3 }) do rawset(m.model.layers[i].self_attn, "window", false) end end,
         function(m) attentions(m, function(a) rawset(a, "qk_norm_in_project", true) end) end,   -- (skipped)
         function(m)                                  -- EXAONE 4's layer: norms after attention and MLP
            for _, l in ipairs(m.model.layers) do
               rawset(l, "post_feedforward_layernorm", l.input_layernorm)
               rawset(l, "forward", llama.Olmo2DecoderLayer.forward)
            end
         end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("needs the correction bias, the groups, renormalization, routed_scaling_factor, two experts a token and the shared expert",
      function()
      local function sparse(m, fn) for i = 2, 4 do fn(m.model.layers[i].mlp) end end
      local changes = {
         function(m) sparse(m, function(b) b.gate.e_score_correction_bias:fill_(0) end) end,
         function(m) sparse(m, function(b) rawset(b, "topk_group", 4) end) end,             -- (every group allowed)
         function(m) sparse(m, function(b) rawset(b, "norm_topk_prob", false) end) end,
         function(m) sparse(m, function(b) rawset(b, "routed_scaling_factor", 1) end) end,
         function(m) sparse(m, function(b) rawset(b, "top_k", 1) end) end,
         function(m) sparse(m, function(b) b.shared_experts.down_proj.weight:fill_(0) end) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("picks within the 2 groups whose best two score highest, by score + bias, weighing by the scores alone", function()
      local block = exaone_moe.ExaoneMoeSparseMoEBlock(model.config)
      block.gate.weight:fill_(0)                         -- every score sigmoid(0) = 0.5
      -- groups {0,1} {2,3} {4,5} {6,7} sum to 1.0, 1.2, 1.1, 1.0: expert 0 chooses best alone, but
      -- its group is left out
      block.gate.e_score_correction_bias:copy_(ml.tensor({ 0.4, -0.4, 0.1, 0.1, 0.05, 0.05, 0, 0 }))
      local top_w, top_i = block:route(ml.zeros(1, 32))
      assert.are.same({ { 2, 3 } }, top_i)
      assert.is_true(H.max_abs_diff(top_w, { { 1.25, 1.25 } }) < 1e-6)    -- 0.5 / (0.5 + 0.5) x 2.5
   end)

   it("runs only the experts the router picked: 2 a token in each sparse layer", function()
      local m = models.from_pretrained(DIR)
      local rows = { 0, 0, 0 }
      for i = 2, 4 do
         for _, e in ipairs(m.model.layers[i].mlp.experts) do
            local run = e.forward
            rawset(e, "forward", function(self, x)
               rows[i - 1] = rows[i - 1] + x:size(1)
               return run(self, x)
            end)
         end
      end
      m({ { 7 } })
      assert.are.same({ 2, 2, 2 }, rows)                -- rows through experts, per sparse layer
   end)

   it("reads transformers' stacked layout and names too (gate_up_proj, down_proj, gate.e_score_correction_bias)", function()
      local dir = H.copy_with_stacked_experts(DIR, SPARSE, 8, transformers_name)
      local stored = ml.safetensors.load_file(dir .. "/model.safetensors")
      assert.is_not_nil(stored["model.layers.1.mlp.experts.gate_up_proj"])
      assert.is_not_nil(stored["model.layers.1.mlp.gate.e_score_correction_bias"])
      local stacked = models.from_pretrained(dir)
      assert.are.same(H.sorted_keys(stored), H.sorted_keys((stacked:state_dict())))
      assert.is_true(H.max_abs_diff(stacked(ids), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, stacked:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      local per_layer = {}
      for i = 2, 4 do
         local experts = stacked.model.layers[i].mlp.experts
         assert.are.equal("StackedExperts", experts.__name)
         per_layer[i - 1] = #H.experts_run(experts, function() stacked({ { 7 } }) end)
      end
      assert.are.same({ 2, 2, 2 }, per_layer)
      H.rmdir(dir)
   end)

   it("leaves out the multi-token-prediction tensors (mtp.*), as transformers does, and nothing else", function()
      local dir = H.tmpdir()
      H.copy(DIR .. "/config.json", dir .. "/config.json")
      local file = ml.safetensors.load_file(DIR .. "/model.safetensors")
      file["mtp.layers.0.eh_proj.weight"] = ml.randn(32, 64)
      file["mtp.layers.0.mlp.experts.0.gate_proj.weight"] = ml.randn(16, 32)
      ml.safetensors.save_file(file, dir .. "/model.safetensors")
      local m = models.from_pretrained(dir)
      assert.is_true(H.max_abs_diff(m(ids), exp.logits) < TOL)
      file["model.layers.4.eh_proj.weight"] = ml.randn(32, 64)     -- (transformers keeps no other name out)
      ml.safetensors.save_file(file, dir .. "/model.safetensors")
      local ok, err = pcall(models.from_pretrained, dir)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("unexpected keys", 1, true), err)
      assert.truthy(tostring(err):find("model.layers.4.eh_proj.weight", 1, true), err)
      assert.falsy(tostring(err):find("mtp.layers", 1, true), err)
      H.rmdir(dir)
   end)

   -- (a CPU budget of 150000 bytes leaves some layers to the disk)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, places = { ["model.layers.1.mlp.experts.5"] = "disk" } })

   describe("config", function()
      it("reads ExaoneMoeConfig's defaults: a 4096-token window on 3 layers of every 4, the first layer dense", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                              "sliding_window", "sliding_window_pattern", "layer_types", "mlp_layer_types",
                              "first_k_dense_replace", "num_experts", "num_experts_per_tok", "num_shared_experts",
                              "moe_intermediate_size", "routed_scaling_factor", "norm_topk_prob", "n_group", "topk_group" }) do
            raw[k] = nil
         end
         local cfg = exaone_moe.config(raw)
         assert.are.same({ 102400, 4096, 16384, 32, 32, 32, 128, 2048, 1e-5, 10000 }, { cfg.vocab_size, cfg.hidden_size,
            cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.max_position_embeddings, cfg.rms_norm_eps, cfg.rope_theta })
         assert.are.same({ 64, 8, 1, 1024, 2.5, true, 1, 1 }, { cfg.n_routed_experts, cfg.num_experts_per_tok,
            cfg.n_shared_experts, cfg.moe_intermediate_size, cfg.routed_scaling_factor, cfg.norm_topk_prob, cfg.n_group,
            cfg.topk_group })
         for i = 1, 32 do
            assert.are.equal(i % 4 ~= 0 and 4096 or false, cfg.layer_windows[i], i)
            assert.are.equal(i % 4 == 0, cfg.nope_layers[i], i)
            assert.are.equal(i > 1, cfg.sparse_layers[i], i)
         end
         assert.is_true(cfg.qk_norm)
         assert.are.same({ false, false, false, false }, { cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.tie_word_embeddings })
         raw.num_attention_heads = 64                   -- (32 key/value heads whatever the query heads, not as many)
         assert.are.equal(32, exaone_moe.config(raw).num_key_value_heads)
      end)

      it("reads the hub's files: layer_types beside a string sliding_window_pattern, is_moe_layer ignored as transformers does",
         function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.sliding_window_pattern = "LLLG"
         raw.layer_types = { "sliding_attention", "sliding_attention", "sliding_attention", "full_attention" }
         raw.mlp_layer_types, raw.is_moe_layer = nil, { false, false, true, true }
         local cfg = exaone_moe.config(raw)
         assert.are.same({ 4, 4, 4, false }, cfg.layer_windows)
         assert.are.same({ false, false, false, true }, cfg.nope_layers)
         assert.are.same({ false, true, true, true }, cfg.sparse_layers)     -- (from first_k_dense_replace)
         H.assert_config_fails(exaone_moe.config, DIR, function(r) r.sliding_window_pattern, r.layer_types = "LLLG", nil end,
            'models.exaone_moe: config key "sliding_window_pattern" must be a positive integer without "layer_types", got LLLG')
      end)

      it("makes a layer dense or sparse as mlp_layer_types says, else the first first_k_dense_replace dense", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.mlp_layer_types = { "sparse", "dense", "sparse", "dense" }
         local cfg = exaone_moe.config(raw)
         assert.are.same({ true, false, true, false }, cfg.sparse_layers)
         local m = ml.init_empty_weights(function() return exaone_moe.ExaoneMoeForCausalLM(cfg) end)
         assert.are.same({ "ExaoneMoeSparseMoEBlock", "ExaoneMoeMLP" }, { m.model.layers[1].mlp.__name,
            m.model.layers[2].mlp.__name })
         raw.mlp_layer_types, raw.first_k_dense_replace = nil, 3
         assert.are.same({ false, false, false, true }, exaone_moe.config(raw).sparse_layers)
         raw.first_k_dense_replace, raw.moe_layer_freq = 0, 2                  -- (DeepSeek's key: not EXAONE's)
         assert.are.same({ true, true, true, true }, exaone_moe.config(raw).sparse_layers)
      end)

      it("reads num_experts and num_shared_experts alone, as transformers does, whatever DeepSeek's keys say", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.n_routed_experts, raw.n_shared_experts = 4, 3
         local cfg = exaone_moe.config(raw)
         assert.are.same({ 8, 1 }, { cfg.n_routed_experts, cfg.n_shared_experts })
         raw.num_shared_experts = 2
         local block = ml.init_empty_weights(function() return exaone_moe.ExaoneMoeSparseMoEBlock(exaone_moe.config(raw)) end)
         assert.are.equal(32, block.shared_experts.gate_proj.out_features)    -- 2 x moe_intermediate_size
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(exaone_moe.config, DIR, change, msg) end
         fails({ num_experts_per_tok = 9 }, "models.exaone_moe: num_experts_per_tok 9 is more than num_experts 8 in config table")
         fails({ num_experts = 0 }, 'models.exaone_moe: config key "num_experts" must be an integer >= 1, got 0')
         fails({ n_group = 3 }, "models.exaone_moe: num_experts 8 does not split into n_group 3 groups of 2 experts or more")
         fails({ n_group = 8, topk_group = 2 }, "num_experts 8 does not split into n_group 8 groups of 2 experts or more")
         fails({ topk_group = 5 }, "models.exaone_moe: topk_group 5 is more than n_group 4 in config table")
         fails({ topk_group = 1, num_experts_per_tok = 3 }, "topk_group 1 groups of 2 experts hold fewer than num_experts_per_tok 3")
         fails({ num_shared_experts = -1 }, 'models.exaone_moe: config key "num_shared_experts" must be an integer >= 0, got -1')
         fails({ moe_intermediate_size = 1.5 }, 'config key "moe_intermediate_size" must be an integer >= 1, got 1.5')
         fails({ routed_scaling_factor = 0 }, 'models.exaone_moe: config key "routed_scaling_factor" must be a positive number, got 0')
         fails({ mlp_layer_types = { "dense", "sparse" } }, 'models.exaone_moe: config key "mlp_layer_types" must list 4 layer types')
         fails({ mlp_layer_types = { "dense", "moe", "sparse", "sparse" } },
            'models.exaone_moe: mlp_layer_types[2] must be "dense" or "sparse", got moe in config table')
         fails(function(raw) raw.mlp_layer_types, raw.first_k_dense_replace = nil, -1 end,
            'models.exaone_moe: config key "first_k_dense_replace" must be an integer >= 0, got -1')
         fails({ sliding_window = 0 }, 'models.exaone_moe: config key "sliding_window" in config table must be a positive integer')
         fails({ layer_types = { "sliding_attention", "chunked_attention", "sliding_attention", "full_attention" } },
            'models.exaone_moe: layer_types[2] is "chunked_attention" (supported: full_attention, sliding_attention)')
         fails({ rope_parameters = { rope_type = "dynamic", factor = 2 } }, 'models.exaone_moe: rope type "dynamic" is not supported')
         fails({ hidden_size = "32" }, 'models.exaone_moe: config key "hidden_size" in config table must be a positive integer, got string "32"')
         fails({ num_attention_heads = 3 }, "models.exaone_moe: num_attention_heads 3 is not a multiple of num_key_value_heads 2")
      end)

      it("names the file a bad config.json came from", function()
         local dir = H.tmpdir()
         local raw = H.read_json(DIR .. "/config.json")
         raw.num_experts_per_tok = 12
         H.write(dir .. "/config.json", require("cjson").encode(raw))
         H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
         local ok, err = pcall(exaone_moe.config, dir)
         assert.is_false(ok)
         assert.truthy(tostring(err):find("num_experts_per_tok 12 is more than num_experts 8 in " .. dir .. "/config.json", 1, true), err)
         ok, err = pcall(models.from_pretrained, dir)
         assert.is_false(ok)
         assert.truthy(tostring(err):find("models.exaone_moe: num_experts_per_tok 12", 1, true), err)
         H.rmdir(dir)
      end)
   end)
end)
