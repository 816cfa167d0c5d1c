-- ml.models Doge (SmallDoge: dynamic mask attention, learned residual scales, the cross-domain MoE)
-- against transformers (tests/fixtures/gen_models.py doge): names, every tensor, logits, greedy ids,
-- the cache, a padded batch, CPU + disk splits, what each particularity changes, the MoE's router
-- mixing the forward's tokens as transformers' does, and configs.
local ml = require("moonload")
local doge = require("moonload.models.doge")
local common = require("moonload.models.common")
local H = require("models_helpers")

local NAME, MOE = "doge_tiny", "doge_moe_tiny"
local DIR, MOE_DIR = H.FIX .. "/" .. NAME, H.FIX .. "/" .. MOE

describe("models.doge (tests/fixtures/models/doge_tiny: 4 heads over 2 kv heads, keep_window_size 5, dense)", function()
   H.collect_warnings()                       -- (the disk split warns of weights on meta)
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds DogeForCausalLM: per-head q/k norms, A and dt_proj in each attention, the residual scales", function()
      assert.are.equal("DogeForCausalLM", model.__name)
      assert.are.same({ "DogeDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR)
      local layer = model.model.layers[2]
      assert.are.same({ "DogeDecoderLayer", "DogeAttention", "DogeMLP" }, { layer.__name, layer.self_attn.__name, layer.mlp.__name })
      local attn = layer.self_attn
      assert.are.same({ 2 }, attn.A.shape)
      assert.are.same({ 2, 16 }, attn.dt_proj.weight.shape)
      assert.are.same({ 8 }, attn.q_norm.weight.shape)
      assert.are.same({ 32 }, layer.input_residual.shape)
      assert.is_not_nil(layer.mlp.up_proj.bias)
      assert.are.equal(5, attn.keep_window)
   end)

   H.it_matches_expected(model, NAME, " (past keep_window_size)")
   H.it_matches_padded(model, NAME, "positions and the dynamic mask")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 100000, overrides = { ["%.mlp$"] = "disk" },
      places = { ["model.layers.1.mlp"] = "disk" } })

   it("needs the keys' dynamic bias, the window of highest bias, the q/k norms and the residual scales", function()
      local changes = {
         function(m)        -- (the causal mask alone)
            for _, l in ipairs(m.model.layers) do
               rawset(l.self_attn, "dynamic_mask", function(_, v, L, pad)
                  local S = v:size(3)
                  local seen = common.attention_mask(L, S, pad, nil, v.device) or ml.ones({ L, S }, { dtype = "bool" })
                  return ml.zeros({ L, S }):masked_fill(seen:logical_not(), -math.huge)
               end)
            end
         end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.self_attn, "keep_window", 100) end end,
         function(m) for _, l in ipairs(m.model.layers) do l.self_attn.q_norm.weight:fill_(1) end end,
         function(m) for _, l in ipairs(m.model.layers) do l.post_attention_residual:fill_(1) end end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("keeps a repeated token's keys together at the window's edge, however the batch is cut", function()
      local rows = {}                         -- (periodic rows: the first layer's biases tie)
      for b = 1, 5 do
         rows[b] = {}
         for t = 1, 19 do rows[b][t] = (b * 31 + t * 17 + b * t) % 100 end
      end
      local whole = model(rows)
      for b = 1, 5 do assert.is_true((model({ rows[b] }) - whole:narrow(1, b, 1)):abs():max():item() < 1e-4, b) end
      assert.are.equal(1e-5, doge.TIE_TOLERANCE)
   end)
end)

describe("models.doge with is_moe (tests/fixtures/models/doge_moe_tiny: 16 experts by 4 x 4 product keys, top 4, tied)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(MOE)
   local batch = H.read_json(MOE_DIR .. "/batch.json")

   it("builds the cross-domain MoE: the shared expert, router_gate's two key sets, the experts' embeddings", function()
      H.assert_holds_checkpoint(model, MOE_DIR, true)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      local mlp = model.model.layers[1].mlp
      assert.are.equal("DogeCDMoE", mlp.__name)
      assert.are.same({ 8, 32 }, mlp.router_gate.weight.shape)
      assert.are.same({ 16, 32 }, mlp.down_embed.weight.shape)
      assert.are.same({ 4, 4 }, { mlp.keys, mlp.top_k })
      assert.is_nil(mlp.gate_proj.bias)
   end)

   it("gives transformers' logits and greedy ids for one prompt and for a batch, whose rows mix in the router", function()
      assert.is_true(H.max_abs_diff(model(exp.input_ids), exp.logits) < 1e-4)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      assert.is_true(H.max_abs_diff(model(batch.input_ids), batch.logits) < 1e-4)
      assert.are.same(batch.greedy_ids, model:generate(batch.input_ids, { max_new_tokens = batch.max_new_tokens,
         eos_token_id = false }))
      -- (the first row alone and beside the second: other router scores, as in transformers)
      assert.is_true(H.max_abs_diff(ml.tensor(batch.logits):narrow(1, 1, 1), exp.logits) > 1e-3)
   end)

   H.it_splits_over_cpu_and_disk(MOE, { budget = 100000, overrides = { ["%.mlp%.up_embed$"] = "disk" },
      places = { ["model.layers.0.mlp.up_embed"] = "disk", ["model.layers.0.mlp.router_gate"] = "cpu" } })

   it("needs the routed experts and the shared one", function()
      for i, change in ipairs({
         function(m) for _, l in ipairs(m.model.layers) do l.mlp.up_embed.weight:zero_() end end,
         function(m) for _, l in ipairs(m.model.layers) do l.mlp.down_proj.weight:zero_() end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.mlp, "top_k", 1) end end,
      }) do
         assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i)
      end
   end)

   it("refuses a block schedule that would cut the batch or the prompt (the router would mix other tokens)", function()
      local ok, err = pcall(model.generate, model, batch.input_ids, { max_new_tokens = 2, micro_batch_size = 1 })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("models.doge: a block schedule (micro_batch_size, prefill_chunk_size) is not supported "
         .. "with is_moe", 1, true), tostring(err))
      assert.is_false((pcall(model, exp.input_ids, { prefill_chunk_size = 3 })))
      -- (one block: the whole forward)
      assert.are.same(batch.greedy_ids, model:generate(batch.input_ids, { max_new_tokens = batch.max_new_tokens,
         eos_token_id = false, micro_batch_size = 2 }))
   end)
end)

describe("models.doge configs", function()
   it("reads DogeConfig's defaults (Doge-320M's), dense and with is_moe, as transformers builds them", function()
      -- (transformers 5.24: DogeForCausalLM(DogeConfig()) and with is_moe = True, on the meta device)
      H.assert_matches_skeleton(function() return doge.DogeForCausalLM({ model_type = "doge" }) end,
         { parameters = 403055872, shapes = { ["model.layers.0.self_attn.dt_proj.weight"] = { 8, 1024 },
            ["lm_head.weight"] = { 32768, 1024 } } })
      local m = H.assert_matches_skeleton(function() return doge.DogeForCausalLM({ model_type = "doge", is_moe = true }) end,
         { parameters = 1485186304, shapes = { ["model.layers.0.mlp.router_gate.weight"] = { 256, 1024 },
            ["model.layers.0.mlp.down_embed.weight"] = { 16384, 1024 } } })
      local cfg = m.config
      assert.are.same({ 2048, 128, 64, false, 1e-6, 2048 }, { cfg.keep_window_size, cfg.expert_keys, cfg.top_k,
         cfg.norm_topk_prob, cfg.rms_norm_eps, cfg.max_position_embeddings })
   end)

   it("names what it refuses", function()
      local function fails(dir, change, msg) H.assert_config_fails(doge.config, dir, change, msg) end
      fails(DIR, { sliding_window = 4 }, 'models.doge: config key "sliding_window" is not supported (dynamic mask attention over a window), got 4')
      fails(DIR, { keep_window_size = 0 }, 'models.doge: config key "keep_window_size" must be an integer >= 1, got 0')
      fails(DIR, { is_moe = "yes" }, 'models.doge: config key "is_moe" must be a boolean, got yes')
      fails(MOE_DIR, { num_experts_per_tok = 17 }, "models.doge: num_experts_per_tok 17 is more than the 16 experts that 4 x 4 product keys reach")
      fails(MOE_DIR, { num_experts = 0 }, 'models.doge: config key "num_experts" must be an integer >= 1, got 0')
      fails(DIR, { num_key_value_heads = 3 }, "models.doge: num_attention_heads 4 is not a multiple of num_key_value_heads 3")
   end)
end)
