-- ml.models RecurrentGemma (Griffin: RG-LRU recurrent blocks and local attention,
-- models/recurrent_gemma.lua) against transformers (tests/fixtures/gen_models.py recurrent_gemma):
-- names, logits, greedy ids, decoding through the blocks' carried conv inputs and states and the
-- attention's window, padded batches, block schedules, offload, the RG-LRU against its definition,
-- what each particularity changes, and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local rg = require("moonload.models.recurrent_gemma")
local common = require("moonload.models.common")
local H = require("models_helpers")

local NAME = "recurrent_gemma_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.recurrent_gemma (tests/fixtures/models/recurrent_gemma_tiny: recurrent, attention, recurrent, recurrent)",
   function()
   H.collect_warnings()
   local model = models.from_pretrained(DIR)
   local exp, _, _, logits_after = H.fixture_model(NAME)

   it("holds every tensor of the checkpoint, under its names, the head tied to the embedding", function()
      H.assert_holds_checkpoint(model, DIR, true)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
   end)

   H.it_matches_expected(model, NAME)

   it("builds Griffin's layers: block_types repeated, RG-LRU heads, half-rotary local attention", function()
      assert.are.equal("RecurrentGemmaForCausalLM", model.__name)
      local layers = model.model.layers
      assert.are.same({ "RecurrentGemmaRecurrentBlock", "RecurrentGemmaAttention", "RecurrentGemmaRecurrentBlock",
         "RecurrentGemmaRecurrentBlock" }, { layers[1].temporal_block.__name, layers[2].temporal_block.__name,
         layers[3].temporal_block.__name, layers[4].temporal_block.__name })
      assert.are.same({ 4, 8, 8 }, layers[1].temporal_block.rg_lru.input_gate_weight.shape)
      local attn = layers[2].temporal_block
      assert.are.same({ 4, 2, 8, 4 }, { attn.n_head, attn.n_kv_head, attn.head_dim, attn.window })
      assert.are.equal(4, model.config.rotary_dim)
      assert.are.equal(48, layers[1].mlp_block.gate_proj.out_features)        -- intermediate_size / 2
      assert.are.equal(5.65625, model.model.normalizer)                         -- sqrt(32) in bfloat16
   end)

   it("keeps each recurrent block's conv inputs and float32 state, and the attention's window, in the cache", function()
      local cache = model:new_cache()
      model({ exp.input_ids[1] }, { cache = cache })
      for _, i in ipairs({ 1, 3, 4 }) do
         assert.are.same({ 1, 3, 32 }, cache.states[i].conv.shape)
         assert.are.same({ 1, 32 }, cache.states[i].recurrent.shape)
         assert.are.equal("float32", cache.states[i].recurrent.dtype)
         assert.is_nil(cache.k[i])
      end
      assert.is_nil(cache.states[2])
      for _ = 1, 12 do model({ { 7 } }, { cache = cache }) end
      assert.is_true(cache.k[2]:size(3) <= 10 + 2 * 4)                      -- the window's keys, not all 22
      assert.is_false(cache:can_crop(2))
   end)

   it("keeps padding out of the recurrent blocks: a left-padded row gives what the row alone gives", function()
      -- (transformers lets its padding's states into the convolution and, without a reset at the
      -- first real token, the recurrence: its padded row's logits are not its row alone's)
      local pad = H.read_json(DIR .. "/padded.json")
      local mask = ml.tensor(pad.attention_mask, { dtype = "int64" })
      local pos = common.positions_from_mask(mask, 7)
      local logits = model(pad.input_ids, { attention_mask = pad.attention_mask, position_ids = pos })
      local alone = model({ { 5, 17, 42, 8, 11 } })
      assert.is_true(H.max_abs_diff(logits:select(1, 1):narrow(1, 3, 5), alone:select(1, 1):tolist()) < 1e-4)
      -- the row without padding: transformers' logits and tokens
      assert.is_true(H.max_abs_diff(model(pad.input_ids, { attention_mask = pad.attention_mask }):select(1, 2),
         pad.logits[2]) < 1e-4)
      local got = model:generate(pad.input_ids, { attention_mask = pad.attention_mask, max_new_tokens = pad.max_new_tokens,
         eos_token_id = false })
      assert.are.same(pad.greedy_ids[2], got[2])
      local first = model:generate({ 5, 17, 42, 8, 11 }, { max_new_tokens = pad.max_new_tokens, eos_token_id = false })
      assert.are.same({ 0, 0, unpack(first) }, got[1])
   end)

   H.it_runs_stateful(model, NAME, H.alternating_layers("model", 4, { ["model.embed_tokens"] = "cpu",
      ["model.rotary_emb"] = "cpu", ["model.final_norm"] = "disk", lm_head = "cpu" }))

   H.it_splits_over_cpu_and_disk(NAME, { budget = 100000, overrides = { ["%.mlp_block$"] = "disk" },
      places = { ["model.layers.0.mlp_block"] = "disk" } })

   it("computes the RG-LRU as its definition says, token by token, the state reset at position 0", function()
      local lru = model.model.layers[1].temporal_block.rg_lru
      ml.manual_seed(5)
      local x = ml.randn(1, 6, 32)
      local reset = ml.tensor({ { true, false, false, true, false, false } })
      local state = ml.randn(1, 32)
      local want_state = state:view(32):clone()
      local cache = model:new_cache()
      cache:layer_state(1, 1, function() return { recurrent = state } end)    -- (its recurrent block's, made first)
      local got = lru(x, reset, cache)
      -- by hand: per head h, gates sigmoid(x_h W_h + b_h); a = exp(-8 r softplus(param))
      local sp = lru.recurrent_param:softplus()
      local h = want_state
      for t = 1, 6 do
         local xt = x:select(2, t):view(4, 1, 8)
         local i = (xt:matmul(lru.input_gate_weight):view(4, 8) + lru.input_gate_bias):sigmoid():reshape(32)
         local r = (xt:matmul(lru.recurrent_gate_weight):view(4, 8) + lru.recurrent_gate_bias):sigmoid():reshape(32)
         local a = (r * sp * -8):exp()
         local xin = x:select(2, t):reshape(32) * i
         if t == 1 or t == 4 then
            h = xin
         else
            h = a * h + (1 - a * a):sqrt() * xin
         end
         assert.is_true(H.max_abs_diff(got:select(2, t):reshape(32), h:tolist()) < 1e-5, "token " .. t)
      end
      assert.is_true(H.max_abs_diff(state:view(32), h:tolist()) < 1e-5)
   end)

   it("needs the soft cap, the window, the reset and the bfloat16 normalizer", function()
      local uncapped = logits_after(function(m) m.config.logits_soft_cap = 1e9 end)
      assert.is_true(H.max_abs_diff(uncapped, exp.logits) > 1e-3)
      local unwindowed = logits_after(function(m) rawset(m.model.layers[2].temporal_block, "window", false) end)
      assert.is_true(H.max_abs_diff(unwindowed, exp.logits) > 1e-3)
      local no_reset = logits_after(function(m)
         for _, i in ipairs({ 1, 3, 4 }) do
            local lru = m.model.layers[i].temporal_block.rg_lru
            local forward = lru.forward
            rawset(lru, "forward", function(self, x, reset, ...) return forward(self, x, nil, ...) end)
         end
      end)
      assert.is_true(H.max_abs_diff(no_reset, exp.logits) > 1e-3)
      local exact = logits_after(function(m) rawset(m.model, "normalizer", math.sqrt(32)) end)
      assert.is_true(H.max_abs_diff(exact, exp.logits) > 1e-4)
   end)

   it("names what is wrong in a config", function()
      local cases = {
         { { block_types = { "recurrent", "mlp" } }, 'block_types[2] is "mlp" (supported: attention, recurrent)' },
         { { block_types = {} }, 'config key "block_types" must list block types' },
         { { lru_width = 30 }, "lru_width 30 is not a multiple of num_attention_heads 4" },
         { { num_key_value_heads = 3 }, "num_attention_heads 4 is not a multiple of num_key_value_heads 3" },
         { { rope_parameters = { rope_type = "linear", factor = 2, rope_theta = 10000 } },
            'rope type "linear" is not supported (supported: default' },
         { { hidden_activation = "swish3" }, 'activation "swish3"' },
         { { logits_soft_cap = 0 }, 'config key "logits_soft_cap"' },
      }
      for _, c in ipairs(cases) do H.assert_config_fails(rg.config, DIR, c[1], c[2]) end
   end)

   it("reads RecurrentGemmaConfig's defaults: recurrentgemma-2b's block types and half-rotary heads", function()
      local raw = H.read_json(DIR .. "/config.json")
      for _, k in ipairs({ "block_types", "num_hidden_layers", "rope_parameters", "lru_width" }) do raw[k] = nil end
      local cfg = rg.config(raw)
      assert.are.equal(26, cfg.num_hidden_layers)
      assert.are.same({ true, true, false, true }, { cfg.recurrent_layers[1], cfg.recurrent_layers[2], cfg.recurrent_layers[3],
         cfg.recurrent_layers[4] })
      assert.are.same({ 32, 4, 10000 }, { cfg.lru_width, cfg.rotary_dim, cfg.rope_theta })
   end)
end)
