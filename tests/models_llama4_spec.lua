-- ml.models Llama 4 (rotary layers turning neighbouring pairs with q/k norms after and attention
-- inside chunks, NoPE layers with a query temperature, a shared expert beside stacked experts fed
-- their router's weight) against transformers (tests/fixtures/gen_models.py llama4): names,
-- logits, greedy ids, padded batches, decoding across chunks, each feature's own effect, configs.
local ml = require("moonload")
local models = require("moonload.models")
local llama4 = require("moonload.models.llama4")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "llama4_tiny"
local DIR = H.FIX .. "/" .. NAME

local function tiny(over)
   local cfg = H.read_json(DIR .. "/config.json")
   for k, v in pairs(over or {}) do cfg[k] = v end
   return cfg
end

-- fn(model) changed something; the logits of the fixture's prompts then (the model is loaded afresh)
local function logits_with(fn)
   local exp = H.expected(NAME)
   local m = models.from_pretrained(DIR)
   fn(m)
   return m(ml.tensor(exp.input_ids, { dtype = "int64" }))
end

describe("models.llama4 (tests/fixtures/models/llama4_tiny: chunks of 4, a NoPE 4th layer, 4 experts, top 1)", function()
   H.collect_warnings()
   local exp = H.expected(NAME)
   local model = models.from_pretrained(DIR)

   it("builds Llama4ForCausalLM with every tensor of the checkpoint, under the hub's names", function()
      assert.are.equal("Llama4ForCausalLM", model.__name)
      assert.are.same(H.sorted_keys(ml.safetensors.load_file(DIR .. "/model.safetensors")), H.sorted_keys((model:state_dict())))
      assert.are.same({ "Llama4TextDecoderLayer" }, model.no_split_modules)
      local cfg = model.config
      assert.are.same({ false, false, false, true }, cfg.nope_layers)         -- every 4th layer NoPE
      assert.are.same({ 4, 4, 4, false }, cfg.layer_chunks)
      assert.are.same({ false, true, false, true }, cfg.sparse_layers)       -- interleave_moe_layer_step 2
      local ff = model.model.layers[2].feed_forward
      assert.are.equal("Llama4TextMoe", ff.__name)
      assert.are.same({ 4, 32, 32 }, ff.experts.gate_up_proj.shape)           -- (E, hidden, 2 x inter)
      assert.are.same({ 4, 16, 32 }, ff.experts.down_proj.shape)
      assert.are.same({ 48, 32 }, model.model.layers[1].feed_forward.gate_proj.weight.shape)   -- intermediate_size_mlp
   end)

   it("gives transformers' logits and greedy ids", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)

   H.it_matches_padded(model, NAME, "chunks, positions and the NoPE temperature")

   it("decodes token by token through the cache, across chunks, as one forward over the whole", function()
      local ids = exp.greedy_ids[1]                                          -- 18 tokens: 5 chunks of 4
      local whole = model({ ids })
      for _, first in ipairs({ 1, 3, 4, 9 }) do
         assert.is_true(H.max_abs_diff(H.decoded_logits(model, ids, first), whole:tolist()) < TOL, "prompt " .. first)
      end
   end)

   it("needs each of its features: without one, other logits", function()
      local want = exp.logits
      local function differs(what, fn) assert.is_true(H.max_abs_diff(logits_with(fn), want) > 1e-3, what) end
      differs("chunks", function(m)
         for _, layer in ipairs(m.model.layers) do rawset(layer.self_attn, "chunk", nil) end
      end)
      differs("NoPE temperature", function(m) rawset(m.model.layers[4].self_attn, "temperature", false) end)
      differs("q/k norms", function(m)
         for _, layer in ipairs(m.model.layers) do rawset(layer.self_attn, "qk_norm_eps", nil) end
      end)
      differs("neighbouring pairs", function(m)
         for _, layer in ipairs(m.model.layers) do rawset(layer.self_attn, "deinterleave", function(_, x) return x end) end
      end)
      differs("experts weighted on the way in", function(m)
         for _, i in ipairs({ 2, 4 }) do
            local experts = m.model.layers[i].feed_forward.experts
            rawset(experts, "forward", function(self, flat, w, idx)
               return require("moonload.models.moe").run_expert_method(self, flat, w, idx)
            end)
         end
      end)
   end)

   it("runs only each token's chosen expert, and quantized (experts apart) still weighs them on the way in", function()
      local experts = model.model.layers[2].feed_forward.experts
      assert.are.equal(1, #H.experts_run(experts, function() model({ { 5 } }) end))
      -- the experts alone quantized (the rest of this tiny model amplifies int8's error)
      local q = ml.quantize(models.from_pretrained(DIR), { dtype = "int8",
         skip = { "self_attn", "shared_expert", "router", "lm_head", "layers%.[02]%." } })
      assert.are.equal("ModuleList", q.model.layers[2].feed_forward.experts.__name)
      assert.are.equal("QuantizedLinear", q.model.layers[2].feed_forward.experts[1].gate_proj.__name)
      local got = q(ml.tensor(exp.input_ids, { dtype = "int64" }))
      local ref = model(ml.tensor(exp.input_ids, { dtype = "int64" }))
      assert.is_true(((got - ref):abs():max() / ref:abs():max()):item() < 0.02)
   end)

   it("masks chunks from each row's first real token, as transformers' chunked_overlay", function()
      -- 6 slots, chunks of 2; row 1 has 1 padding slot, so its chunks are {1, 2}, {3, 4}, {5}
      local pad = ml.tensor({ { 0, 1, 1, 1, 1, 1 }, { 1, 1, 1, 1, 1, 1 } }, { dtype = "bool" })
      local mask = llama4.chunk_mask(6, 6, 0, 2, pad, "cpu"):tolist()
      assert.are.same({ false, true, true, false, false, false }, mask[1][1][3])      -- slot 2 sees 1 and 2
      assert.are.same({ false, false, false, true, false, false }, mask[1][1][4])     -- slot 3 opens a chunk
      assert.are.same({ false, false, true, true, false, false }, mask[2][1][4])      -- unpadded: {2, 3}
      assert.are.same({ true, false, false, false, false, false }, mask[1][1][1])     -- a padding query sees itself
      -- decoding: the query at slot 5 of an unpadded row sees slot 4 and itself
      assert.are.same({ { { { false, false, false, false, true, true } } } }, llama4.chunk_mask(1, 6, 5, 2, nil, "cpu"):tolist())
   end)

   it("reads the layer plan from no_rope_layer_interval, moe_layers and layer_types", function()
      local raw = tiny({ no_rope_layers = {}, no_rope_layer_interval = 2, moe_layers = { 0 } })
      raw.layer_types = nil
      local cfg = llama4.config(raw)
      assert.are.same({ false, true, false, true }, cfg.nope_layers)
      assert.are.same({ true, false, false, false }, cfg.sparse_layers)
      assert.are.same({ 4, false, 4, false }, cfg.layer_chunks)
      cfg = llama4.config(tiny({ layer_types = { "full_attention", "full_attention", "chunked_attention", "full_attention" } }))
      assert.are.same({ false, false, 4, false }, cfg.layer_chunks)
   end)

   it("names a bad layer list, an out-of-range MoE layer and an unknown layer type", function()
      local function fails(over, text)
         local ok, err = pcall(llama4.config, tiny(over))
         assert.is_false(ok)
         assert.truthy(tostring(err):find(text, 1, true), err)
      end
      fails({ no_rope_layers = { 1, 0 } }, 'config key "no_rope_layers" must list 4 layers')
      fails({ no_rope_layers = { 1, 2, 1, 0 } }, "no_rope_layers[2] must be 0 or 1, got 2")
      fails({ moe_layers = { 4 } }, "moe_layers names layer 4, but the model has layers 0 to 3")
      fails({ layer_types = { "full_attention", "sliding_attention", "full_attention", "full_attention" } },
         'layer_types[2] is "sliding_attention" (supported: full_attention, chunked_attention)')
      fails({ num_experts_per_tok = 5 }, "num_experts_per_tok 5 is more than num_local_experts 4")
   end)
end)

describe("hub config (Llama-4-Scout-17B-16E's config.json, built empty)", function()
   local fix = H.read_json(H.FIX .. "/llama4_hub_configs.json").scout

   it("gives transformers' parameter count, names, shapes and rotary frequencies", function()
      local c = fix.config
      c.text_config.attn_temperature_tuning = 4                 -- (as the hub's file has it)
      -- 107.77 B in the language model
      local m = H.assert_matches_skeleton(function() return llama4.Llama4ForCausalLM(c) end, fix)
      assert.is_true(H.max_abs_diff(m.model.rotary_emb.inv_freq, fix.inv_freq) < 1e-9)   -- (the file keeps 10 digits)
      assert.are.equal(fix.rope_attention_scaling, rawget(m.model.rotary_emb, "attention_scaling") or 1)
      local cfg = m.config
      assert.is_true(cfg.attn_temperature_tuning)
      assert.are.equal(8192, cfg.layer_chunks[1])
      assert.is_false(cfg.layer_chunks[4])
      for i = 1, 48 do assert.is_true(cfg.sparse_layers[i]) end
   end)
end)
