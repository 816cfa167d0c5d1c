-- ml.models LFM3 (LFM2's short convolutions beside gated Qwen3-style attention, sliding and full,
-- each kind with its own rotary table; sandwich norms) against transformers
-- (tests/fixtures/gen_models.py lfm3): names, logits, greedy ids, decoding through the cache,
-- padded batches, block schedules, offload, what each particularity changes, and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local lfm2 = require("moonload.models.lfm2")
local lfm3 = require("moonload.models.lfm3")
local llama = require("moonload.models.llama")
local H = require("models_helpers")

local NAME = "lfm3_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.lfm3 (tests/fixtures/models/lfm3_tiny: conv, sliding (4 tokens), full, conv)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds Lfm3ForCausalLM with every tensor of the checkpoint, under the hub's names, the head tied", function()
      assert.are.equal("Lfm3ForCausalLM", model.__name)
      H.assert_holds_checkpoint(model, DIR, true)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      local layers = model.model.layers
      assert.are.equal("Lfm3ShortConv", layers[1].conv.__name)
      assert.are.equal("Lfm3Attention", layers[2].self_attn.__name)
      assert.are.equal("Lfm3Attention", layers[3].self_attn.__name)
      assert.are.equal("Lfm3MLP", layers[1].feed_forward.__name)
      assert.are.equal(64, layers[1].feed_forward.w1.out_features)          -- (as wide as the file says)
      assert.are.equal(4, layers[2].self_attn.gate_proj.out_features)        -- (one gate per head)
      assert.are.equal("Lfm3RotaryEmbedding", model.model.rotary_emb.__name)
      assert.are.same({ false, 4, false, false }, model.config.layer_windows)
      assert.are.same({ "Lfm3DecoderLayer" }, model.no_split_modules)
   end)

   it("turns the full layers' first half of the pairs over the whole head, the rest at 0 (proportional)", function()
      local want = { 1, 1e6 ^ (-2 / 16), 1e6 ^ (-4 / 16), 1e6 ^ (-6 / 16), 0, 0, 0, 0 }
      assert.is_true(H.max_abs_diff(model.model.rotary_emb.inv_freq, want) < 1e-7)
      local plain = {}
      for i = 1, 8 do plain[i] = 1e4 ^ (-(2 * i - 2) / 16) end             -- (the sliding layers': all turn)
      assert.is_true(H.max_abs_diff(model.model.rotary_emb.local_inv_freq, plain) < 1e-7)
   end)

   H.it_matches_expected(model, NAME, " (past the window)")

   it("decodes token by token through the convolutions' last inputs and the keys as one full forward", function()
      local row = exp.input_ids[1]
      local cache = model:new_cache()
      assert.is_true(H.max_abs_diff(H.decoded_logits(model, row, 2, cache), { exp.logits[1] }) < 1e-4)
      assert.are.same({ 1, 2, 32 }, cache.states[1].conv.shape)          -- the last 2 of 3 taps' inputs
      assert.is_nil(cache.states[2])
      assert.is_false(cache:can_crop(#row - 1))
   end)

   H.it_matches_padded(model, NAME, "positions and zeroes padding before the convolutions")

   H.it_runs_stateful(model, NAME, H.alternating_layers("model", 4, { ["model.embed_tokens"] = "cpu",
      ["model.rotary_emb"] = "cpu", ["model.embedding_norm"] = "disk", lm_head = "cpu" }))

   describe("without one of its particularities, the logits move away from transformers'", function()
      local function differs(fn)
         assert.is_true(H.max_abs_diff(logits_after(fn), exp.logits) > 1e-3)
      end
      local function attentions(m)
         return { m.model.layers[2].self_attn, m.model.layers[3].self_attn }
      end

      it("the sigmoid gate per head", function()
         differs(function(m)
            for _, a in ipairs(attentions(m)) do rawset(a, "project", llama.Qwen3Attention.project) end
         end)
      end)

      it("the norms after the operator and the feed-forward", function()
         differs(function(m)
            for i = 1, 4 do rawset(m.model.layers[i], "forward", lfm2.Lfm2DecoderLayer.forward) end
         end)
      end)

      it("the proportional table (a plain rotation of the head's first half instead)", function()
         differs(function(m)
            local partial = llama.LlamaRotaryEmbedding(setmetatable({ rotary_dim = 8, rope_theta = 1e6 },
               { __index = m.config }))
            m.model.rotary_emb.inv_freq = partial.inv_freq
         end)
      end)

      it("the sliding layers' own rotary table", function()
         differs(function(m) m.model.rotary_emb.local_inv_freq = m.model.rotary_emb.inv_freq end)
      end)

      it("the sliding window", function()
         differs(function(m) rawset(m.model.layers[2].self_attn, "window", false) end)
      end)

      it("the per-head q/k norms", function()
         differs(function(m)
            for _, a in ipairs(attentions(m)) do rawset(a, "qk_norm_in_project", true) end     -- (skips them)
         end)
      end)
   end)

   describe("config", function()
      local function fails(change, msg) H.assert_config_fails(lfm3.config, DIR, change, msg) end

      it("names a bad layer type, count, window, head split or flag", function()
         fails({ layer_types = { "conv", "sliding_attention", "mamba", "conv" } },
            'models.lfm3: layer_types[3] is "mamba" (supported: conv, sliding_attention, full_attention) in config table')
         fails({ layer_types = { "conv" } }, 'config key "layer_types" must list 4 layer types')
         fails({ sliding_window = 0 }, 'config key "sliding_window" in config table must be a positive integer, got number 0')
         fails({ num_key_value_heads = 3 }, "num_attention_heads 4 is not a multiple of num_key_value_heads 3")
         fails({ use_attention_gate = "yes" }, 'config key "use_attention_gate" in config table must be a boolean')
         fails({ use_sandwich_norm = 1 }, 'config key "use_sandwich_norm" in config table must be a boolean')
         fails({ norm_eps = -1 }, 'config key "norm_eps" in config table must be a positive number')
      end)

      it("names a bad or missing rotary entry of an attention kind", function()
         fails({ rope_parameters = { rope_type = "default", rope_theta = 10000 } },
            'config key "rope_parameters.full_attention" is missing (rope_parameters holds one entry per attention layer type)')
         fails(function(raw) raw.rope_parameters.full_attention.rope_type = "yarn" end,
            'rope_parameters.full_attention: rope type "yarn" is not supported (supported: default, linear, proportional)')
         fails(function(raw) raw.rope_parameters.full_attention.partial_rotary_factor = 1.5 end,
            'config key "rope_parameters.full_attention.partial_rotary_factor" must be at most 1, got 1.5')
         fails(function(raw) raw.rope_parameters.sliding_attention = { rope_type = "linear" } end,
            'config key "rope_parameters.sliding_attention.factor" is missing (needed by rope type "linear")')
         fails(function(raw) raw.rope_parameters.sliding_attention.rope_theta = "big" end,
            'config key "rope_parameters.sliding_attention.rope_theta" must be a positive number, got big')
      end)

      it("names the file a bad value came from", function()
         local dir = H.tmpdir()
         local raw = H.read_json(DIR .. "/config.json")
         H.write(dir .. "/config.json", (require("cjson").encode(raw):gsub('"conv_L_cache":3', '"conv_L_cache":0')))
         local ok, err = pcall(lfm3.config, dir)
         assert.is_false(ok)
         assert.truthy(tostring(err):find('config key "conv_L_cache" in ' .. dir .. "/config.json must be a positive integer",
            1, true), tostring(err))
         H.rmdir(dir)
      end)

      it("fills in Lfm3Config's defaults: layer kinds, head size, rotary tables, eps", function()
         local cfg = lfm3.config({ vocab_size = 100, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 6,
            num_attention_heads = 4, num_key_value_heads = 2, rms_norm_eps = 1e-3 })
         assert.are.same({ "conv", "conv", "full_attention", "conv", "sliding_attention", "conv" }, cfg.layer_types)
         assert.are.same({ false, false, false, false, 256, false }, cfg.layer_windows)
         assert.are.equal(128, cfg.head_dim)
         assert.are.equal(1e-3, cfg.rms_norm_eps)
         assert.is_true(cfg.tie_word_embeddings and cfg.use_attention_gate and cfg.use_sandwich_norm)
         assert.are.equal(7, cfg.conv_L_cache)
         assert.are.same({ rope_type = "proportional", rope_theta = 1000000, partial_rotary_factor = 0.5 }, cfg.rope_full)
         assert.are.same({ rope_type = "default", rope_theta = 10000 }, cfg.rope_sliding)
         -- (a kind's missing theta: the config class's 1e6; the default type ignores factor)
         local raw = H.read_json(DIR .. "/config.json")
         raw.rope_parameters.sliding_attention = { rope_type = "default", factor = 4 }
         assert.are.same({ rope_type = "default", rope_theta = 1000000 }, lfm3.config(raw).rope_sliding)
      end)
   end)
end)

describe("models.lfm3 (tests/fixtures/models/lfm3_plain_tiny: no gate, no sandwich norms)", function()
   H.collect_warnings()
   local name = "lfm3_plain_tiny"
   local model = models.from_pretrained(H.FIX .. "/" .. name)

   it("builds without gate_proj, post_operator_norm and post_ffn_norm, holding every tensor of the checkpoint", function()
      H.assert_holds_checkpoint(model, H.FIX .. "/" .. name, true)
      assert.is_nil(model.model.layers[2].self_attn.gate_proj)
      assert.is_nil(model.model.layers[1].post_operator_norm)
      assert.is_nil(model.model.layers[1].post_ffn_norm)
   end)

   H.it_matches_expected(model, name)
end)
