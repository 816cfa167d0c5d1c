-- ml.models A.X-K2 (DeepSeek-V3.2's sparse attention whose queries and an output gate come from one
-- fused q_gate_proj over the normed and raw query latents, gated RMSNorms, V3's experts) against
-- transformers (tests/fixtures/gen_models.py axk2), from the hub's layout (q_b_proj, W_down, W_up):
-- names, logits, greedy ids with and without the cache, a padded batch, both ways of attending,
-- what each particularity does, experts on disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local axk2 = require("moonload.models.axk2")
local H = require("models_helpers")

local NAME = "axk2_tiny"
local DIR = H.FIX .. "/" .. NAME

-- A hub tensor's name in transformers' model.
local function transformers_name(key)
   key = key:gsub("%.self_attn%.q_b_proj%.", ".self_attn.q_gate_proj."):gsub("%.W_down%.", ".mlp.fc1.")
   return (key:gsub("%.W_up%.", ".mlp.fc2."))
end

describe("models.axk2 (tests/fixtures/models/axk2_tiny: indexers keeping 4 keys, gated queries and norms, a dense layer, "
   .. "then 3 of 8 experts in 4 groups)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds AXK2ForCausalLM from the hub's names: q_b_proj as q_gate_proj, W_down and W_up as the gates' fc1 and fc2",
      function()
      assert.are.equal("AXK2ForCausalLM", model.__name)
      assert.are.same({ "AXK2DecoderLayer" }, model.no_split_modules)
      local want = {}
      for key in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do want[transformers_name(key)] = true end
      assert.is_true(want["model.layers.0.self_attn.q_gate_proj.weight"])
      assert.is_true(want["model.layers.1.post_attention_layernorm.mlp.fc2.weight"])
      assert.are.same(H.sorted_keys(want), H.sorted_keys((model:state_dict())))
      local dense, sparse = model.model.layers[1], model.model.layers[2]
      assert.are.equal("AXK2GatedRMSNorm", dense.input_layernorm.__name)
      assert.are.equal("RMSNorm", dense.post_attention_layernorm.__name)     -- (gated on the sparse layers only)
      assert.are.equal("AXK2GatedRMSNorm", sparse.post_attention_layernorm.__name)
      assert.are.equal("AXK2MoE", sparse.mlp.__name)
      assert.is_nil(sparse.self_attn.q_b_proj)
      assert.are.same({ 144, 48 }, sparse.self_attn.q_gate_proj.weight.shape)
      assert.are.same({ false, true, true }, model.config.sparse_layers)
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions and the chosen keys")

   H.it_attends_both_ways(model, NAME)

   it("needs the output gate, the raw latent beside the normed one, the norms' gates and the groups", function()
      local function layers(m, fn) for i = 1, 3 do fn(m.model.layers[i]) end end
      local changes = {
         -- the gate's half of q_gate_proj at zero: every head's output halved instead of gated
         function(m) layers(m, function(l)
            local w = l.self_attn.q_gate_proj.weight
            for h = 0, 3 do w:narrow(1, h * 36 + 25, 12):fill_(0) end
         end) end,
         function(m) layers(m, function(l) l.self_attn.q_gate_proj.weight:narrow(2, 25, 24):fill_(0) end) end,
         function(m) layers(m, function(l) l.input_layernorm.mlp.fc2.weight:fill_(0) end) end,
         function(m) for i = 2, 3 do m.model.layers[i].post_attention_layernorm.mlp.fc2.weight:fill_(0) end end,
         function(m) for i = 2, 3 do rawset(m.model.layers[i].mlp, "topk_group", 4) end end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("reads transformers' stacked layout too (gate_up_proj, down_proj per layer), running 3 experts a token", function()
      local dir = H.copy_with_stacked_experts(DIR, { "model.layers.1.mlp.experts", "model.layers.2.mlp.experts" }, 8,
         transformers_name)
      local stacked = models.from_pretrained(dir)
      assert.is_true(H.max_abs_diff(stacked(ids), exp.logits) < 1e-4)
      local experts = stacked.model.layers[2].mlp.experts
      assert.are.equal("StackedExperts", experts.__name)
      assert.are.equal(3, #H.experts_run(experts, function() stacked({ { 7 } }) end))
      H.rmdir(dir)
   end)

   it("runs in bfloat16, the router's weight and correction bias kept in float32 as transformers keeps them", function()
      local m = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local layer = m.model.layers[2]
      assert.are.same({ "float32", "float32", "bfloat16", "bfloat16" }, { layer.mlp.gate.weight.dtype,
         layer.mlp.gate.e_score_correction_bias.dtype, layer.self_attn.q_gate_proj.weight.dtype,
         layer.input_layernorm.mlp.fc1.weight.dtype })
      assert.is_true(H.max_abs_diff(m(ids):float(), exp.logits) < 0.5)
   end)

   -- (a CPU budget of 300000 bytes leaves some layers to the disk)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 300000, places = { ["model.layers.1.mlp.experts.3"] = "disk" } })

   describe("config", function()
      it("reads AXK2Config's defaults: A.X-K2-Light's, routing without groups (one group)", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts",
                              "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group",
                              "topk_group", "num_experts_per_tok", "routed_scaling_factor", "max_position_embeddings",
                              "mlp_layer_types", "rope_parameters", "index_topk", "index_head_dim", "index_n_heads",
                              "gated_norm_rank", "head_dim" }) do
            raw[k] = nil
         end
         local cfg = axk2.config(raw)
         assert.are.same({ 163840, 2048, 5120, 512, 48, 32, 131072 }, { cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size,
            cfg.moe_intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.max_position_embeddings })
         assert.are.same({ 1, 128, 1, 1, 8, 2.5, true }, { cfg.n_shared_experts, cfg.n_routed_experts, cfg.n_group,
            cfg.topk_group, cfg.num_experts_per_tok, cfg.routed_scaling_factor, cfg.norm_topk_prob })
         assert.are.same({ 384, 128, 32, 64, 64 }, { cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
            cfg.v_head_dim, cfg.qk_nope_head_dim })
         assert.are.same({ 2048, 128, 16, 16 }, { cfg.index_topk, cfg.index_head_dim, cfg.index_n_heads, cfg.gated_norm_rank })
         assert.is_false(cfg.sparse_layers[1])
         for i = 2, 48 do assert.is_true(cfg.sparse_layers[i], i) end
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(axk2.config, DIR, change, msg) end
         fails(function(raw) raw.topk_group = nil end, 'models.axk2: config keys "n_group" (4) and "topk_group" (nil) must be set together')
         fails({ topk_group = 5 }, "models.axk2: topk_group 5 is more than n_group 4")
         fails({ gated_norm_rank = 0 }, 'models.axk2: config key "gated_norm_rank" must be an integer >= 1, got 0')
         fails({ q_lora_rank = 0 }, 'models.axk2: config key "q_lora_rank" must be an integer >= 1, got 0')
         fails({ num_experts_per_tok = 9 }, "models.axk2: num_experts_per_tok 9 is more than n_routed_experts 8")
      end)
   end)
end)
