-- ml.models DBRX (a fused Wqkv clamped to clip_qkv, LayerNorms without bias; every block sparse, a
-- softmax router's top-k weights divided by their p-norm, the experts fused in 2-D w1, v1, w2 as the
-- hub stores them) against transformers (tests/fixtures/gen_models.py dbrx): names, logits, greedy ids
-- with and without the cache, a padded batch, the routing, a CPU + disk split, configs.
local ml = require("moonload")
local models = require("moonload.models")
local dbrx = require("moonload.models.dbrx")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "dbrx_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.dbrx (tests/fixtures/models/dbrx_tiny: 2 blocks of 4 experts, top 2, clip_qkv 1.5, p-norm 2)", function()
   H.collect_warnings()                       -- (the disk split's, kept quiet)
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds DbrxForCausalLM with every tensor of the checkpoint, the experts fused as the hub holds them", function()
      assert.are.equal("DbrxForCausalLM", model.__name)
      assert.are.same({ "DbrxBlock" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local block = model.transformer.blocks[1]
      assert.are.equal("DbrxBlock", block.__name)
      assert.are.equal("DbrxAttention", block.norm_attn_norm.attn.__name)
      assert.is_nil(block.norm_attn_norm.norm_1.bias)                      -- (LayerNorms without bias)
      assert.are.same({ 64, 32 }, block.norm_attn_norm.attn.Wqkv.weight.shape)   -- (4 query + 2 x 2 kv heads of 8)
      local mlp = block.ffn.experts.mlp
      for _, w in ipairs({ "w1", "v1", "w2" }) do assert.are.same({ 4 * 16, 32 }, mlp[w].shape, w) end
      assert.are.same({ 2, false, 2 }, { block.ffn.top_k, block.ffn.norm_topk_prob, block.ffn.normalize_p })
      assert.are.equal(5000, model.config.rope_theta)
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("needs the clipping, two experts a token and their weights divided by their 2-norm", function()
      local function each_block(fn) return function(m) for _, b in ipairs(m.transformer.blocks) do fn(b) end end end
      local changes = {
         each_block(function(b) rawset(b.norm_attn_norm.attn, "clip_qkv", nil) end),
         each_block(function(b) rawset(b.ffn, "normalize_p", nil) end),
         each_block(function(b) rawset(b.ffn, "normalize_p", 1) end),            -- (a plain renormalization)
         each_block(function(b) rawset(b.ffn, "top_k", 1) end),
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("weighs with the hub's p = 1 as a renormalization (the weights of a token sum to 1)", function()
      local ffn = dbrx.DbrxForCausalLM(DIR).transformer.blocks[1].ffn
      ffn.router.layer.weight:copy_(model.transformer.blocks[1].ffn.router.layer.weight)
      rawset(ffn, "normalize_p", 1)
      local top_w, top_i = ffn:route(ml.randn({ 5, 32 }))
      assert.are.equal(5, #top_i)
      assert.is_true(H.max_abs_diff(top_w:sum(2), { 1, 1, 1, 1, 1 }) < 1e-6)
   end)

   it("runs only the experts the router chose, from slices of the fused weights", function()
      local block = model.transformer.blocks[1]
      local ran = H.experts_run(block.ffn.experts.mlp, function() model({ { 7 } }) end)
      assert.are.equal(2, #ran)
      assert.are_not.equal(ran[1], ran[2])
   end)

   it("splits over CPU and disk with device_map \"auto\" (a block each) and gives the same logits and greedy ids", function()
      local off = H.tmpdir()
      local split = models.from_pretrained(DIR, { device_map = "auto", max_memory = { cpu = 90000 }, offload_folder = off })
      local map = split.hf_device_map
      assert.are.same({ "cpu", "disk" }, { tostring(map["transformer.blocks.0"]), tostring(map["transformer.blocks.1"]) })
      local mlp = split.transformer.blocks[2].ffn.experts.mlp
      assert.is_true(mlp.w1:is_meta())                                     -- (read from the file as it runs)
      assert.are.equal(2, #H.experts_run(mlp, function() split({ { 7 } }) end))
      assert.is_true(H.max_abs_diff(split(ids), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, split:generate(exp.input_ids,
         { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(off)
   end)

   it("quantizes its fused experts as one module each, saves them so and loads them back", function()
      local m = models.from_pretrained(DIR)
      local _, report = ml.quantize(m, { dtype = "int8" })
      local experts = m.transformer.blocks[1].ffn.experts
      assert.are.equal("ModuleList", experts.__name)
      assert.are.equal("QuantizedLinear", experts[4].gate_proj.__name)        -- (down_proj: 16 in-features, too few)
      local quantized = {}
      for _, name in ipairs(report.quantized) do quantized[name] = true end
      assert.is_true(quantized["transformer.blocks.1.ffn.experts.3.gate_proj"])
      local q = m(ids)
      assert.is_true(H.max_abs_diff(q, exp.logits) < 0.3)                  -- (int8's rounding)
      local out = H.tmpdir()
      ml.save_model(m, out)
      local back = models.from_pretrained(out)
      assert.are.equal("ModuleList", back.transformer.blocks[2].ffn.experts.__name)
      assert.are.equal(0, (back(ids) - q):abs():max():item())
      H.rmdir(out)
   end)

   it("reads the hub's config: attn_config.rope_theta without rope_parameters, p = 1 unless null", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.rope_parameters, raw.ffn_config.moe_normalize_expert_weights = nil, nil
      raw.attn_config.rope_theta = 500000
      local cfg = dbrx.config(raw)
      assert.are.same({ 500000, 1, 8, 2 }, { cfg.rope_theta, cfg.normalize_p, cfg.head_dim, cfg.num_key_value_heads })
      local text = require("cjson").encode(raw)
      local path = H.tmpfile((text:gsub('"ffn_config":{', '"ffn_config":{"moe_normalize_expert_weights":null,')))
      assert.is_nil(dbrx.config(path).normalize_p)               -- (an explicit null: transformers' None)
      os.remove(path)
   end)

   it("names a bad key of the config, nested ones by their path", function()
      local function fails(change, msg) H.assert_config_fails(dbrx.config, DIR, change, msg) end
      local function nested(part, key, v) return function(raw) raw[part][key] = v end end
      fails({ d_model = "32" },
         'models.dbrx: config key "d_model" in config table must be a positive integer, got string "32"')
      fails(function(raw) raw.n_layers = nil end, 'models.dbrx: config key "n_layers" is missing in config table')
      fails(nested("attn_config", "clip_qkv", -1),
         'models.dbrx: config key "attn_config.clip_qkv" must be a positive number or null, got -1')
      fails(nested("attn_config", "kv_n_heads", 3), "models.dbrx: n_heads 4 is not a multiple of attn_config.kv_n_heads 3")
      fails(nested("attn_config", "kv_n_heads", 0),
         'models.dbrx: config key "attn_config.kv_n_heads" in config table must be a positive integer, got number 0')
      fails(nested("ffn_config", "moe_top_k", 5),
         "models.dbrx: ffn_config.moe_top_k 5 is more than ffn_config.moe_num_experts 4")
      fails(nested("ffn_config", "moe_normalize_expert_weights", "yes"),
         'models.dbrx: config key "ffn_config.moe_normalize_expert_weights" must be a positive number or null, got yes')
      fails(nested("ffn_config", "ffn_act_fn", { name = "swish2" }),
         'models.dbrx: activation "swish2" in config table is not supported')
      fails(function(raw) raw.rope_parameters, raw.attn_config.rope_theta = nil, -5 end,
         'models.dbrx: config key "attn_config.rope_theta" in config table must be a positive number, got -5')
      fails({ tie_word_embeddings = true },
         'models.dbrx: config key "tie_word_embeddings" is true: DBRX never ties its head')
   end)
end)
