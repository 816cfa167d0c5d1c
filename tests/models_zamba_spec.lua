-- ml.models Zamba2 (Mamba-2 layers and shared transformer blocks, models/zamba.lua over
-- models/mamba2.lua) against transformers (tests/fixtures/gen_models.py zamba2): names and tied
-- blocks, logits, greedy ids, decoding through the mixers' states and the hybrid layers' keys and
-- values, padded batches, block schedules, offload, what each particularity changes, and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local zamba = require("moonload.models.zamba")
local H = require("models_helpers")

-- The model's state dict names, less those tied to another (stored once, under the first).
local function stored_names(model)
   local names = {}
   for name in pairs((model:state_dict())) do
      if not (model.tied_weights[name] and model.config.tie_word_embeddings) then names[name] = true end
   end
   return names
end

-- The it()s every fixture gets: the checkpoint's tensors, transformers' logits and greedy ids,
-- decoding through the cache, the cache's contents, a padded batch, a block schedule and a CPU/disk
-- split, assisted generation refused. others: the device map's entries beside the layers.
local function it_runs_like_transformers(name, n_layers, others)
   local dir = H.FIX .. "/" .. name
   local model = models.from_pretrained(dir)

   it("holds every tensor of the checkpoint, under its names, the reused blocks tied to their first user's", function()
      local want = {}
      for key in pairs(ml.safetensors.load_file(dir .. "/model.safetensors")) do want[key] = true end
      assert.are.same(H.sorted_keys(want), H.sorted_keys(stored_names(model)))
   end)

   H.it_matches_expected(model, name)

   it("keeps each mixer's conv inputs and float32 state, and the hybrid layers' keys and values, in the cache", function()
      local exp = H.expected(name)
      local cache = model:new_cache()
      model({ { exp.input_ids[1][1], exp.input_ids[1][2], exp.input_ids[1][3] } }, { cache = cache })
      for i = 1, n_layers do
         local layer = model.model.layers[i]
         local mixer = layer.mamba or layer.mamba_decoder.mamba
         local g = mixer.geometry
         assert.are.same({ 1, g.taps - 1, mixer.conv1d.channels }, cache.states[i].conv.shape)
         assert.are.same({ 1, g.H, g.P, g.N }, cache.states[i].recurrent.shape)
         assert.are.equal("float32", cache.states[i].recurrent.dtype)
         local block = layer.shared_name and layer[layer.shared_name]
         if block then
            local attn = block.self_attn
            assert.are.same({ 1, attn.n_kv_head, 3, attn.head_dim }, cache.k[i]:narrow(3, 1, 3).shape)
         else
            assert.is_nil(cache.k[i])
         end
      end
      assert.is_false(cache:can_crop(2))
   end)

   local padded = io.open(dir .. "/padded.json")
   if padded then
      padded:close()
      H.it_matches_padded(model, name, "positions and zeroes padding before the mixers")
   end

   -- layers alternating between disk and CPU, but a block's users where its first user is (a tie
   -- split between the CPU and the disk warns, and has no copy on disk to read)
   local map = H.alternating_layers("model", n_layers, others)
   map["model.embed_tokens"], map["model.final_layernorm"], map.lm_head = "cpu", "disk", "cpu"
   for dst, src in pairs(model:shared_block_users()) do
      map["model.layers." .. (dst - 1)] = map["model.layers." .. (src - 1)]
   end
   H.it_runs_stateful(model, name, map)
   return model
end

describe("models.zamba2 (tests/fixtures/models/zamba2_tiny: mamba, hybrid, hybrid, mamba, hybrid; 2 shared blocks)", function()
   H.collect_warnings()
   local name = "zamba2_tiny"
   local dir = H.FIX .. "/" .. name
   local model = it_runs_like_transformers(name, 5, { ["model.rotary_emb"] = "cpu" })
   local exp, _, _, logits_after = H.fixture_model(name)

   H.it_splits_over_cpu_and_disk(name, { budget = 150000, overrides = { ["%.shared_transformer$"] = "disk" },
      places = { ["model.layers.1.shared_transformer"] = "disk" } })

   it("builds Zamba2's layers: Mamba-2 mixers, hybrid layers whose third use of a block is tied to its first", function()
      assert.are.equal("Zamba2ForCausalLM", model.__name)
      local layers = model.model.layers
      assert.are.equal("Zamba2MambaDecoderLayer", layers[1].__name)
      assert.are.equal("Zamba2HybridLayer", layers[2].__name)
      assert.are.same({ H = 4, P = 16, G = 2, N = 8, width = 64, conv_dim = 96, taps = 4, limit = { 0.001, math.huge } },
         layers[1].mamba.geometry)
      assert.are.same({ 2, 3, 5 }, model.config.hybrid_layers)
      local first, second, third = layers[2].shared_transformer, layers[3].shared_transformer, layers[5].shared_transformer
      assert.are.equal(first.self_attn.q_proj.weight, third.self_attn.q_proj.weight)
      assert.are.equal(first.feed_forward.gate_up_proj_adapter_list[3][1].weight,
         third.feed_forward.gate_up_proj_adapter_list[3][1].weight)
      assert.are_not.equal(first.self_attn.q_proj.weight, second.self_attn.q_proj.weight)
      -- each use its own cache slot and adapters: slots 1 and 3 of the first block, 2 of the second
      assert.are.same({ 2, 3, 5 }, { first.self_attn.layer_idx, second.self_attn.layer_idx, third.self_attn.layer_idx })
      assert.are.same({ 1, 2, 3 }, { first.self_attn.slot, second.self_attn.slot, third.self_attn.slot })
      assert.are.equal("Identity", first.self_attn.linear_q_adapter_list[2].__name)
      assert.are.equal("Sequential", second.self_attn.linear_q_adapter_list[2].__name)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      assert.are.equal(1 / math.sqrt(8), first.self_attn.scale)          -- head_dim 16: sqrt(16 / 2)
   end)

   it("needs the embeddings beside the hidden states in each shared block", function()
      local blind = logits_after(function(m)
         for _, i in ipairs({ 2, 3, 5 }) do
            local block = m.model.layers[i].shared_transformer
            local forward = block.forward
            rawset(block, "forward", function(self, x, emb, ...) return forward(self, x, x, ...) end)
         end
      end)
      assert.is_true(H.max_abs_diff(blind, exp.logits) > 1e-3)
   end)

   it("needs each use's own adapters, on q, k, v and on gate_up_proj", function()
      for _, part in ipairs({ "self_attn", "feed_forward" }) do
         local reused = logits_after(function(m) rawset(m.model.layers[5].shared_transformer[part], "slot", 1) end)
         assert.is_true(H.max_abs_diff(reused, exp.logits) > 1e-3, part)
      end
   end)

   it("needs the scores scaled by sqrt(head_dim / 2) and the rotary embedding", function()
      local plain = logits_after(function(m)
         for _, i in ipairs({ 2, 3, 5 }) do rawset(m.model.layers[i].shared_transformer.self_attn, "scale", 0.25) end
      end)
      assert.is_true(H.max_abs_diff(plain, exp.logits) > 1e-3)
      local unrotated = logits_after(function(m)
         for _, i in ipairs({ 2, 3, 5 }) do rawset(m.model.layers[i].shared_transformer.self_attn, "nope", true) end
      end)
      assert.is_true(H.max_abs_diff(unrotated, exp.logits) > 1e-3)
   end)

   it("names what is wrong in a config", function()
      local cases = {
         { { layers_block_type = { "mamba", "hybrid" } }, 'config key "layers_block_type" must list 5 layer types (num_hidden_layers)' },
         { { layers_block_type = { "mamba", "hybrid", "attention", "mamba", "hybrid" } },
            'layers_block_type[3] is "attention" (supported: hybrid, linear_attention, mamba)' },
         { { num_key_value_heads = 2 }, "use_shared_attention_adapter needs num_key_value_heads 2 = num_attention_heads 4" },
         { { num_key_value_heads = 3 }, "num_attention_heads 4 is not a multiple of num_key_value_heads 3" },
         { { n_mamba_heads = 5 }, "the mixer's width 64 (mamba_expand x hidden_size) is not a multiple of n_mamba_heads 5" },
         { { mamba_ngroups = 3 }, "n_mamba_heads 4 is not a multiple of mamba_ngroups 3" },
         { { hidden_act = "swish2" }, 'activation "swish2"' },
         { { rope_parameters = { rope_type = "mrope" } }, 'rope type "mrope" is not supported' },
      }
      for _, c in ipairs(cases) do H.assert_config_fails(zamba.zamba2_config, dir, c[1], c[2]) end
   end)

   it("reads Zamba2Config's defaults: Zamba2-2.7B's 54 layers, 9 of them hybrid", function()
      local raw = H.read_json(dir .. "/config.json")
      for _, k in ipairs({ "layers_block_type", "num_hidden_layers", "n_mamba_heads", "mamba_d_state", "num_mem_blocks" }) do
         raw[k] = nil
      end
      local cfg = zamba.zamba2_config(raw)
      assert.are.equal(54, cfg.num_hidden_layers)
      assert.are.same({ 7, 13, 19, 25, 31, 37, 43, 48, 52 }, cfg.hybrid_layers)
      assert.are.same({ 8, 8, 64, 1 }, { cfg.mamba.heads, cfg.mamba.head_dim, cfg.mamba.state_size, cfg.num_mem_blocks })
   end)
end)

describe("models.zamba2 (tests/fixtures/models/zamba2_untied_tiny: no tie, no rotary, no attention adapters)", function()
   H.collect_warnings()
   local model = it_runs_like_transformers("zamba2_untied_tiny", 4, {})

   it("keeps a block of its own per hybrid layer and a head of its own (transformers ties neither)", function()
      local layers = model.model.layers
      assert.are_not.equal(layers[1].shared_transformer.self_attn.q_proj.weight, layers[3].shared_transformer.self_attn.q_proj.weight)
      assert.are_not.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      assert.is_nil(layers[1].shared_transformer.self_attn.linear_q_adapter_list)
      assert.is_true(layers[1].shared_transformer.self_attn.nope)
      assert.is_nil(model.model.rotary_emb)
   end)
end)

describe("models.zamba (tests/fixtures/models/zamba_tiny: Mamba-1 heads; hybrid layers 3 and 5, one shared block)", function()
   H.collect_warnings()
   local name = "zamba_tiny"
   local dir = H.FIX .. "/" .. name
   local model = it_runs_like_transformers(name, 6, {})
   local exp, _, _, logits_after = H.fixture_model(name)

   H.it_splits_over_cpu_and_disk(name, { budget = 150000, overrides = { ["%.shared_transf$"] = "disk" }, overrides_budget = 200000,
      places = { ["model.layers.2.shared_transf"] = "disk" } })

   it("builds Zamba's layers: 2-head Mamba-1 mixers, one block shared by every hybrid layer", function()
      assert.are.equal("ZambaForCausalLM", model.__name)
      local layers = model.model.layers
      assert.are.equal("ZambaMambaDecoderLayer", layers[1].__name)
      assert.are.equal("ZambaHybridLayer", layers[3].__name)
      assert.are.same({ H = 2, P = 32, N = 8, R = 2, I = 64, taps = 4 }, layers[1].mamba.geometry)
      assert.are.same({ 2, 18, 32 }, layers[1].mamba.x_proj_weight.shape)
      assert.are.equal(layers[3].shared_transf.self_attn.q_proj.weight, layers[5].shared_transf.self_attn.q_proj.weight)
      assert.are.same({ 3, 5 }, { layers[3].shared_transf.self_attn.layer_idx, layers[5].shared_transf.self_attn.layer_idx })
      assert.is_true(layers[3].shared_transf.self_attn.nope)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
   end)

   it("computes the mixer as its definition says, token by token: x and the gate interleaved, a scan per head", function()
      local mixer = model.model.layers[1].mamba
      ml.manual_seed(3)
      local x = ml.randn(1, 5, 32)
      local got = mixer(x)
      local proj = mixer.in_proj(x)                                 -- (1, 5, 128): x0, gate0, x1, gate1, ...
      local even, odd = {}, {}
      for c = 0, 63 do even[#even + 1], odd[#odd + 1] = 2 * c, 2 * c + 1 end
      local xs = proj:index_select(3, ml.tensor(even, { dtype = "int64" }))
      local z = proj:index_select(3, ml.tensor(odd, { dtype = "int64" }))
      local conv = require("moonload.models.causal_conv").run(mixer.conv1d, xs):silu()
      local y = ml.zeros(1, 5, 64)
      for h = 1, 2 do
         local Wx, Wdt, bdt = mixer.x_proj_weight:select(1, h), mixer.dt_proj_weight:select(1, h), mixer.dt_proj_bias:select(1, h)
         local A, D = -mixer.A_log:select(1, h):exp(), mixer.D:select(1, h)
         local S = ml.zeros(32, 8)
         for t = 1, 5 do
            local xt = conv:select(2, t):narrow(2, (h - 1) * 32 + 1, 32):reshape(32)
            local sel = Wx:matmul(xt:view(32, 1)):view(18)
            local dt = (Wdt:matmul(sel:narrow(1, 1, 2):reshape(2, 1)):view(32) + bdt):softplus()
            local Bt, Ct = sel:narrow(1, 3, 8):reshape(1, 8), sel:narrow(1, 11, 8):reshape(8, 1)
            S = S * (dt:view(32, 1) * A):exp() + (dt * xt):view(32, 1) * Bt
            y:select(2, t):narrow(2, (h - 1) * 32 + 1, 32):copy_((S:matmul(Ct):view(32) + D * xt):view(1, 32))
         end
      end
      local want = mixer.out_proj(y * z:silu())
      assert.is_true(H.max_abs_diff(got, want:tolist()) < 1e-5)
   end)

   it("needs the embeddings beside the hidden states in the shared block, and its scale", function()
      local blind = logits_after(function(m)
         for _, i in ipairs({ 3, 5 }) do
            local block = m.model.layers[i].shared_transf
            local forward = block.forward
            rawset(block, "forward", function(self, x, emb, ...) return forward(self, x, x, ...) end)
         end
      end)
      assert.is_true(H.max_abs_diff(blind, exp.logits) > 1e-3)
      local plain = logits_after(function(m)
         for _, i in ipairs({ 3, 5 }) do rawset(m.model.layers[i].shared_transf.self_attn, "scale", 0.25) end
      end)
      assert.is_true(H.max_abs_diff(plain, exp.logits) > 1e-3)
   end)

   it("names what is wrong in a config", function()
      local cases = {
         { { attention_hidden_size = 48 }, "attention_hidden_size 48 must be 2 x hidden_size = 64" },
         { { hidden_mamba_act = "gelu" }, 'config key "hidden_mamba_act" is "gelu" (supported: silu)' },
         { { n_mamba_heads = 3 }, "the mixer's width 64 (mamba_expand x hidden_size) is not a multiple of n_mamba_heads 3" },
         { { mamba_dt_rank = "big" }, 'config key "mamba_dt_rank" must be "auto" or an integer >= 1, got big' },
         { { num_key_value_heads = 3 }, "num_attention_heads 4 is not a multiple of num_key_value_heads 3" },
         { { layers_block_type = { "mamba", "hybrid", "mamba" } }, 'config key "layers_block_type" must list 6 layer types' },
         { { attn_layer_offset = -1 }, 'config key "attn_layer_offset"' },
      }
      for _, c in ipairs(cases) do H.assert_config_fails(zamba.zamba_config, dir, c[1], c[2]) end
   end)

   it("places the hybrid layers as ZambaConfig does without layers_block_type: the third, then by the period", function()
      local raw = H.read_json(dir .. "/config.json")
      raw.layers_block_type = nil
      assert.are.same({ 3, 5 }, zamba.zamba_config(raw).hybrid_layers)
      for _, k in ipairs({ "num_hidden_layers", "attn_layer_period", "attn_layer_offset" }) do raw[k] = nil end
      local cfg = zamba.zamba_config(raw)                          -- Zamba-7B-v1's 76 layers: 13 hybrid
      assert.are.equal(13, #cfg.hybrid_layers)
      assert.are.same({ 3, 8, 14 }, { cfg.hybrid_layers[1], cfg.hybrid_layers[2], cfg.hybrid_layers[3] })
   end)
end)
