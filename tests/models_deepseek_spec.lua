-- ml.models DeepSeek-V2 and V3 (multi-head latent attention, grouped expert routing, shared
-- experts) and the families sharing their layout against transformers
-- (tests/fixtures/gen_models.py deepseek_v3 deepseek_v2 deepseek_v2_lite, and glm4_moe_lite
-- deepseek_v32 glm_moe_dsa deepseek_v32_fp8, glm4_moe solar_open): names, logits, greedy ids, the latent cache and its two ways of attending,
-- routing, the multi-token-prediction layers real checkpoints carry, and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local deepseek = require("moonload.models.deepseek")
local H = require("models_helpers")

local TOL = 1e-4

local function tiny_v3(over)
   local c = { model_type = "deepseek_v3", vocab_size = 50, hidden_size = 16, intermediate_size = 32,
      moe_intermediate_size = 8, num_hidden_layers = 2, num_attention_heads = 2, n_routed_experts = 8,
      n_shared_experts = 1, num_experts_per_tok = 2, n_group = 4, topk_group = 2, first_k_dense_replace = 1,
      kv_lora_rank = 8, q_lora_rank = 12, qk_rope_head_dim = 4, qk_nope_head_dim = 8, v_head_dim = 6 }
   for k, v in pairs(over or {}) do c[k] = v end
   return c
end

for _, case in ipairs({
   { "deepseek_v3_tiny", "DeepseekV3ForCausalLM", "sigmoid scores, bias, groups, q bottleneck, YaRN" },
   { "deepseek_v2_tiny", "DeepseekV2ForCausalLM", "softmax within groups, YaRN mscale ratio" },
   { "deepseek_v2_lite_tiny", "DeepseekV2ForCausalLM", "greedy softmax, q_proj, plain rotary" },
   -- (their own specs: tests/models_deepseek_sparse_spec.lua)
   { "glm4_moe_lite_tiny", "Glm4MoeLiteForCausalLM", "GLM-4.7-Flash: V3's layout, mlp_layer_types" },
   { "deepseek_v32_tiny", "DeepseekV32ForCausalLM", "sparse attention, every layer indexed, rotary halves" },
   { "glm_moe_dsa_tiny", "GlmMoeDsaForCausalLM", "sparse attention, a shared layer, interleaved rotary pairs" },
   { "deepseek_v32_fp8_tiny", "DeepseekV32ForCausalLM", "sparse attention, DeepSeek's FP8 files" },
   { "mistral4_tiny", "Mistral4ForCausalLM", "Mistral Small 4: softmax routing, query scaling, stacked experts" },
}) do
   local name, class, what = case[1], case[2], case[3]
   describe("models." .. name .. " (" .. what .. ")", function()
      local exp = H.expected(name)
      local model = models.from_pretrained(H.FIX .. "/" .. name)

      it("builds " .. class .. " with every tensor of the checkpoint, under its names", function()
         assert.are.equal(class, model.__name)
         local want = {}
         for k in pairs(ml.safetensors.load_file(H.FIX .. "/" .. name .. "/model.safetensors")) do want[#want + 1] = k end
         local have = {}
         for k in pairs(model:state_dict()) do have[#have + 1] = k end
         table.sort(want)
         table.sort(have)
         assert.are.same(want, have)
      end)

      it("gives transformers' logits and greedy ids", function()
         assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
         assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens,
            eos_token_id = false }))
      end)

      H.it_attends_both_ways(model, name)

      it("decodes the same under a block schedule and with prompt-lookup drafts (blocks and crops of the cache)", function()
         local want = model:generate(exp.input_ids, { max_new_tokens = 6, eos_token_id = false })
         assert.are.same(want, model:generate(exp.input_ids, { max_new_tokens = 6, eos_token_id = false,
            micro_batch_size = 1, prefill_chunk_size = 3 }))
         assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens,
            eos_token_id = false, prompt_lookup_num_tokens = 3 }))
      end)
   end)
end

describe("models.deepseek_v3 latent attention", function()
   local exp = H.expected("deepseek_v3_tiny")
   local model = models.from_pretrained(H.FIX .. "/deepseek_v3_tiny")
   local attn = model.model.layers[1].self_attn

   it("caches the normed latent and the rotary key only: kv_lora_rank + qk_rope_head_dim a token", function()
      local cache = model:new_cache()
      model(exp.input_ids, { cache = cache })
      assert.are.same({ 2, 1, 8, 16 }, cache.k[1]:narrow(3, 1, cache.length).shape)
      assert.are.same({ 2, 1, 8, 8 }, cache.v[1]:narrow(3, 1, cache.length).shape)
      local rm = require("moonload.utils.runtime_memory")
      local sizes = rm.kv_cache_sizes(model, { batch_size = 2, max_length = 20, prompt_length = 8 })
      assert.are.equal(2 * 20 * (16 + 8) * 4, sizes["model.layers.0.self_attn"])
   end)

   it("absorbs kv_b_proj under cpu_offload's per-layer hooks too, its weight brought for the step", function()
      local offloaded = models.from_pretrained(H.FIX .. "/deepseek_v3_tiny")
      ml.cpu_offload(offloaded, { execution_device = "cpu" })
      local proj = offloaded.model.layers[1].self_attn.kv_b_proj
      assert.is_true(proj.weight:is_meta() and rawget(proj, "_hf_hook") ~= nil)
      local absorbed = 0
      local dense = proj.dense_weight
      proj.dense_weight = function(self, dtype) absorbed = absorbed + 1; return dense(self, dtype) end
      assert.is_true(H.max_abs_diff(H.decoded_logits(offloaded, exp.input_ids[2], 5), { exp.logits[2] }) < TOL)
      assert.are.equal(3, absorbed)                    -- the 3 decoding steps
      assert.is_true(proj.weight:is_meta())            -- and put back
   end)

   it("absorbs kv_b_proj when that costs less: decoding steps yes, a long prompt no", function()
      assert.is_true(attn:absorbs(1, 9))
      assert.is_true(attn:absorbs(1, 4096))
      assert.is_false(attn:absorbs(64, 64))
      assert.is_false(attn:absorbs(512, 512))
   end)

   H.it_matches_padded(model, "deepseek_v3_tiny", "positions")

   it("loads bfloat16 with the router's weight and correction bias kept float32", function()
      local bf = models.from_pretrained(H.FIX .. "/deepseek_v3_tiny", { dtype = "bfloat16" })
      local gate = bf.model.layers[2].mlp.gate
      assert.are.equal("float32", gate.weight.dtype)
      assert.are.equal("float32", gate.e_score_correction_bias.dtype)
      assert.are.equal("bfloat16", bf.model.layers[2].self_attn.kv_b_proj.weight.dtype)
      -- (the second prompt's 5th token goes to other experts in bfloat16, a near tie of two groups:
      -- routing is not continuous, so only the first row is compared)
      local logits = bf(ml.tensor(exp.input_ids, { dtype = "int64" })):float()
      assert.is_true(H.max_abs_diff(logits:narrow(1, 1, 1), { exp.logits[1] }) < 0.2)
   end)
end)

describe("models.deepseek routing", function()
   -- a block whose router returns the given logits (one row per token)
   local function block_with(cfg, logits, bias)
      local m = deepseek.DeepseekV3ForCausalLM(cfg)
      local mlp = m.model.layers[2].mlp
      mlp.gate.forward = function() return ml.tensor(logits, { dtype = "float32" }) end
      if bias then mlp.gate.e_score_correction_bias:copy_(ml.tensor(bias, { dtype = "float32" })) end
      return mlp
   end
   local function logit(p) return math.log(p / (1 - p)) end     -- sigmoid(logit(p)) = p

   it("V3: picks within the best groups by their top-two sums, chooses with the bias, weighs without it", function()
      -- groups {0,1} {2,3} {4,5} {6,7}; expert 0 scores best alone, but its group's two sum to less
      -- than those of {2,3} and {4,5}
      local p = { 0.95, 0.01, 0.6, 0.55, 0.5, 0.48, 0.3, 0.3 }
      local row = {}
      for e, v in ipairs(p) do row[e] = logit(v) end
      local mlp = block_with(tiny_v3({ routed_scaling_factor = 2 }), { row })
      local w, idx = mlp:route(ml.zeros({ 1, 16 }))
      assert.are.same({ { 2, 3 } }, idx)
      assert.is_true(H.max_abs_diff(w, { { 2 * 0.6 / 1.15, 2 * 0.55 / 1.15 } }) < 1e-6)   -- renormalized (V3's default)
      -- a bias of 0.5 on expert 5 makes it the first choice; its weight stays its own score
      mlp = block_with(tiny_v3({ routed_scaling_factor = 2 }), { row }, { 0, 0, 0, 0, 0, 0.5, 0, 0 })
      w, idx = mlp:route(ml.zeros({ 1, 16 }))
      assert.are.same({ { 5, 2 } }, idx)
      assert.is_true(H.max_abs_diff(w, { { 2 * 0.48 / 1.08, 2 * 0.6 / 1.08 } }) < 1e-6)
      -- without renormalizing: the scores times the factor
      mlp = block_with(tiny_v3({ routed_scaling_factor = 2, norm_topk_prob = false }), { row })
      w = mlp:route(ml.zeros({ 1, 16 }))
      assert.is_true(H.max_abs_diff(w, { { 2 * 0.6, 2 * 0.55 } }) < 1e-6)
   end)

   it("V2: group_limited_greedy ranks groups by their best softmax score; greedy ignores groups", function()
      local row = { 3, -5, 2, 2.5, 1, 0, -1, -2 }
      local cfg = tiny_v3({ model_type = "deepseek_v2", topk_method = "group_limited_greedy", n_group = 4, topk_group = 1 })
      local m = deepseek.DeepseekV2ForCausalLM(cfg)
      local mlp = m.model.layers[2].mlp
      mlp.gate.forward = function() return ml.tensor({ row }, { dtype = "float32" }) end
      local w, idx = mlp:route(ml.zeros({ 1, 16 }))
      assert.are.same({ { 0, 1 } }, idx)                          -- group {0,1} holds the best; both its experts
      local soft = ml.tensor({ row }):softmax(-1):tolist()[1]
      assert.is_true(H.max_abs_diff(w, { { soft[1], soft[2] } }) < 1e-6)
      cfg.topk_method = "greedy"
      mlp = deepseek.DeepseekV2ForCausalLM(cfg).model.layers[2].mlp
      mlp.gate.forward = function() return ml.tensor({ row }, { dtype = "float32" }) end
      w, idx = mlp:route(ml.zeros({ 1, 16 }))
      assert.are.same({ { 0, 3 } }, idx)
   end)

   it("runs only the experts the router picked", function()
      local model = models.from_pretrained(H.FIX .. "/deepseek_v3_tiny")
      local rows = 0
      for l = 2, 3 do
         for e = 1, 8 do
            local ex = model.model.layers[l].mlp.experts[e]
            local f = ex.forward
            ex.forward = function(self, x) rows = rows + x:size(1); return f(self, x) end
         end
      end
      model({ 1, 7, 9 })
      assert.are.equal(3 * 3 * 2, rows)              -- 3 tokens, 3 experts each, 2 sparse layers
   end)
end)

describe("models.deepseek checkpoints and configs", function()
   it("leaves out the multi-token-prediction layers stored after the last layer, and nothing else", function()
      local dir = H.tmpdir()
      for _, f in ipairs({ "config.json", "generation_config.json" }) do
         H.copy(H.FIX .. "/deepseek_v3_tiny/" .. f, dir .. "/" .. f)
      end
      local sd = ml.safetensors.load_file(H.FIX .. "/deepseek_v3_tiny/model.safetensors")
      sd["model.layers.3.eh_proj.weight"] = ml.zeros({ 32, 64 })           -- num_nextn_predict_layers = 1
      sd["model.layers.3.mlp.experts.0.up_proj.weight"] = ml.zeros({ 16, 32 })
      ml.safetensors.save_file(sd, dir .. "/model.safetensors")
      local exp = H.expected("deepseek_v3_tiny")
      local model = models.from_pretrained(dir)
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      sd["model.layers.4.eh_proj.weight"] = ml.zeros({ 32, 64 })
      ml.safetensors.save_file(sd, dir .. "/model.safetensors")
      assert.has_error(function() models.from_pretrained(dir) end)
      local ok, err = pcall(models.from_pretrained, dir)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("model.layers.4.eh_proj.weight", 1, true), err)
      H.rmdir(dir)
   end)

   it("names what is wrong in a config", function()
      local function fails(over, msg)
         local ok, err = pcall(deepseek.DeepseekV3ForCausalLM, tiny_v3(over))
         assert.is_false(ok)
         assert.truthy(tostring(err):find(msg, 1, true), err)
      end
      fails({ topk_group = 5 }, "models.deepseek_v3: topk_group 5 is more than n_group 4 in config table")
      fails({ n_group = 3 }, "models.deepseek_v3: n_routed_experts 8 is not a multiple of n_group 3 in config table")
      fails({ n_group = 8, topk_group = 2 }, "n_group 8 leaves fewer than 2 experts a group (n_routed_experts 8)")
      fails({ qk_rope_head_dim = 5 }, "qk_rope_head_dim must be even, got 5")
      fails({ num_experts_per_tok = 9 }, "num_experts_per_tok 9 is more than n_routed_experts 8")
      fails({ kv_lora_rank = 0 }, 'config key "kv_lora_rank" must be an integer >= 1, got 0')
      fails({ topk_group = 1, num_experts_per_tok = 3 }, "topk_group 1 groups of 2 experts hold fewer than num_experts_per_tok 3")
      local ok, err = pcall(deepseek.DeepseekV2ForCausalLM, tiny_v3({ model_type = "deepseek_v2", topk_method = "noaux_tc" }))
      assert.is_false(ok)
      assert.truthy(tostring(err):find('topk_method "noaux_tc" is not supported (supported: greedy, group_limited_greedy)', 1, true), err)
   end)
end)

describe("models.deepseek_v3 FP8 checkpoint (tests/fixtures/models/deepseek_v3_fp8_tiny: float8 weights, 16 x 16 scales)", function()
   H.collect_warnings()                       -- (the disk offload note) kept quiet
   local exp = H.expected("deepseek_v3_fp8_tiny")
   local model = models.from_pretrained(H.FIX .. "/deepseek_v3_fp8_tiny")

   it("keeps the projections float8 with their scales, the head, router and norms as stored", function()
      local attn, mlp = model.model.layers[2].self_attn, model.model.layers[2].mlp
      for _, m in ipairs({ attn.q_a_proj, attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj, mlp.experts[8].down_proj,
                           mlp.shared_experts.gate_proj, model.model.layers[1].mlp.up_proj }) do
         assert.are.equal("Fp8Linear", m.__name)
         assert.are.equal("float8_e4m3fn", m.weight.dtype)
      end
      assert.are.same({ 2, 2 }, attn.kv_a_proj_with_mqa.weight_scale_inv.shape)   -- 24 rows: a partial tile
      assert.are.equal("Linear", model.lm_head.__name)
      assert.are.equal("float32", mlp.gate.weight.dtype)
   end)

   it("gives the logits and greedy ids of its dequantized weights (transformers' dequantize = True)", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      -- decoding absorbs the float8 kv_b_proj as it absorbs a float one
      H.attending(true, function()
         assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[2], 5), { exp.logits[2] }) < TOL)
      end)
   end)

   it("runs over CPU and disk with its float8 weights offloaded as they are", function()
      local dir = H.tmpdir()
      local m = models.from_pretrained(H.FIX .. "/deepseek_v3_fp8_tiny",
         { device_map = "auto", max_memory = { cpu = 60000 }, offload_folder = dir })
      local places = {}
      for _, d in pairs(m.hf_device_map) do places[tostring(d)] = true end
      assert.is_true(places.cpu and places.disk)
      assert.is_true(H.max_abs_diff(m(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids[1], m:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(dir)
   end)

   it("keeps float8 weights and float32 scales and router as they are when a dispatch converts to bfloat16", function()
      local dir = H.tmpdir()
      local m = models.from_pretrained(H.FIX .. "/deepseek_v3_fp8_tiny",
         { dtype = "bfloat16", device_map = "auto", max_memory = { cpu = 40000 }, offload_folder = dir })
      -- the layers went to disk: their hooks read what the offload folder holds
      local seen = 0
      for name, mod in m:named_modules() do
         local h = rawget(mod, "_hf_hook")
         local wm = h and h.weights_map
         if wm and mod.__name == "Fp8Linear" then
            assert.are.equal("float8_e4m3fn", wm.weight.dtype, name)
            assert.are.equal("float32", wm.weight_scale_inv.dtype, name)
            seen = seen + 1
         elseif wm and mod.__name == "DeepseekTopkRouter" then
            assert.are.equal("float32", wm.weight.dtype, name)
            seen = seen + 1
         end
      end
      assert.is_true(seen > 60, "float8 layers and routers read from disk: " .. seen)
      assert.are.equal("bfloat16", m.model.embed_tokens.weight.dtype)
      local logits = m(ml.tensor(exp.input_ids, { dtype = "int64" })):float()
      assert.is_true(H.max_abs_diff(logits:narrow(1, 1, 1), { exp.logits[1] }) < 0.3)
      H.rmdir(dir)
   end)

   it("saves back as an FP8 checkpoint that loads to the same model", function()
      local dir = H.tmpdir()
      ml.save_model(model, dir)
      local cfg = H.read_json(dir .. "/config.json")
      assert.are.equal("fp8", cfg.quantization_config.quant_method)
      assert.are.same({ 16, 16 }, cfg.quantization_config.weight_block_size)
      local again = models.from_pretrained(dir)
      assert.are.equal("float8_e4m3fn", again.model.layers[3].mlp.experts[1].up_proj.weight.dtype)
      assert.is_true(H.max_abs_diff(again(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("names an FP8 quantization_config it cannot read", function()
      local dir = H.tmpdir()
      H.copy(H.FIX .. "/deepseek_v3_fp8_tiny/model.safetensors", dir .. "/model.safetensors")
      local cfg = H.read_json(H.FIX .. "/deepseek_v3_fp8_tiny/config.json")
      local function fails(qc, msg)
         cfg.quantization_config = qc
         H.write(dir .. "/config.json", require("cjson").encode(cfg))
         local ok, err = pcall(models.from_pretrained, dir)
         assert.is_false(ok)
         assert.truthy(tostring(err):find(msg, 1, true), err)
      end
      fails({ quant_method = "fp8", fmt = "e4m3" }, "quantization_config in " .. dir .. "/config.json must give weight_block_size as two positive integers")
      fails({ quant_method = "fp8", weight_block_size = { 16, 16 }, activation_scheme = "static" },
         'has activation_scheme "static"')
      fails({ quant_method = "fp8", weight_block_size = { 16, 16 }, fmt = "e2m1" }, 'has fmt "e2m1" (expected "e4m3" or "e5m2")')
      fails({ quant_method = "bitsandbytes" }, 'has quant_method "bitsandbytes"; moonload reads its own int8 and int4 checkpoints')
      H.rmdir(dir)
   end)
end)

describe("models: Kimi K2.5's folder (tests/fixtures/models/kimi_k25_ct_int4_tiny: kimi_k25, int4 experts)", function()
   local exp = H.expected("kimi_k25_ct_int4_tiny")
   local model = models.from_pretrained(H.FIX .. "/kimi_k25_ct_int4_tiny")

   it("builds its DeepSeek-V3 language model from text_config, the experts int4 as stored, the vision tower left out", function()
      assert.are.equal("DeepseekV3ForCausalLM", model.__name)
      assert.truthy(model.config._source:find("(text_config)", 1, true))
      assert.are.equal("QuantizedLinear", model.model.layers[2].mlp.experts[1].gate_proj.__name)
      for name in pairs(model:state_dict()) do assert.is_nil(name:find("vision") or name:find("mm_projector"), name) end
   end)

   it("gives the logits and greedy ids of the same language model in DeepSeek-V3's own folder", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false }))
   end)
end)

describe("models.mistral4 (tests/fixtures/models/mistral4_tiny: Mistral Small 4)", function()
   local exp = H.expected("mistral4_tiny")
   local model = models.from_pretrained(H.FIX .. "/mistral4_tiny")
   local ids = ml.tensor(exp.input_ids, { dtype = "int64" })

   H.it_matches_padded(model, "mistral4_tiny", "positions and query scales")

   it("reads the experts stacked as transformers writes them, or one module each, to the same logits", function()
      assert.are.equal("StackedExperts", model.model.layers[2].mlp.experts.__name)
      local dir = H.tmpdir()
      H.copy(H.FIX .. "/mistral4_tiny/config.json", dir .. "/config.json")
      local tensors = {}
      for name, t in pairs(ml.safetensors.load_file(H.FIX .. "/mistral4_tiny/model.safetensors")) do
         local prefix, proj = name:match("^(.*%.mlp%.experts)%.([%w_]+)$")
         if proj == "gate_up_proj" then
            for e = 0, t:size(1) - 1 do
               local w = t:select(1, e + 1)
               tensors[prefix .. "." .. e .. ".gate_proj.weight"] = w:narrow(1, 1, 16):contiguous()
               tensors[prefix .. "." .. e .. ".up_proj.weight"] = w:narrow(1, 17, 16):contiguous()
            end
         elseif proj == "down_proj" then
            for e = 0, t:size(1) - 1 do tensors[prefix .. "." .. e .. ".down_proj.weight"] = t:select(1, e + 1):contiguous() end
         else
            tensors[name] = t
         end
      end
      ml.safetensors.save_file(tensors, dir .. "/model.safetensors")
      local apart = models.from_pretrained(dir)
      assert.are.equal("ModuleList", apart.model.layers[2].mlp.experts.__name)
      assert.is_true(H.max_abs_diff(apart(ids), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("routes by softmax scores within the groups whose best two score highest", function()
      local method = deepseek.METHODS.softmax_best_two
      deepseek.METHODS.softmax_best_two = { sigmoid = false }           -- a group scored by its best one
      local ok, logits = pcall(model, ids)
      deepseek.METHODS.softmax_best_two = method
      assert.is_true(ok, logits)
      assert.is_true(H.max_abs_diff(logits, exp.logits) > 1e-3)
   end)

   it("scales its queries by position: without it, other logits", function()
      local saved = rawget(model.model.rotary_emb, "query_scaling")
      rawset(model.model.rotary_emb, "query_scaling", { beta = 0, original = 4 })
      local ok, logits = pcall(model, ids)
      rawset(model.model.rotary_emb, "query_scaling", saved)
      assert.is_true(ok, logits)
      assert.is_true(H.max_abs_diff(logits, exp.logits) > 0.05)
   end)
end)

describe("examples/deepseek.lua", function()
   -- the example's output for a folder (nil: its default) and the greedy tokens it should print
   local function run(dir)
      local p = assert(io.popen("luajit examples/deepseek.lua " .. (dir and H.FIX .. "/" .. dir or "") .. " 2>/dev/null"))
      local text = p:read("*a")
      p:close()
      local want = models.from_pretrained(H.FIX .. "/" .. (dir or "deepseek_v3_fp8_tiny")):generate({ 0, 5, 17, 42, 3 },
         { max_new_tokens = 16, eos_token_id = false })
      assert.are.same({ unpack(want, 6) }, H.printed_ids(text))
      return text
   end

   it("runs the FP8 test folder with its experts on disk and prints the model's greedy tokens", function()
      local text = run()
      assert.truthy(text:find("DeepseekV3ForCausalLM, [%d.]+ MB of weights in RAM, [%d.]+ MB on disk %(the routed experts%); projections float8_e4m3fn"), text)
      assert.truthy(text:find("the latent cache holds 72 values a token (24 per layer), where per-head keys and values would be 432", 1, true))
   end)

   it("runs a GLM-5 folder (sparse attention, a shared indexer layer) and counts the indexers' keys", function()
      local text = run("glm_moe_dsa_tiny")
      assert.truthy(text:find("GlmMoeDsaForCausalLM, [%d.]+ MB of weights in RAM, [%d.]+ MB on disk %(the routed experts%); projections float32"), text)
      assert.truthy(text:find("the latent cache holds 104 values a token (24 per layer, 16 per indexer), where per-head keys and values would be 432", 1, true), text)
      assert.truthy(text:find("sparse attention: 2 of 3 layers run an indexer; each query attends to its best 4 keys", 1, true), text)
   end)
end)

describe("hub configs (DeepSeek-V3's, V3.2's, V2-Lite's, GLM-4.5-Air's, GLM-4.7-Flash's, GLM-5's and Mistral Small 4's config.json, built empty)", function()
   local fix = H.read_json(H.FIX .. "/deepseek_hub_configs.json")
   local sparse = require("moonload.models.deepseek_sparse")
   local CLASSES = { deepseek_v3 = deepseek.DeepseekV3ForCausalLM, deepseek_v2 = deepseek.DeepseekV2ForCausalLM,
                     glm4_moe = require("moonload.models.glm4_moe").Glm4MoeForCausalLM,
                     glm4_moe_lite = deepseek.Glm4MoeLiteForCausalLM, deepseek_v32 = sparse.DeepseekV32ForCausalLM,
                     glm_moe_dsa = sparse.GlmMoeDsaForCausalLM, mistral4 = deepseek.Mistral4ForCausalLM }
   -- (transformers builds Mistral Small 4's experts stacked per projection)
   local OPTS = { mistral_small_4 = { experts_layout = "out_in" } }

   for _, name in ipairs({ "deepseek_v3", "deepseek_v2_lite", "glm4_5_air", "deepseek_v32", "glm_5", "glm_4_7_flash",
                           "mistral_small_4" }) do
      it(name .. ": transformers' parameter count, names and shapes, softmax and rotary scales", function()
         local c = fix[name].config
         local m = ml.init_empty_weights(function() return CLASSES[c.model_type](c, OPTS[name]) end)
         local count, shapes = 0, {}
         for pname, p in m:named_parameters() do
            count = count + p:numel()
            shapes[pname] = p.shape
         end
         assert.are.equal(fix[name].parameters, count)              -- 671,026,404,352 for V3
         for pname, shape in pairs(fix[name].shapes) do
            assert.are.same(shape, shapes[pname], pname)
         end
         local scale = m.config.softmax_scale or rawget(m.model.layers[1].self_attn, "scale")
         assert.is_true(math.abs(scale - fix[name].softmax_scale) < 1e-12)
         assert.are.equal(fix[name].rope_attention_scaling, rawget(m.model.rotary_emb, "attention_scaling") or 1)
         assert.are.equal(fix[name].rotary_dims, 2 * m.model.rotary_emb.inv_freq:numel())
      end)
   end

   it("deepseek_v3: its FP8 layers, scales per 128 x 128 tile (partial ones included), the head and routers as they are", function()
      local c = fix.deepseek_v3.config
      local m = ml.init_empty_weights(function()
         return require("moonload.quantize").apply_config(deepseek.DeepseekV3ForCausalLM(c), c.quantization_config,
            "config table", "test")
      end)
      local attn, mlp = m.model.layers[4].self_attn, m.model.layers[4].mlp
      assert.are.same({ 5, 56 }, attn.kv_a_proj_with_mqa.weight_scale_inv.shape)   -- 576 rows: 4.5 tiles
      assert.are.same({ 192, 12 }, attn.q_b_proj.weight_scale_inv.shape)
      assert.are.same({ 56, 16 }, mlp.experts[256].down_proj.weight_scale_inv.shape)
      assert.are.equal("float8_e4m3fn", mlp.shared_experts.up_proj.weight.dtype)
      assert.are.equal("Linear", m.lm_head.__name)
      assert.are.equal("DeepseekTopkRouter", mlp.gate.__name)
      local float8 = 0
      local total = 0
      for _, p in m:named_parameters() do
         total = total + p:numel()
         if p.dtype == "float8_e4m3fn" then float8 = float8 + p:numel() end
      end
      assert.is_true(float8 / total > 0.99, tostring(float8 / total))
   end)
end)

describe("models.glm4_moe (tests/fixtures/models/glm4_moe_tiny: GQA with biases and q/k norms, half-rotary heads, V3's routing)", function()
   local exp = H.expected("glm4_moe_tiny")
   local model = models.from_pretrained(H.FIX .. "/glm4_moe_tiny")

   it("builds Glm4MoeForCausalLM with every tensor of the checkpoint, rotating half of each head", function()
      assert.are.equal("Glm4MoeForCausalLM", model.__name)
      local want, have = {}, {}
      for k in pairs(ml.safetensors.load_file(H.FIX .. "/glm4_moe_tiny/model.safetensors")) do want[#want + 1] = k end
      for k in pairs(model:state_dict()) do have[#have + 1] = k end
      table.sort(want)
      table.sort(have)
      assert.are.same(want, have)
      assert.are.equal(4, model.config.rotary_dim)                       -- of head_dim 8
      assert.are.equal("Glm4MoeMoE", model.model.layers[2].mlp.__name)
      assert.are.equal("Glm4MoeMLP", model.model.layers[1].mlp.__name)
      assert.is_nil(model.model.layers[1].self_attn.o_proj.bias)
   end)

   it("gives transformers' logits and greedy ids, and decodes with the cache as a full forward", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[2], 5), { exp.logits[2] }) < TOL)
   end)

   H.it_matches_padded(model, "glm4_moe_tiny", "positions")
end)

describe("models.solar_open (tests/fixtures/models/solar_open_tiny: GLM-4.5's routing in every layer, whole-head rotary)", function()
   local exp, model, ids, logits_after = H.fixture_model("solar_open_tiny")

   it("builds SolarOpenForCausalLM: every layer sparse, q/k/v biased, the output not, no q/k norms", function()
      assert.are.equal("SolarOpenForCausalLM", model.__name)
      assert.are.same({ "SolarOpenDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, H.FIX .. "/solar_open_tiny")
      for _, layer in ipairs(model.model.layers) do assert.are.equal("SolarOpenMoE", layer.mlp.__name) end
      local attn = model.model.layers[1].self_attn
      assert.is_not_nil(attn.q_proj.bias)
      assert.is_nil(attn.o_proj.bias)
      assert.is_nil(attn.q_norm)
      assert.are.equal(8, model.config.rotary_dim)                       -- of head_dim 8
   end)

   H.it_matches_expected(model, "solar_open_tiny")
   H.it_matches_padded(model, "solar_open_tiny", "positions")

   it("needs the routing's correction bias", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, layer in ipairs(m.model.layers) do layer.mlp.gate.e_score_correction_bias:zero_() end
      end), exp.logits) > 1e-3)
   end)

   it("reads transformers' defaults (128 experts, one shared, 8 a token, every layer sparse)", function()
      local raw = H.read_json(H.FIX .. "/solar_open_tiny/config.json")
      for _, k in ipairs({ "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
                           "moe_intermediate_size", "head_dim", "norm_topk_prob" }) do raw[k] = nil end
      local cfg = require("moonload.models.glm4_moe").solar_open_config(raw)
      assert.are.same({ 128, 1, 8, 1280, 128, true }, { cfg.n_routed_experts, cfg.n_shared_experts,
         cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.head_dim, cfg.norm_topk_prob })
      assert.are.same({ true, true }, cfg.sparse_layers)
      H.assert_config_fails(function(r) return require("moonload.models.glm4_moe").solar_open_config(r) end,
         H.FIX .. "/solar_open_tiny", { num_experts_per_tok = 9 }, "models.solar_open: num_experts_per_tok 9 is more than n_routed_experts 8")
   end)
end)
