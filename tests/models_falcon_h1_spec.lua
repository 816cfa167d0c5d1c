-- ml.models Falcon-H1 (attention and a Mamba-2 mixer side by side in every layer, with muP
-- multipliers: models/falcon_h1.lua over models/mamba2.lua and models/llama.lua) against transformers
-- (tests/fixtures/gen_models.py falcon_h1): names, logits, greedy ids, decoding token by token
-- through the keys, values and mixer states of each layer, padded batches, block schedules, offload,
-- every multiplier proven used, and bad configs.
local ml = require("moonload")
local cjson = require("cjson")
local models = require("moonload.models")
local falcon_h1 = require("moonload.models.falcon_h1")
local H = require("models_helpers")

local N_LAYERS = 3

-- A split of the layers alternately over CPU and disk (the rest on the CPU, the final norm on disk).
local function alternating_map()
   return H.alternating_layers("model", N_LAYERS, { ["model.embed_tokens"] = "cpu", ["model.rotary_emb"] = "cpu",
      ["model.final_layernorm"] = "disk", lm_head = "cpu" })
end

-- A copy of fixture dir in a new temporary folder, its config.json changed by change(raw) and its
-- tensors (by default the fixture's) replaced by tensors(file) when given. Returns the folder.
local function variant(dir, change, tensors)
   local raw = H.read_json(dir .. "/config.json")
   if change then change(raw) end
   local out = H.tmpdir()
   H.write(out .. "/config.json", cjson.encode(raw))
   if tensors then
      ml.safetensors.save_file(tensors(ml.safetensors.load_file(dir .. "/model.safetensors")), out .. "/model.safetensors")
   else
      H.copy(dir .. "/model.safetensors", out .. "/model.safetensors")
   end
   return out
end

-- The logits of the fixture's prompts from a copy whose config change(raw) changed.
local function logits_with(name, change)
   local exp = H.expected(name)
   local dir = variant(H.FIX .. "/" .. name, change)
   local logits = models.from_pretrained(dir)(exp.input_ids)
   H.rmdir(dir)
   return logits
end

-- The it()s every fixture gets: the checkpoint's tensors, transformers' logits and greedy ids,
-- decoding through the cache, a padded batch, a block schedule and a CPU/disk split.
local function it_runs_like_transformers(name, tied)
   local dir = H.FIX .. "/" .. name
   local model = models.from_pretrained(dir)

   it("holds every tensor of the checkpoint and nothing else (the muP vectors are buffers outside the state dict)", function()
      H.assert_holds_checkpoint(model, dir, tied)
   end)

   H.it_matches_expected(model, name)

   it("keeps keys and values and the mixer's conv inputs and float32 state for every layer, and cannot crop", function()
      local exp = H.expected(name)
      local cache = model:new_cache()
      model({ { exp.input_ids[1][1], exp.input_ids[1][2], exp.input_ids[1][3] } }, { cache = cache })
      for i = 1, N_LAYERS do
         local g = model.model.layers[i].mamba.geometry
         assert.are.same({ 1, g.taps - 1, g.conv_dim }, cache.states[i].conv.shape)
         assert.are.same({ 1, g.H, g.P, g.N }, cache.states[i].recurrent.shape)
         assert.are.equal("float32", cache.states[i].recurrent.dtype)
         assert.are.equal(2, cache.k[i]:size(2))                     -- (B, kv heads, slots, head_dim)
         assert.are.equal(12, cache.k[i]:size(4))
      end
      assert.are.equal(3, cache.length)
      assert.is_false(cache:can_crop(2))
   end)

   local padded = io.open(dir .. "/padded.json")
   if padded then
      padded:close()
      H.it_matches_padded(model, name, "positions and zeroes padding before the mixers")
   end

   H.it_runs_stateful(model, name, alternating_map())
   return model
end

describe("models.falcon_h1 (tests/fixtures/models/falcon_h1_tiny: gated norm before the gate, every multiplier set)", function()
   H.collect_warnings()
   local name = "falcon_h1_tiny"
   local dir = H.FIX .. "/" .. name
   local model = it_runs_like_transformers(name, false)

   it("builds hybrid layers: a mixer of mamba_d_ssm 64 (not mamba_expand 3 x 32) beside attention of head_dim 12", function()
      assert.are.equal("FalconH1ForCausalLM", model.__name)
      local layer = model.model.layers[1]
      assert.are.equal("FalconH1DecoderLayer", layer.__name)
      assert.are.equal("FalconH1Mixer", layer.mamba.__name)
      assert.are.equal("FalconH1Attention", layer.self_attn.__name)
      assert.are.equal("FalconH1MLP", layer.feed_forward.__name)
      assert.are.equal("FalconH1RMSNormGated", layer.mamba.norm.__name)
      assert.is_true(layer.mamba.norm.norm_before_gate)
      assert.are.same({ H = 4, P = 16, G = 2, N = 8, width = 64, conv_dim = 96, taps = 4, limit = { 0, math.huge } },
         layer.mamba.geometry)
      assert.is_nil(layer.mamba.in_proj.bias)                 -- mamba_proj_bias false
      assert.are.same({ 32 }, layer.mamba.out_proj.bias.shape) -- projectors_bias true
      assert.are.equal(12, model.config.rotary_dim)
      assert.are.same({ 6 }, model.model.rotary_emb.inv_freq.shape)      -- whole heads of 12
      assert.are_not.equal(model.model.embed_tokens.weight, model.lm_head.weight)
   end)

   it("builds each mixer's muP vector from ssm_multipliers, as a buffer the state dict leaves out", function()
      local mup = model.model.layers[2].mamba.mup_vector
      assert.are.same({ 164 }, mup.shape)                      -- z 64, x 64, B 16, C 16, dt 4
      local want = {}
      for i, n in ipairs({ 64, 64, 16, 16, 4 }) do
         for _ = 1, n do want[#want + 1] = ({ 0.6, 1.8, 2.2, 0.5, 1.6 })[i] end
      end
      assert.is_true(H.max_abs_diff(mup, want) < 1e-7)
      assert.is_nil(model:state_dict()["model.layers.1.mamba.mup_vector"])
   end)

   it("ignores a mup_vector a file holds, rebuilding it from the config as transformers does", function()
      local exp = H.expected(name)
      local copy = variant(dir, nil, function(file)
         for i = 0, N_LAYERS - 1 do file["model.layers." .. i .. ".mamba.mup_vector"] = ml.ones(1, 1, 164) * 9 end
         return file
      end)
      assert.is_true(H.max_abs_diff(models.from_pretrained(copy)(exp.input_ids), exp.logits) < 1e-4)
      H.rmdir(copy)
   end)

   -- each multiplier set back to 1 changes the logits: each is used (and matched above where it is)
   local function set(key, i)
      return function(raw)
         if i then raw[key][i] = 1 else raw[key] = 1 end
      end
   end
   local changes = {
      { "embedding_multiplier", set("embedding_multiplier") },
      { "lm_head_multiplier", set("lm_head_multiplier") },
      { "key_multiplier", set("key_multiplier") },
      { "attention_in_multiplier", set("attention_in_multiplier") },
      { "attention_out_multiplier", set("attention_out_multiplier") },
      { "ssm_in_multiplier", set("ssm_in_multiplier") },
      { "ssm_out_multiplier", set("ssm_out_multiplier") },
      { "mlp_multipliers[1] (gate)", set("mlp_multipliers", 1) },
      { "mlp_multipliers[2] (down)", set("mlp_multipliers", 2) },
      { "mamba_norm_before_gate", function(raw) raw.mamba_norm_before_gate = false end },
   }
   for i, segment in ipairs({ "z", "x", "B", "C", "dt" }) do
      changes[#changes + 1] = { "ssm_multipliers[" .. i .. "] (" .. segment .. ")", set("ssm_multipliers", i) }
   end
   it("uses every multiplier: each one set to 1 (and the norm's order flipped) changes the logits", function()
      local exp = H.expected(name)
      for _, c in ipairs(changes) do
         local d = H.max_abs_diff(logits_with(name, c[2]), exp.logits)
         assert.is_true(d > 1e-3, c[1] .. ": " .. d)
      end
   end)

   it("names what is wrong in a config", function()
      local cases = {
         { { mamba_n_groups = 3 }, "mamba_n_heads 4 is not a multiple of mamba_n_groups 3" },
         { { mamba_d_head = 8 }, "mamba_n_heads 4 x mamba_d_head 8 must be the mixer's width 64 (mamba_d_ssm)" },
         { { mamba_d_head = "auto", mamba_d_ssm = 66 }, "the mixer's width 66 (mamba_d_ssm) is not a multiple of mamba_n_heads 4" },
         { { mamba_d_ssm = 0 }, 'config key "mamba_d_ssm" must be an integer >= 1, got 0' },
         { { mamba_n_heads = 0 }, 'config key "mamba_n_heads" must be an integer >= 1, got 0' },
         { { mamba_d_state = 2.5 }, 'config key "mamba_d_state" must be an integer >= 1, got 2.5' },
         { { mamba_conv_bias = "yes" }, 'config key "mamba_conv_bias" must be a boolean, got yes' },
         { { mamba_rms_norm = "yes" }, 'config key "mamba_rms_norm" must be a boolean, got yes' },
         { { mamba_norm_before_gate = 0 }, 'config key "mamba_norm_before_gate" must be a boolean, got 0' },
         { { projectors_bias = 1 }, 'config key "projectors_bias" must be a boolean, got 1' },
         { { key_multiplier = "2" }, 'config key "key_multiplier" must be a number, got 2' },
         { { lm_head_multiplier = false }, 'config key "lm_head_multiplier" must be a number, got false' },
         { { ssm_multipliers = { 1, 1, 1, 1 } }, 'config key "ssm_multipliers" must list 5 numbers, got [1, 1, 1, 1]' },
         { { mlp_multipliers = "x" }, 'config key "mlp_multipliers" must list 2 numbers, got x' },
         { { hidden_act = "gelu" }, 'config key "hidden_act" is "gelu" (supported: silu' },
         { { time_step_limit = { 2, 1 } }, 'config key "time_step_limit" must be [min, max] with min <= max, got [2, 1]' },
      }
      for _, c in ipairs(cases) do H.assert_config_fails(falcon_h1.config, dir, c[1], c[2]) end
   end)

   it("reads FalconH1Config's defaults: the width from mamba_expand, head_dim auto, multipliers 1", function()
      local raw = H.read_json(dir .. "/config.json")
      for _, key in ipairs({ "mamba_d_ssm", "mamba_d_head", "ssm_multipliers", "mlp_multipliers", "key_multiplier",
         "mamba_rms_norm", "mamba_norm_before_gate", "projectors_bias", "rms_norm_eps", "num_attention_heads", "num_key_value_heads" }) do
         raw[key] = nil
      end
      local cfg = falcon_h1.config(raw)
      assert.are.equal(24, cfg.mamba.head_dim)                  -- 3 x 32 / 4 heads
      assert.are.same({ 1, 1, 1, 1, 1 }, cfg.ssm_multipliers)
      assert.are.same({ 1, 1 }, cfg.mlp_multipliers)
      assert.are.equal(1, cfg.key_multiplier)
      assert.is_false(cfg.mamba_rms_norm)
      assert.is_true(cfg.mamba_norm_before_gate)
      assert.is_false(cfg.projectors_bias)
      assert.are.equal(1e-5, cfg.rms_norm_eps)
      assert.are.same({ 32, 8 }, { cfg.num_attention_heads, cfg.num_key_value_heads })
      assert.are.same({ 0, math.huge }, cfg.mamba.time_step_limit)
   end)
end)

describe("models.falcon_h1 (tests/fixtures/models/falcon_h1_gate_first_tiny: the gate before the mixer's norm)", function()
   H.collect_warnings()
   local model = it_runs_like_transformers("falcon_h1_gate_first_tiny", false)

   it("gates before normalizing (mamba_norm_before_gate false)", function()
      assert.is_false(model.model.layers[1].mamba.norm.norm_before_gate)
   end)
end)

describe("models.falcon_h1 (tests/fixtures/models/falcon_h1_plain_tiny: no mixer norm, biased attention, tied head)", function()
   H.collect_warnings()
   local model = it_runs_like_transformers("falcon_h1_plain_tiny", true)

   it("has no gated norm (y * silu(z)), biases on q, k, v and o, and the head tied to the embeddings", function()
      local layer = model.model.layers[1]
      assert.is_nil(layer.mamba.norm)
      assert.are.same({ 48 }, layer.self_attn.q_proj.bias.shape)
      assert.are.same({ 32 }, layer.self_attn.o_proj.bias.shape)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
   end)
end)
