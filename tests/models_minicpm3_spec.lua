-- ml.models MiniCPM3 (openbmb/MiniCPM3-4B: DeepSeek-V2's latent attention turning halves with
-- LongRoPE, dense layers, muP-style scales on the embeddings, the residual branches and the logits)
-- against transformers (tests/fixtures/gen_models.py minicpm3): names, every tensor, logits and
-- greedy ids, the latent cache attended absorbed and expanded, LongRoPE's long factors past the
-- original length without rebuilding the cache, a padded batch, what each particularity does, the
-- hub's config format, transformers' defaults and readings of null, bad configs.
local ml = require("moonload")
local cjson = require("cjson")
local models = require("moonload.models")
local minicpm3 = require("moonload.models.minicpm3")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "minicpm3_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.minicpm3 (tests/fixtures/models/minicpm3_tiny: 3 layers, latent 16, rotary 8 with LongRoPE, tied)", function()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds MiniCPM3ForCausalLM with every tensor of the checkpoint, the head tied to the embeddings", function()
      assert.are.equal("MiniCPM3ForCausalLM", model.__name)
      assert.are.same({ "MiniCPM3DecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, DIR, true)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      local layer = model.model.layers[3]
      assert.are.same({ "MiniCPM3DecoderLayer", "MiniCPM3Attention", "MiniCPM3MLP", "MiniCPM3RotaryEmbedding" },
         { layer.__name, layer.self_attn.__name, layer.mlp.__name, model.model.rotary_emb.__name })
      local attn = layer.self_attn
      assert.are.same({ 24, 32 }, attn.q_a_proj.weight.shape)
      assert.are.same({ 4 * (16 + 8), 24 }, attn.q_b_proj.weight.shape)
      assert.are.same({ 16 + 8, 32 }, attn.kv_a_proj_with_mqa.weight.shape)
      assert.are.same({ 4 * (16 + 8), 16 }, attn.kv_b_proj.weight.shape)           -- v_head_dim 8: hidden / heads
      assert.is_false(attn.interleaved)
      assert.are.equal(24 ^ -0.5, attn.scale)
      assert.are.equal(4, model.model.rotary_emb.inv_freq:numel())                  -- qk_rope_head_dim / 2
   end)

   H.it_matches_expected(model, NAME, " (past LongRoPE's original length of 16)")
   H.it_matches_padded(model, NAME, "positions")

   H.it_attends_both_ways(model, NAME)

   it("caches the normed latent and the rotary key only: kv_lora_rank + qk_rope_head_dim a token", function()
      local cache = model:new_cache()
      model(exp.input_ids, { cache = cache })
      assert.are.same({ 2, 1, 8, 16 }, cache.k[1]:narrow(3, 1, cache.length).shape)
      assert.are.same({ 2, 1, 8, 8 }, cache.v[1]:narrow(3, 1, cache.length).shape)
   end)

   it("turns by the long factors past the original length, keeping the cached keys' short ones, as transformers does", function()
      local lr = H.read_json(DIR .. "/longrope.json")
      assert.is_nil(model:recompute_cache_at())
      assert.is_true(H.max_abs_diff(model({ lr.input_ids }), { lr.logits }) < TOL)        -- long factors throughout
      for _, way in ipairs({ true, false }) do
         H.attending(way, function()
            assert.is_true(H.max_abs_diff(H.decoded_logits(model, lr.input_ids, lr.first), { lr.decoded_logits }) < TOL)
         end)
      end
      -- (the two differ: a rebuilt cache would give the one forward's logits)
      assert.is_true(H.max_abs_diff(ml.tensor({ lr.logits }), { lr.decoded_logits }) > 1e-2)
      -- generate keeps its cache too (a rebuild, as Phi-3's, picks another 10th token for the second prompt)
      assert.are.same(lr.greedy_ids, model:generate(lr.prompts, { max_new_tokens = lr.max_new_tokens, eos_token_id = false }))
      local short_only = models.from_pretrained(DIR)
      rawset(short_only.model.rotary_emb, "original_max", nil)
      assert.is_true(H.max_abs_diff(short_only({ lr.input_ids }), { lr.logits }) > 1e-3)
   end)

   it("decodes the same under a block schedule and with prompt-lookup drafts (blocks and crops of the cache)", function()
      local want = model:generate(exp.input_ids, { max_new_tokens = 6, eos_token_id = false })
      assert.are.same(want, model:generate(exp.input_ids, { max_new_tokens = 6, eos_token_id = false,
         micro_batch_size = 1, prefill_chunk_size = 3 }))
      assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false, prompt_lookup_num_tokens = 3 }))
   end)

   it("needs scale_emb, the residual scale, rotary halves and LongRoPE's cos/sin scale", function()
      local changes = {
         function(m) m.config.embedding_multiplier = 1 end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l, "residual_multiplier", 1) end end,
         function(m) for _, l in ipairs(m.model.layers) do rawset(l.self_attn, "interleaved", true) end end,
         function(m) rawset(m.model.rotary_emb, "attention_scaling", 1) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
      assert.are.equal(3, model.config.embedding_multiplier)
      assert.is_true(math.abs(model.config.residual_multiplier - 1.4 / math.sqrt(3)) < 1e-15)
   end)

   it("divides the logits by hidden_size / dim_model_base (32 / 8)", function()
      assert.are.equal(4, model.config.logits_scaling)
      local undivided = logits_after(function(m) m.config.logits_scaling = 1 end)
      assert.is_true(H.max_abs_diff(undivided / 4, exp.logits) < TOL)
      assert.is_true(H.max_abs_diff(undivided, exp.logits) > 1)
   end)

   it("loads bfloat16 with the rotary frequencies kept float32", function()
      local bf = models.from_pretrained(DIR, { dtype = "bfloat16" })
      assert.are.equal("bfloat16", bf.model.layers[1].self_attn.kv_b_proj.weight.dtype)
      assert.are.same({ "float32", "float32" }, { bf.model.rotary_emb.inv_freq.dtype, bf.model.rotary_emb.long_inv_freq.dtype })
      assert.is_true(H.max_abs_diff(bf(ids):float(), exp.logits) < 0.1)
   end)
end)

describe("models.minicpm3 configs", function()
   local fixture = H.read_json(DIR .. "/config.json")
   local function with(change)
      local raw = H.read_json(DIR .. "/config.json")
      for k, v in pairs(change) do raw[k] = v end
      return raw
   end

   it("reads the hub's rope_scaling (a legacy \"type\") as rope_parameters, to the same logits", function()
      local dir = H.tmpdir()
      local raw = with({ rope_parameters = cjson.null })
      raw.rope_scaling = { type = "longrope", short_factor = fixture.rope_parameters.short_factor,
         long_factor = fixture.rope_parameters.long_factor, original_max_position_embeddings = 16 }
      H.write(dir .. "/config.json", cjson.encode(raw))
      H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
      local exp = H.expected(NAME)
      local m = models.from_pretrained(dir)
      assert.are.equal("longrope", m.config.rope.rope_type)
      assert.is_true(H.max_abs_diff(m(exp.input_ids), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("builds MiniCPM3Config()'s defaults (MiniCPM3-4B's) as transformers does: parameters, shapes, scales, a tied head", function()
      local fix = H.read_json(DIR .. "/hub_skeleton.json")
      local m = H.assert_matches_skeleton(function() return minicpm3.MiniCPM3ForCausalLM({ model_type = "minicpm3" }) end, fix)
      local cfg = m.config
      assert.is_true(math.abs(cfg.softmax_scale - fix.softmax_scale) < 1e-15)
      assert.is_true(math.abs(cfg.residual_multiplier - fix.residual_scale) < 1e-15)
      assert.are.same({ fix.logits_scaling, fix.embed_scale, fix.tied }, { cfg.logits_scaling, cfg.embedding_multiplier,
         m.lm_head.weight == m.model.embed_tokens.weight })
      -- YaRN with mscale_all_dim scales the softmax as DeepSeek's does
      local yarn = minicpm3.config({ rope_parameters = { rope_type = "yarn", rope_theta = 10000, factor = 4,
         original_max_position_embeddings = 8192, mscale = 1, mscale_all_dim = 0.707 } })
      assert.is_true(math.abs(yarn.softmax_scale - fix.yarn_softmax_scale) < 1e-12)
   end)

   it("reads null q_lora_rank, v_head_dim, scale_depth and dim_model_base as transformers does, in a table or a file", function()
      local nulls = { q_lora_rank = cjson.null, v_head_dim = cjson.null, scale_depth = cjson.null, dim_model_base = cjson.null }
      local dir = H.tmpdir()
      H.write(dir .. "/config.json", cjson.encode(with(nulls)))
      for _, source in ipairs({ with(nulls), dir }) do
         local cfg = minicpm3.config(source)
         assert.are.same({ nil, 8, 1, 1 }, { cfg.q_lora_rank, cfg.v_head_dim, cfg.residual_multiplier, cfg.logits_scaling })
      end
      local m = minicpm3.MiniCPM3ForCausalLM(dir)
      assert.is_nil(m.model.layers[1].self_attn.q_a_proj)
      assert.are.same({ 4 * 24, 32 }, m.model.layers[1].self_attn.q_proj.weight.shape)
      H.rmdir(dir)
      -- absent: MiniCPM3-4B's values
      local cfg = minicpm3.config(with({ q_lora_rank = cjson.null }))
      assert.is_nil(cfg.q_lora_rank)
      local raw = with({})
      raw.q_lora_rank, raw.v_head_dim, raw.scale_depth, raw.dim_model_base, raw.scale_emb = nil, nil, nil, nil, nil
      cfg = minicpm3.config(raw)
      assert.are.same({ 768, 8, 1.4, 256, 12 }, { cfg.q_lora_rank, cfg.v_head_dim, cfg.scale_depth, cfg.dim_model_base,
         cfg.scale_emb })
   end)

   it("names what is wrong in a config, and the file", function()
      local function fails(change, msg) H.assert_config_fails(minicpm3.config, DIR, change, msg) end
      fails({ hidden_size = 30 }, "models.minicpm3: hidden_size 30 is not a multiple of num_attention_heads 4 in config table")
      fails({ num_key_value_heads = 2 }, 'models.minicpm3: config key "num_key_value_heads" (2) must equal num_attention_heads 4')
      fails({ scale_emb = "12" }, 'models.minicpm3: config key "scale_emb" must be a positive number, got 12')
      fails({ scale_depth = 0 }, 'models.minicpm3: config key "scale_depth" must be a positive number, got 0')
      fails({ dim_model_base = -256 }, 'models.minicpm3: config key "dim_model_base" must be a positive number, got -256')
      fails({ kv_lora_rank = 0 }, 'models.minicpm3: config key "kv_lora_rank" must be an integer >= 1, got 0')
      fails({ qk_rope_head_dim = "8" }, 'models.minicpm3: config key "qk_rope_head_dim" must be an integer >= 2, got 8')
      fails({ qk_rope_head_dim = 6 }, "models.minicpm3: longrope short_factor must list 3 positive numbers (one per rotary frequency)")
      fails({ rope_parameters = { rope_type = "dynamic", factor = 2 } },
         'models.minicpm3: rope type "dynamic" is not supported (supported: default, linear, llama3, longrope, yarn)')
      local dir = H.tmpdir()
      H.write(dir .. "/config.json", cjson.encode(with({ scale_depth = -1 })))
      local ok, err = pcall(minicpm3.MiniCPM3ForCausalLM, dir)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('"scale_depth" must be a positive number, got -1 in ' .. dir .. "/config.json", 1, true), err)
      H.rmdir(dir)
   end)
end)
