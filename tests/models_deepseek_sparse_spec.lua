-- ml.models DeepSeek-V3.2 and GLM-5 (DeepSeek Sparse Attention: a lightning indexer chooses the
-- keys each query sees) and GLM-4.7-Flash (V3's latent attention with GLM's defaults) against
-- transformers (tests/fixtures/gen_models.py deepseek_v32 glm_moe_dsa glm4_moe_lite
-- deepseek_v32_fp8: indexers keeping 4 keys, so the fixtures' prompts and generations attend
-- sparsely): padded batches, how the choice is made and reaches the attention,
-- the indexer's cache, shared layers, FP8 files and bad configs. Names, logits, greedy ids, both ways
-- of attending and block schedules: tests/models_deepseek_spec.lua.
local ml = require("moonload")
local models = require("moonload.models")
local deepseek = require("moonload.models.deepseek")
local sparse = require("moonload.models.deepseek_sparse")
local H = require("models_helpers")

local TOL = 1e-4

-- Counts calls of the indexers' scores while fn runs.
local function scoring(fn)
   local saved, calls = sparse.DsaIndexer.scores, 0
   sparse.DsaIndexer.scores = function(...) calls = calls + 1; return saved(...) end
   local ok, err = pcall(fn)
   sparse.DsaIndexer.scores = saved
   if not ok then error(err, 0) end
   return calls
end

local function tiny_v32(over)
   local c = { model_type = "deepseek_v32", vocab_size = 50, hidden_size = 16, intermediate_size = 32,
      moe_intermediate_size = 8, num_hidden_layers = 3, num_attention_heads = 2, n_routed_experts = 4,
      n_shared_experts = 1, num_experts_per_tok = 2, n_group = 2, topk_group = 1, first_k_dense_replace = 1,
      kv_lora_rank = 8, q_lora_rank = 12, qk_rope_head_dim = 4, qk_nope_head_dim = 8, v_head_dim = 6,
      index_topk = 3, index_head_dim = 8, index_n_heads = 2 }
   for k, v in pairs(over or {}) do c[k] = v end
   return c
end

for _, case in ipairs({
   { "deepseek_v32_tiny", "every layer indexed, rotary halves" },
   { "glm_moe_dsa_tiny", "a shared layer, interleaved rotary pairs" },
   { "glm4_moe_lite_tiny", "latent attention, mlp_layer_types" },
}) do
   local name, what = case[1], case[2]
   describe("models." .. name .. " (" .. what .. ")", function()
      H.it_matches_padded(models.from_pretrained(H.FIX .. "/" .. name), name, "positions and the chosen keys")
   end)
end

describe("models.deepseek_v32 from DeepSeek's FP8 files (tests/fixtures/models/deepseek_v32_fp8_tiny)", function()
   local model = models.from_pretrained(H.FIX .. "/deepseek_v32_fp8_tiny")

   it("keeps the float8 tiles of the projections and the indexer's wq_b and wk, its weights_proj not", function()
      local attn = model.model.layers[2].self_attn
      for _, m in ipairs({ attn.q_b_proj, attn.kv_b_proj, attn.indexer.wq_b, attn.indexer.wk }) do
         assert.are.equal("float8_e4m3fn", m.weight.dtype)
      end
      assert.are.equal("float32", attn.indexer.weights_proj.weight.dtype)
   end)

end)

describe("models.deepseek_v32 sparse attention", function()
   local exp = H.expected("deepseek_v32_tiny")
   local model = models.from_pretrained(H.FIX .. "/deepseek_v32_tiny")

   it("chooses keys: attending to all of them gives other logits", function()
      local saved = sparse.DsaAttention.key_choice
      sparse.DsaAttention.key_choice = function() return nil end
      local ok, logits = pcall(model, ml.tensor(exp.input_ids, { dtype = "int64" }))
      sparse.DsaAttention.key_choice = saved
      assert.is_true(ok, logits)
      assert.is_true(H.max_abs_diff(logits, exp.logits) > 0.1)
   end)

   it("scores nothing while a sequence has at most index_topk tokens, and then equals dense attention", function()
      local ids = { 1, 7, 9, 33 }                               -- index_topk is 4
      local sparse_logits
      assert.are.equal(0, scoring(function() sparse_logits = model(ids) end))
      local saved = sparse.DsaAttention.key_choice
      sparse.DsaAttention.key_choice = function() return nil end
      local dense = model(ids)
      sparse.DsaAttention.key_choice = saved
      assert.is_true(H.max_abs_diff(sparse_logits, dense:tolist()) < 1e-6)
      assert.are.equal(3, scoring(function() model({ 1, 7, 9, 33, 51 }) end))   -- one per layer from the 5th
   end)

   it("decodes a row with fewer real tokens than index_topk beside a longer one: padding never chosen", function()
      -- the first row's 5 padding positions make its steps gather index_topk = 4 of 7+ keys when
      -- only 2+ are real: the mask must hide the rest
      local batch = model:generate({ { 0, 0, 0, 0, 0, 1, 7 }, { 1, 60, 61, 62, 63, 64, 65 } },
         { attention_mask = { { 0, 0, 0, 0, 0, 1, 1 }, { 1, 1, 1, 1, 1, 1, 1 } }, max_new_tokens = 4, eos_token_id = false })
      local alone = model:generate({ 1, 7 }, { max_new_tokens = 4, eos_token_id = false })
      assert.are.same(alone, { unpack(batch[1], 6) })
   end)

   it("decodes over the index_topk chosen latents alone, however long the context", function()
      local common = require("moonload.models.common")
      local saved, seen = common.attention, {}
      common.attention = function(q, k, ...) seen[#seen + 1] = k:size(3); return saved(q, k, ...) end
      local ok, logits = pcall(H.decoded_logits, model, exp.input_ids[2], 6)
      common.attention = saved
      assert.is_true(ok, logits)
      assert.is_true(H.max_abs_diff(logits, { exp.logits[2] }) < TOL)
      assert.are.same({ 4, 4, 4, 4, 4, 4 }, { unpack(seen, #seen - 5) })   -- the 2 steps' 3 layers
   end)

   it("scores a long input's queries a few at a time, with the same choice", function()
      local saved = sparse.SCORE_BYTES
      sparse.SCORE_BYTES = 1                                      -- one query at a time
      local ok, logits = pcall(model, ml.tensor(exp.input_ids, { dtype = "int64" }))
      sparse.SCORE_BYTES = saved
      assert.is_true(ok, logits)
      assert.is_true(H.max_abs_diff(logits, exp.logits) < TOL)
   end)

   it("caches the indexer's key beside the latent: kv_lora_rank + qk_rope_head_dim + index_head_dim a token", function()
      local cache = model:new_cache()
      model(exp.input_ids, { cache = cache })
      assert.are.same({ 2, 1, 8, 16 }, cache.kv["indexer:1"]:narrow(3, 1, cache.length).shape)   -- (halves joined)
      cache:drop_layer(1)                         -- (a forward's own cache, layer by layer)
      assert.is_nil(cache.kv["indexer:1"])
      assert.is_nil(cache.k["indexer:1"])
      assert.is_not_nil(cache.k["indexer:2"])
      local rm = require("moonload.utils.runtime_memory")
      local sizes = rm.kv_cache_sizes(model, { batch_size = 2, max_length = 20, prompt_length = 8 })
      assert.are.equal(2 * 20 * (16 + 8 + 16) * 4, sizes["model.layers.0.self_attn"])
   end)

   it("keeps the indexer's keys in an int8 cache and beam search's reordered rows", function()
      local got = H.decoded_logits(model, exp.input_ids[2], 5, model:new_cache(16, nil, "int8"))
      local r = ((got - ml.tensor({ exp.logits[2] })):abs():max() / got:abs():max()):item()
      assert.is_true(r < 0.1, tostring(r))
      local beams = model:generate(exp.input_ids[1], { max_new_tokens = 6, num_beams = 3, eos_token_id = false })
      assert.are.equal(8 + 6, #beams)
   end)

   it("loads bfloat16 with weights_proj kept float32, and ml.quantize leaves it so", function()
      local bf = models.from_pretrained(H.FIX .. "/deepseek_v32_tiny", { dtype = "bfloat16" })
      local idx = bf.model.layers[1].self_attn.indexer
      assert.are.equal("float32", idx.weights_proj.weight.dtype)
      assert.are.equal("bfloat16", idx.wq_b.weight.dtype)
      local q = ml.quantize(models.from_pretrained(H.FIX .. "/deepseek_v32_tiny"), { dtype = "int8" })
      assert.are.equal("IndexerWeightsProjection", q.model.layers[1].self_attn.indexer.weights_proj.__name)
   end)
end)

describe("models.glm_moe_dsa shared indexer layers", function()
   local model = models.from_pretrained(H.FIX .. "/glm_moe_dsa_tiny")

   it("runs no indexer of its own in a shared layer: it reuses the full layer's choice", function()
      assert.is_nil(model.model.layers[2].self_attn.indexer)
      assert.is_not_nil(model.model.layers[3].self_attn.indexer)
      assert.are.equal(2, scoring(function() model({ 1, 7, 9, 33, 51, 2 }) end))
   end)

   it("passes each block of a block schedule its own choice, with or without a cache", function()
      local exp = H.expected("glm_moe_dsa_tiny")
      local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
      assert.is_true(H.max_abs_diff(model(ids, { micro_batch_size = 1 }), exp.logits) < TOL)
      assert.is_true(H.max_abs_diff(model(ids, { micro_batch_size = 1, prefill_chunk_size = 3 }), exp.logits) < TOL)
   end)

   it("derives indexer_types as transformers does: a pattern, or a frequency and an offset", function()
      local function types(over)
         return sparse.config(tiny_v32(over), "glm_moe_dsa").indexer_types
      end
      assert.are.same({ "full", "full", "full" }, types({ model_type = "glm_moe_dsa" }))
      assert.are.same({ "full", "shared", "full" }, types({ model_type = "glm_moe_dsa", index_topk_pattern = "FSF" }))
      assert.are.same({ "full", "shared", "full", "shared", "full" },
         types({ model_type = "glm_moe_dsa", num_hidden_layers = 5, index_topk_freq = 2, index_skip_topk_offset = 1 }))
      assert.are.same({ "full", "full", "shared", "full", "shared" },
         types({ model_type = "glm_moe_dsa", num_hidden_layers = 5, index_topk_freq = 2, index_skip_topk_offset = 2 }))
   end)
end)

describe("models.deepseek_sparse bad configs", function()
   local function fails(over, family, msg)
      local ok, err = pcall(sparse.config, tiny_v32(over), family or "deepseek_v32")
      assert.is_false(ok)
      assert.truthy(tostring(err):find(msg, 1, true), tostring(err))
   end

   it("names what is wrong", function()
      local no_bottleneck = tiny_v32()
      no_bottleneck.q_lora_rank = nil
      local ok, err = pcall(sparse.config, no_bottleneck, "deepseek_v32")
      assert.is_false(ok)
      assert.truthy(tostring(err):find("q_lora_rank is missing: the indexer's queries come from the query latent", 1, true))
      fails({ index_head_dim = 2 }, nil, "index_head_dim 2 must be even and at least qk_rope_head_dim 4")
      fails({ index_head_dim = 7 }, nil, "index_head_dim 7 must be even")
      fails({ index_topk = 0 }, nil, "index_topk")
      fails({ model_type = "glm_moe_dsa", indexer_types = { "shared", "full", "full" } }, "glm_moe_dsa",
         'indexer_types[1] is "shared": a shared layer reuses the keys an earlier full layer chose')
      fails({ model_type = "glm_moe_dsa", indexer_types = { "full", "sparse", "full" } }, "glm_moe_dsa",
         'indexer_types[2] must be "full" or "shared", got sparse')
      fails({ model_type = "glm_moe_dsa", indexer_types = { "full" } }, "glm_moe_dsa",
         'config key "indexer_types" must list 3 indexer types')
      fails({ mlp_layer_types = { "dense", "moe", "sparse" } }, nil, 'mlp_layer_types[2] must be "dense" or "sparse", got moe')
   end)
end)
