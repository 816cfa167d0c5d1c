-- ml.models Nemotron-H (one norm and one mixer a layer: Mamba-2 mixers, attention without position
-- embeddings, ReLU^2 MLPs and DeepSeek-routed experts; models/nemotron_h.lua) against transformers
-- (tests/fixtures/gen_models.py nemotron_h): names, logits, greedy ids, decoding token by token through
-- the mixers' carried conv inputs and states, padded batches, block schedules, offload, the router,
-- the latent experts, and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local nemotron_h = require("moonload.models.nemotron_h")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "nemotron_h_tiny"
local DIR = H.FIX .. "/" .. NAME

-- The checkpoint's tensor names, sorted (the head is stored: never tied).
local function file_names(dir)
   return H.sorted_keys(ml.safetensors.load_file(dir .. "/model.safetensors"))
end

describe("models.nemotron_h (tests/fixtures/models/nemotron_h_tiny: pattern M*-M-E)", function()
   H.collect_warnings()
   local exp = H.expected(NAME)
   local model = models.from_pretrained(DIR)

   it("builds NemotronHForCausalLM with every tensor of the checkpoint under the hub's backbone.* names", function()
      assert.are.equal("NemotronHForCausalLM", model.__name)
      assert.are.same(file_names(DIR), H.sorted_keys((model:state_dict())))
      local layers = model.backbone.layers
      local kinds = { "NemotronHMamba2Mixer", "NemotronHAttention", "NemotronHMLP", "NemotronHMamba2Mixer",
         "NemotronHMLP", "NemotronHMoE" }
      for i, kind in ipairs(kinds) do assert.are.equal(kind, layers[i].mixer.__name) end
      assert.are.same({ H = 4, P = 16, G = 2, N = 8, width = 64, conv_dim = 96, taps = 4, limit = { 0.001, math.huge } },
         layers[1].mixer.geometry)
      assert.is_true(layers[2].mixer.nope)
      assert.is_nil(model.backbone.rotary_emb)
      assert.are.equal("ReLUSquaredActivation", layers[3].mixer.act_fn.__name)
      assert.are.equal(8, #layers[6].mixer.experts)
      assert.are_not.equal(model.backbone.embeddings.weight, model.lm_head.weight)
   end)

   it("gives transformers' logits and greedy ids", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)

   it("decodes token by token through the mixers' conv inputs and states as one full forward", function()
      local ids = exp.input_ids[2]
      local cache = model:new_cache()
      local out = { model({ { ids[1], ids[2], ids[3] } }, { cache = cache }) }
      for i = 4, #ids do out[#out + 1] = model({ { ids[i] } }, { cache = cache }) end
      assert.is_true(H.max_abs_diff(ml.cat(out, 2), { exp.logits[2] }) < TOL)
      for _, i in ipairs({ 1, 4 }) do
         assert.are.same({ 1, 3, 96 }, cache.states[i].conv.shape)          -- the last 3 of 4 taps' inputs
         assert.are.same({ 1, 4, 16, 8 }, cache.states[i].recurrent.shape)   -- heads x head_dim x state
         assert.are.equal("float32", cache.states[i].recurrent.dtype)
      end
      for _, i in ipairs({ 2, 3, 5, 6 }) do assert.is_nil(cache.states[i]) end
      assert.are.equal(#ids, cache.length)
      assert.is_false(cache:can_crop(#ids - 1))
   end)

   H.it_matches_padded(model, NAME, "positions and zeroes padding before the mixers")

   H.it_runs_stateful(model, NAME, H.alternating_layers("backbone", 6, { ["backbone.embeddings"] = "cpu",
      ["backbone.norm_f"] = "disk", lm_head = "cpu" }))

   it("runs a padded batch's prompt in a block schedule to transformers' tokens", function()
      local pad = H.read_json(DIR .. "/padded.json")
      assert.are.same(pad.greedy_ids, model:generate(pad.input_ids, { attention_mask = pad.attention_mask,
         max_new_tokens = pad.max_new_tokens, eos_token_id = false, micro_batch_size = 1, prefill_chunk_size = 3 }))
   end)

   it("routes by sigmoid score + e_score_correction_bias within the best group, weights renormalized x 2.5", function()
      local block = model.backbone.layers[6].mixer
      ml.manual_seed(4)
      local w, picked = block:route(ml.randn(5, 32))
      assert.is_true(math.abs(w:sum(2):max():item() - 2.5) < 1e-5)
      assert.is_true(math.abs(w:sum(2):min():item() - 2.5) < 1e-5)
      for _, row in ipairs(picked) do                 -- both experts of a token in one group of 4 (topk_group 1)
         assert.are.equal(math.floor(row[1] / 4), math.floor(row[2] / 4))
      end
      local m = models.from_pretrained(DIR)
      m.backbone.layers[6].mixer.gate.e_score_correction_bias:fill_(0)
      assert.is_true(H.max_abs_diff(m(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) > 1e-3)
   end)

   it("generates with its experts on disk (device_map auto)", function()
      local dir = H.tmpdir()
      local m = models.from_pretrained(DIR, { device_map = "auto", max_memory = { cpu = 150000 }, offload_folder = dir,
         device_overrides = { ["%.mixer%.experts%.%d+$"] = "disk" } })
      assert.are.equal("disk", m.hf_device_map["backbone.layers.5.mixer.experts.0"])
      assert.are.same(exp.greedy_ids[1], m:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(dir)
   end)

   it("leaves out the multi-token-prediction layers a checkpoint may carry", function()
      local dir = H.tmpdir()
      local tensors = ml.safetensors.load_file(DIR .. "/model.safetensors")
      tensors["mtp.layers.0.norm.weight"] = ml.ones(32)
      ml.safetensors.save_file(tensors, dir .. "/model.safetensors", { format = "pt" })
      H.copy(DIR .. "/config.json", dir .. "/config.json")
      local m = models.from_pretrained(dir)
      assert.are.same(file_names(DIR), H.sorted_keys((m:state_dict())))
      assert.is_true(H.max_abs_diff(m(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("names what is wrong in a config", function()
      local function pattern(p, over)
         return function(raw)
            raw.layers_block_type = nil
            raw.hybrid_override_pattern = p
            for k, v in pairs(over or {}) do raw[k] = v end
         end
      end
      local cases = {
         { pattern("M*-MXE"), 'hybrid_override_pattern "M*-MXE" has "X" at layer 4 (supported: M mixer, * attention' },
         { pattern("M*-M-E", { num_hidden_layers = 5 }),
           'hybrid_override_pattern "M*-M-E" has 6 layers but config key "num_hidden_layers" is 5' },
         { pattern(""), 'config key "hybrid_override_pattern" must be a string of M, *, - and E, got ' },
         { { num_hidden_layers = 4 }, 'config key "layers_block_type" has 6 layers but config key "num_hidden_layers" is 4' },
         { { layers_block_type = { "linear_attention", "sliding_attention" } },
           'layers_block_type[2] is "sliding_attention" (supported: linear_attention, full_attention, mlp, moe)' },
         { { layers_block_type = "M*" }, 'config key "layers_block_type" must list layer types, got M*' },
         { function(raw) raw.layers_block_type, raw.num_hidden_layers = nil, 6 end,
           "transformers' default layers_block_type has 4 layers but config key \"num_hidden_layers\" is 6" },
         { { layer_norm_epsilon = 0 }, 'config key "layer_norm_epsilon" must be a positive number, got 0' },
         { { mamba_hidden_act = "gelu" }, 'config key "mamba_hidden_act" is "gelu" (supported: silu)' },
         { { mlp_hidden_act = "swiglu" }, 'config key "mlp_hidden_act" is "swiglu" (supported: ' },
         { { n_groups = 3 }, "mamba_num_heads 4 is not a multiple of n_groups 3" },
         { { ssm_state_size = 0 }, 'config key "ssm_state_size" must be an integer >= 1, got 0' },
         { { use_conv_bias = "yes" }, 'config key "use_conv_bias" must be a boolean, got yes' },
         { { time_step_min = -1 }, 'config key "time_step_min" must be a number >= 0, got -1' },
         { { n_group = 3 }, "n_routed_experts 8 is not a multiple of n_group 3" },
         { { num_experts_per_tok = 9 }, "num_experts_per_tok 9 is more than n_routed_experts 8" },
         { { n_routed_experts = 0 }, 'config key "n_routed_experts" must be an integer >= 1 with "E" layers, got 0' },
         { { moe_latent_size = 0 }, 'config key "moe_latent_size" must be an integer >= 1, got 0' },
         { { moe_shared_expert_intermediate_size = 1.5 },
           'config key "moe_shared_expert_intermediate_size" must be an integer >= 1, got 1.5' },
      }
      for _, c in ipairs(cases) do H.assert_config_fails(nemotron_h.config, DIR, c[1], c[2]) end
   end)

   it("reads the hub's keys as transformers does: the pattern, legacy names, layer_norm_epsilon", function()
      local raw = H.read_json(DIR .. "/config.json")
      raw.layers_block_type = nil
      raw.hybrid_override_pattern, raw.num_hidden_layers = "M*-M-E", 6
      raw.mamba_n_groups, raw.mamba_dt_min = 1, 0.01                -- (older names win)
      raw.layer_norm_epsilon, raw.rms_norm_eps = 1e-3, 1e-6        -- (rms_norm_eps is not read)
      raw.attention_bias, raw.tie_word_embeddings = true, true      -- (neither has any effect in transformers)
      local cfg = nemotron_h.config(raw)
      assert.are.same({ "linear_attention", "full_attention", "mlp", "linear_attention", "mlp", "moe" }, cfg.layer_types)
      assert.are.equal(1, cfg.mamba.groups)
      assert.are.same({ 0.01, math.huge }, cfg.mamba.time_step_limit)
      assert.are.equal(1e-3, cfg.rms_norm_eps)
      assert.are.equal(1e-3, cfg.mamba.eps)
      local built = nemotron_h.NemotronHForCausalLM(cfg)
      assert.is_nil(built.backbone.layers[2].mixer.q_proj.bias)
      assert.are_not.equal(built.backbone.embeddings.weight, built.lm_head.weight)
      -- transformers 4.x's layer type names
      raw.hybrid_override_pattern = nil
      raw.layers_block_type = { "mamba", "attention", "mlp", "moe" }
      raw.num_hidden_layers = nil
      assert.are.same({ "linear_attention", "full_attention", "mlp", "moe" }, nemotron_h.config(raw).layer_types)
   end)
end)

describe("models.nemotron_h (tests/fixtures/models/nemotron_h_latent_tiny: pattern ME*M, latent experts)", function()
   H.collect_warnings()
   local name = "nemotron_h_latent_tiny"
   local dir = H.FIX .. "/" .. name
   local exp = H.expected(name)
   local model = models.from_pretrained(dir)

   it("holds every tensor of the checkpoint: biased projections, the latent projections, unbiased experts", function()
      assert.are.same(file_names(dir), H.sorted_keys((model:state_dict())))
      local block = model.backbone.layers[2].mixer
      assert.are.equal(16, block.fc1_latent_proj.out_features)
      assert.are.equal(16, block.experts[1].up_proj.in_features)
      assert.is_nil(block.experts[1].up_proj.bias)
      assert.is_not_nil(block.shared_experts.up_proj.bias)
      assert.is_not_nil(model.backbone.layers[1].mixer.in_proj.bias)
   end)

   H.it_matches_expected(model, name)

   it("routes its one group of experts on the tensors as DeepSeek's per-token routing does", function()
      local block = model.backbone.layers[2].mixer
      ml.manual_seed(5)
      local flat = ml.randn(7, 32)
      local w, picked = block:route(flat)
      local dw, dpicked = require("moonload.models.deepseek").DeepseekMoE.route(block, flat)
      w, dw = w:tolist(), dw:tolist()
      for t = 1, 7 do
         local by_expert = {}
         for j, e in ipairs(dpicked[t]) do by_expert[e] = dw[t][j] end
         for j, e in ipairs(picked[t]) do assert.is_true(math.abs(by_expert[e] - w[t][j]) < 1e-6) end
         assert.are.equal(3, #picked[t])
      end
   end)
end)

describe("examples/hybrid.lua on a Nemotron-H folder", function()
   it("puts the experts on disk, names each layer's kind, prints the greedy tokens and the cache's states", function()
      local p = assert(io.popen("luajit examples/hybrid.lua " .. DIR .. " 2>/dev/null"))
      local text = p:read("*a")
      p:close()
      local ram, disk = text:match("NemotronHForCausalLM, ([%d.]+) MB of weights in RAM, ([%d.]+) MB on disk")
      assert.truthy(ram, text)
      assert.is_true(tonumber(disk) > 0, text)
      assert.truthy(text:find("layers: mamba full mlp mamba mlp moe", 1, true), text)
      local want = models.from_pretrained(DIR, { dtype = "bfloat16" }):generate({ 1, 5, 17, 42, 3 },
         { max_new_tokens = 16, eos_token_id = false })
      assert.are.same({ unpack(want, 6) }, H.printed_ids(text))
      assert.truthy(text:find("21 tokens; cache: 5.1 KB of fixed-size state + 1.3 KB of keys and values", 1, true), text)
   end)
end)
