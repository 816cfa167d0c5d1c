-- ml.models Dory (a looped nGPT: L2-normed hidden states joined by learned interpolation rates,
-- AFMoE's gated attention with L2-normed, rescaled queries and keys, a recurrent section run
-- several times with a cache per loop) against transformers (tests/fixtures/gen_models.py dory),
-- from the names and config.json layout it saves (the hub's: backbone., g_proj, an "mlp" entry per
-- layer): names, logits, greedy ids with and without the cache, a padded batch, the hub's two-block
-- layers, what each particularity does, CPU + disk, configs.
local ml = require("moonload")
local models = require("moonload.models")
local dory = require("moonload.models.dory")
local H = require("models_helpers")

local NAME = "dory_tiny"
local DIR = H.FIX .. "/" .. NAME

-- A hub tensor's name in transformers' model.
local function transformers_name(key)
   key = key:gsub("^backbone%.", "model."):gsub("%.embeddings%.", ".embed_tokens.")
   return (key:gsub("%.self_attn%.g_proj%.", ".self_attn.gate_proj."))
end

describe("models.dory (tests/fixtures/models/dory_tiny: 1 + 2 x 3 loops + 1 layers, sliding (3) and full)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds DoryForCausalLM from the names transformers saves (backbone., embeddings, g_proj)", function()
      assert.are.equal("DoryForCausalLM", model.__name)
      assert.are.same({ "DoryDecoderLayer" }, model.no_split_modules)
      local want = {}
      for key in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do want[transformers_name(key)] = true end
      assert.is_true(want["model.layers.0.self_attn.gate_proj.weight"])
      assert.is_true(want["lm_head.logit_scale"])
      assert.are.same(H.sorted_keys(want), H.sorted_keys((model:state_dict())))
      local cfg = model.config
      assert.are.same({ 4, 1, 2, 1, 3 }, { cfg.num_hidden_layers, cfg.n_input_layers, cfg.n_recurrent_layers,
         cfg.n_output_layers, cfg.n_recurrent_loops })
      assert.are.same({ false, 3, false, 3 }, cfg.layer_windows)
      -- memory planning counts a recurrent layer's cache once a loop
      local heads = {}
      for i = 1, 4 do heads[i] = (model.model.layers[i].self_attn:kv_cache_heads()) end
      assert.are.same({ 2, 6, 6, 2 }, heads)
   end)

   H.it_matches_expected(model, NAME)

   H.it_matches_padded(model, NAME, "positions")

   it("keeps a cache a loop: the recurrent layers' later loops in companion slots of theirs", function()
      local cache = model:new_cache(16)
      model(ids, { cache = cache })
      for _, i in ipairs({ 2, 3 }) do
         for loop = 2, 3 do assert.is_not_nil(cache.k["loop" .. loop .. ":" .. i], i .. " " .. loop) end
      end
      assert.is_nil(cache.k["loop2:1"])
      assert.is_nil(cache.k["loop2:4"])
      assert.are.same({ 1, 2, 3, 4 }, { model.model.layers[1].self_attn.layer_idx, model.model.layers[2].self_attn.layer_idx,
         model.model.layers[3].self_attn.layer_idx, model.model.layers[4].self_attn.layer_idx })
      -- one cache shared by the loops (each loop overwriting the one before) decodes otherwise
      local function next_logits(shared)
         local m = models.from_pretrained(DIR)
         local c = m:new_cache(16)
         if shared then rawset(c, "companion", function(_, i) return i end) end
         m(ids:narrow(2, 1, 7), { cache = c })
         return m(ids:narrow(2, 8, 1), { cache = c })
      end
      local last = { { exp.logits[1][8] }, { exp.logits[2][8] } }
      assert.is_true(H.max_abs_diff(next_logits(false), last) < 1e-4)
      assert.is_true(H.max_abs_diff(next_logits(true), last) > 1e-3)
   end)

   it("reads the hub's two blocks a layer (layers.{2i}.mixer, layers.{2i+1}.mixer, attn_alpha, mlp_alpha)", function()
      local dir = H.tmpdir()
      H.copy(DIR .. "/config.json", dir .. "/config.json")
      local out = {}
      for key, t in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do
         local i, part, rest = key:match("^backbone%.layers%.(%d+)%.([%w_]+)(.*)$")
         if part == "self_attn" then key = "backbone.layers." .. 2 * i .. ".mixer" .. rest
         elseif part == "mlp" then key = "backbone.layers." .. 2 * i + 1 .. ".mixer" .. rest
         elseif part == "lambda_1" then key = "backbone.layers." .. 2 * i .. ".attn_alpha"
         elseif part == "lambda_2" then key = "backbone.layers." .. 2 * i + 1 .. ".mlp_alpha" end
         out[key] = t
      end
      assert.is_not_nil(out["backbone.layers.7.mixer.down_proj.weight"])
      ml.safetensors.save_file(out, dir .. "/model.safetensors")
      assert.is_true(H.max_abs_diff(models.from_pretrained(dir)(ids), exp.logits) < 1e-4)
      H.rmdir(dir)
   end)

   -- (the norms before o_proj and down_proj matter through their biases: an unbiased projection's
   -- output is L2-normed next, which undoes any scale)
   it("needs the loops, the query and gate scales, the output norms, the rates, the logit scale and the local rope base",
      function()
      local function layers(m, fn) for i = 1, 4 do fn(m.model.layers[i]) end end
      local changes = {
         function(m) m.config.n_recurrent_loops = 1 end,
         function(m) layers(m, function(l) l.self_attn.sqk:fill_(1 / l.self_attn.sqk_scale) end) end,
         function(m) layers(m, function(l) l.self_attn.s_gate:fill_(0) end) end,
         function(m) layers(m, function(l) rawset(l.self_attn, "gated_norm_name", false) end) end,
         function(m) layers(m, function(l) l.mlp.ffn_sub_norm = ml.nn.Identity() end) end,
         function(m) layers(m, function(l) l.mlp.suv_up:fill_(2) end) end,
         function(m) layers(m, function(l) l.lambda_1:fill_(1 / l.lambda_scale) end) end,
         function(m) m.lm_head.logit_scale:fill_(m.config.initializer_range) end,
         function(m) m.model.rotary_emb.local_inv_freq:copy_(m.model.rotary_emb.inv_freq) end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   -- (a CPU budget of 100000 bytes leaves some layers to the disk: the recurrent ones run from there
   -- once a loop)
   H.it_splits_over_cpu_and_disk(NAME, { budget = 100000, overrides = { ["^model%.layers%.1$"] = "disk" },
      places = { ["model.layers.1"] = "disk" } })

   describe("config", function()
      it("reads DoryConfig's defaults, and the hub's layout (an \"mlp\" entry a layer, counts doubled) halved", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                              "head_dim", "max_position_embeddings", "sliding_window", "rope_parameters", "n_recurrent_layers",
                              "n_recurrent_loops", "initializer_range", "ngpt_alpha_init", "recurrent_kv_cache_mode" }) do
            raw[k] = nil
         end
         raw.num_hidden_layers, raw.n_input_layers, raw.n_output_layers = 20, 4, 6   -- (the hub's counts: halved)
         raw.layer_types = {}
         for i = 1, 10 do raw.layer_types[2 * i - 1], raw.layer_types[2 * i] = i % 4 == 0 and "full_attention" or "sliding_attention", "mlp" end
         local cfg = dory.config(raw)
         assert.are.same({ 131072, 2560, 7168, 16, 4, 256, 8192 }, { cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size,
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.max_position_embeddings })
         assert.are.same({ 10, 2, 5, 3, 2 }, { cfg.num_hidden_layers, cfg.n_input_layers, cfg.n_recurrent_layers,
            cfg.n_output_layers, cfg.n_recurrent_loops })
         assert.are.same({ 1024, 1024, 1024, false, 1024, 1024, 1024, false, 1024, 1024 }, cfg.layer_windows)
         assert.are.same({ 10000000, 10000 }, { cfg.rope.rope_theta, cfg.rope_local.rope_theta })
         assert.are.same({ 0.0177, 0.05 }, { cfg.initializer_range, cfg.ngpt_alpha_init })
         -- without layer_types: 36 layers, every fourth full, 8 + 20 + 8
         cfg = dory.config({ model_type = "dory" })
         assert.are.same({ 36, 8, 20, 8 }, { cfg.num_hidden_layers, cfg.n_input_layers, cfg.n_recurrent_layers,
            cfg.n_output_layers })
         assert.are.same({ 1024, 1024, 1024, false }, { unpack(cfg.layer_windows, 1, 4) })
      end)

      it("names a bad key and the file", function()
         local function fails(change, msg) H.assert_config_fails(dory.config, DIR, change, msg) end
         fails({ recurrent_kv_cache_mode = "last_loop" }, 'models.dory: config key "recurrent_kv_cache_mode" is last_loop '
            .. '(supported: "per_loop"')
         fails({ n_recurrent_layers = 6 }, "models.dory: n_input_layers 1 + n_recurrent_layers 3 + n_output_layers 1 must "
            .. "equal num_hidden_layers 4")
         fails({ n_recurrent_loops = 0 }, 'models.dory: config key "n_recurrent_loops" must be an integer >= 1, got 0')
         fails({ initializer_range = 0 }, 'models.dory: config key "initializer_range" must be a positive number, got 0')
         fails(function(raw) raw.layer_types[3] = "chunked_attention" end,
            'models.dory: layer_types[2] is "chunked_attention" (supported: full_attention, sliding_attention)')
      end)
   end)
end)
