-- ml.models Flint (Qwen3's attention with a sink logit per head; sliding layers that rotate, full
-- ones without position embeddings; dense layers in mlp_only_layers, the others a float32 sigmoid
-- router's renormalized top-k plus an ungated shared expert) against transformers
-- (tests/fixtures/gen_models.py flint): the hub's names, logits, greedy ids with and without the
-- cache, a padded batch, what each particularity does, both expert layouts, experts on disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local flint = require("moonload.models.flint")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "flint_tiny"
local DIR = H.FIX .. "/" .. NAME
local SPARSE = { "model.layers.1.mlp.experts", "model.layers.2.mlp.experts", "model.layers.3.mlp.experts" }

-- transformers' names for the hub's (its conversion mapping's rename)
local function transformers_name(key)
   return (key:gsub("%.self_attn%.softmax_offset$", ".self_attn.sinks"))
end

describe("models.flint (tests/fixtures/models/flint_tiny: full, sliding, sliding, full; a dense layer, then 2 of 8 experts)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)
   local function layers(m, fn) for _, l in ipairs(m.model.layers) do fn(l) end end

   it("builds FlintForCausalLM with every tensor of the checkpoint, the sinks renamed as transformers does", function()
      assert.are.equal("FlintForCausalLM", model.__name)
      assert.are.same({ "FlintDecoderLayer" }, model.no_split_modules)
      local want = {}
      for key in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do want[transformers_name(key)] = true end
      assert.is_true(want["model.layers.3.self_attn.sinks"])
      assert.are.same(H.sorted_keys(want), H.sorted_keys((model:state_dict())))
      local dense, sparse = model.model.layers[1], model.model.layers[2]
      assert.are.equal("FlintAttention", dense.self_attn.__name)
      assert.are.same({ 4 }, dense.self_attn.sinks.shape)
      assert.are.same({ 8 }, dense.self_attn.q_norm.weight.shape)
      assert.are.equal("FlintMLP", dense.mlp.__name)
      assert.are.equal("FlintSparseMoeBlock", sparse.mlp.__name)
      assert.are.equal("FlintTopKRouter", sparse.mlp.gate.__name)
      assert.are.equal(24, sparse.mlp.shared_expert.gate_proj.out_features)
      assert.are.same({ false, true, true, true }, model.config.sparse_layers)
      assert.are.same({ false, 4, 4, false }, model.config.layer_windows)
      assert.are.same({ true, false, false, true }, model.config.nope_layers)
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("needs the sinks, the windows, the full layers without position embedding and the q/k norms", function()
      local changes = {
         function(m) layers(m, function(l) l.self_attn.sinks:fill_(-1e4) end) end,           -- (a sink of nothing)
         function(m) layers(m, function(l) rawset(l.self_attn, "window", false) end) end,
         function(m) layers(m, function(l) rawset(l.self_attn, "nope", false) end) end,
         function(m) layers(m, function(l) rawset(l.self_attn, "qk_norm_in_project", true) end) end,   -- (skipped)
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("needs the sigmoid scores renormalized, two experts a token and the shared expert added in full", function()
      local function sparse(m, fn) for i = 2, 4 do fn(m.model.layers[i].mlp) end end
      local function softmax_route(self, flat)       -- Qwen3-MoE's softmax scores instead
         local w, i = self.gate(flat):softmax(-1):topk(self.top_k, 2)
         return w / w:sum(2, true), i:tolist()
      end
      local changes = {
         function(m) sparse(m, function(b) rawset(b, "norm_topk_prob", false) end) end,
         function(m) sparse(m, function(b) rawset(b, "route", softmax_route) end) end,
         function(m) sparse(m, function(b) rawset(b, "top_k", 1) end) end,
         function(m) sparse(m, function(b) b.shared_expert.down_proj.weight:fill_(0) end) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("keeps the router's weight and the sinks in float32 under bfloat16, as transformers does", function()
      local m = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local layer = m.model.layers[2]
      assert.are.same({ "float32", "float32", "bfloat16" }, { layer.mlp.gate.weight.dtype, layer.self_attn.sinks.dtype,
         layer.self_attn.q_proj.weight.dtype })
      assert.is_true(H.max_abs_diff(m(ids):float(), exp.logits) < 0.5)
   end)

   H.it_reads_stacked_experts({ dir = DIR, prefixes = SPARSE, experts = 8, rename = transformers_name, layer = 3, ids = ids,
      logits = exp.logits, tol = TOL })

   -- (a CPU budget of 150000 bytes leaves some layers to the disk)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, places = { ["model.layers.1.mlp.experts.5"] = "disk" } })

   describe("config", function()
      it("reads FlintConfig's defaults: layers 0 and 1 dense; the first two, every fourth from the second and the last full",
         function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
                              "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts_per_tok", "num_experts",
                              "norm_topk_prob", "mlp_only_layers", "layer_types", "rms_norm_eps", "rope_parameters" }) do
            raw[k] = nil
         end
         local cfg = flint.config(raw)
         assert.are.same({ 150144, 2048, 6144, 49, 32, 4, 128, 262144, 1e-6, 10000 }, { cfg.vocab_size, cfg.hidden_size,
            cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.max_position_embeddings, cfg.rms_norm_eps, cfg.rope_theta })
         assert.are.same({ 256, 6, 512, 1024, true }, { cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
            cfg.shared_expert_intermediate_size, cfg.norm_topk_prob })
         local full = { [1] = true, [2] = true, [49] = true }
         for i = 1, 49 do
            local f = full[i] or (i - 1) % 4 == 1
            assert.are.equal(not f and 513 or false, cfg.layer_windows[i], i)
            assert.are.equal(f, cfg.nope_layers[i], i)
            assert.are.equal(i > 2, cfg.sparse_layers[i], i)
         end
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(flint.config, DIR, change, msg) end
         fails({ num_experts_per_tok = 9 }, "models.flint: num_experts_per_tok 9 is more than num_experts 8")
         fails({ shared_expert_intermediate_size = 0 }, 'models.flint: config key "shared_expert_intermediate_size" must be an integer >= 1, got 0')
         fails({ norm_topk_prob = "yes" }, 'models.flint: config key "norm_topk_prob" must be a boolean, got yes')
         fails({ decoder_sparse_step = 0 }, 'models.flint: config key "decoder_sparse_step" must be an integer >= 1, got 0')
         fails({ sliding_window = -1 }, 'models.flint: config key "sliding_window"')
         fails({ layer_types = { "full_attention" } }, 'models.flint: config key "layer_types" must list 4 layer types')
         fails({ num_attention_heads = 3 }, "models.flint: num_attention_heads 3 is not a multiple of num_key_value_heads 2")
      end)

      it("names the file a bad config.json came from", function()
         H.assert_config_file_fails(flint.config, DIR, { shared_expert_intermediate_size = 0 }, '"shared_expert_intermediate_size" must be an integer >= 1, got 0')
      end)
   end)
end)
