-- ml.models Jamba (Mamba-1 mixers with weighted norms on the step, B and C beside attention without
-- position embeddings; dense and sparse feed-forwards: models/jamba.lua over models/mamba.lua and
-- models/moe.lua) against transformers (tests/fixtures/gen_models.py jamba): names, logits, greedy
-- ids, decoding token by token through the mixers' carried conv inputs and states, a padded batch,
-- block schedules, offload, the sparse block against its definition, the stacked experts' layout,
-- and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local jamba = require("moonload.models.jamba")
local H = require("models_helpers")

local NAME = "jamba_tiny"
local DIR = H.FIX .. "/" .. NAME
local TOL = 1e-4

describe("models.jamba (tests/fixtures/models/jamba_tiny: mixer + MLP, attention + experts, twice)", function()
   H.collect_warnings()
   local model = models.from_pretrained(DIR)
   local exp = H.expected(NAME)

   it("holds every tensor of the checkpoint and nothing else (the experts one module each, as the hub's files)", function()
      H.assert_holds_checkpoint(model, DIR, false)
      assert.truthy(model:state_dict()["model.layers.1.feed_forward.experts.3.up_proj.weight"])
      assert.truthy(model:state_dict()["model.layers.0.mamba.b_layernorm.weight"])
      -- in transformers' order (what save_pretrained writes): the mixer's own tensors, its norms last,
      -- then the feed-forward and both norms
      local first = {}
      for _, name in ipairs(H.param_names(model)) do
         if name:find("^model%.layers%.0%.") then first[#first + 1] = name:sub(#"model.layers.0." + 1) end
      end
      assert.are.same({ "mamba.A_log", "mamba.D", "mamba.conv1d.weight", "mamba.conv1d.bias", "mamba.in_proj.weight",
         "mamba.x_proj.weight", "mamba.dt_proj.weight", "mamba.dt_proj.bias", "mamba.out_proj.weight",
         "mamba.dt_layernorm.weight", "mamba.b_layernorm.weight", "mamba.c_layernorm.weight",
         "feed_forward.gate_proj.weight", "feed_forward.up_proj.weight", "feed_forward.down_proj.weight",
         "input_layernorm.weight", "pre_ff_layernorm.weight" }, first)
   end)

   it("builds Jamba's layers: mixers with weighted inner norms, attention without position embedding, experts", function()
      assert.are.equal("JambaForCausalLM", model.__name)
      local layers = model.model.layers
      assert.are.equal("JambaMambaDecoderLayer", layers[1].__name)
      assert.are.equal("JambaAttentionDecoderLayer", layers[2].__name)
      assert.are.equal("JambaMambaMixer", layers[3].mamba.__name)
      assert.is_nil(layers[3].self_attn)
      assert.are.same({ I = 64, N = 8, R = 4, taps = 4 }, layers[1].mamba.geometry)
      assert.are.equal("RMSNorm", layers[1].mamba.dt_layernorm.__name)
      assert.are.same({ 4 }, layers[1].mamba.dt_layernorm.weight.shape)
      assert.are.same({ 8 }, layers[1].mamba.c_layernorm.weight.shape)
      assert.is_true(layers[2].self_attn.nope)
      assert.is_nil(rawget(model.model, "_modules").rotary_emb)
      assert.are.equal("JambaMLP", layers[1].feed_forward.__name)
      local sparse = layers[4].feed_forward
      assert.are.equal("JambaSparseMoeBlock", sparse.__name)
      assert.are.equal(4, #sparse.experts)
      assert.are.equal(2, sparse.top_k)
      assert.is_false(sparse.norm_topk_prob)
      assert.truthy(model.model.final_layernorm)
      assert.are_not.equal(model.model.embed_tokens.weight, model.lm_head.weight)
   end)

   H.it_matches_expected(model, NAME)

   it("carries the mixers' last conv inputs and float32 states in the cache, the attention's keys, and cannot crop", function()
      local cache = model:new_cache()
      local ids = exp.input_ids[1]
      model({ { ids[1], ids[2], ids[3] } }, { cache = cache })
      for i = 1, 4 do
         if i % 2 == 1 then                      -- layers 0 and 2 (0-based) mix
            assert.are.same({ 1, 3, 64 }, cache.states[i].conv.shape)
            assert.are.same({ 1, 1, 64, 8 }, cache.states[i].recurrent.shape)
            assert.are.equal("float32", cache.states[i].recurrent.dtype)
            assert.is_nil(cache.k[i])
         else
            assert.is_nil(cache.states[i])
            assert.truthy(cache.k[i])
         end
      end
      assert.is_false(cache:can_crop(2))
   end)

   H.it_matches_padded(model, NAME, "zeroes padding before the mixers and masks it in attention")

   H.it_runs_stateful(model, NAME, H.alternating_layers("model", 4, { ["model.embed_tokens"] = "cpu",
      ["model.final_layernorm"] = "disk", lm_head = "cpu" }))

   it("weighs each token's top 2 experts by their softmax probabilities as they are (not renormalized)", function()
      local block = model.model.layers[2].feed_forward
      ml.manual_seed(5)
      local x = ml.randn(1, 3, 32)
      local got = block(x)
      local probs = block.router(x):softmax(-1):tolist()[1]
      local want = {}
      for t = 1, 3 do
         local order = { 1, 2, 3, 4 }
         table.sort(order, function(a, b) return probs[t][a] > probs[t][b] end)
         local row = x:narrow(2, t, 1)
         local y = block.experts[order[1]](row) * probs[t][order[1]] + block.experts[order[2]](row) * probs[t][order[2]]
         want[t] = y:view(32):tolist()
      end
      assert.is_true(H.max_abs_diff(got, { want }) < 1e-5)
   end)

   it("loads experts stacked per projection (transformers' in-memory layout) to the same logits", function()
      local dir = H.copy_with_stacked_experts(DIR, { "model.layers.1.feed_forward.experts",
         "model.layers.3.feed_forward.experts" }, 4)
      local m = models.from_pretrained(dir)
      assert.are.same({ 4, 48, 32 }, m.model.layers[2].feed_forward.experts.gate_up_proj.shape)
      assert.is_true(H.max_abs_diff(m(exp.input_ids), exp.logits) < TOL)
      H.rmdir(dir)
   end)
end)

describe("models.jamba.config", function()
   it("places attention and experts by period and offset (Jamba-v0.1's 32 layers) and reads JambaConfig's defaults", function()
      local cfg = jamba.config({ vocab_size = 100, hidden_size = 64, intermediate_size = 32, num_hidden_layers = 32,
         num_attention_heads = 4, num_key_value_heads = 2, num_local_experts = 16 })
      local attends, sparse = {}, {}
      for i = 1, 32 do
         if not cfg.mixer_layers[i] then attends[#attends + 1] = i - 1 end
         if cfg.sparse_layers[i] then sparse[#sparse + 1] = i - 1 end
      end
      assert.are.same({ 4, 12, 20, 28 }, attends)                 -- attn_layer_period 8, offset 4
      assert.are.equal(16, #sparse)                               -- expert_layer_period 2, offset 1
      assert.are.equal(1, sparse[1])
      assert.are.equal(16, cfg.num_experts)                       -- (num_local_experts, JambaConfig's alias)
      assert.are.same({ width = 128, state_size = 16, dt_rank = 4, taps = 4, conv_bias = true, proj_bias = false,
         inner_norms = "weighted", inner_eps = 1e-6 }, cfg.mamba1)   -- dt rank "auto": ceil(64 / 16)
      assert.are.equal(262144, cfg.max_position_embeddings)
      local dense = jamba.config({ vocab_size = 100, hidden_size = 32, intermediate_size = 32, num_hidden_layers = 2,
         num_attention_heads = 4, num_key_value_heads = 2, num_experts = 1, mamba_dt_rank = "auto" })
      assert.are.same({ false, false }, dense.sparse_layers)      -- one expert: a dense MLP, as transformers builds
      assert.are.equal(2, dense.mamba1.dt_rank)
      dense.tie_word_embeddings = true
      local tied = jamba.JambaForCausalLM(dense)
      assert.are.equal(tied.model.embed_tokens.weight, tied.lm_head.weight)
   end)

   it("names what is wrong in a config", function()
      local cases = {
         { { attn_layer_offset = 2 }, "attn_layer_offset 2 must be smaller than attn_layer_period 2" },
         { { attn_layer_period = 0 }, 'config key "attn_layer_period" must be an integer >= 1, got 0' },
         { { expert_layer_offset = -1 }, 'config key "expert_layer_offset" must be an integer >= 0, got -1' },
         { { expert_layer_offset = 3 }, "expert_layer_offset 3 must be smaller than expert_layer_period 2" },
         { { expert_layer_period = 1.5 }, 'config key "expert_layer_period" must be an integer >= 1, got 1.5' },
         { { mamba_dt_rank = "big" }, 'config key "mamba_dt_rank" must be "auto" or an integer >= 1, got big' },
         { { mamba_dt_rank = 0 }, 'config key "mamba_dt_rank" must be "auto" or an integer >= 1, got 0' },
         { { mamba_d_state = 0 }, 'config key "mamba_d_state" must be an integer >= 1, got 0' },
         { { mamba_d_conv = "4" }, 'config key "mamba_d_conv" must be an integer >= 1, got 4' },
         { { mamba_expand = 0 }, 'config key "mamba_expand" must be an integer >= 1, got 0' },
         { { mamba_conv_bias = "yes" }, 'config key "mamba_conv_bias" must be a boolean, got yes' },
         { { mamba_proj_bias = 1 }, 'config key "mamba_proj_bias" must be a boolean, got 1' },
         { { num_experts_per_tok = 5 }, "num_experts_per_tok 5 is more than num_experts 4" },
         { { num_experts = -1 }, 'config key "num_experts" must be an integer >= 0, got -1' },
         { { hidden_act = "gelu" }, 'config key "hidden_act" is "gelu" (supported with Mamba layers: silu' },
         { { num_key_value_heads = 3 }, "num_attention_heads 4 is not a multiple of num_key_value_heads 3" },
      }
      for _, c in ipairs(cases) do H.assert_config_fails(jamba.config, DIR, c[1], c[2]) end
   end)
end)
