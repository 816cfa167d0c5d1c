-- ml.models Laguna (poolside's Laguna-XS.2: per-head q/k norms, a query head count per layer, the
-- heads' output times softplus(g_proj(x)), full and 4-token sliding layers each rotating by its own
-- rope_parameters entry (YaRN over half of each head on the full ones), a dense first layer, then a
-- router taking a sigmoid of its softcapped logits, choosing by score + e_score_correction_bias,
-- weighing by the renormalized scores, the routed sum scaled, beside a shared MLP) against
-- transformers (tests/fixtures/gen_models.py laguna): names, logits, greedy ids with and without the
-- cache, a padded batch, per-element gates, what each particularity does, both expert layouts,
-- experts on disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local laguna = require("moonload.models.laguna")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "laguna_tiny"
local DIR = H.FIX .. "/" .. NAME
local SPARSE = { "model.layers.1.mlp.experts", "model.layers.2.mlp.experts", "model.layers.3.mlp.experts" }

-- transformers' names for the hub's (its conversion mapping's renames)
local function transformers_name(key)
   return (key:gsub("%.mlp%.experts%.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias")
      :gsub("%.mlp%.shared_expert%.", ".mlp.shared_experts."))
end

-- The fixture's logits with its weights under a config changed by change(raw).
local function logits_with_config(change)
   local dir = H.tmpdir()
   H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
   local raw = H.read_json(DIR .. "/config.json")
   change(raw)
   H.write(dir .. "/config.json", require("cjson").encode(raw))
   local logits = models.from_pretrained(dir)(H.expected(NAME).input_ids)
   H.rmdir(dir)
   return logits
end

describe("models.laguna (tests/fixtures/models/laguna_tiny: 4 or 6 query heads, gated heads, a 4-key window, 2 of 8 experts)",
   function()
   H.collect_warnings()                       -- (the disk offload note) kept quiet
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds LagunaForCausalLM with every tensor of the checkpoint, the hub's names renamed as transformers does", function()
      assert.are.equal("LagunaForCausalLM", model.__name)
      assert.are.same({ "LagunaDecoderLayer" }, model.no_split_modules)
      local want = {}
      for key in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do want[transformers_name(key)] = true end
      assert.is_true(want["model.layers.1.mlp.gate.e_score_correction_bias"] and want["model.layers.3.mlp.shared_experts.up_proj.weight"])
      assert.are.same(H.sorted_keys(want), H.sorted_keys((model:state_dict())))
      local layers = model.model.layers
      assert.are.same({ "LagunaMLP", "LagunaSparseMoeBlock", "LagunaSparseMoeBlock", "LagunaSparseMoeBlock" },
         { layers[1].mlp.__name, layers[2].mlp.__name, layers[3].mlp.__name, layers[4].mlp.__name })
      assert.are.same({ false, 4, 4, false }, model.config.layer_windows)
      -- query heads per layer (num_attention_heads_per_layer) over 2 key/value heads; a gate per head
      for i, heads in ipairs({ 4, 6, 6, 4 }) do
         local attn = layers[i].self_attn
         assert.are.equal("LagunaAttention", attn.__name)
         assert.are.same({ heads, 2, 8 }, { attn.n_head, attn.n_kv_head, attn.head_dim })
         assert.are.same({ heads * 8, 32 }, attn.q_proj.weight.shape)
         assert.are.same({ 32, heads * 8 }, attn.o_proj.weight.shape)
         assert.are.same({ heads, 32 }, attn.g_proj.weight.shape)
         assert.are.same({ 8 }, attn.q_norm.weight.shape)
      end
      -- int(8 x 0.5) = 4 rotary dims on full layers (YaRN), 8 on sliding ones
      assert.are.same({ 4, 8 }, { model.config.rotary_dim, model.config.local_rotary_dim })
      assert.are.same({ 2, 4 }, { model.model.rotary_emb.inv_freq:numel(), model.model.rotary_emb.local_inv_freq:numel() })
      assert.are.same({ "yarn", "default" }, { model.config.rope.rope_type, model.config.rope_local.rope_type })
      local block = layers[2].mlp
      assert.are.equal("LagunaTopKRouter", block.gate.__name)
      assert.are.equal("ModuleList", block.experts.__name)
      assert.are.equal(16, block.experts[8].gate_proj.out_features)
      assert.are.equal(24, block.shared_experts.gate_proj.out_features)
      assert.are.same({ 2, 2.5, 3 }, { block.top_k, block.scale, block.gate.softcap })
   end)

   H.it_matches_expected(model, NAME, " (6 tokens past the window)")

   H.it_matches_padded(model, NAME, "positions")

   it("decodes one token at a time from the first through the cache, past the window, as a full forward", function()
      for _, row in ipairs({ 1, 2 }) do
         assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[row], 1), { exp.logits[row] }) < TOL)
      end
      -- the sliding layers keep at most the first forward's tokens + 2 windows
      local cache = model:new_cache()
      model({ exp.input_ids[2] }, { cache = cache })
      for i = 1, 12 do model({ { i } }, { cache = cache }) end
      assert.are.same({ 1, 2, 22, 8 }, cache.k[1]:narrow(3, 1, cache.length).shape)
      assert.is_true(cache.v[2]:size(3) <= 10 + 2 * 4, tostring(cache.v[2]:size(3)))
   end)

   it("decodes the same under a block schedule and with prompt-lookup drafts (blocks and crops of the cache)", function()
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false, micro_batch_size = 1, prefill_chunk_size = 3 }))
      assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false, prompt_lookup_num_tokens = 3 }))
   end)

   describe("needs each of its particularities (without one, other logits)", function()
      local function attentions(m, fn) for _, l in ipairs(m.model.layers) do fn(l.self_attn) end end
      local function sparse(m, fn) for i = 2, 4 do fn(m.model.layers[i].mlp) end end
      local function far(change) return H.max_abs_diff(logits_after(change), exp.logits) > 1e-3 end

      it("the output gate, through a softplus", function()
         local Llama = require("moonload.models.llama").LlamaAttention
         assert.is_true(far(function(m) attentions(m, function(a) rawset(a, "attend_heads", Llama.attend_heads) end) end))
         assert.is_true(far(function(m)                   -- a sigmoid (Qwen3-Next's gate) in its place
            attentions(m, function(a)
               rawset(a, "attend_heads", function(self, q, k, v, past, pad)
                  local y = Llama.attend_heads(self, q, k, v, past, pad)
                  local g = self.g_proj(rawget(self, "gate_input")):sigmoid()
                  local B, L = y:size(1), y:size(2)
                  return (y:view(B, L, self.n_head, self.head_dim) * g:unsqueeze(4)):view(B, L, -1)
               end)
            end)
         end))
      end)

      it("its q/k norms, applied before the rotary embedding", function()
         assert.is_true(far(function(m) attentions(m, function(a) rawset(a, "qk_norm_in_project", true) end) end))
         assert.is_true(far(function(m)                   -- after rotating, as HunYuan's
            attentions(m, function(a)
               rawset(a, "qk_norm_in_project", true)
               rawset(a, "query_layernorm", a.q_norm)
               rawset(a, "key_layernorm", a.k_norm)
            end)
         end))
      end)

      it("the window, each layer type's rotary table, YaRN on the full layers and their partial rotation", function()
         assert.is_true(far(function(m) for i = 2, 3 do rawset(m.model.layers[i].self_attn, "window", false) end end))
         local function differs(change) return H.max_abs_diff(logits_with_config(change), exp.logits) > 1e-3 end
         assert.is_true(differs(function(raw) raw.rope_parameters.sliding_attention = raw.rope_parameters.full_attention end))
         assert.is_true(differs(function(raw) raw.rope_parameters.full_attention.rope_type = "default" end))
         assert.is_true(differs(function(raw) raw.rope_parameters.full_attention.partial_rotary_factor = 1 end))
         assert.is_true(differs(function(raw) raw.rope_parameters.sliding_attention.partial_rotary_factor = 0.5 end))
      end)

      it("the correction bias, the softcap, renormalization, moe_routed_scaling_factor, two experts a token and the shared experts",
         function()
         local function unnormalized(self, flat)        -- the same choice, weighted by the scores as they are
            local gate = self.gate
            local logits = require("moonload.nn.functional").linear(flat, gate.weight):float()
            logits = (logits / gate.softcap):tanh() * gate.softcap
            return require("moonload.models.moe").biased_sigmoid_route(logits, gate.e_score_correction_bias, self.top_k,
               false, 0)
         end
         local changes = {
            function(m) sparse(m, function(b) b.gate.e_score_correction_bias:fill_(0) end) end,
            function(m) sparse(m, function(b) rawset(b.gate, "softcap", 0) end) end,
            function(m) sparse(m, function(b) rawset(b, "route", unnormalized) end) end,
            function(m) sparse(m, function(b) rawset(b, "scale", 1) end) end,
            function(m) sparse(m, function(b) rawset(b.gate, "top_k", 1) end) end,
            function(m) sparse(m, function(b) b.shared_experts.down_proj.weight:fill_(0) end) end,
         }
         for i, change in ipairs(changes) do assert.is_true(far(change), i) end
      end)
   end)

   it("routes by sigmoid(softcapped logit) + e_score_correction_bias, weighing by the scores alone renormalized", function()
      local router = laguna.LagunaTopKRouter(model.config)
      -- x = e_1 gives logits (6, 1, -3, 0, ...), capped at 3 to 3 tanh(2), 3 tanh(1/3), ...; the bias
      -- picks the second expert over the 0s and the third
      local w, e1 = {}, {}
      for e = 1, 8 do w[e] = {} for j = 1, 32 do w[e][j] = 0 end end
      for j = 1, 32 do e1[j] = j == 1 and 1 or 0 end
      w[1][1], w[2][1], w[3][1] = 6, 1, -3
      router.weight:copy_(ml.tensor(w))
      router.e_score_correction_bias:copy_(ml.tensor({ -1, 0.5, -1, -1, -1, -1, -1, -1 }))
      local top_w, top_i = router(ml.tensor({ e1 }))
      assert.are.same({ { 1, 0 } }, top_i)
      local function sigmoid(z) return 1 / (1 + math.exp(-z)) end
      local s1, s2 = sigmoid(3 * math.tanh(1 / 3)), sigmoid(3 * math.tanh(2))
      assert.is_true(H.max_abs_diff(top_w, { { s1 / (s1 + s2), s2 / (s1 + s2) } }) < 1e-6)
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
      m({ { 1, 7, 9 } })
      assert.are.same({ 6, 6, 6 }, rows)                -- rows through experts, per sparse layer
   end)

   it("reads transformers' stacked layout and names too (gate_up_proj, down_proj per layer), running 2 experts a token", function()
      -- (the hub's correction bias sits under mlp.experts: carried over under transformers' name)
      local file, biases = ml.safetensors.load_file(DIR .. "/model.safetensors"), {}
      for _, prefix in ipairs(SPARSE) do
         local key = prefix .. ".e_score_correction_bias"
         biases[transformers_name(key)] = file[key]
      end
      local dir = H.copy_with_stacked_experts(DIR, SPARSE, 8, transformers_name, biases)
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
         assert.are.equal("LagunaExperts", experts.__name)
         per_layer[i - 1] = #H.experts_run(experts, function() stacked({ { 7 } }) end)
      end
      assert.are.same({ 2, 2, 2 }, per_layer)
      H.rmdir(dir)
   end)

   -- (a CPU budget of 150000 bytes leaves some layers to the disk; with 400000 every layer fits
   -- on the CPU but for the experts sent to the disk)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, overrides_budget = 400000,
      places = { ["model.layers.1.mlp.experts.5"] = "disk", ["model.layers.1.mlp.gate"] = "cpu" } })

   it("loads bfloat16 with the router's weight and correction bias in bfloat16, as transformers has them", function()
      local bf = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local gate = bf.model.layers[2].mlp.gate
      assert.are.same({ "bfloat16", "bfloat16" }, { gate.weight.dtype, gate.e_score_correction_bias.dtype })
      -- (bfloat16 rounding flips some tokens' experts in this tiny random model, in transformers too:
      -- the first positions, before any flip, stay close)
      local logits = bf(ids)
      assert.are.equal("bfloat16", logits.dtype)
      assert.is_true(H.max_abs_diff(logits:float():narrow(2, 1, 2), { { exp.logits[1][1], exp.logits[1][2] },
         { exp.logits[2][1], exp.logits[2][2] } }) < 0.2)
   end)

   describe("with a gate per head and dim (gating \"per-element\", laguna_per_element_tiny) and LagunaConfig's defaults",
      function()
      local per_element = models.from_pretrained(H.FIX .. "/laguna_per_element_tiny")

      it("builds g_proj with heads x head_dim outputs, every layer full, half of each head rotated at base 500000", function()
         local cfg = per_element.config
         assert.is_false(cfg.gate_per_head)
         assert.are.same({ 32, 32 }, per_element.model.layers[1].self_attn.g_proj.weight.shape)
         assert.are.same({ false, false, false }, cfg.layer_windows)
         assert.are.same({ false, true, true }, cfg.sparse_layers)
         assert.are.same({ 4, 500000 }, { cfg.rotary_dim, cfg.rope_theta })
         assert.is_nil(cfg.rope_local)
      end)

      H.it_matches_expected(per_element, "laguna_per_element_tiny")
   end)

   describe("config", function()
      it("reads LagunaConfig's defaults", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                              "sliding_window", "layer_types", "mlp_layer_types", "num_attention_heads_per_layer", "gating",
                              "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                              "moe_routed_scaling_factor", "moe_router_logit_softcapping" }) do
            raw[k] = nil
         end
         local cfg = laguna.config(raw)
         assert.are.same({ 100352, 2048, 8192, 40, 48, 8, 128, 131072, 1e-6 }, { cfg.vocab_size, cfg.hidden_size,
            cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.max_position_embeddings, cfg.rms_norm_eps })
         assert.are.same({ 256, 8, 512, 512, 1, 0, true }, { cfg.num_experts, cfg.num_experts_per_tok,
            cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, cfg.moe_routed_scaling_factor,
            cfg.moe_router_logit_softcapping, cfg.gate_per_head })
         assert.are.same({ 500000, 64 }, { cfg.rope_theta, cfg.rotary_dim })
         assert.is_false(cfg.sparse_layers[1])
         for i = 2, 40 do assert.is_true(cfg.sparse_layers[i], i) end
         for i = 1, 40 do
            assert.are.equal(false, cfg.layer_windows[i], i)
            assert.are.equal(48, cfg.heads_per_layer[i], i)
         end
         assert.is_true(cfg.qk_norm)
         assert.are.same({ false, false }, { cfg.qkv_bias, cfg.o_bias })
      end)

      it("rotates the sliding layers by their own entry, 512 keys by default, and gates per element for false", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.sliding_window, raw.rope_parameters, raw.gating = nil, nil, false
         local cfg = laguna.config(raw)
         assert.are.same({ false, 512, 512, false }, cfg.layer_windows)
         assert.are.same({ 10000, 8, 500000, 4 }, { cfg.rope_local.rope_theta, cfg.local_rotary_dim, cfg.rope_theta,
            cfg.rotary_dim })
         assert.is_false(cfg.gate_per_head)
         raw.gating = "per-head"
         assert.is_true(laguna.config(raw).gate_per_head)
      end)

      it("biases q, k, v and o with attention_bias, never the MLPs", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.attention_bias = true
         local m = ml.init_empty_weights(function() return laguna.LagunaForCausalLM(laguna.config(raw)) end)
         local layer = m.model.layers[2]
         assert.is_not_nil(layer.self_attn.q_proj.bias)
         assert.is_not_nil(layer.self_attn.o_proj.bias)
         assert.is_nil(layer.self_attn.g_proj.bias)
         assert.is_nil(layer.mlp.shared_experts.up_proj.bias)
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(laguna.config, DIR, change, msg) end
         fails({ num_experts_per_tok = 9 }, "models.laguna: num_experts_per_tok 9 is more than num_experts 8 in config table")
         fails({ num_experts = 0 }, 'models.laguna: config key "num_experts" must be an integer >= 1, got 0')
         fails({ shared_expert_intermediate_size = 0 }, 'config key "shared_expert_intermediate_size" must be an integer >= 1, got 0')
         fails({ moe_routed_scaling_factor = 0 }, 'config key "moe_routed_scaling_factor" must be a number > 0, got 0')
         fails({ moe_router_logit_softcapping = -1 }, 'config key "moe_router_logit_softcapping" must be a number >= 0, got -1')
         fails({ moe_apply_router_weight_on_input = true },
            'config key "moe_apply_router_weight_on_input" is true: routing weights applied to the experts\' input are not supported')
         fails({ gating = "per-token" }, 'config key "gating" must be true, "per-head" or "per-element", got per-token')
         fails({ num_attention_heads_per_layer = { 4, 6, 6 } }, 'config key "num_attention_heads_per_layer" must list 4 head counts')
         fails({ num_attention_heads_per_layer = { 4, 5, 6, 4 } },
            "num_attention_heads_per_layer[2] 5 is not a multiple of num_key_value_heads 2 in config table")
         fails({ mlp_layer_types = { "dense", "moe", "sparse", "sparse" } }, 'mlp_layer_types[2] is "moe" (supported: dense, sparse)')
         fails({ mlp_layer_types = { "dense" } }, 'config key "mlp_layer_types" must list 4 layer types')
         fails({ layer_types = { "full_attention", "chunked_attention", "full_attention", "full_attention" } },
            'layer_types[2] is "chunked_attention" (supported: full_attention, sliding_attention)')
         fails(function(raw) raw.rope_parameters.sliding_attention = nil end,
            'config key "rope_parameters.sliding_attention" must be an object (each layer type rotates by its own)')
         fails(function(raw) raw.rope_parameters.full_attention.rope_type = "llama3" end,
            'rope type "llama3" of rope_parameters.full_attention is not supported (supported: default, yarn)')
         fails(function(raw) raw.rope_parameters.full_attention.original_max_position_embeddings = nil end,
            'config key "rope_parameters.full_attention.original_max_position_embeddings" is missing (needed by rope type "yarn")')
         fails(function(raw) raw.rope_parameters.sliding_attention.rope_theta = nil end,
            'config key "rope_parameters.sliding_attention.rope_theta" is missing (needed by rope type "default")')
         fails(function(raw) raw.rope_parameters.full_attention.partial_rotary_factor = 0.375 end,
            "the rotary dims of a head (3 of head_dim 8) must be even")
         fails(function(raw) raw.rope_parameters.sliding_attention.partial_rotary_factor = 0 end,
            "partial_rotary_factor must be a number in (0, 1], got 0")
      end)

      it("names the file when from_pretrained reads a bad config", function()
         local dir = H.tmpdir()
         H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
         local raw = H.read_json(DIR .. "/config.json")
         raw.num_experts_per_tok = 9
         H.write(dir .. "/config.json", require("cjson").encode(raw))
         local ok, err = pcall(models.from_pretrained, dir)
         assert.is_false(ok)
         assert.truthy(tostring(err):find("num_experts_per_tok 9 is more than num_experts 8 in " .. dir .. "/config.json", 1, true), err)
         H.rmdir(dir)
      end)
   end)
end)
