-- ml.models LongCat-Flash (longcat_flash): two latent-attention + MLP sub-blocks a layer beside a
-- shortcut MoE block whose router also picks zero experts (they return their input); logits,
-- greedy generation, the latent cache (a slot per sub-block) and left-padded batches against
-- transformers' LongcatFlashForCausalLM (tests/fixtures/gen_models.py longcat_flash), what each
-- particularity does, experts on disk, the checkpoint layouts, configs.
local ml = require("moonload")
local models = require("moonload.models")
local longcat = require("moonload.models.longcat_flash")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "longcat_flash_tiny"
local DIR = H.FIX .. "/" .. NAME

-- The experts (0-based) each token of ids picks in every layer, through the router of model.
local function picks(model, ids)
   local out = {}
   for l, layer in ipairs(model.model.layers) do
      local router = layer.mlp.router
      local route = router.forward
      router.forward = function(self, x)
         local w, i = route(self, x)
         out[l] = i
         return w, i
      end
   end
   model(ids)
   for _, layer in ipairs(model.model.layers) do layer.mlp.router.forward = nil end
   return out
end

describe("models.longcat_flash (tests/fixtures/models/longcat_flash_tiny: 2 layers of two sub-blocks, 6 experts + 3 zero experts, top 2)", function()
   H.collect_warnings()                       -- (the disk offload note) kept quiet
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds LongcatFlashForCausalLM with every tensor of the checkpoint, under the hub's names", function()
      assert.are.equal("LongcatFlashForCausalLM", model.__name)
      assert.are.same({ "LongcatFlashDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[2]
      assert.are.equal("LongcatFlashMoE", layer.mlp.__name)
      assert.are.equal(6, #layer.mlp.experts)                        -- the zero experts are no modules
      assert.are.same({ 9, 32 }, layer.mlp.router.classifier.weight.shape)
      assert.are.same({ 9 }, layer.mlp.router.e_score_correction_bias.shape)
      assert.are.same({ "LongcatFlashMLA", "LongcatFlashMLA" }, { layer.self_attn[1].__name, layer.self_attn[2].__name })
      assert.are.same({ 3, 4 }, { rawget(layer.self_attn[1], "layer_idx"), rawget(layer.self_attn[2], "layer_idx") })
      assert.are.same({ 2, 2, 2 }, { #layer.mlps, #layer.input_layernorm, #layer.post_attention_layernorm })
      assert.are.same({ 2, 2, 16, 64 }, { model.config.num_layers, model.config.num_hidden_layers,
         model.config.moe_intermediate_size, model.config.intermediate_size })
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")

   H.it_attends_both_ways(model, NAME)

   it("caches each sub-block's scaled latent and rotary key in a slot of its own: 4 slots of 16 + 8 values a token", function()
      local cache = model:new_cache()
      model(ids, { cache = cache })
      assert.are.equal(4, cache.n_layers)
      for slot = 1, 4 do
         assert.are.same({ 2, 1, 8, 16 }, cache.k[slot]:narrow(3, 1, cache.length).shape)
         assert.are.same({ 2, 1, 8, 8 }, cache.v[slot]:narrow(3, 1, cache.length).shape)
      end
      assert.is_true(H.max_abs_diff(cache.k[1]:narrow(3, 1, 8), cache.k[2]:narrow(3, 1, 8):tolist()) > 0.1)   -- each its own
      local rm = require("moonload.utils.runtime_memory")
      local sizes = rm.kv_cache_sizes(model, { batch_size = 2, max_length = 20, prompt_length = 8 })
      for _, name in ipairs({ "model.layers.0.self_attn.0", "model.layers.0.self_attn.1", "model.layers.1.self_attn.1" }) do
         assert.are.equal(2 * 20 * (16 + 8) * 4, sizes[name], name)
      end
   end)

   it("decodes the same under a block schedule and with prompt-lookup drafts (blocks and crops of the cache)", function()
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false, micro_batch_size = 1, prefill_chunk_size = 3 }))
      assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false, prompt_lookup_num_tokens = 3 }))
   end)

   describe("needs each of its particularities (without one, other logits)", function()
      it("the zero experts, which return their input: picked, they weigh in", function()
         local zero = 0
         for _, rows in ipairs(picks(model, ids)) do
            for _, row in ipairs(rows) do for _, e in ipairs(row) do if e >= 6 then zero = zero + 1 end end end
         end
         assert.is_true(zero > 0, "the fixture's tokens pick zero experts")
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for _, layer in ipairs(m.model.layers) do rawset(layer.mlp, "zero_expert", function(x) return x * 0 end) end
         end), exp.logits) > 0.05)
         -- and never picked, the others take their place
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for _, layer in ipairs(m.model.layers) do
               layer.mlp.router.e_score_correction_bias:narrow(1, 7, 3):fill_(-1e9)
            end
         end), exp.logits) > 0.05)
      end)

      it("the router's correction bias (the choice), and routed_scaling_factor (the weights)", function()
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for _, layer in ipairs(m.model.layers) do layer.mlp.router.e_score_correction_bias:zero_() end
         end), exp.logits) > 1e-3)
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for _, layer in ipairs(m.model.layers) do rawset(layer.mlp.router, "routed_scaling_factor", 1) end
         end), exp.logits) > 0.05)
      end)

      it("the layer's second sub-block (attention and MLP)", function()
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for _, layer in ipairs(m.model.layers) do layer.self_attn[2].o_proj.weight:zero_() end
         end), exp.logits) > 0.05)
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for _, layer in ipairs(m.model.layers) do layer.mlps[2].down_proj.weight:zero_() end
         end), exp.logits) > 0.05)
      end)

      it("the shortcut: the MoE block's output joins at the layer's end, past the second attention", function()
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for _, layer in ipairs(m.model.layers) do
               rawset(layer, "forward", function(self, x, cos, sin, cache, pad)
                  x = x + self.self_attn[1](self.input_layernorm[1](x), cos, sin, cache, pad)
                  local normed = self.post_attention_layernorm[1](x)
                  x = x + self.mlps[1](normed) + self.mlp(normed)
                  x = x + self.self_attn[2](self.input_layernorm[2](x), cos, sin, cache, pad)
                  return x + self.mlps[2](self.post_attention_layernorm[2](x))
               end)
            end
         end), exp.logits) > 0.05)
      end)

      it("the scales of the queries (sqrt(hidden / q_lora_rank)) and of the latent (sqrt(hidden / kv_lora_rank))", function()
         local attn = model.model.layers[1].self_attn[1]
         assert.are.same({ math.sqrt(32 / 24), math.sqrt(32 / 16) },
            { rawget(attn.q_a_layernorm, "lora_scale"), rawget(attn.kv_a_layernorm, "lora_scale") })
         for _, norm in ipairs({ "q_a_layernorm", "kv_a_layernorm" }) do
            assert.is_true(H.max_abs_diff(logits_after(function(m)
               for _, layer in ipairs(m.model.layers) do
                  for _, a in ipairs(layer.self_attn) do rawset(a[norm], "lora_scale", 1) end
               end
            end), exp.logits) > 0.05, norm)
         end
      end)

      it("the interleaved rotary pairs", function()
         assert.is_true(H.max_abs_diff(logits_after(function(m)
            for _, layer in ipairs(m.model.layers) do
               for _, a in ipairs(layer.self_attn) do rawset(a, "interleaved", false) end
            end
         end), exp.logits) > 1e-3)
      end)
   end)

   it("runs only the real experts the router picked, once each on its rows", function()
      local m = models.from_pretrained(DIR)
      local chosen = picks(m, ids)
      local want, ran = 0, 0
      for _, rows in ipairs(chosen) do
         for _, row in ipairs(rows) do for _, e in ipairs(row) do if e < 6 then want = want + 1 end end end
      end
      for _, layer in ipairs(m.model.layers) do
         for _, expert in ipairs(layer.mlp.experts) do
            local f = expert.forward
            expert.forward = function(self, x) ran = ran + x:size(1); return f(self, x) end
         end
      end
      m(ids)
      assert.are.equal(want, ran)
      assert.is_true(ran < 2 * 16 * 2, "fewer rows than 2 experts x 16 tokens x 2 layers: some went to zero experts")
   end)

   -- (a CPU budget of 200000 bytes keeps the embedding and leaves the layers, 145 kB each, to the disk)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 200000, overrides_budget = 400000,
      overrides = { ["%.mlp%.experts%.%d+$"] = "disk", ["%.mlp%.router$"] = "disk" },
      places = { ["model.layers.1.mlp.experts.5"] = "disk", ["model.layers.0.mlp.router"] = "disk" } })

   it("loads transformers' save_pretrained folder (gate/up rows for the zero experts) and leaves out the hub's MTP layers", function()
      local dir = H.tmpdir()
      H.copy(DIR .. "/config.json", dir .. "/config.json")
      local sd = ml.safetensors.load_file(DIR .. "/model.safetensors")
      for l = 0, 1 do
         for e = 6, 8 do
            for _, p in ipairs({ "gate_proj", "up_proj" }) do
               sd["model.layers." .. l .. ".mlp.experts." .. e .. "." .. p .. ".weight"] = ml.ones({ 16, 32 })
            end
         end
      end
      sd["model.mtp.layers.0.eh_proj.weight"] = ml.zeros({ 32, 64 })
      ml.safetensors.save_file(sd, dir .. "/model.safetensors")
      assert.is_true(H.max_abs_diff(models.from_pretrained(dir)(ids), exp.logits) < TOL)
      -- an expert past the zero experts is no such row: an error naming it
      sd["model.layers.0.mlp.experts.9.up_proj.weight"] = ml.ones({ 16, 32 })
      ml.safetensors.save_file(sd, dir .. "/model.safetensors")
      local ok, err = pcall(models.from_pretrained, dir)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("model.layers.0.mlp.experts.9.up_proj.weight", 1, true), err)
      H.rmdir(dir)
   end)

   it("loads bfloat16 with the router's classifier and correction bias kept float32", function()
      local bf = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local router = bf.model.layers[2].mlp.router
      assert.are.equal("float32", router.classifier.weight.dtype)
      assert.are.equal("float32", router.e_score_correction_bias.dtype)
      assert.are.equal("bfloat16", bf.model.layers[2].self_attn[2].kv_b_proj.weight.dtype)
      assert.are.equal("bfloat16", bf.model.layers[2].mlp.experts[1].up_proj.weight.dtype)
      assert.are.same({ unpack(exp.greedy_ids[1], 1, 10) }, bf:generate(exp.input_ids[1], { max_new_tokens = 2, eos_token_id = false }))
   end)

   it("quantizes to int8 all but the routers, which stay float32 (as transformers keeps them), to the same tokens", function()
      local m = models.from_pretrained(DIR)
      local _, report = ml.quantize(m, { dtype = "int8" })
      local quantized = {}
      for _, name in ipairs(report.quantized) do quantized[name] = true end
      assert.is_true(quantized["model.layers.1.mlp.experts.5.up_proj"] and quantized["model.layers.0.mlps.1.down_proj"])
      for _, layer in ipairs(m.model.layers) do
         assert.are.equal("LongcatFlashClassifier", layer.mlp.router.classifier.__name)
         assert.are.equal("float32", layer.mlp.router.classifier.weight.dtype)
      end
      assert.are.same(exp.greedy_ids, m:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)

   describe("config", function()
      it("reads LongcatFlashConfig's defaults, LongCat-Flash-Chat's: 560,664,958,976 parameters as the hub holds them", function()
         local fix = H.read_json(DIR .. "/hub_skeleton.json")
         local m = H.assert_matches_skeleton(function() return longcat.LongcatFlashForCausalLM({ model_type = "longcat_flash" }) end, fix)
         local c = m.config
         assert.are.same({ 28, 131072, 6144, 12288, 2048, 512, 256, 12, 6, 64 }, { c.num_hidden_layers, c.vocab_size,
            c.hidden_size, c.intermediate_size, c.moe_intermediate_size, c.n_routed_experts, c.zero_expert_num,
            c.num_experts_per_tok, c.routed_scaling_factor, c.num_attention_heads })
         assert.are.same({ 1536, 512, 128, 64, 128, 10000000, 1e-5, 131072, false }, { c.q_lora_rank, c.kv_lora_rank,
            c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.rope.rope_theta, c.rms_norm_eps,
            c.max_position_embeddings, c.norm_topk_prob })
         assert.is_true(math.abs(c.softmax_scale - 192 ^ -0.5) < 1e-15)
         assert.are.equal(512 + 256, m.model.layers[28].mlp.router.e_score_correction_bias:numel())
         assert.are.equal(64, 2 * m.model.rotary_emb.inv_freq:numel())
      end)

      it("reads the Llama-style aliases as transformers' attribute_map does: they win, num_hidden_layers halved", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.num_hidden_layers, raw.num_experts_per_tok, raw.intermediate_size = 5, 3, 48
         local c = longcat.config(raw)
         assert.are.same({ 2, 2, 3, 48 }, { c.num_layers, c.num_hidden_layers, c.num_experts_per_tok, c.intermediate_size })
         -- a top-k past the real experts, within the pool with the zero experts
         raw.num_hidden_layers, raw.num_experts_per_tok = nil, 8
         assert.are.equal(8, longcat.config(raw).num_experts_per_tok)
      end)

      it("names a malformed field and the file", function()
         local function fails(change, msg) H.assert_config_fails(longcat.config, DIR, change, msg) end
         fails({ moe_topk = 10 }, "models.longcat_flash: moe_topk 10 is more than the 9 experts (n_routed_experts 6 + zero_expert_num 3) in config table")
         fails({ moe_topk = 0 }, 'config key "moe_topk" must be an integer >= 1, got 0')
         fails({ num_layers = 0 }, 'config key "num_layers" must be an integer >= 1, got 0')
         fails({ zero_expert_num = -1 }, 'config key "zero_expert_num" must be an integer >= 0, got -1')
         fails({ ffn_hidden_size = 1.5 }, 'config key "ffn_hidden_size" must be an integer >= 1, got 1.5')
         fails({ expert_ffn_hidden_size = "x" }, 'config key "expert_ffn_hidden_size" must be an integer >= 1, got x')
         fails({ head_dim = 16 }, 'config key "head_dim" (16, the width transformers gives the rotary table) must equal qk_rope_head_dim 8')
         fails({ qk_head_dim = 20 }, 'config key "qk_head_dim" must be qk_nope_head_dim + qk_rope_head_dim (24), got 20')
         fails({ kv_lora_rank = 0 }, 'models.longcat_flash: config key "kv_lora_rank" must be an integer >= 1, got 0')
         fails({ router_bias = "no" }, 'config key "router_bias" must be a boolean, got no')
         fails({ routed_scaling_factor = 0 }, 'config key "routed_scaling_factor" must be a positive number, got 0')
         local dir = H.tmpdir()
         H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
         local raw = H.read_json(DIR .. "/config.json")
         raw.num_layers = 0
         H.write(dir .. "/config.json", require("cjson").encode(raw))
         local ok, err = pcall(models.from_pretrained, dir)
         assert.is_false(ok)
         assert.truthy(tostring(err):find('models.longcat_flash: config key "num_layers" must be an integer >= 1, got 0 in '
            .. dir .. "/config.json", 1, true), err)
         H.rmdir(dir)
      end)
   end)
end)
