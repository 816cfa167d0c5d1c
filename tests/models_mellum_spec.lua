-- ml.models Mellum 2 (Qwen3-MoE's attention and sparse block in Laguna's layer plan: layer_types'
-- windows, a rotary table per layer type, mlp_layer_types' dense and sparse layers) against
-- transformers (tests/fixtures/gen_models.py mellum): names, logits, greedy ids with and without the
-- cache, a padded batch, what each particularity does, the multi-token-prediction layer left out, both
-- expert layouts, experts on disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local laguna = require("moonload.models.laguna")
local llama = require("moonload.models.llama")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "mellum_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.mellum (tests/fixtures/models/mellum_tiny: sliding, full, sliding; a dense layer, then 2 of 8 experts)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds MellumForCausalLM with every tensor of the checkpoint but the multi-token-prediction layer", function()
      assert.are.equal("MellumForCausalLM", model.__name)
      assert.are.same({ "MellumDecoderLayer" }, model.no_split_modules)
      local want = {}
      for key in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do
         if not key:find("^mtp%.") then want[key] = true end
      end
      assert.are.same(H.sorted_keys(want), H.sorted_keys((model:state_dict())))
      local dense, sparse = model.model.layers[1], model.model.layers[2]
      assert.are.equal("MellumMLP", dense.mlp.__name)
      assert.are.equal("MellumSparseMoeBlock", sparse.mlp.__name)
      assert.are.same({ 8 }, dense.self_attn.q_norm.weight.shape)
      assert.is_nil(dense.self_attn.g_proj)
      assert.are.same({ 4, false, 4 }, model.config.layer_windows)
      assert.are.same({ 500000, 10000 }, { model.config.rope_theta, model.config.rope_local.rope_theta })
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("needs the windows, each layer type's rotary base and the q/k norms", function()
      local function attentions(m, fn) for _, l in ipairs(m.model.layers) do fn(l.self_attn) end end
      local changes = {
         function(m) attentions(m, function(a) rawset(a, "window", false) end) end,
         function(m) rawset(m.model, "layer_rotary", llama.LlamaModel.layer_rotary) end,   -- (the full layers' for all)
         function(m) attentions(m, function(a) rawset(a, "qk_norm_in_project", true) end) end,   -- (skipped)
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("needs the softmax scores renormalized and two experts a token", function()
      local function sparse(m, fn) for i = 2, 3 do fn(m.model.layers[i].mlp) end end
      local changes = {
         function(m) sparse(m, function(b) rawset(b, "norm_topk_prob", false) end) end,
         function(m) sparse(m, function(b) rawset(b, "top_k", 1) end) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   H.it_reads_stacked_experts({ dir = DIR, prefixes = { "model.layers.1.mlp.experts", "model.layers.2.mlp.experts" }, experts = 8, rename = nil, layer = 3, ids = ids,
      logits = exp.logits, tol = TOL })

   -- (a CPU budget of 150000 bytes leaves some layers to the disk)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, places = { ["model.layers.1.mlp.experts.5"] = "disk" } })

   describe("config", function()
      it("reads MellumConfig's defaults: every layer full and sparse, full layers at base 500000, sliding ones at 10000", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
                              "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                              "layer_types", "mlp_layer_types", "rope_parameters", "rms_norm_eps" }) do
            raw[k] = nil
         end
         local cfg = laguna.mellum_config(raw)
         assert.are.same({ 98304, 2304, 7168, 28, 32, 4, 128, 131072, 1e-6, 500000, 128 }, { cfg.vocab_size, cfg.hidden_size,
            cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.max_position_embeddings, cfg.rms_norm_eps, cfg.rope_theta, cfg.rotary_dim })
         assert.are.same({ 64, 8, 896, true }, { cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
            cfg.norm_topk_prob })
         for i = 1, 28 do
            assert.is_false(cfg.layer_windows[i], i)
            assert.is_true(cfg.sparse_layers[i], i)
         end
         assert.is_true(cfg.qk_norm)
         raw.layer_types = {}
         for i = 1, 28 do raw.layer_types[i] = i % 2 == 1 and "sliding_attention" or "full_attention" end
         cfg = laguna.mellum_config(raw)
         assert.are.same({ 1024, 10000, 128 }, { cfg.layer_windows[1], cfg.rope_local.rope_theta, cfg.local_rotary_dim })
      end)

      it("reads num_experts for num_local_experts", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.num_local_experts, raw.num_experts = nil, 4
         assert.are.equal(4, laguna.mellum_config(raw).num_experts)
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(laguna.mellum_config, DIR, change, msg) end
         fails({ num_experts_per_tok = 9 }, "models.mellum: num_experts_per_tok 9 is more than num_local_experts 8")
         fails({ num_local_experts = 0 }, 'models.mellum: config key "num_local_experts" must be an integer >= 1, got 0')
         fails({ norm_topk_prob = "yes" }, 'models.mellum: config key "norm_topk_prob" must be a boolean, got yes')
         fails({ mlp_layer_types = { "dense", "sparse" } }, 'models.mellum: config key "mlp_layer_types" must list 3 layer types')
         fails({ mlp_layer_types = { "dense", "moe", "sparse" } }, 'models.mellum: mlp_layer_types[2] is "moe" (supported: dense, sparse)')
         fails(function(raw) raw.rope_parameters.full_attention.partial_rotary_factor = 0.5 end,
            'models.mellum: config key "rope_parameters.full_attention.partial_rotary_factor" is 0.5: transformers\' Mellum rotates whole heads only')
         fails(function(raw) raw.rope_parameters.sliding_attention = nil end,
            'models.mellum: config key "rope_parameters.sliding_attention" must be an object')
         fails(function(raw) raw.rope_parameters.full_attention.rope_type = "llama3" end,
            'models.mellum: rope type "llama3" of rope_parameters.full_attention is not supported (supported: default, yarn)')
         fails({ layer_types = { "sliding_attention", "chunked_attention", "full_attention" } },
            'models.mellum: layer_types[2] is "chunked_attention" (supported: full_attention, sliding_attention)')
      end)

      it("names the file a bad config.json came from", function()
         H.assert_config_file_fails(laguna.mellum_config, DIR, { num_experts_per_tok = 0 }, '"num_experts_per_tok" must be an integer >= 1, got 0')
      end)
   end)
end)
