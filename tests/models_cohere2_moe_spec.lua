-- ml.models Cohere 2 MoE (Cohere 2's parallel block, sliding layers rotating and full ones NoPE but
-- for the dense layers under force_rope; dense or sparse MLPs by mlp_layer_types, a softmax or sigmoid
-- router over the top-k logits, shared experts summed or averaged; LayerNorms or RMSNorms; logits
-- times logit_scale) against transformers (tests/fixtures/gen_models.py cohere2_moe): names, logits,
-- greedy ids with and without the cache, padded batches, the routing, both expert layouts, experts on
-- disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local cohere2_moe = require("moonload.models.cohere2_moe")
local H = require("models_helpers")

local TOL = 1e-4
local NAME, SIGMOID = "cohere2_moe_tiny", "cohere2_moe_sigmoid_tiny"
local DIR, SIGMOID_DIR = H.FIX .. "/" .. NAME, H.FIX .. "/" .. SIGMOID

-- The experts (0-based) of a ModuleList of experts that ran during fn().
local function experts_run(experts, fn)
   local ran = {}
   for e, expert in ipairs(experts) do
      local forward = getmetatable(expert).forward
      rawset(expert, "forward", function(self, x)
         ran[#ran + 1] = e - 1
         return forward(self, x)
      end)
   end
   fn()
   for _, expert in ipairs(experts) do rawset(expert, "forward", nil) end
   return ran
end

-- Each layer's (window or false, NoPE, sparse), as a list of strings.
local function layer_kinds(cfg)
   local out = {}
   for i = 1, cfg.num_hidden_layers do
      out[i] = string.format("%s/%s/%s", tostring(cfg.layer_windows[i]), cfg.nope_layers[i] and "nope" or "rope",
         cfg.sparse_layers[i] and "sparse" or "dense")
   end
   return out
end

describe("models.cohere2_moe (tests/fixtures/models/cohere2_moe_tiny: 4 layers, 1 dense then 3 of 6 experts, top 2, "
   .. "a shared expert averaged, softmax, LayerNorms)", function()
   H.collect_warnings()                       -- (the disk split's, kept quiet)
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds Cohere2MoeForCausalLM with every tensor of the checkpoint: one module per expert, as the hub holds them", function()
      assert.are.equal("Cohere2MoeForCausalLM", model.__name)
      assert.are.same({ "Cohere2MoeDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR, true)
      assert.are.equal(model.lm_head.weight, model.model.embed_tokens.weight)        -- (tied)
      local dense, sparse = model.model.layers[1], model.model.layers[2]
      assert.are.equal("Cohere2MoeDecoderLayer", dense.__name)
      assert.are.equal("Cohere2MoeAttention", dense.self_attn.__name)
      assert.are.equal("CohereLayerNorm", dense.input_layernorm.__name)
      assert.are.equal("CohereLayerNorm", model.model.norm.__name)
      assert.is_nil(dense.post_attention_layernorm)                              -- (one norm: a parallel block)
      assert.are.equal("Cohere2MoeMLP", dense.mlp.__name)
      assert.are.same({ 24, 32 }, dense.mlp.gate_proj.weight.shape)              -- prefix_dense_intermediate_size
      local block = sparse.mlp
      assert.are.equal("Cohere2MoeSparseMoeBlock", block.__name)
      assert.are.equal("ModuleList", block.experts.__name)
      assert.are.equal(6, #block.experts)
      assert.are.same({ 16, 32 }, block.experts[1].gate_proj.weight.shape)       -- intermediate_size
      assert.are.same({ 16, 32 }, block.shared_experts.gate_proj.weight.shape)   -- x num_shared_experts 1
      assert.are.same({ 2, false, true }, { block.top_k, block.sigmoid, block.shared_average })
      assert.are.same({ "false/rope/dense", "4/rope/sparse", "4/rope/sparse", "false/nope/sparse" },
         layer_kinds(model.config))
      assert.are.equal(0.25, model.config.logit_scale)
   end)

   H.it_matches_expected(model, NAME, " (the window of 4 shorter than the prompts)")

   H.it_matches_padded(model, NAME, "positions")

   it("needs force_rope on the dense layer, NoPE on the last, the window, the softmax, the averaging and logit_scale", function()
      local function layer(i, fn) return function(m) fn(m.model.layers[i]) end end
      local function sparse(fn) return function(m) for i = 2, 4 do fn(m.model.layers[i].mlp) end end end
      local changes = {
         layer(1, function(l) rawset(l.self_attn, "nope", true) end),            -- (the dense full layer rotates)
         layer(4, function(l) rawset(l.self_attn, "nope", false) end),
         layer(2, function(l) rawset(l.self_attn, "window", false) end),
         sparse(function(b) rawset(b, "sigmoid", true) end),
         sparse(function(b) rawset(b, "shared_average", false) end),
         sparse(function(b) rawset(b, "top_k", 1) end),
         function(m) m.config.logit_scale = 1 end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("weighs a token's experts by a softmax over their logits alone", function()
      local block = model.model.layers[2].mlp
      local x = ml.randn({ 3, 32 })
      local top_w, top_i = block:route(x)
      local logits = block.gate(x):tolist()
      for n = 1, 3 do
         local a, b = logits[n][top_i[n][1] + 1], logits[n][top_i[n][2] + 1]
         assert.is_true(a >= b)
         assert.is_true(math.abs(top_w[n][1]:item() - 1 / (1 + math.exp(b - a))) < 1e-6)
      end
   end)

   it("runs only the experts the router chose", function()
      local ran = experts_run(model.model.layers[3].mlp.experts, function() model({ { 7 } }) end)
      assert.are.equal(2, #ran)
      assert.are_not.equal(ran[1], ran[2])
   end)

   it("reads transformers' in-memory layout too (experts stacked per projection), running the chosen ones only", function()
      local prefixes = {}
      for i = 1, 3 do prefixes[i] = "model.layers." .. i .. ".mlp.experts" end
      local dir = H.copy_with_stacked_experts(DIR, prefixes, 6)
      local m = models.from_pretrained(dir)
      local experts = m.model.layers[2].mlp.experts
      assert.are.equal("StackedExperts", experts.__name)
      assert.is_true(H.max_abs_diff(m(ids), exp.logits) < TOL)
      assert.are.equal(2, #H.experts_run(experts, function() m({ { 7 } }) end))
      H.rmdir(dir)
   end)

   it("splits over CPU and disk with device_map \"auto\" under max_memory cpu = 150000, with the same logits and tokens", function()
      local off = H.tmpdir()
      local split = models.from_pretrained(DIR, { device_map = "auto", max_memory = { cpu = 150000 }, offload_folder = off })
      local map = split.hf_device_map
      assert.are.same({ "cpu", "cpu", "disk", "disk" }, { tostring(map["model.layers.0"]), tostring(map["model.layers.1"]),
         tostring(map["model.layers.2"]), tostring(map["model.layers.3"]) })
      local experts = split.model.layers[4].mlp.experts
      assert.is_true(experts[1].gate_proj.weight:is_meta())                 -- (read from the file as it runs)
      assert.are.equal(2, #experts_run(experts, function() split({ { 7 } }) end))
      assert.is_true(H.max_abs_diff(split(ids), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, split:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(off)
   end)

   it("gives the same tokens with every expert on disk (device_overrides)", function()
      local off = H.tmpdir()
      local m = models.from_pretrained(DIR, { device_map = "auto", max_memory = { cpu = 400000 }, offload_folder = off,
         device_overrides = { ["%.mlp%.experts%.%d+$"] = "disk" } })
      assert.are.equal("disk", m.hf_device_map["model.layers.1.mlp.experts.0"])
      assert.are.equal("disk", m.hf_device_map["model.layers.3.mlp.experts.5"])
      assert.are.same(exp.greedy_ids, m:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(off)
   end)

   it("derives layer_types and mlp_layer_types from first_k_dense_replace as transformers does, with its defaults", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.layer_types, raw.mlp_layer_types, raw.first_k_dense_replace = nil, nil, 1
      assert.are.same(layer_kinds(model.config), layer_kinds(cohere2_moe.config(raw)))
      -- without first_k_dense_replace: all sparse, every 3rd layer full (NoPE)
      raw.first_k_dense_replace, raw.prefix_dense_intermediate_size, raw.layer_norm_eps, raw.head_dim = nil, nil, nil, nil
      local cfg = cohere2_moe.config(raw)
      assert.are.same({ "4/rope/sparse", "4/rope/sparse", "false/nope/sparse", "4/rope/sparse" }, layer_kinds(cfg))
      assert.are.same({ false, 1e-5, 16, 128 }, { cfg.rms_norm, cfg.rms_norm_eps, cfg.dense_intermediate_size, cfg.head_dim })
      -- transformers' defaults for what the file leaves out
      raw.sliding_window, raw.sliding_window_pattern, raw.expert_selection_fn, raw.shared_expert_combination_strategy = nil, nil, nil, nil
      raw.logit_scale, raw.num_experts_per_tok = nil, nil
      cfg = cohere2_moe.config(raw)
      assert.are.same({ "softmax", "average", 0.0625, 2 }, { cfg.expert_selection_fn,
         cfg.shared_expert_combination_strategy, cfg.logit_scale, cfg.num_experts_per_tok })
      assert.are.same({ "4096/rope/sparse", "4096/rope/sparse", "4096/rope/sparse", "false/nope/sparse" }, layer_kinds(cfg))
   end)

   it("names a bad key of the config", function()
      local function fails(change, msg) H.assert_config_fails(cohere2_moe.config, DIR, change, msg) end
      local W = "models.cohere2_moe: "
      fails({ expert_selection_fn = "relu" },
         W .. 'config key "expert_selection_fn" is "relu" (supported: softmax, sigmoid) in config table')
      fails({ shared_expert_combination_strategy = "max" },
         W .. 'config key "shared_expert_combination_strategy" is "max" (supported: average, sum) in config table')
      fails({ mlp_layer_types = { "dense", "moe", "sparse", "sparse" } },
         W .. 'mlp_layer_types[2] is "moe" (supported: dense, sparse) in config table')
      fails({ mlp_layer_types = { "dense", "sparse" } }, W .. 'config key "mlp_layer_types" must list 4 layer types')
      fails({ layer_types = { "full_attention", "local", "full_attention", "full_attention" } },
         W .. 'layer_types[2] is "local" (supported: full_attention, sliding_attention)')
      fails({ num_shared_experts = -1 }, W .. 'config key "num_shared_experts" must be an integer >= 0, got -1')
      fails({ num_experts_per_tok = 7 }, W .. "num_experts_per_tok 7 is more than num_experts 6")
      fails({ num_experts = 0 }, W .. 'config key "num_experts" must be an integer >= 1, got 0')
      fails({ norm_topk_prob = "yes" }, W .. 'config key "norm_topk_prob" must be a boolean, got yes')
      fails({ layer_norm_eps = "1e-5" }, W .. 'config key "layer_norm_eps" must be a positive number, got 1e-5')
      fails({ rms_norm_eps = -1 }, W .. 'config key "rms_norm_eps" in config table must be a positive number, got number -1')
      fails({ prefix_dense_intermediate_size = 0 },
         W .. 'config key "prefix_dense_intermediate_size" must be an integer >= 1, got 0')
      fails({ logit_scale = 0 }, W .. 'config key "logit_scale" must be a positive number, got 0')
      fails({ sliding_window = 2.5 }, W .. 'config key "sliding_window" in config table must be a positive integer or null')
      fails(function(raw) raw.layer_types, raw.sliding_window_pattern = nil, 0 end,
         W .. 'config key "sliding_window_pattern" must be an integer >= 1, got 0')
      fails({ num_hidden_layers = "4" },
         W .. 'config key "num_hidden_layers" in config table must be a positive integer, got string "4"')
   end)

   it("names the file a bad config came from", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.expert_selection_fn = "relu"
      local path = H.tmpfile(require("cjson").encode(raw))
      local ok, err = pcall(cohere2_moe.config, path)
      os.remove(path)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('config key "expert_selection_fn" is "relu" (supported: softmax, sigmoid) in '
         .. path, 1, true), err)
   end)
end)

describe("models.cohere2_moe (tests/fixtures/models/cohere2_moe_sigmoid_tiny: 2 dense then 2 of 8 experts, top 2, "
   .. "sigmoid renormalized, two shared experts summed, RMSNorms, an untied head)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(SIGMOID)

   it("builds RMSNorms, the shared experts as one MLP twice as wide, and NoPE on the dense full layer (no force_rope)", function()
      H.assert_holds_checkpoint(model, SIGMOID_DIR)
      assert.are_not.equal(model.lm_head.weight, model.model.embed_tokens.weight)
      assert.are.equal("RMSNorm", model.model.layers[1].input_layernorm.__name)
      assert.are.equal("RMSNorm", model.model.norm.__name)
      local block = model.model.layers[3].mlp
      assert.are.same({ 32, 32 }, block.shared_experts.gate_proj.weight.shape)   -- 16 x num_shared_experts 2
      assert.are.same({ 16, 32 }, model.model.layers[1].mlp.gate_proj.weight.shape)
      assert.are.same({ 2, true, true, false }, { block.top_k, block.sigmoid, block.norm_topk_prob, block.shared_average })
      assert.are.same({ "4/rope/dense", "false/nope/dense", "4/rope/sparse", "false/nope/sparse" }, layer_kinds(model.config))
   end)

   H.it_matches_expected(model, SIGMOID)

   H.it_matches_padded(model, SIGMOID, "positions")

   it("needs the sigmoid, its renormalization, the sum and NoPE on the dense full layer", function()
      local function sparse(fn) return function(m) for i = 3, 4 do fn(m.model.layers[i].mlp) end end end
      local changes = {
         sparse(function(b) rawset(b, "sigmoid", false) end),
         sparse(function(b) rawset(b, "norm_topk_prob", false) end),
         sparse(function(b) rawset(b, "shared_average", true) end),
         function(m) rawset(m.model.layers[2].self_attn, "nope", false) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("needs RMSNorms where rms_norm_eps is set (Cohere's LayerNorms otherwise)", function()
      local dir = H.tmpdir()
      local raw = H.read_json(SIGMOID_DIR .. "/config.json")
      raw.rms_norm_eps = nil
      H.write(dir .. "/config.json", require("cjson").encode(raw))
      H.copy(SIGMOID_DIR .. "/model.safetensors", dir .. "/model.safetensors")
      local m = models.from_pretrained(dir)
      assert.are.equal("CohereLayerNorm", m.model.norm.__name)
      assert.is_true(H.max_abs_diff(m(ids), exp.logits) > 1e-3)
      H.rmdir(dir)
   end)

   it("derives its layer types from first_k_dense_replace and prefix_dense_sliding_window_pattern 2", function()
      local raw = H.read_json(SIGMOID_DIR .. "/config.json")
      raw.layer_types, raw.mlp_layer_types, raw.first_k_dense_replace = nil, nil, 2
      assert.are.same(layer_kinds(model.config), layer_kinds(cohere2_moe.config(raw)))
   end)

   it("splits over CPU and disk with device_map \"auto\" under max_memory cpu = 150000, with the same tokens", function()
      local off = H.tmpdir()
      local split = models.from_pretrained(SIGMOID_DIR, { device_map = "auto", max_memory = { cpu = 150000 },
         offload_folder = off })
      local places = {}
      for _, dev in pairs(split.hf_device_map) do places[tostring(dev)] = true end
      assert.is_true(places.cpu and places.disk, "a CPU + disk split")
      assert.are.equal("disk", tostring(split.hf_device_map["model.layers.3"]))
      assert.is_true(H.max_abs_diff(split(ids), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, split:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(off)
   end)
end)
