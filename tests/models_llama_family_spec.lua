-- ml.models Mistral, Qwen2, Qwen3 and Phi-3 (Llama's network with sliding-window attention, q/k/v
-- biases for Qwen2, per-head q/k norms for Qwen3, fused projections and partial rotary embeddings
-- for Phi-3): names, configs, logits and greedy generation against transformers
-- (tests/fixtures/gen_models.py mistral qwen2 qwen3 phi3). The fixtures' prompts and generations
-- run past the window, so keys it hides matter in prefill, in decode with the cache and with
-- padding.
local ml = require("moonload")
local models = require("moonload.models")
local llama = require("moonload.models.llama")
local H = require("models_helpers")

local TOL = 1e-4

local function tiny(over)
   local c = { vocab_size = 50, hidden_size = 16, intermediate_size = 32, num_hidden_layers = 2,
      num_attention_heads = 4, num_key_value_heads = 2 }
   for k, v in pairs(over or {}) do c[k] = v end
   return c
end

-- Logits of the last two positions decoded one by one with the cache, next to a full forward.
local function assert_cache_decodes(model, ids)
   local n = #ids
   local full = model(ids)
   local cache = model:new_cache()
   local prefix = {}
   for i = 1, n - 2 do prefix[i] = ids[i] end
   model(prefix, { cache = cache })
   local a = model({ ids[n - 1] }, { cache = cache })
   local b = model({ ids[n] }, { cache = cache })
   -- float32 sums in another order: a decoding step's products have other shapes
   assert.is_true(H.max_abs_diff(a, full:narrow(2, n - 1, 1):tolist()) < 2e-5)
   assert.is_true(H.max_abs_diff(b, full:narrow(2, n, 1):tolist()) < 2e-5)
end

-- The checks every family gets: transformers' logits and greedy ids for the fixture's prompts,
-- and decoding with the cache equal to a full forward.
local function it_matches_transformers(model, exp, what)
   it("gives the same logits and greedy ids as transformers (" .. what .. ")", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)
   it("decodes with the cache to the same logits as a full forward", function()
      assert_cache_decodes(model, exp.input_ids[#exp.input_ids])
   end)
end

local it_matches_padded = H.it_matches_padded

describe("models.mistral (tests/fixtures/models/mistral_tiny: sliding window 4)", function()
   local exp = H.expected("mistral_tiny")
   local model = models.from_pretrained(H.FIX .. "/mistral_tiny")

   it("builds MistralForCausalLM with Llama's parameter names and no biases", function()
      assert.are.equal("MistralForCausalLM", model.__name)
      assert.are.equal("MistralDecoderLayer", model.model.layers[1].__name)
      assert.are.same({ "MistralDecoderLayer" }, model.no_split_modules)
      assert.are.same({ 4, 4 }, model.config.layer_windows)
      for name in model:named_parameters() do assert.is_nil(name:find("bias"), name) end
      assert.are.equal(ml.models.mistral.MistralForCausalLM, llama.MistralForCausalLM)
   end)

   it_matches_transformers(model, exp, "batch of 2, past the window")

   it("generates transformers' greedy ids for a left-padded batch", function()
      local pad = H.read_json(H.FIX .. "/mistral_tiny/padded.json")
      local logits = model(pad.input_ids, { attention_mask = pad.attention_mask })
      assert.is_true(H.max_abs_diff(logits:select(1, 2), pad.logits[2]) < TOL)
      assert.is_true(H.max_abs_diff(logits:select(1, 1):narrow(1, 3, 6),
         { unpack(pad.logits[1], 3, 8) }) < TOL)
      local out = model:generate(pad.input_ids, { attention_mask = pad.attention_mask,
         max_new_tokens = pad.max_new_tokens, eos_token_id = false })
      assert.are.same(pad.greedy_ids, out)
   end)

   it("reads sliding_window null as full attention and names a bad one", function()
      local m = llama.MistralForCausalLM(tiny({ sliding_window = nil }))
      assert.are.same({ false, false }, m.config.layer_windows)
      assert.has_error(function() llama.MistralForCausalLM(tiny({ sliding_window = "4" })) end,
         'models.mistral: config key "sliding_window" in config table must be a positive integer or null, got string "4"')
      assert.has_error(function() llama.MistralForCausalLM(tiny({ sliding_window = 0 })) end,
         'models.mistral: config key "sliding_window" in config table must be a positive integer or null, got 0')
   end)
end)

describe("models.qwen2 (tests/fixtures/models/qwen2_tiny: biases, window 3 on layer 2)", function()
   local exp = H.expected("qwen2_tiny")
   local model = models.from_pretrained(H.FIX .. "/qwen2_tiny")

   it("builds Qwen2ForCausalLM with biases on q, k and v only, and a tied head", function()
      assert.are.equal("Qwen2ForCausalLM", model.__name)
      assert.are.equal("Qwen2DecoderLayer", model.model.layers[2].__name)
      local attn = model.model.layers[1].self_attn
      assert.are.same({ 32 }, attn.q_proj.bias.shape)
      assert.are.same({ 16 }, attn.k_proj.bias.shape)
      assert.are.same({ 16 }, attn.v_proj.bias.shape)
      assert.is_nil(attn.o_proj.bias)
      assert.is_nil(model.model.layers[1].mlp.up_proj.bias)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      assert.are.same({ false, 3 }, model.config.layer_windows)
      assert.are.equal(1000000, model.config.rope_theta)
   end)

   it_matches_transformers(model, exp, "one prompt")

   it("slides only with use_sliding_window, on the layers layer_types or max_window_layers name", function()
      assert.are.same({ false, false }, llama.Qwen2ForCausalLM(tiny({ sliding_window = 8 })).config.layer_windows)
      local m = llama.Qwen2ForCausalLM(tiny({ use_sliding_window = true, sliding_window = 8, max_window_layers = 1 }))
      assert.are.same({ false, 8 }, m.config.layer_windows)
      m = llama.Qwen2ForCausalLM(tiny({ use_sliding_window = true, sliding_window = 8,
         layer_types = { "sliding_attention", "full_attention" } }))
      assert.are.same({ 8, false }, m.config.layer_windows)
      assert.are.same({ false, false }, llama.Qwen2ForCausalLM(tiny({ use_sliding_window = true,
         sliding_window = 8 })).config.layer_windows)   -- max_window_layers defaults to 28
   end)

   it("names bad layer_types", function()
      assert.has_error(function()
         llama.Qwen2ForCausalLM(tiny({ use_sliding_window = true, sliding_window = 8, layer_types = { "full_attention" } }))
      end, 'models.qwen2: config key "layer_types" must list 2 layer types in config table')
      assert.has_error(function()
         llama.Qwen2ForCausalLM(tiny({ layer_types = { "full_attention", "chunked_attention" } }))
      end, 'models.qwen2: layer_types[2] is "chunked_attention" (supported: full_attention, sliding_attention) in config table')
   end)
end)

describe("models.qwen2 with YaRN (tests/fixtures/models/qwen2_tiny_yarn: factor 4 over 16 positions)", function()
   local exp = H.expected("qwen2_tiny_yarn")
   local model = models.from_pretrained(H.FIX .. "/qwen2_tiny_yarn")

   it("computes transformers' frequencies and cos/sin scale", function()
      assert.is_true(H.max_abs_diff(model:get_buffer("model.rotary_emb.inv_freq"), exp.inv_freq) < 1e-9)
      assert.is_true(math.abs(model.model.rotary_emb.attention_scaling - exp.attention_scaling) < 1e-12)
   end)

   it_matches_transformers(model, exp, "18 tokens, past the original 16")

   it("names a bad YaRN parameter", function()
      assert.has_error(function()
         llama.Qwen2ForCausalLM(tiny({ rope_scaling = { type = "yarn", factor = 4, beta_fast = -1 } }))
      end, 'models.qwen2: config key "rope_scaling.beta_fast" in config table must be a positive number, got -1')
   end)
end)

describe("models.qwen3 (tests/fixtures/models/qwen3_tiny: q/k head norms, head_dim 16, window 3 on layer 2)", function()
   local exp = H.expected("qwen3_tiny")
   local model = models.from_pretrained(H.FIX .. "/qwen3_tiny")

   it("builds Qwen3ForCausalLM with q_norm and k_norm over head_dim, after the projections", function()
      assert.are.equal("Qwen3ForCausalLM", model.__name)
      assert.are.same({
         "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
         "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
         "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight",
      }, { unpack(H.param_names(model), 2, 7) })
      local attn = model.model.layers[1].self_attn
      assert.are.same({ 64, 32 }, attn.q_proj.weight.shape)      -- 4 heads of 16 over hidden 32
      assert.are.same({ 16 }, attn.q_norm.weight.shape)
      assert.are_not.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      assert.are.same({ false, 3 }, model.config.layer_windows)
   end)

   it_matches_transformers(model, exp, "batch of 2")

   it("defaults head_dim to 128 as transformers' Qwen3Config does, and honours attention_bias", function()
      local m = llama.Qwen3ForCausalLM(tiny({ attention_bias = true }))
      assert.are.same({ 512, 16 }, m.model.layers[1].self_attn.q_proj.weight.shape)
      assert.are.same({ 16 }, m.model.layers[1].self_attn.o_proj.bias.shape)
   end)
end)

describe("models.phi3 (tests/fixtures/models/phi3_tiny: fused projections, window 5; phi3_tiny_partial: 3/4 rotary)", function()
   local exp = H.expected("phi3_tiny")
   local model = models.from_pretrained(H.FIX .. "/phi3_tiny")

   it("builds Phi3ForCausalLM with qkv_proj and gate_up_proj in transformers' order", function()
      assert.are.equal("Phi3ForCausalLM", model.__name)
      assert.are.same({
         "model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.qkv_proj.weight",
         "model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight",
      }, { unpack(H.param_names(model), 2, 5) })
      assert.are.same({ 64, 32 }, model.model.layers[1].self_attn.qkv_proj.weight.shape)   -- (4 + 2 * 2) heads of 8
      assert.are.same({ 128, 32 }, model.model.layers[1].mlp.gate_up_proj.weight.shape)
      assert.are.same({ 5, 5 }, model.config.layer_windows)
      assert.are.same({ "Phi3DecoderLayer" }, model.no_split_modules)
   end)

   it_matches_transformers(model, exp, "batch of 2, past the window")

   it("rotates only partial_rotary_factor of each head (Phi-4-mini's 0.75)", function()
      local pexp = H.expected("phi3_tiny_partial")
      local m = models.from_pretrained(H.FIX .. "/phi3_tiny_partial")
      assert.are.equal(12, m.config.rotary_dim)                      -- of head_dim 16
      assert.are.same({ 6 }, m:get_buffer("model.rotary_emb.inv_freq").shape)
      assert.are.equal(m.model.embed_tokens.weight, m.lm_head.weight)
      assert.is_true(H.max_abs_diff(m(pexp.input_ids), pexp.logits) < TOL)
      assert.are.same(pexp.greedy_ids[1], m:generate(pexp.input_ids[1], { max_new_tokens = pexp.max_new_tokens, eos_token_id = false }))
      assert_cache_decodes(m, pexp.input_ids[1])
   end)

   it("names an unusable partial_rotary_factor and rope types it does not support", function()
      assert.has_error(function() llama.Phi3ForCausalLM(tiny({ partial_rotary_factor = 1.5 })) end,
         "models.phi3: partial_rotary_factor must be a number in (0, 1], got 1.5 in config table")
      assert.has_error(function() llama.Phi3ForCausalLM(tiny({ partial_rotary_factor = 0.3 })) end,
         "models.phi3: the rotary dims of a head (1 of head_dim 4) must be even in config table")
      assert.has_error(function()
         llama.Phi3ForCausalLM(tiny({ rope_scaling = { type = "dynamic", factor = 4 } }))
      end, 'models.phi3: rope type "dynamic" is not supported (supported: default, linear, llama3, longrope, yarn) in config table')
   end)
end)

describe("models.phi3 with LongRoPE (tests/fixtures/models/phi3_tiny_longrope: original length 8)", function()
   local exp = H.expected("phi3_tiny_longrope")
   local model = models.from_pretrained(H.FIX .. "/phi3_tiny_longrope")

   it("gives transformers' logits past the original length (long factors, scaled cos/sin)", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)

   it("switches from the short to the long factors while generating, as transformers does", function()
      local c = H.read_json(H.FIX .. "/phi3_tiny_longrope/crossing.json")
      assert.is_true(#c.input_ids[1] <= 8 and #c.input_ids[1] + c.max_new_tokens > 8)
      assert.are.same(c.greedy_ids[1], model:generate(c.input_ids[1], { max_new_tokens = c.max_new_tokens, eos_token_id = false }))
   end)

   it("names short or long factors of the wrong length", function()
      assert.has_error(function()
         llama.Phi3ForCausalLM(tiny({ original_max_position_embeddings = 8,
            rope_scaling = { type = "longrope", short_factor = { 1 }, long_factor = { 1, 2 } } }))
      end, "models.phi3: longrope short_factor must list 2 positive numbers (one per rotary frequency) in config table")
      assert.has_error(function()
         llama.Phi3ForCausalLM(tiny({ rope_scaling = { type = "longrope", short_factor = { 1, 1 }, long_factor = { 1, 2 } } }))
      end, 'models.phi3: config key "rope_parameters.original_max_position_embeddings" is missing in config table (needed by rope type "longrope")')
   end)
end)

describe("models.gemma2 (tests/fixtures/models/gemma2_tiny: soft caps 3 and 8, window 4 on layers 1 and 3)", function()
   local gemma = require("moonload.models.gemma")
   local exp = H.expected("gemma2_tiny")
   local model = models.from_pretrained(H.FIX .. "/gemma2_tiny")

   it("builds Gemma2ForCausalLM with four (1 + w) norms per layer and a tied head", function()
      assert.are.equal("Gemma2ForCausalLM", model.__name)
      local names = H.param_names(model)
      assert.are.same({
         "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
         "model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.post_feedforward_layernorm.weight",
      }, { unpack(names, 9, 12) })
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      assert.are.same({ 4, false, 4 }, model.config.layer_windows)
      assert.are.equal(3, model.config.attn_logit_softcapping)
      assert.are.equal(8, model.config.final_logit_softcapping)
      -- a fresh norm (weight 0) is the identity on unit-RMS rows, as transformers' Gemma2RMSNorm
      local n = gemma.Gemma2RMSNorm(4)
      assert.is_true(H.max_abs_diff(n(ml.tensor({ { 1, -1, 1, -1 } })), { { 1, -1, 1, -1 } }) < 1e-5)
   end)

   it_matches_transformers(model, exp, "batch of 2, past the window")

   it("generates transformers' greedy ids for a left-padded batch", function()
      local pad = H.read_json(H.FIX .. "/gemma2_tiny/padded.json")
      local logits = model(pad.input_ids, { attention_mask = pad.attention_mask })
      assert.is_true(H.max_abs_diff(logits:select(1, 2), pad.logits[2]) < TOL)
      assert.is_true(H.max_abs_diff(logits:select(1, 1):narrow(1, 3, 6), { unpack(pad.logits[1], 3, 8) }) < TOL)
      assert.are.same(pad.greedy_ids, model:generate(pad.input_ids, { attention_mask = pad.attention_mask,
         max_new_tokens = pad.max_new_tokens, eos_token_id = false }))
   end)

   it("forms the soft-capped scores a block of query rows at a time, with the same results", function()
      local pad = H.read_json(H.FIX .. "/gemma2_tiny/padded.json")
      local whole = model(exp.input_ids)
      local whole_padded = model(pad.input_ids, { attention_mask = pad.attention_mask })
      local block = gemma.Gemma2Attention.query_block
      gemma.Gemma2Attention.query_block = 3                    -- 9 and 8 query rows: blocks of 3, 3, 3 / 3, 3, 2
      -- (not to the bit: 2 heads x 3 rows go through the few-row kernel, 2 x 9 through the BLAS,
      -- whose sums round differently; 9e-6 measured)
      local ok, err = pcall(function()
         assert.is_true(H.max_abs_diff(model(exp.input_ids), whole:tolist()) < 5e-5)
         local padded = model(pad.input_ids, { attention_mask = pad.attention_mask })
         assert.is_true(H.max_abs_diff(padded:select(1, 2), whole_padded:select(1, 2):tolist()) < 5e-5)
         assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      end)
      gemma.Gemma2Attention.query_block = block
      assert(ok, err)
   end)

   it("runs in bfloat16 about as close to float32 as PyTorch's bfloat16 is", function()
      -- transformers' own bfloat16 logits of this checkpoint are 0.79 from its float32 ones
      local m = models.from_pretrained(H.FIX .. "/gemma2_tiny", { dtype = "bfloat16" })
      local got = m(exp.input_ids):float()
      assert.is_true(H.max_abs_diff(got, exp.logits) < 1.0)
   end)

   it("names a bad soft cap", function()
      assert.has_error(function() gemma.Gemma2ForCausalLM(tiny({ attn_logit_softcapping = -1 })) end,
         'models.gemma2: config key "attn_logit_softcapping" in config table must be a positive number or null, got -1')
   end)
end)

describe("models.gemma3 (tests/fixtures/models/gemma3_tiny: head norms, local and global rotary bases)", function()
   local gemma = require("moonload.models.gemma")
   local exp = H.expected("gemma3_tiny")
   local model = models.from_pretrained(H.FIX .. "/gemma3_tiny")

   it("builds Gemma3ForCausalLM with q_norm and k_norm, sliding on all but every third layer", function()
      assert.are.equal("Gemma3ForCausalLM", model.__name)
      assert.are.equal("Gemma3TextModel", model.model.__name)
      assert.are.equal("Gemma3RMSNorm", model.model.layers[1].self_attn.q_norm.__name)
      assert.are.same({ 3, 3, false }, model.config.layer_windows)
      assert.are.equal(10000, model.config.rope_local.rope_theta)
      assert.are.equal("linear", model.config.rope.rope_type)
      -- sliding layers rotate with base 10000, full ones with 1e6 / 8 (linear scaling)
      local rot = model.model.rotary_emb
      assert.is_true(math.abs(rot.local_inv_freq:tolist()[2] - 10000 ^ (-2 / 16)) < 1e-6)
      assert.is_true(math.abs(rot.inv_freq:tolist()[2] - 1e6 ^ (-2 / 16) / 8) < 1e-7)
   end)

   it_matches_transformers(model, exp, "batch of 2, past the window")

   it("derives layer types from sliding_window_pattern and refuses bidirectional attention", function()
      local m = gemma.Gemma3ForCausalLM(tiny({ num_hidden_layers = 6, sliding_window = 8 }))
      assert.are.same({ 8, 8, 8, 8, 8, false }, m.config.layer_windows)
      assert.has_error(function() gemma.Gemma3ForCausalLM(tiny({ use_bidirectional_attention = true })) end,
         "models.gemma2: use_bidirectional_attention (EmbeddingGemma) is not supported, in config table")
   end)
end)

describe("models.qwen3_moe (tests/fixtures/models/qwen3_moe_tiny: 6 experts, top 2, dense middle layer)", function()
   local moe = require("moonload.models.moe")
   local exp = H.expected("qwen3_moe_tiny")
   local model = models.from_pretrained(H.FIX .. "/qwen3_moe_tiny")

   it("builds sparse blocks under transformers' names, a dense MLP where mlp_only_layers says", function()
      assert.are.equal("Qwen3MoeForCausalLM", model.__name)
      local names = {}
      for name in model:named_parameters() do names[name] = true end
      assert.is_true(names["model.layers.0.mlp.experts.5.down_proj.weight"])
      assert.is_true(names["model.layers.0.mlp.gate.weight"])
      assert.is_true(names["model.layers.1.mlp.gate_proj.weight"])
      assert.is_nil(names["model.layers.1.mlp.gate.weight"])
      assert.are.equal("Qwen3MoeSparseMoeBlock", model.model.layers[3].mlp.__name)
      assert.are.same({ 16, 32 }, model.model.layers[1].mlp.experts[1].gate_proj.weight.shape)
      assert.is_true(model.config.norm_topk_prob)
   end)

   it_matches_transformers(model, exp, "batch of 2")

   it("runs only the experts the router picked: top 2 per token", function()
      local calls = {}
      for l = 1, 3, 2 do
         for e = 1, 6 do
            local ex = model.model.layers[l].mlp.experts[e]
            local f = ex.forward
            ex.forward = function(self, x) calls[#calls + 1] = x:size(1); return f(self, x) end
         end
      end
      model({ 1, 7, 9 })                              -- 3 tokens: at most 6 distinct experts a layer
      local rows = 0
      for _, n in ipairs(calls) do rows = rows + n end
      assert.are.equal(2 * 3 * 2, rows)               -- each of 3 tokens in 2 experts, in 2 sparse layers
      calls = {}
      model({ 5 })
      assert.are.equal(4, #calls)                     -- one token: exactly its 2 experts in each layer
   end)

   it("names an impossible expert count", function()
      assert.has_error(function() moe.Qwen3MoeForCausalLM(tiny({ num_experts = 2, num_experts_per_tok = 3 })) end,
         "models.qwen3_moe: num_experts_per_tok 3 is more than num_experts 2 in config table")
   end)
end)

describe("models.mixtral (tests/fixtures/models/mixtral_tiny: 4 experts w1/w2/w3, top 2)", function()
   local exp = H.expected("mixtral_tiny")
   local model = models.from_pretrained(H.FIX .. "/mixtral_tiny")

   it("builds block_sparse_moe with gate and experts under transformers' names", function()
      assert.are.equal("MixtralForCausalLM", model.__name)
      local names = {}
      for name in model:named_parameters() do names[#names + 1] = name end
      local first = {}
      for _, n in ipairs(names) do if n:find("layers%.0%.block_sparse_moe") then first[#first + 1] = n end end
      assert.are.equal("model.layers.0.block_sparse_moe.gate.weight", first[1])
      assert.are.equal("model.layers.0.block_sparse_moe.experts.0.w1.weight", first[2])
      assert.are.equal(13, #first)                        -- the gate and 4 experts of 3
      assert.are.same({ "MixtralDecoderLayer" }, model.no_split_modules)
   end)

   it_matches_transformers(model, exp, "batch of 2")
end)

describe("models.gemma3 multimodal checkpoint (tests/fixtures/models/gemma3_multimodal_tiny: its language model)", function()
   local exp = H.expected("gemma3_multimodal_tiny")
   local model = models.from_pretrained(H.FIX .. "/gemma3_multimodal_tiny")

   it("reads text_config and language_model.model.*, and leaves the vision tower out", function()
      assert.are.equal("Gemma3ForCausalLM", model.__name)
      assert.truthy(model.config._source:find("(text_config)", 1, true))
      for name in model:named_parameters() do
         assert.is_nil(name:find("vision") or name:find("projector"), name)
      end
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
   end)

   it("gives the multimodal model's logits and greedy ids on text", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)
end)

-- Mistral 3 (llava's names: language_model.model.*, language_model.lm_head) and Qwen3-VL (the
-- newer model.language_model.*, model.visual.*): the language model of each, on text
for _, case in ipairs({ { "mistral3_multimodal_tiny", "MistralForCausalLM", "^language_model%.", "^language_model%.lm_head%." },
                        { "ministral3_multimodal_tiny", "MistralForCausalLM", "^language_model%.", "^language_model%.lm_head%." },
                        { "mistral4_multimodal_tiny", "Mistral4ForCausalLM", "^language_model%.", "^language_model%.lm_head%." },
                        { "llama4_multimodal_tiny", "Llama4ForCausalLM", "^language_model%.", "^language_model%.lm_head%." },
                        { "qwen3_vl_multimodal_tiny", "Qwen3ForCausalLM", "^model%.language_model%.", "^lm_head%." },
                        { "qwen3_vl_moe_multimodal_tiny", "Qwen3MoeForCausalLM", "^model%.language_model%.", "^lm_head%." } }) do
   local name, class, prefix, head = case[1], case[2], case[3], case[4]
   describe("models: a multimodal checkpoint's language model (tests/fixtures/models/" .. name .. ")", function()
      local exp = H.expected(name)
      local model = models.from_pretrained(H.FIX .. "/" .. name)

      it("builds " .. class .. " from text_config with every language-model tensor of the checkpoint", function()
         assert.are.equal(class, model.__name)
         assert.truthy(model.config._source:find("(text_config)", 1, true))
         local want = {}
         for k in pairs(ml.safetensors.load_file(H.FIX .. "/" .. name .. "/model.safetensors")) do
            if k:find(prefix) or k:find(head) then want[#want + 1] = k end
         end
         local have = H.param_names(model)
         assert.are.equal(#want, #have)
         assert.are_not.equal(model.model.embed_tokens.weight, model.lm_head.weight)     -- a head of its own
      end)

      it_matches_transformers(model, exp, "batch of 2")
      H.it_matches_padded(model, name, "positions")
   end)
end

describe("models.qwen3_moe with stacked experts (Qwen3-VL-MoE: the hub's transposed layout, and transformers' own)", function()
   local name = "qwen3_vl_moe_multimodal_tiny"
   local exp = H.expected(name)

   it("reads the hub's (E, hidden, 2 x inter) layout as views and runs only the chosen experts", function()
      local model = models.from_pretrained(H.FIX .. "/" .. name)
      local experts = model.model.layers[1].mlp.experts
      assert.are.equal("StackedExperts", experts.__name)
      assert.are.same({ 6, 32, 16 }, experts.gate_up_proj.shape)
      assert.are.same({ 6, 8, 32 }, experts.down_proj.shape)
      assert.is_true(model.config.norm_topk_prob)                 -- (Qwen3-VL-MoE's router always renormalizes)
      assert.are.equal(2, #H.experts_run(experts, function() model({ { 5 } }) end))
   end)

   it("reads the same experts as transformers writes them, (E, 2 x inter, hidden), to the same logits", function()
      local dir = H.tmpdir()
      H.copy(H.FIX .. "/" .. name .. "/config.json", dir .. "/config.json")
      local tensors = {}
      for k, t in pairs(ml.safetensors.load_file(H.FIX .. "/" .. name .. "/model.safetensors")) do
         if k:find("%.mlp%.experts%.") then t = t:transpose(2, 3):contiguous() end
         tensors[k] = t
      end
      ml.safetensors.save_file(tensors, dir .. "/model.safetensors")
      local model = models.from_pretrained(dir)
      assert.are.same({ 6, 16, 32 }, model.model.layers[1].mlp.experts.gate_up_proj.shape)
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      -- quantized (unstacked into int8 linear layers), either layout gives the same int8 model
      local hub = models.from_pretrained(H.FIX .. "/" .. name)
      ml.quantize(hub, { dtype = "int8" })
      ml.quantize(model, { dtype = "int8" })
      local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
      assert.are.equal(0, H.max_abs_diff(hub(ids), model(ids):tolist()))
      H.rmdir(dir)
   end)

   it("tells the layouts apart by the down projection's shape", function()
      local moe = require("moonload.models.moe")
      local shapes = { ["a.mlp.experts.gate_up_proj"] = { 4, 32, 32 }, ["a.mlp.experts.down_proj"] = { 4, 32, 16 } }
      local function shape_of(n) return shapes[n] end
      assert.are.equal("out_in", moe.stacked_layout({ "a.mlp.experts.gate_up_proj" }, shape_of))
      shapes["a.mlp.experts.down_proj"] = { 4, 16, 32 }
      assert.are.equal("in_out", moe.stacked_layout({ "a.mlp.experts.gate_up_proj" }, shape_of))
      assert.is_nil(moe.stacked_layout({ "a.mlp.experts.0.gate_proj.weight" }, shape_of))
   end)
end)

describe("models.ministral3 (tests/fixtures/models/ministral3_tiny: queries scaled by position, Llama 4's way)", function()
   local exp = H.expected("ministral3_tiny")
   local model = models.from_pretrained(H.FIX .. "/ministral3_tiny")

   it("builds Ministral3ForCausalLM, its rotary tables carrying each position's query scale", function()
      assert.are.equal("Ministral3ForCausalLM", model.__name)
      assert.are.same({ beta = 0.5, original = 4 }, model.config.query_scaling)
      local cos, sin = model.model.rotary_emb(ml.tensor({ 0, 3, 4, 7, 8, 17 }, { dtype = "int64" }))
      local _, _, scale = llama.split_query_scale(cos, sin)
      local want = { 1, 1, 1 + 0.5 * math.log(2), 1 + 0.5 * math.log(2), 1 + 0.5 * math.log(3), 1 + 0.5 * math.log(5) }
      assert.is_true(H.max_abs_diff(scale:view(6), want) < 1e-6)
      assert.are.equal(9, sin:size(2))                           -- (head_dim 8: the rotary table, one column more)
   end)

   it_matches_transformers(model, exp, "batch of 2, past the original length")
   it_matches_padded(model, "ministral3_tiny", "positions and query scales")

   it("needs the scaling: without it, other logits", function()
      local saved = rawget(model.model.rotary_emb, "query_scaling")
      rawset(model.model.rotary_emb, "query_scaling", { beta = 0, original = 4 })
      local ok, logits = pcall(model, ml.tensor(exp.input_ids, { dtype = "int64" }))
      rawset(model.model.rotary_emb, "query_scaling", saved)
      assert.is_true(ok, logits)
      assert.is_true(H.max_abs_diff(logits, exp.logits) > 0.05)
   end)

   it("names a bad beta or a missing original length", function()
      local rope = { rope_type = "default", rope_theta = 10000, llama_4_scaling_beta = -1, original_max_position_embeddings = 4 }
      local ok, err = pcall(llama.config, tiny({ model_type = "ministral3", rope_parameters = rope }), "ministral3")
      assert.is_false(ok)
      assert.truthy(tostring(err):find('"rope_parameters.llama_4_scaling_beta" must be a number >= 0, got -1', 1, true), err)
      rope.llama_4_scaling_beta, rope.original_max_position_embeddings = 0.1, nil
      ok, err = pcall(llama.config, tiny({ model_type = "ministral3", rope_parameters = rope }), "ministral3")
      assert.is_false(ok)
      assert.truthy(tostring(err):find("original_max_position_embeddings\" must be a number >= 1 with llama_4_scaling_beta, got nil", 1, true), err)
   end)
end)

describe("models.olmo3 (tests/fixtures/models/olmo3_tiny: OLMo 2's layers, a 4-token window on 3 of 4, YaRN on the full one)", function()
   local exp = H.expected("olmo3_tiny")
   local model = models.from_pretrained(H.FIX .. "/olmo3_tiny")

   it("builds Olmo3ForCausalLM: windows by layer type, the sliding layers' rotary table unscaled", function()
      assert.are.equal("Olmo3ForCausalLM", model.__name)
      assert.are.same({ 4, 4, 4, false }, model.config.layer_windows)
      assert.are.equal("yarn", model.config.rope.rope_type)
      assert.are.equal("default", model.config.rope_local.rope_type)
      assert.are.equal(1.2, rawget(model.model.rotary_emb, "attention_scaling"))
      assert.are.equal(1, rawget(model.model.rotary_emb, "local_scaling"))
      assert.is_nil(H.param_names(model)[3]:find("input_layernorm"))        -- (norms after, as OLMo 2)
   end)

   it_matches_transformers(model, exp, "batch of 2, past the window")
   it_matches_padded(model, "olmo3_tiny", "positions")
end)

describe("models.gpt_neox (tests/fixtures/models/gpt_neox_tiny: per-head q/k/v, a quarter rotated)", function()
   local neox = require("moonload.models.gpt_neox")
   local exp = H.expected("gpt_neox_tiny")
   local model = models.from_pretrained(H.FIX .. "/gpt_neox_tiny")

   it("builds GPTNeoXForCausalLM under the hub's names, embed_out included", function()
      assert.are.equal("GPTNeoXForCausalLM", model.__name)
      local names = H.param_names(model)
      assert.are.equal("gpt_neox.embed_in.weight", names[1])
      assert.are.equal("embed_out.weight", names[#names])
      assert.are.equal(2, model.config.rotary_dim)                 -- 0.25 of head_dim 8
      assert.is_true(model.config.use_parallel_residual)
   end)

   it_matches_transformers(model, exp, "batch of 2, parallel residual")

   describe("with the sequential residual", function()
      it_matches_transformers(models.from_pretrained(H.FIX .. "/gpt_neox_tiny_sequential"),
         H.expected("gpt_neox_tiny_sequential"), "batch of 2")
   end)

   it("reads the older rotary_pct and rotary_emb_base, and names a bad one", function()
      local m = neox.GPTNeoXForCausalLM({ vocab_size = 50, hidden_size = 32, num_hidden_layers = 1,
         num_attention_heads = 2, rotary_pct = 0.5, rotary_emb_base = 500 })
      assert.are.equal(8, m.config.rotary_dim)
      assert.are.equal(500, m.config.rope_theta)
      assert.has_error(function()
         neox.GPTNeoXForCausalLM({ vocab_size = 50, hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 3 })
      end, "models.gpt_neox: hidden_size 32 is not a multiple of num_attention_heads 3 in config table")
   end)
end)

describe("models.opt (tests/fixtures/models/opt_tiny: learned positions from the mask, ReLU, tied head)", function()
   local opt = require("moonload.models.opt")
   local exp = H.expected("opt_tiny")
   local model = models.from_pretrained(H.FIX .. "/opt_tiny")

   it("builds OPTForCausalLM under the hub's names, the head tied to the token embedding", function()
      assert.are.equal("OPTForCausalLM", model.__name)
      local names = H.param_names(model)
      assert.are.equal("model.decoder.embed_tokens.weight", names[1])
      assert.are.equal("model.decoder.embed_positions.weight", names[2])
      assert.are.same({ 66, 32 }, model.model.decoder.embed_positions.weight.shape)   -- 64 positions + 2
      assert.are.equal(model.model.decoder.embed_tokens.weight, model.lm_head.weight)
      assert.are.same({ "OPTDecoderLayer" }, model.no_split_modules)
      assert.are.equal(64, model:max_length())
   end)

   it_matches_transformers(model, exp, "batch of 2, LayerNorm before each block")

   it_matches_padded(model, "opt_tiny", "positions")

   describe("with 350m's layout (LayerNorm after each block, narrower word embeddings)", function()
      local post = models.from_pretrained(H.FIX .. "/opt_tiny_post_norm")
      it("has project_in and project_out and no final LayerNorm", function()
         assert.are.same({ 32, 16 }, post.model.decoder.project_in.weight.shape)
         assert.are.same({ 16, 32 }, post.model.decoder.project_out.weight.shape)
         assert.is_nil(post.model.decoder.final_layer_norm)
      end)
      it_matches_transformers(post, H.expected("opt_tiny_post_norm"), "one prompt")
   end)

   it("names a bad config and a sequence past its positions", function()
      assert.has_error(function()
         opt.OPTForCausalLM({ vocab_size = 50, hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 3 })
      end, "models.opt: hidden_size 32 is not a multiple of num_attention_heads 3 in config table")
      local ids = {}
      for i = 1, 65 do ids[i] = i % 100 end
      assert.has_error(function() model(ids) end,
         "models.opt: sequence of 65 tokens (0 cached + 65 new) exceeds max_position_embeddings 64")
   end)
end)

describe("models.bloom (tests/fixtures/models/bloom_tiny: ALiBi over 6 heads, positions from the mask)", function()
   local bloom = require("moonload.models.bloom")
   local exp = H.expected("bloom_tiny")
   local model = models.from_pretrained(H.FIX .. "/bloom_tiny")

   it("builds BloomForCausalLM under the hub's names, the head tied to the word embeddings", function()
      assert.are.equal("BloomForCausalLM", model.__name)
      local names = H.param_names(model)
      assert.are.equal("transformer.word_embeddings.weight", names[1])
      assert.are.equal("transformer.word_embeddings_layernorm.weight", names[2])
      assert.are.equal(model.transformer.word_embeddings.weight, model.lm_head.weight)
      assert.are.same({ "BloomBlock" }, model.no_split_modules)
   end)

   it("has ALiBi's slopes: powers of 2^-2 for the first 4 heads, of 2^-1 (odd ones) for the other 2", function()
      assert.are.same({ 0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125 }, bloom.alibi_slopes(6))
      local eight = bloom.alibi_slopes(8)
      assert.are.equal(8, #eight)
      assert.are.equal(2 ^ -1, eight[1])
      assert.are.equal(2 ^ -8, eight[8])
   end)

   it_matches_transformers(model, exp, "batch of 2")

   it_matches_padded(model, "bloom_tiny", "ALiBi's positions")

   it("biases a prompt's scores with one row per head under the kernel's causal triangle", function()
      local t = model.transformer
      local prompt = t:attention_bias(512, 0, nil, "cpu")
      assert.are.same({ 1, 6, 1, 512 }, prompt.shape)            -- not (512, 512) per head
      assert.is_true(rawget(prompt, "_causal"))
      local padded = t:attention_bias(6, 0, ml.tensor({ { false, true, true, true, true, true } }), "cpu")
      assert.are.same({ 1, 6, 1, 6 }, padded.shape)
      assert.are.equal(-math.huge, padded[1][1][1][1]:item())
      local step = t:attention_bias(3, 5, nil, "cpu")              -- after cached tokens: the full mask
      assert.are.same({ 1, 6, 3, 8 }, step.shape)
      assert.is_nil(rawget(step, "_causal"))
      assert.are.equal(-math.huge, step[1][1][1][7]:item())       -- query 6 does not see key 7
   end)

   it("reads num_hidden_layers and num_attention_heads too, and names a bad config", function()
      local m = bloom.BloomForCausalLM({ vocab_size = 50, hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 4 })
      assert.are.equal(1, m.config.n_layer)
      assert.are.equal(4, m.config.n_head)
      assert.has_error(function() bloom.BloomForCausalLM({ vocab_size = 50, hidden_size = 32, n_layer = 1 }) end,
         'models.bloom: config key "n_head" (or "num_attention_heads") must be a positive integer, got nil in config table')
      assert.has_error(function() bloom.BloomForCausalLM({ vocab_size = 50, hidden_size = 32, n_layer = 1, n_head = 3 }) end,
         "models.bloom: hidden_size 32 is not a multiple of n_head 3 in config table")
   end)
end)

describe("models.falcon (tests/fixtures/models/falcon_tiny*: the three layouts of query_key_value)", function()
   local falcon = require("moonload.models.falcon")
   local model = models.from_pretrained(H.FIX .. "/falcon_tiny")

   it("builds FalconForCausalLM under the hub's names, one key/value head shared by 7b's layout", function()
      assert.are.equal("FalconForCausalLM", model.__name)
      local names = H.param_names(model)
      assert.are.equal("transformer.word_embeddings.weight", names[1])
      assert.are.equal(model.transformer.word_embeddings.weight, model.lm_head.weight)
      assert.are.same({ 48, 32 }, model.transformer.h[1].self_attention.query_key_value.weight.shape)   -- 4 q + k + v heads of 8
      assert.are.equal(1, model.config.kv_heads)
      assert.is_nil(model.transformer.h[1].post_attention_layernorm)
   end)

   it_matches_transformers(model, H.expected("falcon_tiny"), "multi-query, attention and MLP in parallel")
   it_matches_padded(model, "falcon_tiny", "rotary positions")

   describe("the new decoder architecture (40b, 180b)", function()
      local m = models.from_pretrained(H.FIX .. "/falcon_tiny_new_arch")
      it("groups 2 query heads with each of 2 key/value heads, with ln_attn and ln_mlp", function()
         assert.are.equal(2, m.config.kv_heads)
         assert.are.same({ 64, 32 }, m.transformer.h[1].self_attention.query_key_value.weight.shape)
         assert.is_not_nil(m.transformer.h[1].ln_mlp)
      end)
      it_matches_transformers(m, H.expected("falcon_tiny_new_arch"), "grouped-query attention")
   end)

   describe("per-head q/k/v with attention and MLP in turn", function()
      it_matches_transformers(models.from_pretrained(H.FIX .. "/falcon_tiny_sequential"),
         H.expected("falcon_tiny_sequential"), "biases, sequential")
   end)

   it("refuses falcon-rw's ALiBi and names bad head counts", function()
      local base = { vocab_size = 50, hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 4 }
      local function with(extra)
         local c = {}
         for k, v in pairs(base) do c[k] = v end
         for k, v in pairs(extra) do c[k] = v end
         return function() falcon.FalconForCausalLM(c) end
      end
      assert.has_error(with({ alibi = true }),
         "models.falcon: alibi = true (falcon-rw's ALiBi attention) is not supported in config table")
      assert.has_error(with({ new_decoder_architecture = true, num_kv_heads = 3 }),
         "models.falcon: num_attention_heads 4 is not a multiple of num_kv_heads 3 in config table")
      assert.has_error(with({ num_attention_heads = 5 }),
         "models.falcon: hidden_size 32 is not a multiple of num_attention_heads 5 in config table")
   end)
end)

describe("models.qwen2_moe (tests/fixtures/models/qwen2_moe_tiny: 6 experts top 2 and a gated shared expert)", function()
   local exp = H.expected("qwen2_moe_tiny")
   local model = models.from_pretrained(H.FIX .. "/qwen2_moe_tiny")

   it("builds the shared expert and its gate beside the routed experts, a dense last layer", function()
      assert.are.equal("Qwen2MoeForCausalLM", model.__name)
      local mlp = model.model.layers[1].mlp
      assert.are.equal("Qwen2MoeSparseMoeBlock", mlp.__name)
      assert.are.same({ 24, 32 }, mlp.shared_expert.gate_proj.weight.shape)
      assert.are.same({ 1, 32 }, mlp.shared_expert_gate.weight.shape)
      assert.are.equal("Qwen2MoeMLP", model.model.layers[3].mlp.__name)
      assert.are.same({ 32 }, model.model.layers[1].self_attn.q_proj.bias.shape)   -- Qwen2's biases
      assert.is_false(model.config.norm_topk_prob)
   end)

   it_matches_transformers(model, exp, "batch of 2")
end)

describe("models.starcoder2 (tests/fixtures/models/starcoder2_tiny: LayerNorms, biases, c_fc/c_proj, window 5)", function()
   local exp = H.expected("starcoder2_tiny")
   local model = models.from_pretrained(H.FIX .. "/starcoder2_tiny")

   it("builds Starcoder2ForCausalLM with LayerNorms, biased projections and a tied head", function()
      assert.are.equal("Starcoder2ForCausalLM", model.__name)
      local layer = model.model.layers[1]
      assert.are.equal("LayerNorm", layer.input_layernorm.__name)
      assert.are.same({ 32 }, layer.input_layernorm.bias.shape)
      assert.are.same({ 32 }, layer.self_attn.o_proj.bias.shape)
      assert.are.same({ 64, 32 }, layer.mlp.c_fc.weight.shape)
      assert.are.equal("LayerNorm", model.model.norm.__name)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      assert.are.same({ 5, 5 }, model.config.layer_windows)
   end)

   it_matches_transformers(model, exp, "batch of 2, past the window")
end)

describe("models.olmo2 (tests/fixtures/models/olmo2_tiny: norms after attention and MLP, whole-projection q/k norms)", function()
   local exp = H.expected("olmo2_tiny")
   local model = models.from_pretrained(H.FIX .. "/olmo2_tiny")

   it("builds Olmo2ForCausalLM without input norms, with q_norm over all query heads", function()
      assert.are.equal("Olmo2ForCausalLM", model.__name)
      local layer = model.model.layers[1]
      assert.is_nil(layer.input_layernorm)
      assert.are.same({ 32 }, layer.self_attn.q_norm.weight.shape)          -- 4 heads of 8
      assert.are.same({ 16 }, layer.self_attn.k_norm.weight.shape)          -- 2 key/value heads of 8
      assert.are.same({ 32 }, layer.post_feedforward_layernorm.weight.shape)
   end)

   it_matches_transformers(model, exp, "batch of 2")
end)

describe("models.phi (tests/fixtures/models/phi_tiny: parallel attention and MLP, 0.4 rotary, q/k LayerNorms)", function()
   local exp = H.expected("phi_tiny")
   local model = models.from_pretrained(H.FIX .. "/phi_tiny")

   it("builds PhiForCausalLM under the hub's names: dense, fc1/fc2, final_layernorm, a biased head", function()
      assert.are.equal("PhiForCausalLM", model.__name)
      local attn = model.model.layers[1].self_attn
      assert.are.same({ 40 }, attn.dense.bias.shape)
      assert.are.same({ 10 }, attn.q_layernorm.weight.shape)
      assert.are.equal(4, model.config.rotary_dim)               -- 0.4 of head_dim 10
      assert.are.same({ 100 }, model.lm_head.bias.shape)
      assert.are.equal("LayerNorm", model.model.final_layernorm.__name)
   end)

   it_matches_transformers(model, exp, "batch of 2")
end)

describe("sliding-window caches over generations many windows long", function()
   for _, name in ipairs({ "mistral_tiny", "qwen2_tiny", "phi3_tiny", "gemma2_tiny", "gemma3_tiny", "starcoder2_tiny" }) do
      it(name .. ": cached greedy ids equal full forwards', and padded rows their own", function()
         local model = models.from_pretrained(H.FIX .. "/" .. name)
         local prompt, new = { 3, 17, 5, 9, 11, 2 }, 30
         local seq = { unpack(prompt) }
         for _ = 1, new do                                       -- no cache: the whole sequence each step
            local _, best = model({ seq }):select(2, -1):max(-1)
            seq[#seq + 1] = best:item()
         end
         assert.are.same(seq, model:generate(prompt, { max_new_tokens = new, eos_token_id = false }))
         local ids, mask = H.padded_prompts(model, 3, 7)          -- rows 2 and 3 left-padded
         local out = model:generate(ids, { max_new_tokens = new, attention_mask = mask, eos_token_id = false })
         for b = 1, 3 do
            local real = {}
            for t = 1, 7 do if mask[b][t] == 1 then real[#real + 1] = ids[b][t] end end
            assert.are.same({ unpack(model:generate(real, { max_new_tokens = new, eos_token_id = false }), #real + 1) },
               { unpack(out[b], 8) })
         end
      end)
   end
end)

describe("models.gptj (tests/fixtures/models/gptj_tiny: 4 of 8 dims rotated in neighbour pairs)", function()
   local gptj = require("moonload.models.gptj")
   local model = models.from_pretrained(H.FIX .. "/gptj_tiny")

   it("builds GPTJForCausalLM under the hub's names, with a biased head", function()
      assert.are.equal("GPTJForCausalLM", model.__name)
      local names = H.param_names(model)
      assert.are.equal("transformer.wte.weight", names[1])
      assert.are.equal("lm_head.bias", names[#names])
      assert.are.equal(4, model.config.rotary_dim)
   end)

   it("turns neighbour pairs as Llama's halves once the rotary dims are ordered evens then odds", function()
      assert.are.same({ 0, 2, 1, 3, 4, 5, 6, 7 }, gptj.pair_order(4, 8))
      assert.are.same({ 0, 2, 4, 1, 3, 5 }, gptj.pair_order(6, 6))
   end)

   it_matches_transformers(model, H.expected("gptj_tiny"), "batch of 2, attention and MLP in parallel")
   it_matches_padded(model, "gptj_tiny", "rotary positions")

   it("names a bad config", function()
      assert.has_error(function() gptj.GPTJForCausalLM({ vocab_size = 50, n_embd = 32, n_layer = 1, n_head = 4, rotary_dim = 10 }) end,
         "models.gptj: rotary_dim 10 must be even and at most head_dim 8 in config table")
      assert.has_error(function() gptj.GPTJForCausalLM({ vocab_size = 50, n_embd = 32, n_layer = 1, n_head = 4, rotary_dim = 3 }) end,
         "models.gptj: rotary_dim 3 must be even and at most head_dim 8 in config table")
   end)
end)

describe("OPT, BLOOM, Falcon and GPT-J through save_model and int8", function()
   for _, name in ipairs({ "opt_tiny", "opt_tiny_post_norm", "bloom_tiny", "falcon_tiny", "falcon_tiny_new_arch",
                           "falcon_tiny_sequential", "gptj_tiny" }) do
      it(name .. ": saved and loaded back gives transformers' logits; int8 stays close", function()
         local exp = H.expected(name)
         local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
         local dir = H.tmpdir()
         ml.save_model(models.from_pretrained(H.FIX .. "/" .. name), dir)
         assert.is_true(H.max_abs_diff(models.from_pretrained(dir)(ids), exp.logits) < TOL)
         H.rmdir(dir)
         -- (measured 0.05-0.13 on these widths of 32 or 48: one block a row)
         assert.is_true(H.max_abs_diff(models.from_pretrained(H.FIX .. "/" .. name, { quantize = "int8" })(ids), exp.logits) < 0.3)
      end)
   end
end)

describe("models.seed_oss (tests/fixtures/models/seed_oss_tiny: q/k/v, output and MLP biases)", function()
   local dir = H.FIX .. "/seed_oss_tiny"
   local exp = H.expected("seed_oss_tiny")
   local model = models.from_pretrained(dir)

   it("builds SeedOssForCausalLM with every tensor of the checkpoint, its output bias by attention_out_bias", function()
      assert.are.equal("SeedOssForCausalLM", model.__name)
      assert.are.same(H.sorted_keys(ml.safetensors.load_file(dir .. "/model.safetensors")), H.sorted_keys((model:state_dict())))
      assert.are.same({ 32 }, model.model.layers[1].self_attn.o_proj.bias.shape)
      local raw = H.read_json(dir .. "/config.json")
      raw.attention_out_bias = nil                              -- (transformers' default: none)
      local cfg = llama.config(raw, "seed_oss")
      assert.is_true(cfg.qkv_bias)
      assert.is_false(cfg.o_bias)
   end)

   it_matches_transformers(model, exp, "batch of 2")
   it_matches_padded(model, "seed_oss_tiny", "positions")

   it("builds transformers' default config (28.92 B) with its parameter count and shapes", function()
      local fix = H.read_json(dir .. "/hub_config.json")
      H.assert_matches_skeleton(function() return llama.SeedOssForCausalLM(fix.config) end, fix)
   end)
end)

-- A fixture's logits with fn(model) applied first (the model loaded afresh).
local function logits_after(name, fn)
   local m = models.from_pretrained(H.FIX .. "/" .. name)
   fn(m)
   return m(ml.tensor(H.expected(name).input_ids, { dtype = "int64" }))
end

describe("models.exaone4 (tests/fixtures/models/exaone4_tiny: norms after, a 4-token window on 3 layers, a NoPE 4th)", function()
   local exp = H.expected("exaone4_tiny")
   local model = models.from_pretrained(H.FIX .. "/exaone4_tiny")

   it("builds Exaone4ForCausalLM: OLMo 2's norms after, per-head q/k norms, the full layer without rotary", function()
      assert.are.equal("Exaone4ForCausalLM", model.__name)
      assert.are.same(H.sorted_keys(ml.safetensors.load_file(H.FIX .. "/exaone4_tiny/model.safetensors")),
         H.sorted_keys((model:state_dict())))
      assert.are.same({ 4, 4, 4, false }, model.config.layer_windows)
      assert.are.same({ false, false, false, true }, model.config.nope_layers)
      assert.are.same({ 8 }, model.model.layers[1].self_attn.q_norm.weight.shape)
      assert.truthy(model.model.layers[1].post_feedforward_layernorm)
   end)

   it_matches_transformers(model, exp, "batch of 2, past the window")
   it_matches_padded(model, "exaone4_tiny", "positions and windows")

   it("needs its NoPE layer: rotating it too gives other logits", function()
      local logits = logits_after("exaone4_tiny", function(m) rawset(m.model.layers[4].self_attn, "nope", false) end)
      assert.is_true(H.max_abs_diff(logits, exp.logits) > 1e-3)
   end)

   it("reads the layer plan from sliding_window_pattern, and names a pattern it cannot read", function()
      local cfg = llama.config(tiny({ model_type = "exaone4", num_hidden_layers = 4, sliding_window = 8,
         sliding_window_pattern = 2 }), "exaone4")
      assert.are.same({ 8, false, 8, false }, cfg.layer_windows)
      assert.are.same({ false, true, false, true }, cfg.nope_layers)
      cfg = llama.config(tiny({ model_type = "exaone4", num_hidden_layers = 2 }), "exaone4")   -- no window: all rotate
      assert.are.same({ false, false }, cfg.nope_layers)
      local ok, err = pcall(llama.config, tiny({ model_type = "exaone4", sliding_window = 8, sliding_window_pattern = "LLLG" }),
         "exaone4")
      assert.is_false(ok)
      assert.truthy(tostring(err):find('"sliding_window_pattern" must be a positive integer without "layer_types", got LLLG', 1, true), err)
   end)
end)

describe("models.smollm3 (tests/fixtures/models/smollm3_tiny: every 2nd layer NoPE, a tied head)", function()
   local exp = H.expected("smollm3_tiny")
   local model = models.from_pretrained(H.FIX .. "/smollm3_tiny")

   it("builds SmolLM3ForCausalLM, its NoPE layers from no_rope_layers", function()
      assert.are.equal("SmolLM3ForCausalLM", model.__name)
      assert.are.same({ false, true, false, true }, model.config.nope_layers)
      assert.are.same({ false, false, false, false }, model.config.layer_windows)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
   end)

   it_matches_transformers(model, exp, "batch of 2")
   it_matches_padded(model, "smollm3_tiny", "positions")

   it("needs its NoPE layers: rotating them too gives other logits", function()
      local logits = logits_after("smollm3_tiny", function(m)
         for _, layer in ipairs(m.model.layers) do rawset(layer.self_attn, "nope", false) end
      end)
      assert.is_true(H.max_abs_diff(logits, exp.logits) > 1e-3)
   end)

   it("slides its NoPE layers with use_sliding_window, and names a bad no_rope_layers", function()
      local cfg = llama.config(tiny({ model_type = "smollm3", num_hidden_layers = 4, no_rope_layers = { 1, 0, 1, 0 },
         use_sliding_window = true, sliding_window = 6 }), "smollm3")
      assert.are.same({ false, 6, false, 6 }, cfg.layer_windows)
      local ok, err = pcall(llama.config, tiny({ model_type = "smollm3", no_rope_layers = { 1, 2 } }), "smollm3")
      assert.is_false(ok)
      assert.truthy(tostring(err):find("no_rope_layers[2] must be 0 or 1, got 2", 1, true), err)
      ok, err = pcall(llama.config, tiny({ model_type = "smollm3", no_rope_layers = { 1 } }), "smollm3")
      assert.is_false(ok)
      assert.truthy(tostring(err):find('config key "no_rope_layers" must list 2 layers', 1, true), err)
   end)
end)

describe("models.hunyuan_v1_dense (tests/fixtures/models/hunyuan_v1_dense_tiny: q/k norms after the rotary, NTK-alpha base)", function()
   local dir = H.FIX .. "/hunyuan_v1_dense_tiny"
   local exp = H.expected("hunyuan_v1_dense_tiny")
   local model = models.from_pretrained(dir)

   it("builds HunYuanDenseV1ForCausalLM with every tensor of the checkpoint and transformers' rotary frequencies", function()
      assert.are.equal("HunYuanDenseV1ForCausalLM", model.__name)
      H.assert_holds_checkpoint(model, dir, true)
      assert.are.same({ 8 }, model.model.layers[1].self_attn.query_layernorm.weight.shape)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      -- "dynamic" with alpha 50: one stretched base, theta * alpha^(8 / 6)
      assert.are.equal("ntk_alpha", model.config.rope.rope_type)
      local inv_freq = model.model.rotary_emb.inv_freq:tolist()
      for i, f in ipairs(exp.inv_freq) do assert.is_true(math.abs(inv_freq[i] / f - 1) < 1e-6, i) end
   end)

   it_matches_transformers(model, exp, "batch of 2")
   it_matches_padded(model, "hunyuan_v1_dense_tiny", "positions")

   it("needs the alpha: the plain base gives other logits", function()
      local raw = H.read_json(dir .. "/config.json")
      raw.rope_parameters = { rope_type = "default", rope_theta = 10000 }
      local plain = llama.LlamaRotaryEmbedding(llama.config(raw, "hunyuan_v1_dense"))
      local logits = logits_after("hunyuan_v1_dense_tiny", function(m)
         m.model.rotary_emb:register_buffer("inv_freq", plain.inv_freq, false)
      end)
      assert.is_true(H.max_abs_diff(logits, exp.logits) > 1e-3)
   end)

   it("reads the hub's rope_scaling too, and names a rope or switch it cannot follow", function()
      local cfg = llama.config(tiny({ model_type = "hunyuan_v1_dense", rope_theta = 10000,
         rope_scaling = { type = "dynamic", alpha = 1000, factor = 1, beta_fast = 32 } }), "hunyuan_v1_dense")
      assert.are.same({ "ntk_alpha", 1000, 10000 }, { cfg.rope.rope_type, cfg.rope.alpha, cfg.rope_theta })
      local function fails(over, family, msg)
         local ok, err = pcall(llama.config, tiny(over), family)
         assert.is_false(ok)
         assert.truthy(tostring(err):find(msg, 1, true), err)
      end
      fails({ rope_scaling = { type = "dynamic", factor = 2 } }, "hunyuan_v1_dense",
         'models.hunyuan_v1_dense: rope type "dynamic" needs "alpha"')
      fails({ rope_scaling = { type = "dynamic", alpha = "big" } }, "hunyuan_v1_dense",
         'config key "rope_scaling.alpha" in config table must be a positive number, got string "big"')
      fails({ use_cla = true }, "hunyuan_v1_dense", 'config key "use_cla" is true')
      fails({ use_qk_norm = false }, "hunyuan_v1_dense", 'config key "use_qk_norm" is false')
      -- (Llama's "dynamic" grows with the length in transformers: not this fixed base)
      fails({ rope_scaling = { type = "dynamic", alpha = 1000, factor = 2 } }, "llama", 'rope type "dynamic" is not supported')
   end)
end)

-- llama.config of tiny(over) for family fails with an error holding msg.
local function config_fails(over, family, msg)
   local ok, err = pcall(llama.config, tiny(over), family)
   assert.is_false(ok)
   assert.truthy(tostring(err):find(msg, 1, true), err)
end

describe("models.cohere (tests/fixtures/models/cohere_tiny: parallel block, neighbouring rotary pairs, per-head q/k LayerNorms)", function()
   local dir = H.FIX .. "/cohere_tiny"
   local exp = H.expected("cohere_tiny")
   local model = models.from_pretrained(dir)

   it("builds CohereForCausalLM with every tensor of the checkpoint: one bias-free LayerNorm per layer, q/k norms per head", function()
      assert.are.equal("CohereForCausalLM", model.__name)
      assert.are.equal("CohereDecoderLayer", model.model.layers[1].__name)
      H.assert_holds_checkpoint(model, dir, true)
      local layer = model.model.layers[1]
      assert.is_nil(layer.post_attention_layernorm)
      assert.is_nil(layer.input_layernorm.bias)
      assert.are.same({ 4, 8 }, layer.self_attn.q_norm.weight.shape)
      assert.are.same({ 2, 8 }, layer.self_attn.k_norm.weight.shape)
      assert.are.equal(0.25, model.config.logit_scale)
   end)

   it_matches_transformers(model, exp, "batch of 2")
   it_matches_padded(model, "cohere_tiny", "positions")

   it("needs each of its differences: the logit scale, the parallel block, the rotary pairs, the q/k norms", function()
      local scaled = model(ml.tensor(exp.input_ids, { dtype = "int64" }))
      local unscaled = logits_after("cohere_tiny", function(m) m.config.logit_scale = 1 end)
      assert.is_true(H.max_abs_diff(unscaled, (scaled / 0.25):tolist()) < 1e-4)
      assert.is_true(H.max_abs_diff(unscaled, exp.logits) > 1e-3)
      local sequential = logits_after("cohere_tiny", function(m)
         for _, layer in ipairs(m.model.layers) do
            rawset(layer, "forward", function(self, x, cos, sin, cache, pad)
               x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pad)
               return x + self.mlp(self.input_layernorm(x))
            end)
         end
      end)
      assert.is_true(H.max_abs_diff(sequential, exp.logits) > 1e-3)
      local halves = logits_after("cohere_tiny", function(m)
         for _, layer in ipairs(m.model.layers) do rawset(layer.self_attn, "pairs_interleaved", false) end
      end)
      assert.is_true(H.max_abs_diff(halves, exp.logits) > 1e-3)
      local unnormed = logits_after("cohere_tiny", function(m)
         for _, layer in ipairs(m.model.layers) do layer.self_attn.q_norm, layer.self_attn.k_norm = nil, nil end
      end)
      assert.is_true(H.max_abs_diff(unnormed, exp.logits) > 1e-3)
   end)

   it("reads the hub's keys (layer_norm_eps, rope_theta, no q/k norms by default) and names a bad one", function()
      local cfg = llama.config(tiny({ model_type = "cohere", layer_norm_eps = 1e-6, rope_theta = 8000000 }), "cohere")
      assert.are.same({ 1e-6, 8000000, 0.0625, true }, { cfg.rms_norm_eps, cfg.rope_theta, cfg.logit_scale,
         cfg.tie_word_embeddings })
      assert.is_nil(llama.CohereForCausalLM(cfg).model.layers[1].self_attn.q_norm)
      local fails = config_fails
      fails({ logit_scale = "0.0625" }, "cohere", 'models.cohere: config key "logit_scale" must be a positive number, got 0.0625')
      fails({ logit_scale = 0 }, "cohere2", 'models.cohere2: config key "logit_scale" must be a positive number, got 0')
      fails({ use_qk_norm = "yes" }, "cohere", 'config key "use_qk_norm" must be a boolean, got yes')
   end)
end)

describe("models.cohere2 (tests/fixtures/models/cohere2_tiny: a 4-token window on 3 layers that rotate, a NoPE 4th)", function()
   local dir = H.FIX .. "/cohere2_tiny"
   local exp = H.expected("cohere2_tiny")
   local model = models.from_pretrained(dir)

   it("builds Cohere2ForCausalLM with every tensor of the checkpoint, its windows and NoPE layer", function()
      assert.are.equal("Cohere2ForCausalLM", model.__name)
      assert.are.equal("Cohere2DecoderLayer", model.model.layers[1].__name)
      H.assert_holds_checkpoint(model, dir, true)
      assert.are.same({ 4, 4, 4, false }, model.config.layer_windows)
      assert.are.same({ false, false, false, true }, model.config.nope_layers)
   end)

   it_matches_transformers(model, exp, "batch of 2, past the window")
   it_matches_padded(model, "cohere2_tiny", "positions and windows")

   it("needs the NoPE layer, the window and the logit scale", function()
      local rotated = logits_after("cohere2_tiny", function(m) rawset(m.model.layers[4].self_attn, "nope", false) end)
      assert.is_true(H.max_abs_diff(rotated, exp.logits) > 1e-3)
      local unwindowed = logits_after("cohere2_tiny", function(m) rawset(m.model.layers[1].self_attn, "window", false) end)
      assert.is_true(H.max_abs_diff(unwindowed, exp.logits) > 1e-3)
      local unscaled = logits_after("cohere2_tiny", function(m) m.config.logit_scale = 1 end)
      assert.is_true(H.max_abs_diff(unscaled, exp.logits) > 1e-3)
   end)

   it("derives the layers from sliding_window_pattern as transformers does, the head size from the widths", function()
      local cfg = llama.config(tiny({ model_type = "cohere2", num_hidden_layers = 4, sliding_window = 8,
         sliding_window_pattern = 2, head_dim = 128 }), "cohere2")
      assert.are.same({ 8, false, 8, false }, cfg.layer_windows)
      assert.are.same({ false, true, false, true }, cfg.nope_layers)
      assert.are.equal(4, cfg.head_dim)                          -- hidden_size / num_attention_heads
      cfg = llama.config(tiny({ model_type = "cohere2", num_hidden_layers = 4 }), "cohere2")
      assert.are.same({ 4096, 4096, 4096, false }, cfg.layer_windows)   -- transformers' default window and pattern
      config_fails({ layer_types = { "full_attention" } }, "cohere2",
         'models.cohere2: config key "layer_types" must list 2 layer types')
   end)
end)

describe("models.glm4 (tests/fixtures/models/glm4_tiny: norms after as well as before, neighbouring rotary pairs over half of each head)", function()
   local dir = H.FIX .. "/glm4_tiny"
   local exp = H.expected("glm4_tiny")
   local model = models.from_pretrained(dir)

   it("builds Glm4ForCausalLM with every tensor of the checkpoint: fused gate_up_proj, biased q/k/v only, four norms", function()
      assert.are.equal("Glm4ForCausalLM", model.__name)
      assert.are.equal("Glm4DecoderLayer", model.model.layers[1].__name)
      assert.are.same(H.sorted_keys(ml.safetensors.load_file(dir .. "/model.safetensors")),
         H.sorted_keys((model:state_dict())))
      local attn = model.model.layers[1].self_attn
      assert.are.same({ 32 }, attn.q_proj.bias.shape)
      assert.is_nil(attn.o_proj.bias)
      assert.are.same({ 128, 32 }, model.model.layers[1].mlp.gate_up_proj.weight.shape)
      assert.are.equal(4, model.config.rotary_dim)              -- half of head_dim 8
   end)

   it_matches_transformers(model, exp, "batch of 2")
   it_matches_padded(model, "glm4_tiny", "positions")

   it("needs the norms after attention and MLP, and the pairs of neighbouring dims within the rotary half", function()
      local unnormed = logits_after("glm4_tiny", function(m)
         for _, layer in ipairs(m.model.layers) do
            rawset(layer, "forward", function(self, x, cos, sin, cache, pad)
               x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pad)
               return x + self.mlp(self.post_attention_layernorm(x))
            end)
         end
      end)
      assert.is_true(H.max_abs_diff(unnormed, exp.logits) > 1e-3)
      local halves = logits_after("glm4_tiny", function(m)
         for _, layer in ipairs(m.model.layers) do rawset(layer.self_attn, "pairs_interleaved", false) end
      end)
      assert.is_true(H.max_abs_diff(halves, exp.logits) > 1e-3)
      local whole_head = logits_after("glm4_tiny", function(m)        -- pairs reordered across the whole head
         for _, layer in ipairs(m.model.layers) do
            rawset(layer.self_attn, "deinterleave", function(self, x) return ml.models.common.deinterleave(self, x) end)
         end
      end)
      assert.is_true(H.max_abs_diff(whole_head, exp.logits) > 1e-3)
   end)

   it("reads the hub's top-level partial_rotary_factor and rope_theta, half a head by default, and names a bad factor", function()
      local cfg = llama.config(tiny({ model_type = "glm4", head_dim = 8, partial_rotary_factor = 0.25, rope_theta = 5000 }), "glm4")
      assert.are.same({ 2, 5000, true }, { cfg.rotary_dim, cfg.rope_theta, cfg.attention_bias })
      assert.are.equal(4, llama.config(tiny({ model_type = "glm4", head_dim = 8 }), "glm4").rotary_dim)
      config_fails({ head_dim = 8, partial_rotary_factor = 2 }, "glm4",
         "models.glm4: partial_rotary_factor must be a number in (0, 1], got 2")
   end)
end)

describe("models.granite (tests/fixtures/models/granite_tiny: embedding, residual, attention and logits multipliers)", function()
   local dir = H.FIX .. "/granite_tiny"
   local exp = H.expected("granite_tiny")
   local model = models.from_pretrained(dir)

   it("builds GraniteForCausalLM with every tensor of the checkpoint and the config's multipliers", function()
      assert.are.equal("GraniteForCausalLM", model.__name)
      assert.are.equal("GraniteDecoderLayer", model.model.layers[1].__name)
      H.assert_holds_checkpoint(model, dir, true)
      assert.are.equal(0.25, model.model.layers[1].self_attn.scale)
      assert.are.equal(0.5, model.model.layers[2].residual_multiplier)
      assert.are.same({ 3, 2 }, { model.config.embedding_multiplier, model.config.logits_scaling })
   end)

   it_matches_transformers(model, exp, "batch of 2")
   it_matches_padded(model, "granite_tiny", "positions")

   it("needs each multiplier", function()
      local undivided = logits_after("granite_tiny", function(m) m.config.logits_scaling = 1 end)
      assert.is_true(H.max_abs_diff(undivided / 2, exp.logits) < 1e-4)
      local changes = {
         function(m) m.config.embedding_multiplier = 1 end,
         function(m) for _, layer in ipairs(m.model.layers) do rawset(layer, "residual_multiplier", 1) end end,
         function(m) for _, layer in ipairs(m.model.layers) do rawset(layer.self_attn, "scale", 1 / math.sqrt(8)) end end,
      }
      for i, change in ipairs(changes) do
         assert.is_true(H.max_abs_diff(logits_after("granite_tiny", change), exp.logits) > 1e-3, i)
      end
   end)

   it("defaults the multipliers to 1 and names a bad one", function()
      local cfg = llama.config(tiny({ model_type = "granite" }), "granite")
      assert.are.same({ 1, 1, 1, 1 }, { cfg.embedding_multiplier, cfg.residual_multiplier, cfg.attention_multiplier,
         cfg.logits_scaling })
      config_fails({ logits_scaling = "16" }, "granite", 'models.granite: config key "logits_scaling" must be a positive number, got 16')
      config_fails({ attention_multiplier = 0 }, "granite",
         'models.granite: config key "attention_multiplier" must be a positive number, got 0')
   end)
end)
