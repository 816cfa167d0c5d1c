-- ml.models A.X-K1 (DeepSeek-V3's latent attention through a query bottleneck, V3's grouped sigmoid
-- routing beside a shared expert, an RMSNorm over each sparse block's output) against transformers
-- (tests/fixtures/gen_models.py axk1), from the released checkpoints' layout (the norm at the layer
-- level, the dense layer's too, no correction bias): names, logits, greedy ids with and without the
-- cache, a padded batch, both ways of attending, what each particularity does, experts on disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local deepseek = require("moonload.models.deepseek")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "axk1_tiny"
local DIR = H.FIX .. "/" .. NAME

-- A copy of the fixture with extra tensors in its checkpoint.
local function with_tensors(extra)
   local dir = H.tmpdir()
   H.copy(DIR .. "/config.json", dir .. "/config.json")
   local file = ml.safetensors.load_file(DIR .. "/model.safetensors")
   for k, t in pairs(extra) do file[k] = t end
   ml.safetensors.save_file(file, dir .. "/model.safetensors")
   return dir
end

describe("models.axk1 (tests/fixtures/models/axk1_tiny: a dense layer, then 2 of 8 experts in 4 groups, normed)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds AXK1ForCausalLM from the released layout: the sparse layers' norms moved into their blocks, the dense one's left out",
      function()
      assert.are.equal("AXK1ForCausalLM", model.__name)
      assert.are.same({ "AXK1DecoderLayer" }, model.no_split_modules)
      local want = {}
      for key in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do
         if key ~= "model.layers.0.post_mlp_layernorm.weight" then
            want[(key:gsub("%.post_mlp_layernorm%.", ".mlp.post_mlp_layernorm."))] = true
         end
      end
      assert.is_true(want["model.layers.2.mlp.post_mlp_layernorm.weight"])
      assert.are.same(H.sorted_keys(want), H.sorted_keys((model:state_dict())))
      local dense, sparse = model.model.layers[1], model.model.layers[2]
      assert.are.equal("AXK1MLP", dense.mlp.__name)
      assert.are.equal("AXK1MoE", sparse.mlp.__name)
      assert.is_not_nil(sparse.self_attn.q_a_proj)
      assert.is_nil(sparse.mlp.gate.e_score_correction_bias)             -- (the released checkpoints have none)
      assert.are.same({ false, true, true }, model.config.sparse_layers)
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   H.it_attends_both_ways(model, NAME)

   it("needs the norm over the sparse blocks' output, the groups and the shared expert", function()
      local function sparse(m, fn) for i = 2, 3 do fn(m.model.layers[i].mlp) end end
      local changes = {
         function(m) sparse(m, function(b) rawset(b, "forward", deepseek.DeepseekMoE.forward) end) end,
         function(m) sparse(m, function(b) rawset(b, "topk_group", 4) end) end,
         function(m) sparse(m, function(b) b.shared_experts.down_proj.weight:fill_(0) end) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("loads and routes by a correction bias when the checkpoint has one (zeros: the same logits)", function()
      for _, case in ipairs({ { ml.zeros(8), false }, { ml.randn(8) * 0.3, true } }) do
         local dir = with_tensors({ ["model.layers.1.mlp.gate.e_score_correction_bias"] = case[1],
            ["model.layers.2.mlp.gate.e_score_correction_bias"] = case[1] })
         local m = models.from_pretrained(dir)
         assert.are.equal("float32", m.model.layers[2].mlp.gate.e_score_correction_bias.dtype)
         assert.are.equal(case[2], H.max_abs_diff(m(ids), exp.logits) > 1e-3)
         H.rmdir(dir)
      end
   end)

   -- (a CPU budget of 150000 bytes leaves some layers to the disk)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, places = { ["model.layers.1.mlp.experts.3"] = "disk" } })

   describe("config", function()
      it("reads AXK1Config's defaults (DeepSeek-V3's where it has none)", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "n_shared_experts", "n_routed_experts", "q_lora_rank", "kv_lora_rank",
                              "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
                              "num_experts_per_tok", "routed_scaling_factor", "max_position_embeddings", "mlp_layer_types",
                              "rope_parameters" }) do
            raw[k] = nil
         end
         local cfg = deepseek.axk1_config(raw)
         assert.are.same({ 163840, 7168, 18432, 2048, 61, 64, 32768 }, { cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size,
            cfg.moe_intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.max_position_embeddings })
         assert.are.same({ 1, 192, 8, 4, 8, 2.5, true }, { cfg.n_shared_experts, cfg.n_routed_experts, cfg.n_group,
            cfg.topk_group, cfg.num_experts_per_tok, cfg.routed_scaling_factor, cfg.norm_topk_prob })
         assert.are.same({ 1536, 512, 64, 128, 128 }, { cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
            cfg.v_head_dim, cfg.qk_nope_head_dim })
         assert.is_false(cfg.sparse_layers[1])
         for i = 2, 61 do assert.is_true(cfg.sparse_layers[i], i) end
      end)

      it("makes layers dense or sparse by mlp_layer_types, else by first_k_dense_replace and moe_layer_freq", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.mlp_layer_types = { "sparse", "dense", "sparse" }
         assert.are.same({ true, false, true }, deepseek.axk1_config(raw).sparse_layers)
         raw.mlp_layer_types, raw.first_k_dense_replace, raw.moe_layer_freq = nil, 0, 2
         assert.are.same({ true, false, true }, deepseek.axk1_config(raw).sparse_layers)
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(deepseek.axk1_config, DIR, change, msg) end
         fails({ num_experts_per_tok = 9 }, "models.axk1: num_experts_per_tok 9 is more than n_routed_experts 8")
         fails({ topk_group = 5 }, "models.axk1: topk_group 5 is more than n_group 4")
         fails({ q_lora_rank = 0 }, 'models.axk1: config key "q_lora_rank" must be an integer >= 1, got 0')
         fails({ mlp_layer_types = { "dense", "moe", "sparse" } }, 'models.axk1: mlp_layer_types[2] must be "dense" or "sparse", got moe')
         fails({ routed_scaling_factor = -1 }, 'models.axk1: config key "routed_scaling_factor" must be a positive number, got -1')
      end)
   end)
end)
