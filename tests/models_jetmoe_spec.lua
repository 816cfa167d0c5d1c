-- ml.models JetMoE (a mixture of attention heads: each token's query and output projections from
-- its top-k experts over shared keys and values; a mixture of SwiGLU experts; stacked expert weights,
-- a bias after each mixture, layer norms at eps 1e-6) against transformers
-- (tests/fixtures/gen_models.py jetmoe): names, logits, greedy ids with and without the cache, a padded
-- batch, what each particularity does, the experts run, quantized, on disk, and configs.
local ml = require("moonload")
local models = require("moonload.models")
local jetmoe = require("moonload.models.jetmoe")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "jetmoe_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.jetmoe (tests/fixtures/models/jetmoe_tiny: 2 of 4 experts a token, in attention and MLP)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   local function layers(m, fn) for _, l in ipairs(m.model.layers) do fn(l) end end

   it("builds JetMoeForCausalLM with every tensor of the checkpoint under transformers' names, and a tied head", function()
      assert.are.equal("JetMoeForCausalLM", model.__name)
      assert.are.same({ "JetMoeDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR, true)
      assert.are.equal(model.lm_head.weight, model.model.embed_tokens.weight)
      local layer = model.model.layers[1]
      local attn, mlp = layer.self_attention, layer.mlp
      assert.are.equal("JetMoeAttention", attn.__name)
      assert.are.equal("JetMoeMoA", attn.experts.__name)
      assert.are.same({ 4, 16, 32 }, attn.experts.input_linear.weight.shape)      -- (2 heads of 8 an expert)
      assert.are.same({ 4, 32, 16 }, attn.experts.output_linear.weight.shape)
      assert.are.equal("JetMoeMoE", mlp.__name)
      assert.are.same({ 4, 32, 32 }, mlp.input_linear.weight.shape)               -- (gate and up rows)
      assert.are.same({ 4, 4 }, { attn.n_head, model.config.num_attention_heads }) -- 2 key heads x 2 experts
      assert.are.same({ 2, 8 }, { attn.n_kv_head, attn.head_dim })
      assert.are.same({ 1e-6, 1e-6, 1e-2 }, { layer.input_layernorm.eps, layer.post_attention_layernorm.eps,
         model.model.norm.eps })
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("caches the shared key and value heads only: 2 a layer", function()
      local cache = model:new_cache(16)
      model(ids, { cache = cache })
      assert.are.same({ 2, 8 }, { cache.k[1]:size(2), cache.k[1]:size(4) })     -- (B, heads, capacity, head size)
   end)

   it("pairs query head h of each expert with key head h, as transformers repeats the keys", function()
      -- interleaved instead: the slots' heads side by side, query head j with key head floor(j / k)
      local function interleaved(m)
         layers(m, function(l)
            local attn = l.self_attention
            local Hkv, k = attn.n_kv_head, attn.n_head / attn.n_kv_head
            rawset(attn, "attend_heads", function(self, q, key, v, past, pad)
               local B, L, D = q:size(1), q:size(3), q:size(4)
               local by_slot = q:reshape(B, Hkv, k, L, D):transpose(2, 3):reshape(B, Hkv * k, L, D)
               local y = jetmoe.JetMoeAttention.attend_heads(self, by_slot, key, v, past, pad)      -- (B, T, H * D)
               return y:reshape(B, L, k, Hkv, D):transpose(3, 4):reshape(B, L, Hkv * k * D)
            end)
         end)
      end
      assert.is_true(H.max_abs_diff(logits_after(interleaved), exp.logits) > 1e-3)
   end)

   it("needs the layers' norms at eps 1e-6, not rms_norm_eps, and the final one at rms_norm_eps", function()
      local changes = {
         function(m) layers(m, function(l) rawset(l.input_layernorm, "eps", 1e-2) rawset(l.post_attention_layernorm, "eps", 1e-2) end) end,
         function(m) rawset(m.model.norm, "eps", 1e-6) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("needs both biases, the softmax over the top-k logits alone and two MLP experts a token", function()
      local function all_softmax(logits, k)       -- weights from a softmax over every expert instead
         local w, i = logits:float():softmax(-1):topk(k, 2)
         return w, i:tolist()
      end
      local changes = {
         function(m) layers(m, function(l) l.self_attention.experts.bias:fill_(0) end) end,
         function(m) layers(m, function(l) l.mlp.bias:fill_(0) end) end,
         function(m) layers(m, function(l) rawset(l.mlp, "route", function(self, flat) return all_softmax(self.router(flat), 2) end) end) end,
         function(m) layers(m, function(l) rawset(l.mlp, "top_k", 1) end) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
      local route = jetmoe.route
      jetmoe.route = all_softmax                  -- (the attention's router too)
      local ok, diff = pcall(function() return H.max_abs_diff(logits_after(function() end), exp.logits) end)
      jetmoe.route = route
      assert.is_true(ok, diff)
      assert.is_true(diff > 1e-3)
   end)

   it("runs only the experts the routers picked: 2 a token, in attention and MLP", function()
      local m = models.from_pretrained(DIR)
      local rows = {}
      for _, l in ipairs(m.model.layers) do
         for _, group in ipairs({ l.self_attention.experts.input_linear, l.self_attention.experts.output_linear,
                                  l.mlp.input_linear, l.mlp.output_linear }) do
            local forward = group.forward
            rawset(group, "forward", function(self, x, e)
               rows[#rows + 1] = x:size(1)
               return forward(self, x, e)
            end)
         end
      end
      m({ { 7 } })
      local total = 0
      for _, n in ipairs(rows) do total = total + n end
      assert.are.equal(2 * 4 * 2, total)           -- 2 layers x 4 groups x 2 experts of one row
   end)

   it("quantizes its stacked experts as one linear layer each, saves them so and loads them back", function()
      local m = models.from_pretrained(DIR)
      -- (the routers kept in floats: int8's rounding would turn this tiny model's near choices)
      local _, report = ml.quantize(m, { dtype = "int8", skip = "router" })
      local layer = m.model.layers[2]
      assert.are.equal("ModuleList", layer.mlp.input_linear.__name)
      assert.are.equal("QuantizedLinear", layer.mlp.input_linear[4].__name)
      assert.are.equal("QuantizedLinear", layer.self_attention.experts.input_linear[1].__name)
      assert.are.equal("Linear", layer.mlp.output_linear[1].__name)              -- (16 in-features: too few)
      local quantized = {}
      for _, name in ipairs(report.quantized) do quantized[name] = true end
      assert.is_true(quantized["model.layers.1.self_attention.experts.input_linear.3"])
      local q = m(ids)
      assert.is_true(H.max_abs_diff(q, exp.logits) < 0.5)                       -- (int8's rounding)
      local out = H.tmpdir()
      ml.save_model(m, out)
      local back = models.from_pretrained(out)
      assert.are.equal("ModuleList", back.model.layers[1].mlp.output_linear.__name)
      assert.are.equal(0, (back(ids) - q):abs():max():item())
      H.rmdir(out)
   end)

   -- (a CPU budget of 60000 bytes leaves some layers to the disk)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 60000,
      overrides = { ["%.input_linear$"] = "disk", ["%.output_linear$"] = "disk" },
      places = { ["model.layers.0.self_attention.experts.input_linear"] = "disk", ["model.layers.1.mlp.output_linear"] = "disk" } })

   describe("config", function()
      it("reads JetMoeConfig's defaults and derives the heads, head size and activation as transformers does", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "kv_channels",
                              "intermediate_size", "max_position_embeddings", "activation_function", "num_local_experts",
                              "num_experts_per_tok", "tie_word_embeddings", "rms_norm_eps", "rope_parameters" }) do
            raw[k] = nil
         end
         raw.num_attention_heads, raw.hidden_act = 3, "gelu"             -- (ignored, as transformers does)
         local cfg = jetmoe.config(raw)
         assert.are.same({ 32000, 2048, 12, 16, 128, 5632, 4096, "silu", 8, 2, true, 1e-6, 10000 }, { cfg.vocab_size,
            cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.max_position_embeddings, cfg.hidden_act, cfg.num_experts, cfg.num_experts_per_tok,
            cfg.tie_word_embeddings, cfg.rms_norm_eps, cfg.rope_theta })
         assert.are.equal(32, cfg.num_attention_heads)
         raw.kv_channels, raw.head_dim = nil, 16                            -- (head_dim: its alias)
         assert.are.equal(16, jetmoe.config(raw).head_dim)
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(jetmoe.config, DIR, change, msg) end
         fails({ num_experts_per_tok = 5 }, "models.jetmoe: num_experts_per_tok 5 is more than num_local_experts 4 in config table")
         fails({ num_local_experts = 0 }, 'models.jetmoe: config key "num_local_experts" must be an integer >= 1, got 0')
         fails({ kv_channels = 2.5 }, 'models.jetmoe: config key "kv_channels" must be an integer >= 1, got 2.5')
         fails({ num_key_value_heads = 0 }, 'models.jetmoe: config key "num_key_value_heads" must be an integer >= 1, got 0')
         fails({ activation_function = 3 }, 'models.jetmoe: config key "activation_function" must be a string, got 3')
         fails({ activation_function = "swish2" }, 'models.jetmoe: activation "swish2"')
         fails({ rope_parameters = { rope_type = "dynamic", factor = 2 } }, 'models.jetmoe: rope type "dynamic" is not supported')
         fails({ hidden_size = "32" }, 'models.jetmoe: config key "hidden_size" in config table must be a positive integer, got string "32"')
      end)

      it("names the file a bad config.json came from", function()
         H.assert_config_file_fails(jetmoe.config, DIR, { num_experts_per_tok = 0 }, '"num_experts_per_tok" must be an integer >= 1, got 0')
      end)
   end)
end)
