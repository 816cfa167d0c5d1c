-- ml.models Lara Mini (Qwen3.5's gated delta net, sliding Qwen3 attention with the rotary embedding and
-- full Qwen3 attention without, a sparse MLP with an ungated shared expert in every layer) against
-- transformers (tests/fixtures/gen_models.py lara_mini): names (the checkpoint's fused in_proj split, its
-- out_norm renamed), logits, greedy ids, decoding through the cache's state, a padded batch, block
-- schedules and a CPU + disk split, what each particularity changes, and configs.
local ml = require("moonload")
local cjson = require("cjson")
local lara = require("moonload.models.lara_mini")
local H = require("models_helpers")

local NAME = "lara_mini_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.lara_mini (tests/fixtures/models/lara_mini_tiny: linear, sliding, linear, full, sliding; window 3)", function()
   H.collect_warnings()                       -- (the disk split warns of weights on meta)
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds LaraMiniForCausalLM: the layer kinds, the delta net's projections split from in_proj, a tied head", function()
      assert.are.equal("LaraMiniForCausalLM", model.__name)
      assert.are.same({ "LaraMiniDecoderLayer" }, model.no_split_modules)
      local stored = H.sorted_keys(ml.safetensors.load_file(DIR .. "/model.safetensors"))
      local want = {}
      for _, name in ipairs(stored) do
         if name:find("%.linear_attn%.in_proj%.weight$") then
            for _, p in ipairs({ "qkv", "z", "b", "a" }) do want[#want + 1] = name:gsub("in_proj", "in_proj_" .. p) end
         else
            want[#want + 1] = (name:gsub("%.out_norm%.", ".norm."))
         end
      end
      want[#want + 1] = "lm_head.weight"
      table.sort(want)
      assert.are.same(want, H.sorted_keys((model:state_dict())))
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      local layers = model.model.layers
      assert.are.same({ "LaraMiniGatedDeltaNet", "LaraMiniAttention", "LaraMiniGatedDeltaNet", "LaraMiniAttention", "LaraMiniAttention" },
         { layers[1].linear_attn.__name, layers[2].self_attn.__name, layers[3].linear_attn.__name, layers[4].self_attn.__name,
           layers[5].self_attn.__name })
      assert.are.same({ 3, false, 3 }, { layers[2].self_attn.window, layers[4].self_attn.window or false, layers[5].self_attn.window })
      assert.are.same({ false, true, false }, { layers[2].self_attn.nope, layers[4].self_attn.nope, layers[5].self_attn.nope })
      assert.are.same({ 56, 32 }, layers[1].linear_attn.in_proj_qkv.weight.shape)      -- 2 x 2 x 8 + 4 x 6
      local mlp = layers[1].mlp
      assert.are.same({ "LaraMiniSparseMoeBlock", "LaraMiniExperts", "LaraMiniTopKRouter" },
         { mlp.__name, mlp.experts.__name, mlp.gate.__name })
      assert.are.same({ 8, 32, 32 }, mlp.experts.gate_up_proj.shape)
      assert.are.equal(8, model.model.rotary_emb.inv_freq:numel() * 2)                  -- whole heads
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions and the delta nets' padding")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 200000, overrides = { ["%.mlp%.experts$"] = "disk" },
      places = { ["model.layers.0.mlp.experts"] = "disk" } })

   it("decodes the same under a block schedule, and refuses assisted generation (its state cannot be cropped)", function()
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false, micro_batch_size = 1, prefill_chunk_size = 3 }))
      local ok, err = pcall(model.generate, model, { 1, 7, 9 }, { max_new_tokens = 3, prompt_lookup_num_tokens = 2 })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("does not support LaraMiniForCausalLM", 1, true), tostring(err))
   end)

   it("needs the full layers without position embedding, the window, the q/k norms, the shared expert and the renormalized top-k", function()
      local changes = {
         function(m) rawset(m.model.layers[4].self_attn, "nope", false) end,
         function(m) rawset(m.model.layers[2].self_attn, "window", false) end,
         function(m) m.model.layers[5].self_attn.k_norm.weight:fill_(1) end,
         function(m) for _, l in ipairs(m.model.layers) do l.mlp.shared_expert.down_proj.weight:zero_() end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.mlp, "norm_topk_prob", false) end end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("loads the projections apart and the gated norm as norm (transformers' names in memory), to the same logits", function()
      local dir = H.tmpdir()
      H.copy(DIR .. "/config.json", dir .. "/config.json")
      local out = {}
      for name, t in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do out[name] = t end
      local sd = model:state_dict()
      for name, t in pairs(out) do
         if name:find("%.linear_attn%.in_proj%.weight$") or name:find("%.out_norm%.") then out[name] = nil end
      end
      for name, t in pairs(sd) do
         if name:find("%.linear_attn%.in_proj_") or name:find("%.linear_attn%.norm%.") then out[name] = t:contiguous() end
      end
      ml.safetensors.save_file(out, dir .. "/model.safetensors")
      local m = ml.models.from_pretrained(dir)
      assert.is_nil(rawget(m, "rewrite_checkpoint"))
      assert.is_true(H.max_abs_diff(m(exp.input_ids), exp.logits) < 1e-4)
      H.rmdir(dir)
   end)
end)

describe("models.lara_mini configs", function()
   it("reads LaraMiniConfig()'s defaults (Lara-4-Mini's) as transformers builds them", function()
      -- (transformers 5.24: LaraMiniForCausalLM(LaraMiniConfig()) on the meta device)
      local m = H.assert_matches_skeleton(function() return lara.LaraMiniForCausalLM({ model_type = "lara_mini" }) end,
         { parameters = 7281684672, shapes = { ["model.layers.0.linear_attn.in_proj_qkv.weight"] = { 4096, 1024 },
            ["model.layers.0.mlp.experts.gate_up_proj"] = { 128, 1024, 1024 },
            ["model.layers.0.mlp.experts.down_proj"] = { 128, 1024, 512 } } })
      local cfg = m.config
      assert.are.same({ "linear_attention", "sliding_attention", "linear_attention", "full_attention", "sliding_attention",
         "linear_attention" }, { unpack(cfg.layer_types, 1, 6) })
      assert.are.same({ 512, 4, true, 128, 1e-6 }, { cfg.layer_windows[2], cfg.num_experts_per_tok, cfg.norm_topk_prob,
         cfg.rotary_dim, cfg.rms_norm_eps })
      assert.are.equal(m.model.embed_tokens.weight, m.lm_head.weight)
   end)

   it("names what is wrong in a config", function()
      local function fails(change, msg) H.assert_config_fails(lara.config, DIR, change, msg) end
      fails({ layer_types = { "linear_attention", "sliding_attention", "mamba", "full_attention", "sliding_attention" } },
         'models.lara_mini: layer_types[3]')
      fails({ layer_types = { "linear_attention" } }, 'models.lara_mini: config key "layer_types" must list 5')
      fails({ linear_num_value_heads = 3 }, "models.lara_mini: linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2")
      fails({ sliding_window = 0 }, 'models.lara_mini: config key "sliding_window" must be an integer >= 1, got 0')
      fails({ num_experts_per_tok = 9 }, "models.lara_mini: num_experts_per_tok 9 is more than num_experts 8")
      fails({ num_attention_heads = 3 }, "models.lara_mini: num_attention_heads 3 is not a multiple of num_key_value_heads 2")
   end)
end)
