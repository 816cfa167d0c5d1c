-- ml.models AFMoE (Arcee's Trinity: per-head q/k norms and a sigmoid output gate in the attention,
-- sliding layers that rotate and full ones without position embedding, norms before and after
-- attention and MLP, muP's embedding scale, a dense first layer, then a sigmoid router choosing by
-- score + expert_bias beside shared experts) against transformers (tests/fixtures/gen_models.py
-- afmoe): names, logits, greedy ids with and without the cache, a padded batch, what each
-- particularity does, both expert layouts, experts on disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local moe = require("moonload.models.moe")
local llama = require("moonload.models.llama")
local afmoe = require("moonload.models.afmoe")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "afmoe_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.afmoe (tests/fixtures/models/afmoe_tiny: 4 layers, 3-key window on every other, 6 experts, top 2)", function()
   H.collect_warnings()
   local exp, model, _, logits_after = H.fixture_model(NAME)

   it("builds AfmoeForCausalLM with every tensor of the checkpoint: a dense first layer, then experts one module each", function()
      assert.are.equal("AfmoeForCausalLM", model.__name)
      assert.are.same({ "AfmoeDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local cfg = model.config
      assert.are.same({ 3, false, 3, false }, cfg.layer_windows)
      assert.are.same({ false, true, false, true }, cfg.nope_layers)
      local dense, sparse = model.model.layers[1], model.model.layers[2]
      assert.are.equal("AfmoeAttention", dense.self_attn.__name)
      assert.are.same({ 8 }, dense.self_attn.q_norm.weight.shape)           -- (one head's dims)
      assert.are.same({ 32, 32 }, dense.self_attn.gate_proj.weight.shape)
      assert.are.equal("AfmoeMLP", dense.mlp.__name)
      assert.are.equal(64, dense.mlp.gate_proj.out_features)
      assert.are.equal("AfmoeSparseMoeBlock", sparse.mlp.__name)
      assert.are.equal("ModuleList", sparse.mlp.experts.__name)
      assert.are.equal(32, sparse.mlp.shared_experts.gate_proj.out_features)   -- 2 shared experts of 16
      assert.are.equal("float32", sparse.mlp.expert_bias.dtype)
      assert.are.same({ 2, 2, 2.5 }, { sparse.mlp.top_k, sparse.mlp.router.top_k, sparse.mlp.router.route_scale })
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("keeps only the window's keys in a sliding layer's cache and decodes past it to the same logits", function()
      local seq = exp.greedy_ids[1]                                     -- 18 tokens, 6 windows' worth
      local cache = model:new_cache(64)
      local logits = H.decoded_logits(model, seq, 2, cache)
      assert.is_true(H.max_abs_diff(logits, model({ seq }):tolist()) < TOL)
      assert.is_true(H.max_abs_diff(logits:narrow(2, 1, 8), { exp.logits[1] }) < TOL)
      assert.are.same({ 3, 3 }, { cache.window[1], cache.window[3] })
      assert.are.same({ nil, nil }, { cache.window[2], cache.window[4] })
      assert.is_true(cache.start[1] > 0 and cache.k[1]:size(3) < #seq)  -- the oldest keys let go
      assert.are.same({ 0, 64 }, { cache.start[2], cache.k[2]:size(3) })
   end)

   it("needs its q/k norms, the gate, the window, NoPE on full layers, muP and the norms after each block", function()
      local function layers(m) return ipairs(m.model.layers) end
      local changes = {
         function(m) for _, l in layers(m) do l.self_attn.q_norm.weight:fill_(1) end end,
         function(m) for _, l in layers(m) do rawset(l.self_attn, "project", llama.LlamaAttention.project) end end,
         function(m) for _, l in layers(m) do rawset(l.self_attn, "window", false) end end,
         function(m) for _, l in layers(m) do rawset(l.self_attn, "nope", false) end end,
         function(m) rawset(m.model, "embed_scale", false) end,
         function(m)
            for _, l in layers(m) do
               rawset(l, "forward", function(self, x, cos, sin, cache, pad)
                  x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pad)
                  return x + self.mlp(self.pre_mlp_layernorm(x))
               end)
            end
         end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("needs the sigmoid router's bias, renormalization, route_scale, two experts a token and the shared experts", function()
      local function sparse(m, fn) for i = 2, 4 do fn(m.model.layers[i].mlp) end end
      local function softmax_top2(self, flat)          -- a softmax router's top 2, as they are
         local w, i = self.router.gate(flat):float():softmax(-1):topk(2, 2)
         return w, i:tolist()
      end
      local changes = {
         function(m) sparse(m, function(b) b.expert_bias:fill_(0) end) end,
         function(m) sparse(m, function(b) rawset(b, "route", softmax_top2) end) end,
         function(m) sparse(m, function(b) rawset(b.router, "route_scale", 1) end) end,
         function(m) sparse(m, function(b) rawset(b.router, "top_k", 1) end) end,
         function(m) sparse(m, function(b) b.shared_experts.down_proj.weight:fill_(0) end) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("routes by sigmoid score + expert_bias, weighing by the scores alone renormalized, times route_scale", function()
      local block = model.model.layers[2].mlp
      local w = block:route(ml.randn(5, 32))
      assert.is_true((w:sum(2) - 2.5):abs():max():item() < 1e-5)
      -- logits (2, 1, -3): the second expert chosen for its bias though the third's score is lower
      local saved = ml.tensor(block.expert_bias:tolist())
      local router = block.router.gate.weight
      local kept = ml.tensor(router:tolist())
      router:fill_(0)
      router:narrow(1, 1, 3):narrow(2, 1, 1):copy_(ml.tensor({ { 2 }, { 1 }, { -3 } }))
      block.expert_bias:fill_(-1)
      block.expert_bias:narrow(1, 2, 1):fill_(0.5)
      local x = ml.zeros({ 1, 32 })
      x:narrow(2, 1, 1):fill_(1)
      local top_w, top_i = block:route(x)
      block.expert_bias:copy_(saved)
      router:copy_(kept)
      assert.are.same({ { 1, 0 } }, top_i)
      local s1, s2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))
      assert.is_true(math.abs(top_w[1][1]:item() - 2.5 * s1 / (s1 + s2)) < 1e-5)
   end)

   it("runs only the experts the router picked: 2 a token in each sparse layer", function()
      local m = models.from_pretrained(DIR)
      local ran = {}
      for name, module in m:named_modules() do
         local layer = name:match("^model%.layers%.(%d+)%.mlp%.experts%.%d+$")
         if layer then
            local f = module.forward
            module.forward = function(self, x) ran[layer] = (ran[layer] or 0) + x:size(1); return f(self, x) end
         end
      end
      m({ { 7 } })
      assert.are.same({ ["1"] = 2, ["2"] = 2, ["3"] = 2 }, ran)   -- rows through experts, per sparse layer
   end)

   it("reads transformers' stacked layout too (gate_up_proj, down_proj per layer), running each token's 2 experts", function()
      local dir = H.copy_with_stacked_experts(DIR, { "model.layers.1.mlp.experts", "model.layers.2.mlp.experts",
         "model.layers.3.mlp.experts" }, 6)
      local stacked = models.from_pretrained(dir)
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

   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, places = { ["model.layers.1.mlp.experts.0"] = "disk" } })

   describe("config", function()
      it("derives layer_types from global_attn_every_n_layers (4 by default), and reads AfmoeConfig's defaults", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.layer_types = nil
         local cfg = afmoe.config(raw)
         assert.are.same({ 3, false, 3, false }, cfg.layer_windows)
         raw.global_attn_every_n_layers = nil
         cfg = afmoe.config(raw)
         assert.are.same({ "sliding_attention", "sliding_attention", "sliding_attention", "full_attention" }, cfg.layer_types)
         assert.are.same({ false, false, false, true }, cfg.nope_layers)
         for _, k in ipairs({ "sliding_window", "head_dim", "num_dense_layers", "num_shared_experts", "route_scale",
                              "mup_enabled", "moe_intermediate_size", "num_experts", "num_experts_per_tok" }) do
            raw[k] = nil
         end
         cfg = afmoe.config(raw)
         assert.are.same({ 1024, 1024, 1024, false }, cfg.layer_windows)
         assert.are.same({ 128, 1, 2, 1, false, 1408, 64, 6 }, { cfg.head_dim, cfg.num_dense_layers, cfg.num_shared_experts,
            cfg.route_scale, cfg.mup_enabled, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok })
         assert.are.same({ false, true, true, true }, cfg.sparse_layers)
      end)

      it("makes the first num_dense_layers layers dense", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.num_dense_layers = 2
         assert.are.same({ false, false, true, true }, afmoe.config(raw).sparse_layers)
         raw.num_dense_layers = 0
         assert.are.same({ true, true, true, true }, afmoe.config(raw).sparse_layers)
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(afmoe.config, DIR, change, msg) end
         fails({ num_experts_per_tok = 7 }, "models.afmoe: num_experts_per_tok 7 is more than num_experts 6 in config table")
         fails({ route_scale = -1 }, 'models.afmoe: config key "route_scale" must be a positive number, got -1')
         fails({ mup_enabled = "yes" }, 'models.afmoe: config key "mup_enabled" must be a boolean, got yes')
         fails({ num_dense_layers = -1 }, 'models.afmoe: config key "num_dense_layers" must be an integer >= 0, got -1')
         fails({ score_func = "softmax" }, 'models.afmoe: config key "score_func" is "softmax" (supported: sigmoid)')
         fails({ route_norm = false }, 'models.afmoe: config key "route_norm" is false: routing weights that are not '
            .. "renormalized are not supported")
         fails({ layer_types = { "full_attention" } }, 'models.afmoe: config key "layer_types" must list 4 layer types')
         fails({ layer_types = { "full_attention", "chunked_attention", "full_attention", "full_attention" } },
            'models.afmoe: layer_types[2] is "chunked_attention" (supported: full_attention, sliding_attention)')
         fails(function(raw) raw.layer_types, raw.global_attn_every_n_layers = nil, 0 end,
            'models.afmoe: config key "global_attn_every_n_layers" must be an integer >= 1, got 0')
         fails({ sliding_window = 2.5 }, 'models.afmoe: config key "sliding_window" in config table must be a positive integer')
         H.assert_config_fails(afmoe.config, DIR, { vocab_size = false },
            'models.afmoe: config key "vocab_size" in config table must be a positive integer, got boolean false')
      end)

      it("names the file a bad config.json came from", function()
         H.assert_config_file_fails(afmoe.config, DIR, { route_scale = 0 }, '"route_scale" must be a positive number, got 0')
      end)
   end)
end)
