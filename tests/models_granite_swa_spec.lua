-- ml.models GraniteSWA and GraniteMoeSWA (Granite's multipliers with sliding windows by layer_types,
-- a learned sink per query head and a rope base per layer, 0 for none; GraniteMoeShared's experts
-- and shared MLP in the MoE one) against transformers (tests/fixtures/gen_models.py granite_swa
-- granitemoe_swa): names, the checkpoint's tensors, logits, greedy ids, the cache, a left-padded
-- batch, a CPU + disk split, what each difference changes, and configs.
local models = require("moonload.models")
local llama = require("moonload.models.llama")
local granite_swa = require("moonload.models.granite_swa")
local H = require("models_helpers")

local function dir(name) return H.FIX .. "/" .. name end

describe("models.granite_swa (tests/fixtures/models/granite_swa_tiny: window 3 on layers 2-4, rope bases 1e4, none, 100, 1e4)", function()
   local NAME = "granite_swa_tiny"
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds GraniteSWAForCausalLM: sinks, the windows layer_types names, a rotary table per base, a tied head", function()
      assert.are.equal("GraniteSWAForCausalLM", model.__name)
      assert.are.same({ "GraniteSWADecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, dir(NAME), true)
      assert.are.equal(model.lm_head.weight, model.model.embed_tokens.weight)
      assert.are.same({ false, 3, 3, 3 }, model.config.layer_windows)
      assert.are.same({ 100, 10000 }, model.config.rope_thetas)
      assert.are.same({ false, true, false, false }, model.config.nope_layers)
      assert.are.equal(2, #model.model.rotary_embs)
      assert.are.same({ 4 }, model.model.layers[1].self_attn.sinks.shape)
      assert.are.equal(0.25, model.model.layers[1].self_attn.scale)
      assert.are.equal(granite_swa.GraniteSWAForCausalLM, models.granite_swa.GraniteSWAForCausalLM)
   end)

   H.it_matches_expected(model, NAME, " past the window")
   H.it_matches_padded(model, NAME, "positions")

   it("gives transformers' logits and tokens split over CPU and disk by device_map auto", function()
      local off = H.tmpdir()
      local m = models.from_pretrained(dir(NAME), { device_map = "auto", max_memory = { cpu = 80000 }, offload_folder = off })
      local on = {}
      for _, dev in pairs(m.hf_device_map) do on[tostring(dev)] = true end
      assert.is_true(on.cpu and on.disk, "a CPU + disk split")
      assert.is_true(H.max_abs_diff(m(exp.input_ids), exp.logits) < 1e-4)
      assert.are.same(exp.greedy_ids, m:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(off)
   end)

   it("needs the sinks, the windows where layer_types says, each layer's rope base and its NoPE layer", function()
      local changes = {
         function(m) for _, l in ipairs(m.model.layers) do l.self_attn.sinks:fill_(0) end end,
         function(m) rawset(m.model.layers[2].self_attn, "window", false) end,
         function(m) rawset(m.model.layers[1].self_attn, "window", 3) end,
         function(m) m.config.layer_rope_index[3] = 2 end,                    -- (base 1e4 in place of 100)
         function(m)
            m.config.layer_rope_index[2] = 2
            rawset(m.model.layers[2].self_attn, "nope", false)
         end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l, "residual_multiplier", 1) end end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
      local undivided = logits_after(function(m) m.config.logits_scaling = 1 end)
      assert.is_true(H.max_abs_diff(undivided / 2, exp.logits) < 1e-4)
   end)

   it("reads transformers' defaults: the first of every four layers full, window 128, rope_theta on every layer", function()
      local raw = H.read_json(dir(NAME) .. "/config.json")
      raw.layer_types, raw.sliding_window, raw.layer_rope_theta = nil, nil, nil
      raw.num_hidden_layers, raw.num_key_value_heads, raw.tie_word_embeddings = 6, nil, nil
      local cfg = granite_swa.config(raw)
      assert.are.same({ false, 128, 128, 128, false, 128 }, cfg.layer_windows)
      assert.are.same({ 10000 }, cfg.rope_thetas)
      assert.are.same({ 1, 1, 1, 1, 1, 1 }, cfg.layer_rope_index)
      assert.are.same({ 4, true, 1e-5 }, { cfg.num_key_value_heads, cfg.tie_word_embeddings, cfg.rms_norm_eps })
   end)

   it("names bad layer types, windows and rope bases", function()
      local function fails(change, msg) H.assert_config_fails(granite_swa.config, dir(NAME), change, msg) end
      fails({ layer_rope_theta = { 10000, 0 } }, 'models.granite_swa: config key "layer_rope_theta" must list 4 rope bases (0: no position embedding)')
      fails({ layer_rope_theta = { 10000, -1, 100, 10000 } }, "models.granite_swa: layer_rope_theta[2] must be a number >= 0, got -1")
      fails({ layer_types = { "full_attention", "sliding_attention" } }, 'models.granite_swa: config key "layer_types" must list 4 layer types')
      fails({ layer_types = { "full_attention", "chunked_attention", "sliding_attention", "sliding_attention" } },
         'models.granite_swa: layer_types[2] is "chunked_attention" (supported: full_attention, sliding_attention)')
      fails({ sliding_window = 0 }, 'models.granite_swa: config key "sliding_window"')
      fails({ attention_multiplier = -1 }, 'models.granite_swa: config key "attention_multiplier" must be a positive number, got -1')
      -- (a Llama config read as Granite's stays without windows)
      assert.are.same({ false, false, false, false }, llama.config(H.read_json(dir(NAME) .. "/config.json"), "granite").layer_windows)
   end)
end)

describe("models.granitemoe_swa (tests/fixtures/models/granitemoe_swa_tiny: window 3 on layers 1 and 3, rope bases 500, 1e4, none, 500)", function()
   local NAME = "granitemoe_swa_tiny"
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds GraniteMoeSWAForCausalLM: GraniteSWA's attention, stacked experts and a shared MLP", function()
      assert.are.equal("GraniteMoeSWAForCausalLM", model.__name)
      assert.are.same({ "GraniteMoeSWADecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, dir(NAME), true)
      assert.are.same({ 3, false, 3, false }, model.config.layer_windows)
      assert.are.same({ 1, 2, nil, 1 }, model.config.layer_rope_index)
      local layer = model.model.layers[1]
      assert.is_true(require("moonload.class").is_a(layer.self_attn, granite_swa.GraniteSWAAttention))
      assert.are.same({ 4, 32, 32 }, layer.block_sparse_moe.experts.gate_up_proj.shape)
      assert.are.same({ 48, 32 }, layer.shared_mlp.input_linear.weight.shape)
   end)

   H.it_matches_expected(model, NAME, " past the window")
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 80000, overrides = { ["%.block_sparse_moe%.experts$"] = "disk" },
      places = { ["model.layers.1.block_sparse_moe.experts"] = "disk" } })

   it("needs the sinks, the windows, the rope bases, the NoPE layer and the shared MLP", function()
      local changes = {
         function(m) for _, l in ipairs(m.model.layers) do l.self_attn.sinks:fill_(0) end end,
         function(m) rawset(m.model.layers[1].self_attn, "window", false) end,
         function(m) m.config.layer_rope_index[1] = 2 end,
         function(m)
            m.config.layer_rope_index[3] = 1
            rawset(m.model.layers[3].self_attn, "nope", false)
         end,
         function(m) for _, l in ipairs(m.model.layers) do l.shared_mlp = nil end end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("reads transformers' defaults (no shared MLP, the first of every four layers full) and names bad values", function()
      local raw = H.read_json(dir(NAME) .. "/config.json")
      raw.layer_types, raw.shared_intermediate_size, raw.layer_rope_theta = nil, nil, nil
      local cfg = granite_swa.config(raw, "granitemoe_swa")
      assert.are.same({ false, 3, 3, 3 }, cfg.layer_windows)
      assert.are.same({ 0, { 10000 } }, { cfg.shared_intermediate_size, cfg.rope_thetas })
      local read = function(r) return granite_swa.config(r, "granitemoe_swa") end
      H.assert_config_fails(read, dir(NAME), { layer_rope_theta = { 500, "1e4", 0, 500 } },
         "models.granitemoe_swa: layer_rope_theta[2] must be a number >= 0, got 1e4")
      H.assert_config_fails(read, dir(NAME), { num_experts_per_tok = 5 },
         "models.granitemoe_swa: num_experts_per_tok 5 is more than num_experts 4")
   end)
end)
