-- ml.models OLMo Hybrid (Gated DeltaNet linear attention with its projections apart, a three-part
-- conv and rates up to 2, beside OLMo 3's full attention, with or without rotary embeddings) against
-- transformers (tests/fixtures/gen_models.py olmo_hybrid): names, logits, greedy ids, decoding
-- through the cache's states, padded batches, block schedules, offload, what each particularity
-- changes, the checkpoint layouts, NoPE, and bad configs.
local cjson = require("cjson")
local ml = require("moonload")
local nn = require("moonload.nn")
local models = require("moonload.models")
local llama = require("moonload.models.llama")
local olmo_hybrid = require("moonload.models.olmo_hybrid")
local H = require("models_helpers")

-- (transformers runs prompts through the chunked delta rule, this the recurrent one: they agree
-- within 3e-5 here, so the usual tolerance holds)
local TOL = 1e-4
local NAME = "olmo_hybrid_tiny"
local DIR = H.FIX .. "/" .. NAME
local LINEAR, FULL = { 1, 3 }, { 2, 4 }

-- A copy of the fixture's folder, its tensors changed by edit(tensors) and its config by
-- config(raw) when given; returns the folder.
local function folder_with(edit, config)
   local dir = H.tmpdir()
   local raw = H.read_json(DIR .. "/config.json")
   if config then config(raw) end
   H.write(dir .. "/config.json", cjson.encode(raw))
   local tensors = ml.safetensors.load_file(DIR .. "/model.safetensors")
   if edit then edit(tensors) end
   ml.safetensors.save_file(tensors, dir .. "/model.safetensors")
   return dir
end

-- A linear layer's conv weight (56, 1, 4) as transformers holds it: the file's three parts joined.
local function joined_conv(tensors, layer)
   local p = "model.layers." .. layer .. ".linear_attn."
   local w = ml.cat({ tensors[p .. "q_conv1d.weight"], tensors[p .. "k_conv1d.weight"], tensors[p .. "v_conv1d.weight"] }, 1)
   for _, part in ipairs({ "q_conv1d", "k_conv1d", "v_conv1d" }) do tensors[p .. part .. ".weight"] = nil end
   return w, p
end

describe("models.olmo_hybrid (tests/fixtures/models/olmo_hybrid_tiny: linear, full, linear, full)", function()
   H.collect_warnings()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds OlmoHybridForCausalLM holding every tensor of the checkpoint, the hub's norm names renamed", function()
      assert.are.equal("OlmoHybridForCausalLM", model.__name)
      assert.are.same({ "OlmoHybridAttentionDecoderLayer", "OlmoHybridLinearAttentionDecoderLayer" }, model.no_split_modules)
      local stored = ml.safetensors.load_file(DIR .. "/model.safetensors")
      local map, held = models.name_mapper(model), {}
      for name in pairs(stored) do held[map(name)] = true end
      assert.are.same(H.sorted_keys(held), H.sorted_keys(model:state_dict()))
      -- save_pretrained's names: a linear layer's norms, and the attention layer's first post-norm
      assert.truthy(stored["model.layers.0.attention_layer_norm.weight"] and stored["model.layers.0.feedforward_layer_norm.weight"])
      assert.truthy(stored["model.layers.1.feedforward_layer_norm.weight"])
      assert.are.equal("model.layers.1.post_attention_layernorm.weight", map("model.layers.1.feedforward_layer_norm.weight"))
      local layers = model.model.layers
      assert.are.equal("OlmoHybridLinearAttentionDecoderLayer", layers[1].__name)
      assert.are.equal("OlmoHybridGatedDeltaNet", layers[1].linear_attn.__name)
      assert.are.equal("OlmoHybridAttentionDecoderLayer", layers[2].__name)
      assert.are.equal("OlmoHybridAttention", layers[2].self_attn.__name)
      assert.are.same({ 32 }, layers[2].self_attn.q_norm.weight.shape)    -- (the whole projection)
      assert.are.same({ 16 }, layers[2].self_attn.k_norm.weight.shape)
      -- the conv in the file's three parts: thirds of 56 channels, as save_pretrained splits it
      assert.truthy(tostring(model):find("(q_conv1d): Conv1d(19, 19, kernel_size=(4,), stride=(1,), padding=(3,), groups=19, bias=False)", 1, true))
      assert.are.same({ 18, 1, 4 }, layers[3].linear_attn.v_conv1d.weight.shape)
      assert.are.equal(1e-5, layers[1].linear_attn.o_norm.eps)
      assert.are.same({ false, false, false, false }, model.config.layer_windows)
      assert.is_nil(model.config.nope_layers)
   end)

   H.it_matches_expected(model, NAME)

   it("keeps the linear layers' conv inputs and states in the cache, the full layers' keys and values", function()
      local row = exp.input_ids[1]
      local cache = model:new_cache()
      assert.is_true(H.max_abs_diff(H.decoded_logits(model, row, 3, cache), { exp.logits[1] }) < TOL)
      assert.are.same({ "conv", "recurrent" }, H.sorted_keys(cache.states[1]))
      assert.are.same({ 1, 3, 56 }, cache.states[1].conv.shape)
      assert.are.same({ 1, 4, 8, 6 }, cache.states[3].recurrent.shape)
      assert.is_nil(cache.states[2])
      assert.are.equal(#row, cache.k[2]:size(3) >= #row and #row or -1)
      local la = model.model.layers[1].linear_attn
      assert.are.equal(cache.states[1].conv:nbytes() + cache.states[1].recurrent:nbytes(), la:state_bytes(1, 4))
      assert.is_false(cache:can_crop(#row - 1))
   end)

   H.it_matches_padded(model, NAME, "positions and zeroes padding before the linear layers")

   H.it_runs_stateful(model, NAME, H.alternating_layers("model", 4, { ["model.embed_tokens"] = "cpu",
      ["model.rotary_emb"] = "cpu", ["model.norm"] = "disk", lm_head = "cpu" }))

   it("reorders the states with the rows (beam search's reorder)", function()
      local cache = model:new_cache()
      model({ { 1, 7, 9 }, { 1, 60, 61 } }, { cache = cache })
      local before = cache.states[1].recurrent:clone()
      cache:reorder({ 1, 1, 0 })
      assert.are.same({ 3, 4, 8, 6 }, cache.states[1].recurrent.shape)
      assert.is_true(H.max_abs_diff(cache.states[1].recurrent:select(1, 1), before:select(1, 2):tolist()) == 0)
      assert.is_true(H.max_abs_diff(cache.states[1].recurrent:select(1, 3), before:select(1, 1):tolist()) == 0)
   end)

   it("keeps a bfloat16 model's conv inputs in bfloat16 and its states in float32", function()
      local m = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local cache = m:new_cache()
      local f = m(ids, { cache = cache }):float()
      assert.are.equal(f:numel(), f:eq(f):sum():item())                  -- no NaN
      -- (bfloat16 rounding moves them: transformers' own bfloat16 logits land 0.43 from its float32 ones)
      assert.is_true(H.max_abs_diff(f, exp.logits) < 1)
      assert.are.equal("bfloat16", cache.states[1].conv.dtype)
      assert.are.equal("float32", cache.states[1].recurrent.dtype)
   end)

   describe("without one of its particularities, the logits move away from transformers'", function()
      local function differs(fn) assert.is_true(H.max_abs_diff(logits_after(fn), exp.logits) > 1e-3) end
      local function each(m, list, fn) for _, i in ipairs(list) do fn(m.model.layers[i]) end end

      it("the rates up to 2 (linear_allow_neg_eigval)", function()
         differs(function(m) each(m, LINEAR, function(l) rawset(l.linear_attn, "neg_eigval", false) end) end)
      end)

      it("the gated norm's own eps (1e-5, not rms_norm_eps)", function()
         differs(function(m) each(m, LINEAR, function(l) rawset(l.linear_attn.o_norm, "eps", 1e-6) end) end)
      end)

      it("the conv's activation", function()
         differs(function(m) each(m, LINEAR, function(l) rawset(l.linear_attn, "act", function(x) return x end) end) end)
      end)

      it("the rotary embedding of the full layers", function()
         differs(function(m) each(m, FULL, function(l) rawset(l.self_attn, "nope", true) end) end)
      end)

      it("the q/k norms over the whole projections (per head instead)", function()
         differs(function(m)
            each(m, FULL, function(l)
               local a = l.self_attn
               rawset(a, "project", llama.LlamaAttention.project)
               rawset(a, "qk_norm_in_project", false)
               a.q_norm, a.k_norm = nn.RMSNorm(8, { eps = 1e-6 }), nn.RMSNorm(8, { eps = 1e-6 })
            end)
         end)
      end)

      it("the full layers' norms after attention and MLP (before them instead)", function()
         differs(function(m)
            each(m, FULL, function(l)
               rawset(l, "forward", function(self, x, cos, sin, cache, pad)
                  x = x + self.self_attn(self.post_attention_layernorm(x), cos, sin, cache, pad)
                  return x + self.mlp(self.post_feedforward_layernorm(x))
               end)
            end)
         end)
      end)

      it("the linear layers' norms before mixer and MLP (after them instead)", function()
         differs(function(m)
            each(m, LINEAR, function(l)
               rawset(l, "forward", function(self, x, cos, sin, cache, pad)
                  x = x + self.input_layernorm(self.linear_attn(x, cache, pad))
                  return x + self.post_attention_layernorm(self.mlp(x))
               end)
            end)
         end)
      end)

      it("the padding zeroed before the linear layers", function()
         local pad = H.read_json(DIR .. "/padded.json")
         local m = models.from_pretrained(DIR)
         each(m, LINEAR, function(l)
            rawset(l.linear_attn, "forward", function(self, x, cache)
               return olmo_hybrid.OlmoHybridGatedDeltaNet.forward(self, x, cache, nil)
            end)
         end)
         local logits = m(pad.input_ids, { attention_mask = pad.attention_mask })
         assert.is_true(H.max_abs_diff(logits:select(1, 1):narrow(1, 3, 4),
            { pad.logits[1][3], pad.logits[1][4], pad.logits[1][5], pad.logits[1][6] }) > 1e-3)
      end)
   end)

   describe("checkpoint layouts", function()
      it("loads the hub's converted names (input_layernorm, post_attention_layernorm; convs of 16, 16, 24)", function()
         local dir = folder_with(function(t)
            for name, w in pairs(t) do
               local renamed = name:gsub("attention_layer_norm", "input_layernorm"):gsub("feedforward_layer_norm", "post_attention_layernorm")
               if renamed ~= name then t[name], t[renamed] = nil, w end
            end
            for _, layer in ipairs({ 0, 2 }) do
               local w, p = joined_conv(t, layer)
               t[p .. "q_conv1d.weight"] = w:narrow(1, 1, 16):contiguous()
               t[p .. "k_conv1d.weight"] = w:narrow(1, 17, 16):contiguous()
               t[p .. "v_conv1d.weight"] = w:narrow(1, 33, 24):contiguous()
            end
         end)
         local m = models.from_pretrained(dir)
         assert.are.same({ 24, 1, 4 }, m.model.layers[1].linear_attn.v_conv1d.weight.shape)
         assert.is_true(H.max_abs_diff(m(ids), exp.logits) < TOL)
         H.rmdir(dir)
      end)

      it("loads one joined linear_attn.conv1d (transformers' in-memory layout) and saves it back as it was", function()
         local dir = folder_with(function(t)
            for _, layer in ipairs({ 0, 2 }) do
               local w, p = joined_conv(t, layer)
               t[p .. "conv1d.weight"] = w
            end
         end)
         local m = models.from_pretrained(dir)
         assert.are.same({ "conv1d" }, m.model.layers[3].linear_attn.convs)
         assert.is_true(H.max_abs_diff(m(ids), exp.logits) < TOL)
         local out = H.tmpdir()
         ml.save_model(m, out)
         local back = models.from_pretrained(out)
         assert.are.same({ 56, 1, 4 }, back.model.layers[1].linear_attn.conv1d.weight.shape)
         assert.is_true(H.max_abs_diff(back(ids), exp.logits) < TOL)
         H.rmdir(dir)
         H.rmdir(out)
      end)

      it("names convs whose channels do not add up to the config's heads", function()
         local dir = folder_with(function(t)
            t["model.layers.0.linear_attn.v_conv1d.weight"] = t["model.layers.0.linear_attn.v_conv1d.weight"]:narrow(1, 1, 17):contiguous()
         end)
         local ok, err = pcall(models.from_pretrained, dir)
         assert.is_false(ok)
         assert.truthy(tostring(err):find("models.olmo_hybrid: the checkpoint's linear_attn convs hold 19 + 19 + 17 channels, "
            .. "the config's heads need 56 (2 x linear_num_key_heads x linear_key_head_dim + linear_num_value_heads x "
            .. "linear_value_head_dim) in " .. dir .. "/config.json", 1, true), tostring(err))
         H.rmdir(dir)
      end)
   end)

   describe("without position embedding (rope_theta null, as the hub's model)", function()
      local nope = H.read_json(DIR .. "/nope.json")

      it("gives transformers' logits, and save_model writes the null back", function()
         local dir = folder_with(nil, function(raw) raw.rope_parameters, raw.rope_theta = nil, cjson.null end)
         local m = models.from_pretrained(dir)
         assert.are.same({ true, true, true, true }, m.config.nope_layers)
         assert.is_true(H.max_abs_diff(m(ids), nope.logits) < TOL)
         assert.is_true(H.max_abs_diff(m(ids), exp.logits) > 1e-3)
         local out = H.tmpdir()
         ml.save_model(m, out)
         local saved = H.read_json(out .. "/config.json")
         assert.are.equal(cjson.null, saved.rope_parameters.rope_theta)
         assert.is_true(H.max_abs_diff(models.from_pretrained(out)(ids), nope.logits) < TOL)
         H.rmdir(dir)
         H.rmdir(out)
      end)

      it("reads rope_parameters' own rope_theta first, as transformers does", function()
         local raw = H.read_json(DIR .. "/config.json")
         raw.rope_parameters.rope_theta = cjson.null
         raw.rope_theta = 5000
         assert.are.same({ true, true, true, true }, olmo_hybrid.config(raw).nope_layers)
         raw.rope_parameters.rope_theta, raw.rope_theta = 5000, cjson.null
         local cfg = olmo_hybrid.config(raw)
         assert.is_nil(cfg.nope_layers)
         assert.are.equal(5000, cfg.rope_theta)
      end)
   end)

   describe("config", function()
      local function fails(change, msg) H.assert_config_fails(olmo_hybrid.config, DIR, change, msg) end

      it("names a bad layer type, count or mix", function()
         fails({ layer_types = { "linear_attention", "full_attention", "mamba", "full_attention" } },
            'models.olmo_hybrid: layer_types[3] is "mamba" (supported: linear_attention, full_attention) in config table')
         fails({ layer_types = { "linear_attention" } }, 'config key "layer_types" must list 4 layer types')
         fails({ layer_types = { "linear_attention", "linear_attention", "linear_attention", "linear_attention" } },
            'layer_types must hold at least one "full_attention" layer in config table')
         fails({ layer_types = { "full_attention", "full_attention", "full_attention", "full_attention" } },
            'layer_types must hold at least one "linear_attention" layer in config table')
      end)

      it("names bad linear-attention heads, taps or flag", function()
         fails({ linear_num_value_heads = 3 }, "linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2 in config table")
         fails({ linear_conv_kernel_dim = 0 }, 'config key "linear_conv_kernel_dim" must be an integer >= 1, got 0 in config table')
         fails({ linear_key_head_dim = 2.5 }, 'config key "linear_key_head_dim" must be an integer >= 1, got 2.5')
         fails({ linear_allow_neg_eigval = "yes" }, 'config key "linear_allow_neg_eigval" must be a boolean, got yes in config table')
         fails({ num_key_value_heads = 3 }, "num_attention_heads 4 is not a multiple of num_key_value_heads 3")
      end)

      it("names the file a bad value came from", function()
         local dir = folder_with(nil, function(raw) raw.linear_conv_kernel_dim = -1 end)
         local ok, err = pcall(olmo_hybrid.config, dir)
         assert.is_false(ok)
         assert.truthy(tostring(err):find('config key "linear_conv_kernel_dim" must be an integer >= 1, got -1 in '
            .. dir .. "/config.json", 1, true), tostring(err))
         H.rmdir(dir)
      end)

      it("fills in OlmoHybridConfig's defaults: every fourth layer full, heads from the attention's, rates up to 2", function()
         local raw = H.read_json(DIR .. "/config.json")
         for _, k in ipairs({ "layer_types", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                              "linear_value_head_dim", "linear_allow_neg_eigval", "linear_conv_kernel_dim", "max_position_embeddings" }) do
            raw[k] = nil
         end
         local cfg = olmo_hybrid.config(raw)
         assert.are.same({ "linear_attention", "linear_attention", "linear_attention", "full_attention" }, cfg.layer_types)
         -- (4 heads: 0.75 x 32 / 4 = 6 key dims, 12 value dims)
         assert.are.same({ 4, 4, 6, 12, 4, true }, { cfg.linear_num_key_heads, cfg.linear_num_value_heads,
            cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim, cfg.linear_allow_neg_eigval })
         assert.are.same({ { "q_conv1d", 24 }, { "k_conv1d", 24 }, { "v_conv1d", 48 } }, cfg.linear_convs)
         raw.num_hidden_layers = 2                                           -- (no fourth layer: the last is full)
         assert.are.same({ "linear_attention", "full_attention" }, olmo_hybrid.config(raw).layer_types)
         raw.num_hidden_layers, raw.rope_parameters = 8, nil
         cfg = olmo_hybrid.config(raw)
         assert.are.same({ "linear_attention", "linear_attention", "linear_attention", "full_attention",
            "linear_attention", "linear_attention", "linear_attention", "full_attention" }, cfg.layer_types)
         assert.are.same({ 10000, 65536 }, { cfg.rope_theta, cfg.max_position_embeddings })
      end)
   end)
end)
