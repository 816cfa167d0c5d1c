-- ml.models GPT-NeoX Japanese (GPT-NeoX's fused attention without biases but the last layer's
-- dense_bias, sequential residuals, a tied head) against transformers (tests/fixtures/gen_models.py
-- gpt_neox_japanese): names, every tensor, logits, greedy ids, the cache, a padded batch, a CPU + disk
-- split, what each difference from GPT-NeoX changes, the hub's config keys and defaults.
local ml = require("moonload")
local cjson = require("cjson")
local neoxj = require("moonload.models.gpt_neox_japanese")
local H = require("models_helpers")

local NAME = "gpt_neox_japanese_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.gpt_neox_japanese (tests/fixtures/models/gpt_neox_japanese_tiny: half of each head rotated, tied)", function()
   H.collect_warnings()                       -- (the disk split warns of weights on meta)
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds GPTNeoXJapaneseForCausalLM: no biases but the last attention's dense_bias, a tied head", function()
      assert.are.equal("GPTNeoXJapaneseForCausalLM", model.__name)
      assert.are.same({ "GPTNeoXJapaneseLayer" }, model.no_split_modules)
      local stored = ml.safetensors.load_file(DIR .. "/model.safetensors")
      stored["embed_out.weight"] = true                                            -- (tied: stored once)
      assert.are.same(H.sorted_keys(stored), H.sorted_keys((model:state_dict())))
      local base = model.gpt_neox_japanese
      assert.are.equal(base.embed_in.weight, model.embed_out.weight)
      local layers = base.layers
      assert.are.same({ "GPTNeoXJapaneseLayer", "GPTNeoXJapaneseAttention", "GPTNeoXJapaneseMLP" },
         { layers[1].__name, layers[1].attention.__name, layers[1].mlp.__name })
      assert.is_nil(layers[1].attention.dense_bias)
      assert.is_nil(layers[2].attention.dense_bias)
      assert.are.same({ 32 }, layers[3].attention.dense_bias.shape)
      for name in model:named_parameters() do
         if name:find("%.bias$") then assert.truthy(name:find("layer_?norm%.bias$"), name) end   -- (the LayerNorms' only)
      end
      assert.are.same({ 64, 32 }, layers[1].mlp.dense_h_to_4h.weight.shape)        -- 32 x intermediate_multiple_size 2
      assert.are.same({ 4, 5000 }, { model.config.rotary_dim, model.config.rope_theta })
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 70000, overrides = { ["%.mlp$"] = "disk" },
      places = { ["gpt_neox_japanese.layers.0.mlp"] = "disk" } })

   it("needs the last layer's dense_bias, sequential residuals and the partial rotary embedding", function()
      local changes = {
         function(m) m.gpt_neox_japanese.layers[3].attention.dense_bias:zero_() end,
         function(m) for _, l in ipairs(m.gpt_neox_japanese.layers) do rawset(l, "parallel", true) end end,
         function(m)
            local cfg = setmetatable({ rotary_dim = 8 }, { __index = m.config })
            m.gpt_neox_japanese.rotary_emb = neoxj.GPTNeoXJapaneseRotaryEmbedding(cfg)
         end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)
end)

describe("models.gpt_neox_japanese configs", function()
   local function with(change)
      local raw = H.read_json(DIR .. "/config.json")
      for k, v in pairs(change) do raw[k] = v end
      return raw
   end

   it("reads the hub's rotary_pct and rotary_emb_base, to the same logits", function()
      local dir = H.tmpdir()
      H.write(dir .. "/config.json", cjson.encode(with({ rope_parameters = cjson.null, rotary_pct = 0.5, rotary_emb_base = 5000 })))
      H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
      local exp = H.expected(NAME)
      local m = ml.models.from_pretrained(dir)
      assert.are.same({ 4, 5000 }, { m.config.rotary_dim, m.config.rope_theta })
      assert.is_true(H.max_abs_diff(m(exp.input_ids), exp.logits) < 1e-4)
      H.rmdir(dir)
   end)

   it("reads GPTNeoXJapaneseConfig's defaults (gpt-neox-japanese-2.7b's) as transformers builds them", function()
      -- (transformers 5.24: GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig()) on the meta device)
      local m = H.assert_matches_skeleton(function()
         return neoxj.GPTNeoXJapaneseForCausalLM({ model_type = "gpt_neox_japanese" })
      end, { parameters = 2598837760, shapes = { ["gpt_neox_japanese.layers.0.mlp.dense_h_to_4h.weight"] = { 10240, 2560 },
         ["gpt_neox_japanese.layers.31.attention.dense_bias"] = { 2560 } } })
      local cfg = m.config
      assert.are.same({ 80, 10000, "gelu", 1e-5, true, false }, { cfg.rotary_dim, cfg.rope_theta, cfg.hidden_act,
         cfg.layer_norm_eps, cfg.tie_word_embeddings, cfg.use_parallel_residual })
      assert.is_false(neoxj.config(with({ use_parallel_residual = true, attention_bias = true })).attention_bias)
   end)

   it("names what is wrong in a config", function()
      local function fails(change, msg) H.assert_config_fails(neoxj.config, DIR, change, msg) end
      fails({ num_attention_heads = 5 }, "models.gpt_neox_japanese: hidden_size 32 is not a multiple of num_attention_heads 5")
      fails({ intermediate_multiple_size = 0 }, 'models.gpt_neox_japanese: config key "intermediate_multiple_size"')
      fails({ hidden_act = "relu3" }, 'models.gpt_neox_japanese: activation "relu3"')
      fails({ rope_parameters = { rope_type = "dynamic", factor = 2 } }, 'models.gpt_neox_japanese: rope type "dynamic" is not supported')
   end)
end)
