-- NLLB-MoE (models/nllb_moe.lua) against transformers' NllbMoeForConditionalGeneration
-- (tests/fixtures/gen_models.py, nllb_moe()): M2M100's layers with a top-2 router (biased) over 4
-- experts in encoder layers 1 and 3 and decoder layer 1 (from 0), the experts run as routed (the
-- generator replaces 5.24's NllbMoeExperts.forward, which runs expert_1 and expert_0 whatever the
-- router chose), their output scaled by 1 - moe_token_dropout 0.8; the capacity drops choices in
-- both stacks. nllb_moe_tiny: batch_prioritized_routing and normalize_router_prob_before_dropping,
-- capacity 0.3 of a call's tokens; nllb_moe_tiny_ordered: transformers' defaults, 0.4 of them.
-- Generated with 2 beams, forced to a language token after the start.
local ml = require("moonload")
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local nllb = require("moonload.models.nllb_moe")

local NAME = "nllb_moe_tiny"

local function logits_after(fn) return S.logits_after(NAME, fn) end

local function sparse_mlps(m)
   local out = {}
   for _, stack in ipairs({ m.model.encoder, m.model.decoder }) do
      for i = 1, stack.n_layers do
         if stack.layers[i].is_sparse then out[#out + 1] = stack.layers[i].ffn end
      end
   end
   return out
end

local function routers(m, k, v)
   for _, mlp in ipairs(sparse_mlps(m)) do rawset(mlp.router, k, v) end
end

describe("models.nllb_moe (nllb_moe_tiny)", function()
   local model, e = S.load(NAME), H.expected(NAME)
   S.it_matches_transformers(NAME, 200000)

   it("builds NllbMoeForConditionalGeneration under transformers' names, sparse every 2nd layer", function()
      assert.are.equal("NllbMoeForConditionalGeneration", model.__name)
      assert.are.same({ "NllbMoeEncoderLayer", "NllbMoeDecoderLayer" }, model.no_split_modules)
      local kinds = {}
      for _, stack in ipairs({ model.model.encoder, model.model.decoder }) do
         for i = 1, stack.n_layers do kinds[#kinds + 1] = stack.layers[i].ffn.__name end
      end
      local dense, sparse = "NllbMoeDenseActDense", "NllbMoeSparseMLP"
      assert.are.same({ dense, sparse, dense, sparse, dense, sparse }, kinds)
      assert.are.equal("M2M100SinusoidalPositionalEmbedding", model.model.encoder.embed_positions.__name)
      assert.are.equal(model.model.shared.weight, model.lm_head.weight)
      assert.is_nil(model.final_logits_bias)
      local stored = ml.safetensors.load_file(H.FIX .. "/" .. NAME .. "/model.safetensors")
      stored["lm_head.weight"], stored["model.encoder.embed_tokens.weight"] = true, true
      stored["model.decoder.embed_tokens.weight"] = true
      assert.are.same(H.sorted_keys(stored), H.sorted_keys((model:state_dict())))
      assert.is_not_nil(stored["model.decoder.layers.1.ffn.experts.expert_3.fc2.bias"])
   end)

   it("needs the capacity, the confident tokens first, the normalization before dropping", function()
      for k, v in pairs({ moe_eval_capacity_token_fraction = 1.0, batch_prioritized_routing = false,
         normalize_router_prob_before_dropping = false }) do
         assert.is_true(H.max_abs_diff(logits_after(function(m) routers(m, k, v) end), e.logits) > 1e-3, k)
      end
   end)

   it("needs the router's choice of both experts, the padding routed nowhere, the output scale", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, mlp in ipairs(sparse_mlps(m)) do
            local experts = mlp.experts.list
            rawset(mlp.experts, "list", { experts[2], experts[1], experts[3], experts[4] })
         end
      end), e.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m) routers(m, "router_ignore_padding_tokens", true) end),
         e.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, mlp in ipairs(sparse_mlps(m)) do rawset(mlp, "output_scale", nil) end
      end), e.logits) > 1e-3)
   end)

   it("routes each token to its best expert and the best of the rest, renormalized over the kept ones", function()
      local router = sparse_mlps(model)[1].router
      ml.manual_seed(3)
      local x = ml.randn(12, 32) * 3
      rawset(router, "normalize_router_prob_before_dropping", false)
      local top_w, top_i = router(x, nil)
      rawset(router, "normalize_router_prob_before_dropping", true)
      local probs = router.classifier(x):softmax(-1):tolist()
      local per, dropped = {}, 0
      for n, row in ipairs(top_i) do
         local p = probs[n]
         local order = { 1, 2, 3, 4 }
         table.sort(order, function(a, b) return p[a] > p[b] end)
         local w = top_w[n]:tolist()
         local kept = 0
         for s = 1, 2 do
            if row[s] >= 0 then
               assert.are.equal(order[s] - 1, row[s])
               per[row[s]] = (per[row[s]] or 0) + 1
               kept = kept + p[order[s]]
            else
               dropped = dropped + 1
               assert.are.equal(0, w[s])
            end
         end
         for s = 1, 2 do
            if row[s] >= 0 then assert.is_true(math.abs(w[s] - p[order[s]] / kept) < 1e-6) end
         end
      end
      assert.is_true(dropped > 0)
      for _, count in pairs(per) do assert.is_true(count <= math.ceil(0.3 * 12)) end
   end)

   it("loads bfloat16 with the routers float32, and quantizes the experts, not the routers", function()
      local bf = S.load(NAME, { dtype = "bfloat16" })
      local mlp = sparse_mlps(bf)[2]
      assert.are.same({ "float32", "float32", "bfloat16" }, { mlp.router.classifier.weight.dtype,
         mlp.router.classifier.bias.dtype, mlp.experts.expert_1.fc1.weight.dtype })
      local q = S.load(NAME, { quantize = "int8" })
      mlp = sparse_mlps(q)[3]
      assert.are.same({ "QuantizedLinear", "QuantizedLinear", "RouterClassifier" }, { mlp.experts.expert_0.fc1.__name,
         mlp.experts.expert_0.fc2.__name, mlp.router.classifier.__name })
      -- (the capacity makes the routing jump at small changes: the tokens are compared, not the logits)
      assert.are.same(e.greedy_ids, q:generate(e.input_ids, { attention_mask = e.attention_mask,
         max_new_tokens = e.max_new_tokens, num_beams = 1 }))
   end)
end)

describe("models.nllb_moe (nllb_moe_tiny_ordered: tokens in order, normalized after dropping)", function()
   S.it_matches_transformers("nllb_moe_tiny_ordered", 200000)
end)

describe("models.nllb_moe bad config", function()
   local dir = H.FIX .. "/" .. NAME

   it("names the second expert's policy, router_dtype and moe_token_dropout", function()
      H.assert_config_fails(nllb.config, dir, { second_expert_policy = "sampling" },
         'models.nllb_moe: config key "second_expert_policy" "sampling" is not supported (only "all")')
      H.assert_config_fails(nllb.config, dir, { router_dtype = "bfloat16" },
         'models.nllb_moe: config key "router_dtype" "bfloat16" is not supported (only "float32")')
      H.assert_config_fails(nllb.config, dir, { moe_token_dropout = 1 },
         'models.nllb_moe: config key "moe_token_dropout" must be in [0, 1), got 1')
      H.assert_config_fails(nllb.config, dir, { num_experts = 0 },
         'models.nllb_moe: config key "num_experts" in config table must be a positive integer, got number 0')
   end)

   it("defaults as transformers' NllbMoeConfig does", function()
      local raw = H.read_json(dir .. "/config.json")
      for _, k in ipairs({ "encoder_sparse_step", "second_expert_policy", "normalize_router_prob_before_dropping",
         "batch_prioritized_routing", "moe_eval_capacity_token_fraction", "moe_token_dropout", "scale_embedding",
         "pad_token_id", "activation_function" }) do
         raw[k] = nil
      end
      local cfg = nllb.config(raw)
      assert.are.same({ 4, "all", false, false, 1.0, 0.2, true, 1, "relu" }, { cfg.encoder_sparse_step,
         cfg.second_expert_policy, cfg.normalize_router_prob_before_dropping, cfg.batch_prioritized_routing,
         cfg.moe_eval_capacity_token_fraction, cfg.moe_token_dropout, cfg.scale_embedding, cfg.pad_token_id,
         cfg.activation_function })
      assert.are.same({ false, false, false, true, true }, { nllb.is_sparse(1, 4), nllb.is_sparse(3, 4),
         nllb.is_sparse(4, 0), nllb.is_sparse(4, 4), nllb.is_sparse(8, 4) })
   end)
end)

describe("models.nllb_moe on cuda #cuda", function()
   S.it_generates_on_cuda(NAME, { ["model.shared"] = 0, ["model.encoder.embed_tokens"] = 0,
      ["model.decoder.embed_tokens"] = 0, lm_head = 0, ["model.encoder.embed_positions"] = "cpu",
      ["model.encoder.layers.0"] = 0, ["model.encoder.layers.1"] = "disk", ["model.encoder.layers.2"] = "cpu",
      ["model.encoder.layers.3"] = 0, ["model.encoder.layer_norm"] = 0, ["model.decoder.embed_positions"] = 0,
      ["model.decoder.layers.0"] = "cpu", ["model.decoder.layers.1"] = 0, ["model.decoder.layer_norm"] = "cpu" })
end)
