-- ml.models Bamba and Granite 4.0 hybrid (Mamba-2 mixers beside attention, models/bamba.lua over
-- models/mamba2.lua) against transformers (tests/fixtures/gen_models.py bamba, granitemoehybrid):
-- names, logits, greedy ids, decoding token by token through the mixers' carried conv inputs and
-- states, padded batches, block schedules, offload, the mixer alone against F.ssm_scan's
-- reference, and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local bamba = require("moonload.models.bamba")
local mamba2 = require("moonload.models.mamba2")
local H = require("models_helpers")

local TOL = 1e-4

-- The it()s every hybrid fixture gets: the checkpoint's tensors, transformers' logits and greedy
-- ids, decoding through the cache, a padded batch, a block schedule and a CPU/disk split, assisted
-- generation refused.
local function it_runs_like_transformers(name, n_layers, norm, tied)
   local dir = H.FIX .. "/" .. name
   local model = models.from_pretrained(dir)

   it("holds every tensor of the checkpoint, under its names (the hub's expert names as transformers renames them)",
      function()
      local want = {}
      for key in pairs(ml.safetensors.load_file(dir .. "/model.safetensors")) do
         for _, r in ipairs(model.checkpoint_renames or {}) do key = key:gsub(r[1], r[2]) end
         want[key] = true
      end
      if tied then want["lm_head.weight"] = true end
      assert.are.same(H.sorted_keys(want), H.sorted_keys((model:state_dict())))
   end)

   H.it_matches_expected(model, name)

   it("carries each mixer's last conv inputs and float32 state in the cache, which cannot be cropped", function()
      local exp = H.expected(name)
      local cache = model:new_cache()
      model({ { exp.input_ids[1][1], exp.input_ids[1][2], exp.input_ids[1][3] } }, { cache = cache })
      local any = false
      for i = 1, n_layers do
         local mixer = model.model.layers[i].mamba
         if mixer then
            local g = mixer.geometry
            assert.are.same({ 1, g.taps - 1, g.conv_dim }, cache.states[i].conv.shape)
            assert.are.same({ 1, g.H, g.P, g.N }, cache.states[i].recurrent.shape)
            assert.are.equal("float32", cache.states[i].recurrent.dtype)
            any = true
         else
            assert.is_nil(cache.states[i])
         end
      end
      assert.is_true(any)
      assert.is_false(cache:can_crop(2))
   end)

   local padded = io.open(dir .. "/padded.json")
   if padded then
      padded:close()
      H.it_matches_padded(model, name, "positions and zeroes padding before the mixers")
   end

   H.it_runs_stateful(model, name, H.alternating_layers("model", n_layers, { ["model.embed_tokens"] = "cpu",
      ["model.rotary_emb"] = "cpu", [norm] = "disk", lm_head = "cpu" }))
   return model
end

describe("models.bamba (tests/fixtures/models/bamba_tiny: mixer, attention, mixer, mixer)", function()
   H.collect_warnings()
   local dir = H.FIX .. "/bamba_tiny"
   local model = it_runs_like_transformers("bamba_tiny", 4, "model.final_layernorm", false)

   it("builds Bamba's layers: mixers (4 heads of 16 in 2 groups, state 8) and attention rotating half a head", function()
      assert.are.equal("BambaForCausalLM", model.__name)
      local layers = model.model.layers
      assert.are.equal("BambaMixer", layers[1].mamba.__name)
      assert.are.equal("BambaAttention", layers[2].self_attn.__name)
      assert.is_nil(layers[2].mamba)
      assert.are.same({ H = 4, P = 16, G = 2, N = 8, width = 64, conv_dim = 96, taps = 4, limit = { 0, math.huge } },
         layers[1].mamba.geometry)
      assert.are.equal(4, model.config.rotary_dim)                              -- half of head_dim 8
      assert.are_not.equal(model.model.embed_tokens.weight, model.lm_head.weight)
   end)

   it("computes the mixer as its definition says, token by token (F.ssm_scan's reference in Lua)", function()
      local mixer = model.model.layers[1].mamba
      local g = mixer.geometry
      ml.manual_seed(3)
      local x = ml.randn(1, 5, 32)
      local got = mixer(x)
      -- the same steps written out: projection, conv + SiLU, dt, a scan by hand, gated norm, out_proj
      local proj = mixer.in_proj(x)
      local z, xbc, dt = proj:narrow(3, 1, 64), proj:narrow(3, 65, 96), proj:narrow(3, 161, 4)
      local conv = require("moonload.models.causal_conv").run(mixer.conv1d, xbc):silu()
      local step = ((dt + mixer.dt_bias):exp() + 1):log()                        -- softplus (small values)
      local A, D, steps = (-mixer.A_log:exp()):tolist(), mixer.D:tolist(), step:tolist()
      local y = ml.zeros(1, 5, 4, 16)
      for h = 1, g.H do
         local S = ml.zeros(16, 8)
         local grp = math.floor((h - 1) / (g.H / g.G))
         for t = 1, 5 do
            local xt = conv:select(2, t):narrow(2, (h - 1) * 16 + 1, 16):view(16)
            local Bt = conv:select(2, t):narrow(2, 64 + grp * 8 + 1, 8):view(8)
            local Ct = conv:select(2, t):narrow(2, 80 + grp * 8 + 1, 8):view(8)
            local d = steps[1][t][h]
            S = S * math.exp(d * A[h]) + (xt * d):unsqueeze(2) * Bt:unsqueeze(1)
            y:select(2, t):select(2, h):copy_((S:matmul(Ct:unsqueeze(2)):view(16) + xt * D[h]):unsqueeze(1))
         end
      end
      local want = mixer.out_proj(mixer.norm(y:view(1, 5, 64), z))
      assert.is_true(H.max_abs_diff(got, want:tolist()) < 1e-5)
   end)

   it("names what is wrong in a config", function()
      local cases = {
         { { attn_layer_indices = { 1, 4 } }, "attn_layer_indices lists 4, not a layer (0 to 3)" },
         { { attn_layer_indices = "1" }, 'config key "attn_layer_indices" must list layer indices, got 1' },
         { { mamba_n_groups = 3 }, "mamba_n_heads 4 is not a multiple of mamba_n_groups 3" },
         { { mamba_d_head = 8 }, "mamba_n_heads 4 x mamba_d_head 8 must be mamba_expand x hidden_size = 64" },
         { { mamba_n_heads = 0 }, "mamba_n_heads" },
         { { mamba_conv_bias = "yes" }, 'config key "mamba_conv_bias" must be a boolean, got yes' },
         { { time_step_limit = { 2, 1 } }, 'config key "time_step_limit" must be [min, max] with min <= max, got [2, 1]' },
      }
      for _, c in ipairs(cases) do H.assert_config_fails(bamba.config, dir, c[1], c[2]) end
   end)

   it("reads the time-step limit transformers writes (Infinity as {__float__}) and clamps dt to it", function()
      local raw = H.read_json(dir .. "/config.json")
      assert.are.same({ 0, math.huge }, bamba.config(raw).mamba.time_step_limit)
      raw.time_step_limit = { 0.001, 0.1 }
      local cfg = bamba.config(raw)
      assert.are.same({ 0.001, 0.1 }, cfg.mamba.time_step_limit)
      -- a mixer whose steps are clamped differs from the unclamped one
      local exp = H.expected("bamba_tiny")
      local clamped = models.from_pretrained(dir)
      for i = 1, 4 do
         local mixer = clamped.model.layers[i].mamba
         if mixer then mixer.geometry.limit = { 0.001, 0.1 } end
      end
      assert.is_true(H.max_abs_diff(clamped(exp.input_ids), exp.logits) > 1e-3)
   end)
end)

describe("models.granitemoehybrid (tests/fixtures/models/granitemoehybrid_tiny: Granite 4.0-h, no position embedding, experts)",
   function()
   H.collect_warnings()
   local dir = H.FIX .. "/granitemoehybrid_tiny"
   local model = it_runs_like_transformers("granitemoehybrid_tiny", 4, "model.norm", true)

   it("builds its layers: mixers or NoPE attention, a shared MLP beside 4 stacked experts, Granite's multipliers", function()
      assert.are.equal("GraniteMoeHybridForCausalLM", model.__name)
      local layers = model.model.layers
      assert.are.equal("GraniteMoeHybridMambaLayer", layers[1].mamba.__name)
      assert.are.equal("GraniteMoeHybridAttention", layers[2].self_attn.__name)
      assert.is_true(layers[2].self_attn.nope)
      assert.are.equal(0.25, layers[2].self_attn.scale)
      assert.are.equal("GraniteMoeHybridMoE", layers[1].block_sparse_moe.__name)
      assert.are.same({ 4, 32, 32 }, layers[1].block_sparse_moe.experts.gate_up_proj.shape)
      assert.are.equal(48, layers[1].shared_mlp.input_linear.out_features)
      assert.are.same({ "mamba", "attention", "mamba", "mamba" }, (function()
         local kinds = {}
         for i, mixes in ipairs(model.config.mixer_layers) do kinds[i] = mixes and "mamba" or "attention" end
         return kinds
      end)())
   end)

   it("reads Granite's layer type names and transformers' alike, and names a wrong one", function()
      local raw = H.read_json(dir .. "/config.json")
      raw.layer_types = { "mamba", "attention", "linear_attention", "full_attention" }
      assert.are.same({ true, false, true, false }, bamba.config(raw, "granitemoehybrid").mixer_layers)
      H.assert_config_fails(function(r) return bamba.config(r, "granitemoehybrid") end, dir,
         { layer_types = { "mamba", "conv", "mamba", "mamba" } }, 'layer_types[2] is "conv" (supported: attention, full_attention, linear_attention, mamba)')
      H.assert_config_fails(function(r) return bamba.config(r, "granitemoehybrid") end, dir,
         { position_embedding_type = "alibi" }, 'position_embedding_type "alibi" is not supported (supported: rope, nope)')
   end)
end)

describe("models.granitemoehybrid (tests/fixtures/models/granitemoehybrid_dense_tiny: no experts, rotary attention)", function()
   H.collect_warnings()
   local model = it_runs_like_transformers("granitemoehybrid_dense_tiny", 3, "model.norm", true)

   it("has no sparse block and rotates its attention", function()
      local layers = model.model.layers
      assert.is_nil(layers[1].block_sparse_moe)
      assert.is_false(layers[1].self_attn.nope)
      assert.are.equal("GraniteMoeHybridMambaLayer", layers[2].mamba.__name)
   end)
end)

describe("models.mamba2.read_config", function()
   it("derives head_dim from expand and names each family's keys in its errors", function()
      local cfg = { hidden_size = 32, rms_norm_eps = 1e-5, n_heads = 4, exp = 2, grp = 1, st = 8, ck = 4, cb = true, pb = false }
      local names = { heads = "n_heads", head_dim = "hd", expand = "exp", groups = "grp", state_size = "st", conv_kernel = "ck",
         conv_bias = "cb", proj_bias = "pb" }
      local m = mamba2.read_config(cfg, "models.test", names, {}).mamba
      assert.are.equal(16, m.head_dim)
      assert.are.same({ 0, math.huge }, m.time_step_limit)
      cfg.n_heads = 5
      local ok, err = pcall(mamba2.read_config, cfg, "models.test", names, {})
      assert.is_false(ok)
      assert.truthy(tostring(err):find("the mixer's width 64 (exp x hidden_size) is not a multiple of n_heads 5", 1, true), tostring(err))
   end)
end)

describe("examples/hybrid.lua on a Granite 4.0-h folder", function()
   it("puts the stacked experts on disk, names each layer's kind, prints the greedy tokens and the cache's states", function()
      local dir = H.FIX .. "/granitemoehybrid_tiny"
      local p = assert(io.popen("luajit examples/hybrid.lua " .. dir .. " 2>/dev/null"))
      local text = p:read("*a")
      p:close()
      local ram, disk = text:match("GraniteMoeHybridForCausalLM, ([%d.]+) MB of weights in RAM, ([%d.]+) MB on disk")
      assert.truthy(ram, text)
      assert.is_true(tonumber(disk) > 0, text)
      assert.truthy(text:find("layers: mamba full mamba mamba", 1, true), text)
      local want = models.from_pretrained(dir, { dtype = "bfloat16" }):generate({ 1, 5, 17, 42, 3 },
         { max_new_tokens = 16, eos_token_id = false })
      assert.are.same({ unpack(want, 6) }, H.printed_ids(text))
      -- 3 mixers: conv inputs (3 x 80 bfloat16) and a 4 x 16 x 8 float32 state each
      assert.truthy(text:find("21 tokens; cache: 7.4 KB of fixed-size state", 1, true), text)
   end)
end)
