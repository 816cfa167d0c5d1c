-- ml.models Youtu-LLM (tencent/Youtu-LLM-2B: DeepSeek-V3's latent attention in Llama's dense layers)
-- against transformers (tests/fixtures/gen_models.py youtu): names, every tensor, logits and greedy
-- ids, the latent cache attended absorbed and expanded, a padded batch, a CPU + disk split, what each
-- particularity does, transformers' defaults and reading of a null q_lora_rank, bad configs.
local ml = require("moonload")
local cjson = require("cjson")
local youtu = require("moonload.models.youtu")
local H = require("models_helpers")

local NAME = "youtu_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.youtu (tests/fixtures/models/youtu_tiny: 3 layers, latent 16, rotary 8 interleaved, YaRN, tied)", function()
   H.collect_warnings()                       -- (the disk split warns of weights on meta)
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds YoutuForCausalLM with every tensor of the checkpoint, the head tied to the embeddings", function()
      assert.are.equal("YoutuForCausalLM", model.__name)
      assert.are.same({ "YoutuDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR, true)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      local layer = model.model.layers[3]
      assert.are.same({ "YoutuDecoderLayer", "YoutuAttention", "YoutuMLP", "YoutuRotaryEmbedding" },
         { layer.__name, layer.self_attn.__name, layer.mlp.__name, model.model.rotary_emb.__name })
      local attn = layer.self_attn
      assert.are.same({ 24, 32 }, attn.q_a_proj.weight.shape)
      assert.are.same({ 4 * (16 + 8), 24 }, attn.q_b_proj.weight.shape)
      assert.are.same({ 16 + 8, 32 }, attn.kv_a_proj_with_mqa.weight.shape)
      assert.are.same({ 4 * (16 + 12), 16 }, attn.kv_b_proj.weight.shape)           -- v_head_dim 12
      assert.are.same({ 32, 4 * 12 }, attn.o_proj.weight.shape)
      assert.is_true(attn.interleaved)
      local m = 0.1 * math.log(4) + 1                                                -- YaRN's mscale_all_dim 1, factor 4
      assert.is_true(math.abs(attn.scale - 24 ^ -0.5 * m * m) < 1e-15)
      assert.are.equal(4, model.model.rotary_emb.inv_freq:numel())                  -- qk_rope_head_dim / 2
      assert.is_nil(layer.mlp.gate_proj.bias)
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_attends_both_ways(model, NAME)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, overrides = { ["%.mlp$"] = "disk" },
      overrides_budget = 120000, places = { ["model.layers.1.mlp"] = "disk", ["model.layers.1.self_attn"] = "cpu" } })

   it("caches the normed latent and the rotary key only: kv_lora_rank + qk_rope_head_dim a token", function()
      local cache = model:new_cache()
      model(exp.input_ids, { cache = cache })
      assert.are.same({ 2, 1, 8, 16 }, cache.k[1]:narrow(3, 1, cache.length).shape)
      assert.are.same({ 2, 1, 8, 8 }, cache.v[1]:narrow(3, 1, cache.length).shape)
   end)

   it("needs the interleaved rotary pairs, YaRN's softmax scale and the latent's norm", function()
      local changes = {
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.self_attn, "interleaved", false) end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.self_attn, "scale", 24 ^ -0.5) end end,
         function(m) for _, l in ipairs(m.model.layers) do l.self_attn.kv_a_layernorm.weight:fill_(1) end end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("decodes the same under a block schedule and with prompt-lookup drafts (blocks and crops of the cache)", function()
      local want = model:generate(exp.input_ids, { max_new_tokens = 6, eos_token_id = false })
      assert.are.same(want, model:generate(exp.input_ids, { max_new_tokens = 6, eos_token_id = false,
         micro_batch_size = 1, prefill_chunk_size = 3 }))
      assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false, prompt_lookup_num_tokens = 3 }))
   end)
end)

describe("models.youtu configs", function()
   local function with(change)
      local raw = H.read_json(DIR .. "/config.json")
      for k, v in pairs(change) do raw[k] = v end
      return raw
   end

   it("builds YoutuConfig()'s defaults (Youtu-LLM-2B's) as transformers does: parameters, shapes, scale, a tied head", function()
      -- (transformers 5.24, YoutuForCausalLM(YoutuConfig()) on the meta device)
      local fix = { parameters = 1961560064, shapes = {
         ["model.layers.0.self_attn.q_a_proj.weight"] = { 1536, 2048 },
         ["model.layers.0.self_attn.q_b_proj.weight"] = { 3072, 1536 },
         ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] = { 576, 2048 },
         ["model.layers.0.self_attn.kv_b_proj.weight"] = { 4096, 512 },
         ["model.layers.0.self_attn.o_proj.weight"] = { 2048, 2048 },
         ["model.layers.0.mlp.gate_proj.weight"] = { 6144, 2048 },
         ["model.embed_tokens.weight"] = { 128256, 2048 } } }
      local m = H.assert_matches_skeleton(function() return youtu.YoutuForCausalLM({ model_type = "youtu" }) end, fix)
      local cfg = m.config
      assert.is_true(math.abs(cfg.softmax_scale - 0.07216878364870322) < 1e-15)
      assert.are.same({ 131072, 10000, true, true, 1e-6 }, { cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_interleave,
         m.lm_head.weight == m.model.embed_tokens.weight, cfg.rms_norm_eps })
   end)

   it("reads q_lora_rank null as no bottleneck (q_proj) and absent as 1536, in a table or a file", function()
      local dir = H.tmpdir()
      H.write(dir .. "/config.json", cjson.encode(with({ q_lora_rank = cjson.null })))
      for _, source in ipairs({ with({ q_lora_rank = cjson.null }), dir }) do
         assert.is_nil(youtu.config(source).q_lora_rank)
      end
      local m = youtu.YoutuForCausalLM(dir)
      assert.is_nil(m.model.layers[1].self_attn.q_a_proj)
      assert.are.same({ 4 * 24, 32 }, m.model.layers[1].self_attn.q_proj.weight.shape)
      H.rmdir(dir)
      local raw = with({})
      raw.q_lora_rank = nil
      assert.are.equal(1536, youtu.config(raw).q_lora_rank)
      -- (rope_interleave false: halves, as Llama's)
      assert.is_false(youtu.config(with({ rope_interleave = false })).rope_interleave)
      assert.is_false(youtu.config(with({ mlp_bias = true })).mlp_bias)
   end)

   it("names what is wrong in a config, and the file", function()
      local function fails(change, msg) H.assert_config_fails(youtu.config, DIR, change, msg) end
      fails({ num_key_value_heads = 2 }, 'models.youtu: config key "num_key_value_heads" (2) must equal num_attention_heads 4')
      fails({ kv_lora_rank = 0 }, 'models.youtu: config key "kv_lora_rank" must be an integer >= 1, got 0')
      fails({ qk_rope_head_dim = 7 }, "models.youtu: qk_rope_head_dim must be even, got 7")
      fails({ hidden_act = "relu3" }, 'models.youtu: activation "relu3"')
      fails({ rope_parameters = { rope_type = "dynamic", factor = 2 } },
         'models.youtu: rope type "dynamic" is not supported (supported: default, linear, llama3, longrope, yarn)')
      local dir = H.tmpdir()
      H.write(dir .. "/config.json", cjson.encode(with({ num_key_value_heads = 1 })))
      local ok, err = pcall(youtu.YoutuForCausalLM, dir)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("must equal num_attention_heads 4 in " .. dir .. "/config.json", 1, true), err)
      H.rmdir(dir)
   end)
end)
