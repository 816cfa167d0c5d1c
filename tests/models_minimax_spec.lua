-- ml.models MiniMax-Text-01 (lightning attention beside full attention, residuals taken after the
-- norms and weighed by alphas and betas, Mixtral's sparse block) against transformers
-- (tests/fixtures/gen_models.py minimax): names, logits, greedy ids, the lightning attention by
-- blocks and token by token through the cache's state, padded batches, block schedules, offload,
-- the decays, what each particularity weighs, and bad configs.
local ml = require("moonload")
local nn = require("moonload.nn")
local models = require("moonload.models")
local minimax = require("moonload.models.minimax")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "minimax_tiny"
local DIR = H.FIX .. "/" .. NAME

-- (the fixture's logits reach 7: a particularity left out moves them by far more than this)
local FAR = 0.05

local DECAYS = { "slope_rate", "query_decay", "key_decay", "diagonal_decay" }

-- A stand-in for a projection: a constant (B, L, n) of `value` whatever x.
local Constant = nn.Module:extend("Constant")
function Constant:__init(n, value)
   nn.Module.__init(self)
   rawset(self, "n", n)
   rawset(self, "value", value)
end
function Constant:forward(x)
   return ml.full({ x:size(1), x:size(2), self.n }, self.value, { dtype = x.dtype })
end

describe("models.minimax (tests/fixtures/models/minimax_tiny: full, linear, linear, full; blocks of 4 tokens)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds MiniMaxForCausalLM with every tensor of the checkpoint (the decays too), under its names", function()
      assert.are.equal("MiniMaxForCausalLM", model.__name)
      H.assert_holds_checkpoint(model, DIR)
      local layers = model.model.layers
      assert.are.equal("MiniMaxAttention", layers[1].self_attn.__name)
      assert.are.equal("MiniMaxLightningAttention", layers[2].self_attn.__name)
      assert.are.equal("MiniMaxLightningAttention", layers[3].self_attn.__name)
      assert.are.equal("MiniMaxAttention", layers[4].self_attn.__name)
      assert.are.equal("MiniMaxSparseMoeBlock", layers[1].block_sparse_moe.__name)
      assert.are.same({ "MiniMaxDecoderLayer" }, model.no_split_modules)
      assert.are.same({ 1, 4, 4, 4 }, layers[2].self_attn.diagonal_decay.shape)
      assert.are.equal(8, model.config.rotary_dim)                       -- whole heads
      assert.truthy(tostring(model):find("attn_alpha=1.6, attn_beta=0.7, mlp_alpha=1.2, mlp_beta=0.9", 1, true))
   end)

   H.it_matches_expected(model, NAME)

   it("runs the prompt by blocks and token by token to the same logits, from any split", function()
      -- the second prompt from its first token through the cache: the recurrence alone
      assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[2], 1), { exp.logits[2] }) < TOL)
      -- 3 tokens, then 7 at once after a state: blocks that start from it
      local cache = model:new_cache()
      local first = { {}, {} }
      local rest = { {}, {} }
      for b = 1, 2 do
         for t = 1, 10 do table.insert(t <= 3 and first[b] or rest[b], exp.input_ids[b][t]) end
      end
      local out = ml.cat({ model(first, { cache = cache }), model(rest, { cache = cache }) }, 2)
      assert.is_true(H.max_abs_diff(out, exp.logits) < TOL)
      -- the linear layers keep a float32 state of a (head_dim x head_dim) matrix per head, the full one keys and values
      assert.are.same({ "kv" }, H.sorted_keys(cache.states[2]))
      assert.are.same({ 2, 4, 8, 8 }, cache.states[2].kv.shape)
      assert.are.equal("float32", cache.states[3].kv.dtype)
      assert.is_nil(cache.states[1])
      assert.is_nil(cache.k[2])
      assert.are.equal(2 * 2 * 4 * 8 * 8 * 4 + cache.k[1]:nbytes() + cache.v[1]:nbytes() + cache.k[4]:nbytes()
         + cache.v[4]:nbytes(), cache:nbytes())
   end)

   H.it_matches_padded(model, NAME, "positions and zeroes padding's q, k, v in the linear layers")

   it("runs a padded batch in a block schedule (2-token chunks, one row at a time) with the same tokens", function()
      local pad = H.read_json(DIR .. "/padded.json")
      assert.are.same(pad.greedy_ids, model:generate(pad.input_ids, { attention_mask = pad.attention_mask,
         max_new_tokens = pad.max_new_tokens, eos_token_id = false, micro_batch_size = 1, prefill_chunk_size = 2 }))
      -- a forward without a cache in chunks: the schedule's own cache carries the state between them
      assert.is_true(H.max_abs_diff(model(ids, { prefill_chunk_size = 3 }), exp.logits) < TOL)
   end)

   -- (transformers 5.24 sizes its decoding masks by the first layer's keys: with a linear first
   -- layer, as the hub's model has, a left-padded row's full layers see no key (sdpa) or every key
   -- (eager) in its decoding steps. Here the row decodes as it does unpadded.)
   it("decodes a left-padded row as the row alone when the first layer is a linear one", function()
      local dir = H.tmpdir()
      local raw = H.read_json(DIR .. "/config.json")
      raw.layer_types = { "linear_attention", "full_attention", "linear_attention", "full_attention" }
      H.write(dir .. "/config.json", require("cjson").encode(raw))
      local tensors = {}
      for name, t in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do   -- layers 0 and 1 swapped
         tensors[(name:gsub("^model%.layers%.([01])%.", function(i) return "model.layers." .. (1 - i) .. "." end))] = t
      end
      ml.safetensors.save_file(tensors, dir .. "/model.safetensors")
      local m = models.from_pretrained(dir)
      local pad = H.read_json(DIR .. "/padded.json")
      local both = m:generate(pad.input_ids, { attention_mask = pad.attention_mask, max_new_tokens = 6, eos_token_id = false })
      local alone = m:generate({ { unpack(pad.input_ids[1], 3) } }, { max_new_tokens = 6, eos_token_id = false })
      assert.are.same(alone[1], { unpack(both[1], 3) })
      H.rmdir(dir)
   end)

   H.it_runs_stateful(model, NAME, H.alternating_layers("model", 4, { ["model.embed_tokens"] = "cpu",
      ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" }))

   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000,
      overrides = { ["%.block_sparse_moe%.experts%.%d+$"] = "disk" },
      places = { ["model.layers.0.block_sparse_moe.experts.0"] = "disk" } })

   it("reorders the states with the rows (beam search's reorder)", function()
      local cache = model:new_cache()
      model({ { 1, 7, 9 }, { 1, 60, 61 } }, { cache = cache })
      local before = cache.states[3].kv:clone()
      cache:reorder({ 1, 1, 0 })
      assert.are.same({ 3, 4, 8, 8 }, cache.states[3].kv.shape)
      assert.are.equal(0, H.max_abs_diff(cache.states[3].kv:select(1, 3), before:select(1, 1):tolist()))
      assert.are.equal(0, H.max_abs_diff(cache.states[3].kv:select(1, 1), before:select(1, 2):tolist()))
   end)

   describe("the decays", function()
      it("are computed as transformers computes them (the slopes fall with the head and the layer)", function()
         local file = ml.safetensors.load_file(DIR .. "/model.safetensors")
         for _, i in ipairs({ 1, 2 }) do
            local d = minimax.decays(4, i + 1, 4, 4)
            for _, name in ipairs(DECAYS) do
               local stored = file["model.layers." .. i .. ".self_attn." .. name]
               assert.are.same(stored.shape, d[name].shape)
               assert.is_true(H.max_abs_diff(d[name], stored:tolist()) < 1e-6, name)
            end
         end
         -- head 1: 2^(-2) a token, times 1 - layer / 3 (0-based layers); head 4 decays 2^(-8) as fast
         local slopes = file["model.layers.1.self_attn.slope_rate"]:view(4)
         assert.is_true(math.abs(slopes[1]:item() - 0.25 * 2 / 3) < 1e-5)
         assert.is_true(math.abs(slopes[4]:item() - 2 ^ -8 * 2 / 3) < 1e-7)
         assert.is_true(math.abs(file["model.layers.2.self_attn.slope_rate"]:view(4)[1]:item() - 0.25 / 3) < 1e-5)
         -- the last layer (a full one here) would hardly decay
         assert.is_true(minimax.decays(4, 4, 4, 4).slope_rate:max():item() < 1e-5)
      end)

      it("are computed, and not expected, for a checkpoint without them", function()
         local dir = H.tmpdir()
         H.copy(DIR .. "/config.json", dir .. "/config.json")
         local tensors = ml.safetensors.load_file(DIR .. "/model.safetensors")
         for name in pairs(tensors) do
            for _, d in ipairs(DECAYS) do
               if name:sub(-#d - 1) == "." .. d then tensors[name] = nil end
            end
         end
         ml.safetensors.save_file(tensors, dir .. "/model.safetensors")
         local m = models.from_pretrained(dir)
         assert.is_true(H.max_abs_diff(m(ids), exp.logits) < TOL)
         assert.are.same(H.sorted_keys(tensors), H.sorted_keys((m:state_dict())))
         assert.are.same({ 4, 4, 1 }, m.model.layers[2].self_attn.query_decay.shape)
         H.rmdir(dir)
      end)
   end)

   describe("weighs each particularity, as the fixture shows (leaving one out moves the logits)", function()
      it("the decays of the lightning attention", function()
         local got = logits_after(function(m)
            for _, i in ipairs({ 2, 3 }) do
               local a = m.model.layers[i].self_attn
               a.slope_rate:fill_(0)
               a.query_decay:fill_(1)
               a.key_decay:fill_(1)
               a.diagonal_decay:copy_(a.diagonal_decay:gt(0):float())
            end
         end)
         assert.is_true(H.max_abs_diff(got, exp.logits) > FAR)
      end)

      it("the residual alphas and betas", function()
         for _, key in ipairs({ "attn_alpha", "attn_beta", "mlp_alpha", "mlp_beta" }) do
            local got = logits_after(function(m)
               for _, layer in ipairs(m.model.layers) do layer.factors[key] = 1 end
            end)
            assert.is_true(H.max_abs_diff(got, exp.logits) > FAR, key)
         end
      end)

      it("the output gate of the lightning attention", function()
         local got = logits_after(function(m)
            for _, i in ipairs({ 2, 3 }) do m.model.layers[i].self_attn.output_gate = Constant(32, 40) end   -- sigmoid 1
         end)
         assert.is_true(H.max_abs_diff(got, exp.logits) > FAR)
      end)

      it("the routing: the top 2 experts, their softmax weights renormalized", function()
         for _, change in ipairs({ { "top_k", 1 }, { "norm_topk_prob", false } }) do
            local got = logits_after(function(m)
               for _, layer in ipairs(m.model.layers) do rawset(layer.block_sparse_moe, change[1], change[2]) end
            end)
            assert.is_true(H.max_abs_diff(got, exp.logits) > FAR, change[1])
         end
      end)
   end)

   it("keeps a bfloat16 model's decays and state in float32", function()
      local m = models.from_pretrained(DIR, { dtype = "bfloat16" })
      assert.are.equal("bfloat16", m.model.layers[2].self_attn.qkv_proj.weight.dtype)
      assert.are.equal("float32", m.model.layers[2].self_attn.diagonal_decay.dtype)
      local cache = m:new_cache()
      local f = m(ids, { cache = cache }):float()
      assert.are.equal(f:numel(), f:eq(f):sum():item())                   -- no NaN
      assert.are.equal("float32", cache.states[2].kv.dtype)
   end)

   it("names what is wrong in a config", function()
      local cases = {
         { { layer_types = { "linear_attention", "full_attention", "mamba", "full_attention" } },
           'layer_types[3] is "mamba" (supported: linear_attention, full_attention)' },
         { { layer_types = { "linear_attention" } }, 'config key "layer_types" must list 4 layer types' },
         { { block_size = 0 }, 'config key "block_size" must be an integer >= 1, got 0' },
         { { linear_attn_beta_factor = "1" }, 'config key "linear_attn_beta_factor" must be a number, got 1' },
         { { num_local_experts = 0 }, 'config key "num_local_experts" must be an integer >= 1, got 0' },
         { { num_experts_per_tok = 5 }, "num_experts_per_tok 5 is more than num_experts 4" },
         { { hidden_act = "swish2" }, 'activation "swish2"' },
         { { num_key_value_heads = 3 }, "num_attention_heads 4 is not a multiple of num_key_value_heads 3" },
      }
      for _, c in ipairs(cases) do
         H.assert_config_fails(minimax.config, DIR, c[1], c[2])
         H.assert_config_fails(minimax.config, DIR, c[1], "models.minimax: ")
      end
      -- an error names the file
      local ok, err = pcall(models.from_config, { model_type = "minimax", vocab_size = 100, hidden_size = 32,
         intermediate_size = 24, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, block_size = -1 })
      assert.is_false(ok)
      assert.truthy(tostring(err):find('config key "block_size" must be an integer >= 1, got -1 in config table', 1, true), err)
      -- transformers' defaults: the first layer of each pair full, 8 key/value heads, 8 experts of 2, blocks of 256
      local cfg = minimax.config({ vocab_size = 100, hidden_size = 64, intermediate_size = 24, num_hidden_layers = 4,
         num_attention_heads = 8 })
      assert.are.same({ "full_attention", "linear_attention", "full_attention", "linear_attention" }, cfg.layer_types)
      assert.are.same({ 8, 8, 2, 256, 1000000, 1e-5 }, { cfg.num_key_value_heads, cfg.num_experts, cfg.num_experts_per_tok,
         cfg.block_size, cfg.rope_theta, cfg.rms_norm_eps })
   end)
end)
