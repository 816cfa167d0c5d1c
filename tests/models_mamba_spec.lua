-- ml.models Mamba-1 language models (MambaForCausalLM, FalconMambaForCausalLM: every layer a norm
-- and a Mamba-1 mixer, the residual in float32; models/mamba.lua) against transformers
-- (tests/fixtures/gen_models.py mamba): names, logits, greedy ids, decoding token by token through
-- the mixers' carried conv inputs and per-channel states, padded batches, block schedules, offload,
-- the mixer against its definition, and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local mamba = require("moonload.models.mamba")
local H = require("models_helpers")

local TOL = 1e-4

-- The it()s both fixtures get: the checkpoint's tensors (the head when tied), transformers' logits,
-- greedy ids and cached decoding, the cache's states, a padded batch, a block schedule and a
-- CPU/disk split, assisted generation refused (H.it_runs_stateful).
local function it_runs_like_transformers(name, class, tied)
   local dir = H.FIX .. "/" .. name
   local model = models.from_pretrained(dir)

   it("builds " .. class .. " with every tensor of the checkpoint, under its backbone.* names", function()
      assert.are.equal(class, model.__name)
      H.assert_holds_checkpoint(model, dir, tied)
      assert.are.equal(tied, model.backbone.embeddings.weight == model.lm_head.weight)
   end)

   H.it_matches_expected(model, name)

   it("carries each mixer's last conv inputs and per-channel float32 state, which cannot be cropped", function()
      local exp = H.expected(name)
      local cache = model:new_cache()
      model({ { exp.input_ids[1][1], exp.input_ids[1][2] } }, { cache = cache })
      for i = 1, 3 do
         assert.are.same({ 1, 3, 64 }, cache.states[i].conv.shape)          -- the last 3 of 4 taps' inputs
         assert.are.same({ 1, 1, 64, 8 }, cache.states[i].recurrent.shape)  -- 64 channels of 8 entries
         assert.are.equal("float32", cache.states[i].recurrent.dtype)
      end
      assert.is_false(cache:can_crop(1))
   end)

   H.it_matches_padded(model, name, "zeroes padding before the mixers")

   H.it_runs_stateful(model, name, H.alternating_layers("backbone", 3, { ["backbone.embeddings"] = "cpu",
      ["backbone.norm_f"] = "disk", lm_head = "cpu" }))
   return model
end

describe("models.mamba (tests/fixtures/models/mamba_tiny: 3 Mamba-1 mixers, a tied head)", function()
   H.collect_warnings()
   local dir = H.FIX .. "/mamba_tiny"
   local model = it_runs_like_transformers("mamba_tiny", "MambaForCausalLM", true)

   it("computes the mixer as its definition says, token by token (F.ssm_scan's reference in Lua)", function()
      local mixer = model.backbone.layers[1].mixer
      assert.are.same({ I = 64, N = 8, R = 4, taps = 4 }, mixer.geometry)
      ml.manual_seed(5)
      local x = ml.randn(1, 4, 32)
      local got = mixer(x)
      local proj = mixer.in_proj(x)
      local xs, z = proj:narrow(3, 1, 64), proj:narrow(3, 65, 64)
      local conv = require("moonload.models.causal_conv").run(mixer.conv1d, xs):silu()
      local sel = mixer.x_proj(conv)
      local dt = mixer.dt_proj(sel:narrow(3, 1, 4))
      dt = (dt:exp() + 1):log()                                         -- softplus (small values)
      local Bm, Cm = sel:narrow(3, 5, 8), sel:narrow(3, 13, 8)
      local A = -mixer.A_log:exp()                                      -- (64, 8)
      local S = ml.zeros(64, 8)
      local ys = {}
      for t = 1, 4 do
         local d = dt:select(2, t):view(64, 1)
         S = S * (A * d):exp() + (conv:select(2, t):view(64, 1) * d) * Bm:select(2, t):view(1, 8)
         ys[t] = (S:matmul(Cm:select(2, t):view(8, 1)):view(1, 1, 64) + conv:narrow(2, t, 1) * mixer.D)
      end
      local y = ml.cat(ys, 2) * z:silu()
      assert.is_true(H.max_abs_diff(got, mixer.out_proj(y):tolist()) < 1e-5)
   end)

   it("reads time_step_rank \"auto\" as transformers does and names what is wrong in a config", function()
      local raw = H.read_json(dir .. "/config.json")
      raw.time_step_rank = "auto"
      assert.are.equal(2, mamba.config(raw).mamba1.dt_rank)               -- ceil(32 / 16)
      local cases = {
         { { time_step_rank = 0 }, 'config key "time_step_rank" must be an integer >= 1, got 0' },
         { { hidden_act = "gelu" }, 'config key "hidden_act" is "gelu" (supported: silu' },
         { { state_size = 0 }, 'config key "state_size" in config table must be a positive integer, got number 0' },
         { { use_conv_bias = "yes" }, 'config key "use_conv_bias" in config table must be a boolean, got string "yes"' },
      }
      for _, c in ipairs(cases) do H.assert_config_fails(mamba.config, dir, c[1], c[2]) end
   end)
end)

describe("models.falcon_mamba (tests/fixtures/models/falcon_mamba_tiny: weightless norms on the step, B and C)", function()
   H.collect_warnings()
   local model = it_runs_like_transformers("falcon_mamba_tiny", "FalconMambaForCausalLM", false)

   it("normalizes the step, B and C without weights, and differs from plain Mamba without them", function()
      local mixer = model.backbone.layers[1].mixer
      assert.are.equal("FalconMambaMixer", mixer.__name)
      assert.are.equal("FalconMambaWeightlessRMSNorm", mixer.b_layernorm.__name)
      local exp = H.expected("falcon_mamba_tiny")
      local plain = models.from_pretrained(H.FIX .. "/falcon_mamba_tiny")
      for i = 1, 3 do
         local m = plain.backbone.layers[i].mixer
         rawset(m, "dt_layernorm", nil)
         m._modules.dt_layernorm, m._modules.b_layernorm, m._modules.c_layernorm = nil, nil, nil
      end
      assert.is_true(H.max_abs_diff(plain(exp.input_ids), exp.logits) > 1e-2)
   end)
end)
