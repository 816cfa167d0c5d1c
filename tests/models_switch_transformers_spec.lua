-- Switch Transformers (models/switch_transformers.lua) against transformers'
-- SwitchTransformersForConditionalGeneration (tests/fixtures/gen_models.py, switch_transformers()):
-- switch_transformers_tiny, T5's blocks with a top-1 router (biased) over 4 experts in encoder
-- blocks 1 and 3 and decoder block 1 (from 0), each expert taking 2 tokens of a row per call (the
-- batch and the decoder's ids overflow it), the head tied and the output scaled; 2 beams.
-- switch_transformers_tiny_untied: tie_word_embeddings false (the head and the stacks' embeddings
-- their own, no scaling), gelu_new experts, encoder block 1 of 3 and both decoder blocks sparse.
local ml = require("moonload")
local H = require("models_helpers")
local S = require("seq2seq_helpers")
local switch = require("moonload.models.switch_transformers")

local NAME = "switch_transformers_tiny"

local function logits_after(fn) return S.logits_after(NAME, fn) end

local function sparse_mlps(m)
   local out = {}
   for _, stack in ipairs({ m.encoder, m.decoder }) do
      for i = 1, stack.n_blocks do
         local ff = stack.block[i].layer[#stack.block[i].layer]
         if ff.is_sparse then out[#out + 1] = ff.mlp end
      end
   end
   return out
end

describe("models.switch_transformers (switch_transformers_tiny)", function()
   local model, e = S.load(NAME), H.expected(NAME)
   S.it_matches_transformers(NAME, 200000)

   it("builds SwitchTransformersForConditionalGeneration under transformers' names, sparse every other block", function()
      assert.are.equal("SwitchTransformersForConditionalGeneration", model.__name)
      assert.are.same({ "SwitchTransformersBlock" }, model.no_split_modules)
      local kinds = {}
      for _, stack in ipairs({ model.encoder, model.decoder }) do
         for i = 1, stack.n_blocks do kinds[#kinds + 1] = stack.block[i].layer[#stack.block[i].layer].mlp.__name end
      end
      local dense, sparse = "SwitchTransformersDenseActDense", "SwitchTransformersSparseMLP"
      assert.are.same({ dense, sparse, dense, sparse, dense, sparse }, kinds)
      assert.are.equal(model.shared.weight, model.lm_head.weight)
      local stored = ml.safetensors.load_file(H.FIX .. "/" .. NAME .. "/model.safetensors")
      stored["lm_head.weight"], stored["encoder.embed_tokens.weight"], stored["decoder.embed_tokens.weight"] = true, true, true
      assert.are.same(H.sorted_keys(stored), H.sorted_keys((model:state_dict())))
      assert.is_not_nil(stored["encoder.block.1.layer.1.mlp.experts.expert_3.wo.weight"])
      assert.is_not_nil(stored["decoder.block.1.layer.2.mlp.router.classifier.bias"])
   end)

   it("drops the tokens past an expert's capacity in their row: without it, other logits", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, mlp in ipairs(sparse_mlps(m)) do rawset(mlp.router, "expert_capacity", 100) end
      end), e.logits) > 1e-3)
   end)

   it("counts the capacity per row, in order, each chosen expert's output weighted by its probability", function()
      local mlp = sparse_mlps(model)[1]
      ml.manual_seed(7)
      local x = ml.randn(2, 5, 32) * 3
      local top_w, top_i = mlp.router(x)
      local taken, dropped = { {}, {} }, 0
      for n, row in ipairs(top_i) do
         local b = n <= 5 and 1 or 2
         if row[1] >= 0 then taken[b][row[1]] = (taken[b][row[1]] or 0) + 1 else dropped = dropped + 1 end
         assert.is_true((taken[b][row[1]] or 0) <= 2)
      end
      assert.is_true(dropped > 0)
      local y = mlp(x):view(10, 32)
      local flat = x:view(10, 32)
      for n, row in ipairs(top_i) do
         local want = row[1] < 0 and flat[n] * 0
            or mlp.experts.list[row[1] + 1](flat:narrow(1, n, 1)):view(32) * top_w[{ n, 1 }]:item()
         assert.is_true(H.max_abs_diff(y[n], want:tolist()) < 1e-5)
      end
   end)

   it("needs its router's choice, its bias, and the head's scaling", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, mlp in ipairs(sparse_mlps(m)) do
            local experts = mlp.experts.list
            rawset(mlp.experts, "list", { experts[2], experts[3], experts[4], experts[1] })
         end
      end), e.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, mlp in ipairs(sparse_mlps(m)) do mlp.router.classifier.bias:zero_() end
      end), e.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m) m.config.scale_decoder_outputs = false end), e.logits) > 1e-3)
   end)

   it("loads bfloat16 with the routers float32, and quantizes the experts, not the routers", function()
      local bf = S.load(NAME, { dtype = "bfloat16" })
      local mlp = sparse_mlps(bf)[1]
      assert.are.same({ "float32", "float32", "bfloat16" }, { mlp.router.classifier.weight.dtype,
         mlp.router.classifier.bias.dtype, mlp.experts.expert_0.wi.weight.dtype })
      local q = S.load(NAME, { quantize = "int8" })
      mlp = sparse_mlps(q)[3]
      assert.are.same({ "QuantizedLinear", "QuantizedLinear", "RouterClassifier" }, { mlp.experts.expert_2.wi.__name,
         mlp.experts.expert_2.wo.__name, mlp.router.classifier.__name })
      local logits = q(e.input_ids, { attention_mask = e.attention_mask, decoder_input_ids = e.decoder_input_ids })
      assert.is_true(H.max_abs_diff(logits, e.logits) < 0.1)
   end)
end)

describe("models.switch_transformers (switch_transformers_tiny_untied: nothing tied, sparse steps 3 and 1)", function()
   local UNTIED = "switch_transformers_tiny_untied"
   S.it_matches_transformers(UNTIED, 200000)

   it("reads its own head and stack embeddings, unscaled, as transformers 5 does with tie_word_embeddings false", function()
      local model = S.load(UNTIED)
      assert.are_not.equal(model.shared.weight, model.lm_head.weight)
      assert.are_not.equal(model.shared.weight, model.encoder.embed_tokens.weight)
      assert.are_not.equal(model.shared.weight, model.decoder.embed_tokens.weight)
      assert.is_false(model.config.scale_decoder_outputs)
      local kinds = {}
      for _, stack in ipairs({ model.encoder, model.decoder }) do
         for i = 1, stack.n_blocks do kinds[#kinds + 1] = stack.block[i].layer[#stack.block[i].layer].is_sparse end
      end
      assert.are.same({ false, true, false, true, true }, kinds)
      local e = H.expected(UNTIED)
      assert.is_true(H.max_abs_diff(S.logits_after(UNTIED, function(m)
         m.encoder.embed_tokens.weight = m.shared.weight
      end), e.logits) > 1e-3)
   end)
end)

describe("models.switch_transformers bad config", function()
   local dir = H.FIX .. "/" .. NAME

   it("names router_dtype, the activation and the expert count", function()
      H.assert_config_fails(switch.config, dir, { router_dtype = "bfloat16" },
         'models.switch_transformers: config key "router_dtype" "bfloat16" is not supported (only "float32")')
      H.assert_config_fails(switch.config, dir, { dense_act_fn = "gated-gelu" }, "gated-gelu")
      H.assert_config_fails(switch.config, dir, { num_experts = 0 },
         'models.switch_transformers: config key "num_experts" in config table must be a positive integer, got number 0')
   end)

   it("defaults as transformers' SwitchTransformersConfig does, its sparse steps from the sparse layer counts", function()
      local raw = H.read_json(dir .. "/config.json")
      raw.encoder_sparse_step, raw.decoder_sparse_step, raw.dense_act_fn, raw.expert_capacity = 5, 5, nil, nil
      local cfg = switch.config(raw)
      assert.are.same({ 2, 2, "relu", 64 }, { cfg.encoder_sparse_step, cfg.decoder_sparse_step, cfg.dense_act_fn,
         cfg.expert_capacity })
      raw.num_sparse_encoder_layers, raw.num_sparse_decoder_layers = 0, nil
      cfg = switch.config(raw)
      assert.are.same({ 4, 0 }, { cfg.encoder_sparse_step, cfg.decoder_sparse_step })   -- (3 sparse of 2: step 0)
      assert.is_false(switch.is_sparse(2, 0))
      assert.are.same({ false, true, false, false, true }, { switch.is_sparse(1, 3), switch.is_sparse(2, 3),
         switch.is_sparse(3, 3), switch.is_sparse(4, 3), switch.is_sparse(5, 3) })
      raw.tie_word_embeddings = false
      cfg = switch.config(raw)
      assert.are.same({ false, false }, { cfg.tie_head, cfg.scale_decoder_outputs })
   end)
end)

describe("models.switch_transformers on cuda #cuda", function()
   S.it_generates_on_cuda(NAME, { shared = 0, ["encoder.embed_tokens"] = 0, ["decoder.embed_tokens"] = 0,
      ["encoder.block.0"] = 0, ["encoder.block.1"] = "disk", ["encoder.block.2"] = "cpu", ["encoder.block.3"] = 0,
      ["encoder.final_layer_norm"] = 0, ["decoder.block.0"] = "cpu", ["decoder.block.1"] = 0,
      ["decoder.final_layer_norm"] = "disk", lm_head = 0 })
end)
