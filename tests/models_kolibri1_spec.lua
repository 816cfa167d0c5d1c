-- ml.models Kolibri-1 (EXAONE 4's attention: per-head q/k norms, sliding layers that rotate and full
-- ones without position embeddings; GLM-4's four norms a layer; every layer sparse: a float32 router
-- choosing by logit + e_score_correction_bias, weighing by the chosen logits' sigmoids, beside a
-- shared MLP) against transformers (tests/fixtures/gen_models.py kolibri1): the hub's names, logits,
-- greedy ids with and without the cache, a padded batch, what each particularity does, both expert
-- layouts, experts on disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local kolibri1 = require("moonload.models.kolibri1")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "kolibri1_tiny"
local DIR = H.FIX .. "/" .. NAME
local EXPERTS = { "model.layers.0.mlp.experts", "model.layers.1.mlp.experts", "model.layers.2.mlp.experts" }

-- transformers' names for the hub's (its conversion mapping's renames)
local function transformers_name(key)
   return (key:gsub("%.moe%.router%.expert_bias$", ".mlp.gate.e_score_correction_bias")
      :gsub("%.post_attn_norm%.", ".post_self_attn_layernorm."):gsub("%.post_ffn_norm%.", ".post_mlp_layernorm."))
end

describe("models.kolibri1 (tests/fixtures/models/kolibri1_tiny: sliding, full, sliding; 2 of 8 experts and a shared MLP)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)
   local function layers(m, fn) for _, l in ipairs(m.model.layers) do fn(l) end end

   it("builds Kolibri1ForCausalLM with every tensor of the checkpoint, the hub's names renamed as transformers does", function()
      assert.are.equal("Kolibri1ForCausalLM", model.__name)
      assert.are.same({ "Kolibri1DecoderLayer" }, model.no_split_modules)
      local want = {}
      for key in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do want[transformers_name(key)] = true end
      assert.is_true(want["model.layers.2.mlp.gate.e_score_correction_bias"] and want["model.layers.0.post_mlp_layernorm.weight"])
      assert.are.same(H.sorted_keys(want), H.sorted_keys((model:state_dict())))
      local layer = model.model.layers[1]
      assert.are.equal("Kolibri1SparseMoeBlock", layer.mlp.__name)
      assert.are.equal("Kolibri1TopKRouter", layer.mlp.gate.__name)
      assert.are.equal(24, layer.mlp.shared_experts.gate_proj.out_features)
      assert.are.equal(16, layer.mlp.experts[8].gate_proj.out_features)
      assert.are.same({ 8 }, layer.self_attn.q_norm.weight.shape)
      assert.are.same({ 4, false, 4 }, model.config.layer_windows)
      assert.are.same({ false, true, false }, model.config.nope_layers)
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("needs the windows, the full layer without position embedding, the q/k norms and the norms after each block", function()
      local changes = {
         function(m) layers(m, function(l) rawset(l.self_attn, "window", false) end) end,
         function(m) rawset(m.model.layers[2].self_attn, "nope", false) end,
         function(m) layers(m, function(l) rawset(l.self_attn, "qk_norm_in_project", true) end) end,     -- (skipped)
         function(m) layers(m, function(l) rawset(l, "forward", require("moonload.models.llama").LlamaDecoderLayer.forward) end) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("needs the bias on the logits (not on their sigmoids), renormalization, two experts a token and the shared MLP", function()
      local function on_sigmoids(self, flat)          -- MiniMax-M2's choice: sigmoid(logit) + bias
         return require("moonload.models.moe").biased_sigmoid_route(self.gate(flat), self.gate.e_score_correction_bias,
            self.top_k, true, 0)
      end
      local changes = {
         function(m) layers(m, function(l) l.mlp.gate.e_score_correction_bias:fill_(0) end) end,
         function(m) layers(m, function(l) rawset(l.mlp, "route", on_sigmoids) end) end,
         function(m) layers(m, function(l) rawset(l.mlp, "norm_topk_prob", false) end) end,
         function(m) layers(m, function(l) rawset(l.mlp, "top_k", 1) end) end,
         function(m) layers(m, function(l) l.mlp.shared_experts.down_proj.weight:fill_(0) end) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("routes by logit + bias, weighing by the chosen logits' sigmoids over their sum", function()
      local block = model.model.layers[1].mlp
      local flat = ml.randn(5, 32)
      local top_w, top_i = block:route(flat)
      local logits = block.gate(flat):tolist()
      local bias = block.gate.e_score_correction_bias:tolist()
      local function sigmoid(z) return 1 / (1 + math.exp(-z)) end
      for n, row in ipairs(top_i) do
         local order = {}
         for e = 1, 8 do order[e] = e end
         table.sort(order, function(a, b) return logits[n][a] + bias[a] > logits[n][b] + bias[b] end)
         assert.are.same({ order[1] - 1, order[2] - 1 }, row)
         local s1, s2 = sigmoid(logits[n][order[1]]), sigmoid(logits[n][order[2]])
         assert.is_true(H.max_abs_diff(top_w:narrow(1, n, 1), { { s1 / (s1 + s2), s2 / (s1 + s2) } }) < 1e-6)
      end
   end)

   it("keeps the correction bias in float32 under bfloat16, as transformers does", function()
      local m = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local block = m.model.layers[1].mlp
      assert.are.same({ "float32", "bfloat16" }, { block.gate.e_score_correction_bias.dtype, block.gate.weight.dtype })
      assert.is_true(H.max_abs_diff(m(ids):float(), exp.logits) < 0.5)
   end)

   H.it_reads_stacked_experts({ dir = DIR, prefixes = EXPERTS, experts = 8, rename = transformers_name, layer = 2, ids = ids,
      logits = exp.logits, tol = TOL })

   -- (a CPU budget of 150000 bytes leaves some layers to the disk)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, places = { ["model.layers.0.mlp.experts.5"] = "disk" } })

   describe("config", function()
      it("reads Kolibri1Config's defaults, every fifth layer full", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                              "head_dim", "max_position_embeddings", "sliding_window", "moe_intermediate_size",
                              "shared_expert_intermediate_size", "num_experts_per_tok", "num_local_experts", "norm_topk_prob",
                              "layer_types", "rms_norm_eps", "rope_parameters" }) do
            raw[k] = nil
         end
         local cfg = kolibri1.config(raw)
         assert.are.same({ 128000, 2560, 50, 48, 4, 128, 262144, 1e-6, 10000 }, { cfg.vocab_size, cfg.hidden_size,
            cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.max_position_embeddings,
            cfg.rms_norm_eps, cfg.rope_theta })
         assert.are.same({ 384, 6, 512, 512, false }, { cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
            cfg.shared_expert_intermediate_size, cfg.norm_topk_prob })
         for i = 1, 50 do
            assert.are.equal(i % 5 ~= 0 and 513 or false, cfg.layer_windows[i], i)
            assert.are.equal(i % 5 == 0, cfg.nope_layers[i], i)
         end
         assert.is_true(cfg.qk_norm)
      end)

      it("reads num_experts for num_local_experts", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.num_local_experts, raw.num_experts = nil, 4
         assert.are.equal(4, kolibri1.config(raw).num_experts)
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(kolibri1.config, DIR, change, msg) end
         fails({ num_experts_per_tok = 9 }, "models.kolibri1: num_experts_per_tok 9 is more than num_local_experts 8 in config table")
         fails({ num_local_experts = 0 }, 'models.kolibri1: config key "num_local_experts" must be an integer >= 1, got 0')
         fails({ shared_expert_intermediate_size = 0 }, 'models.kolibri1: config key "shared_expert_intermediate_size" must be an integer >= 1, got 0')
         fails({ moe_intermediate_size = 1.5 }, 'models.kolibri1: config key "moe_intermediate_size" must be an integer >= 1, got 1.5')
         fails({ norm_topk_prob = 1 }, 'models.kolibri1: config key "norm_topk_prob" must be a boolean, got 1')
         fails({ sliding_window = 0 }, 'models.kolibri1: config key "sliding_window"')
         fails({ layer_types = { "sliding_attention", "full_attention" } }, 'models.kolibri1: config key "layer_types" must list 3 layer types')
         fails({ layer_types = { "sliding_attention", "chunked_attention", "full_attention" } },
            'models.kolibri1: layer_types[2] is "chunked_attention" (supported: full_attention, sliding_attention)')
         fails({ num_attention_heads = 3 }, "models.kolibri1: num_attention_heads 3 is not a multiple of num_key_value_heads 2")
      end)

      it("names the file a bad config.json came from", function()
         H.assert_config_file_fails(kolibri1.config, DIR, { num_experts_per_tok = 0 }, '"num_experts_per_tok" must be an integer >= 1, got 0')
      end)
   end)
end)
