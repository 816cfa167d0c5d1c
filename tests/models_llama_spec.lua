-- ml.models Llama: Hugging Face names, tied and untied heads, grouped-query attention, rotary
-- embeddings; logits and greedy generation against transformers (tests/fixtures/gen_models.py).
local ml = require("moonload")
local models = require("moonload.models")
local llama = require("moonload.models.llama")
local H = require("models_helpers")

local TOL = 1e-4

local function tiny(over)
   local c = { vocab_size = 50, hidden_size = 16, intermediate_size = 32, num_hidden_layers = 1,
      num_attention_heads = 4, num_key_value_heads = 2 }
   for k, v in pairs(over or {}) do c[k] = v end
   return c
end

describe("models.llama", function()
   describe("tied head (tests/fixtures/models/llama_tiny_tied)", function()
      local exp = H.expected("llama_tiny_tied")
      local model = models.from_pretrained(H.FIX .. "/llama_tiny_tied")

      it("uses transformers' parameter names and grouped-query projection shapes", function()
         local names = H.param_names(model)
         assert.are.same({
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
         }, { unpack(names, 1, 10) })
         assert.are.equal("model.norm.weight", names[#names])
         local attn = model.model.layers[1].self_attn
         assert.are.same({ 32, 32 }, attn.q_proj.weight.shape)
         assert.are.same({ 16, 32 }, attn.k_proj.weight.shape)
         assert.are.same({ 16, 32 }, attn.v_proj.weight.shape)
      end)

      it("ties lm_head.weight to model.embed_tokens.weight", function()
         assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      end)

      it("keeps inv_freq as a non-persistent buffer (not in state_dict)", function()
         local sd = model:state_dict()
         assert.is_nil(sd["model.rotary_emb.inv_freq"])
         local inv = model:get_buffer("model.rotary_emb.inv_freq"):tolist()
         assert.are.equal(4, #inv)
         assert.is_true(math.abs(inv[1] - 1) < 1e-7)
         assert.is_true(math.abs(inv[2] - 10000 ^ (-2 / 8)) < 1e-6)
      end)

      it("gives the same logits as transformers (within 1e-4)", function()
         local logits = model(ml.tensor(exp.input_ids, { dtype = "int64" }))
         assert.are.same({ 1, 10, 100 }, logits.shape)
         assert.is_true(H.max_abs_diff(logits, exp.logits) < TOL)
      end)

      it("generates greedily token for token", function()
         local out = model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false })
         assert.are.same(exp.greedy_ids[1], out)
      end)
   end)

   describe("untied head, sharded checkpoint (tests/fixtures/models/llama_tiny_untied)", function()
      local exp = H.expected("llama_tiny_untied")
      local model = models.from_pretrained(H.FIX .. "/llama_tiny_untied")

      it("keeps lm_head separate and reads rope_theta from rope_parameters", function()
         assert.are_not.equal(model.model.embed_tokens.weight, model.lm_head.weight)
         assert.is_false(model.model.embed_tokens.weight:equal(model.lm_head.weight))
         assert.are.equal(500000, model.config.rope_theta)
         assert.are.equal(1e-5, model.config.rms_norm_eps)
      end)

      it("gives the same logits as transformers (batch of 2, within 1e-4)", function()
         local logits = model(ml.tensor(exp.input_ids, { dtype = "int64" }))
         assert.are.same({ 2, 7, 100 }, logits.shape)
         assert.is_true(H.max_abs_diff(logits, exp.logits) < TOL)
      end)

      it("generates greedily token for token (batch of 2, nested lists)", function()
         local out = model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false })
         assert.are.same(exp.greedy_ids, out)
      end)

      it("decodes with the cache to the same logits as a full forward", function()
         local ids = exp.input_ids[2]
         local full = model(ids)
         local cache = model:new_cache()
         model({ ids[1], ids[2], ids[3], ids[4] }, { cache = cache })
         local b = model({ ids[5], ids[6] }, { cache = cache })
         local c = model({ ids[7] }, { cache = cache })
         assert.is_true(H.max_abs_diff(b, full:narrow(2, 5, 2):tolist()) < 1e-5)
         assert.is_true(H.max_abs_diff(c, full:narrow(2, 7, 1):tolist()) < 1e-5)
      end)

      it("generates transformers' greedy ids for a left-padded batch", function()
         local pad = H.read_json(H.FIX .. "/llama_tiny_untied/padded.json")
         local logits = model(pad.input_ids, { attention_mask = pad.attention_mask })
         assert.is_true(H.max_abs_diff(logits:select(1, 2), pad.logits[2]) < TOL)
         assert.is_true(H.max_abs_diff(logits:select(1, 1):narrow(1, 3, 4),
            { pad.logits[1][3], pad.logits[1][4], pad.logits[1][5], pad.logits[1][6] }) < TOL)
         local out = model:generate(pad.input_ids, { attention_mask = pad.attention_mask,
            max_new_tokens = pad.max_new_tokens, eos_token_id = false })
         assert.are.same(pad.greedy_ids, out)
      end)

      it("samples reproducibly with a seed", function()
         local o = { max_new_tokens = 6, temperature = 0.7, top_k = 5, seed = 11 }
         assert.are.same(model:generate({ 1, 2 }, o), model:generate({ 1, 2 }, o))
      end)
   end)

   for _, variant in ipairs({ "llama_tiny_llama3", "llama_tiny_linear" }) do
      describe("scaled rotary embeddings (" .. variant .. ")", function()
         local exp = H.expected(variant)
         local model = llama.LlamaForCausalLM(H.FIX .. "/" .. variant)
         models.load_checkpoint(model, H.FIX .. "/llama_tiny_tied/model.safetensors")

         it("computes transformers' inv_freq", function()
            assert.is_true(H.max_abs_diff(model:get_buffer("model.rotary_emb.inv_freq"), exp.inv_freq) < 1e-9)
         end)

         it("gives the same logits and greedy ids as transformers", function()
            assert.is_true(H.max_abs_diff(model(exp.input_ids), exp.logits) < TOL)
            assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
         end)
      end)
   end

   describe("config", function()
      it("accepts the older top-level rope_theta and defaults num_key_value_heads", function()
         local c = tiny({ rope_theta = 1000 })
         c.num_key_value_heads = nil
         local m = llama.LlamaForCausalLM(c)
         assert.are.equal(1000, m.config.rope_theta)
         assert.are.equal(4, m.config.num_key_value_heads)
         assert.are.same({ 16, 16 }, m.model.layers[1].self_attn.k_proj.weight.shape)
         assert.are_not.equal(m.model.embed_tokens.weight, m.lm_head.weight)
      end)

      it("rejects heads that do not group, unsupported rope types and bad keys", function()
         assert.has_error(function() llama.LlamaForCausalLM(tiny({ num_key_value_heads = 3 })) end,
            "models.llama: num_attention_heads 4 is not a multiple of num_key_value_heads 3 in config table")
         assert.has_error(function()
            llama.LlamaForCausalLM(tiny({ rope_parameters = { rope_type = "dynamic", rope_theta = 1e4 } }))
         end, 'models.llama: rope type "dynamic" is not supported (supported: default, linear, llama3, longrope, yarn) in config table')
         assert.has_error(function() llama.LlamaForCausalLM(tiny({ hidden_size = false })) end,
            'models.llama: config key "hidden_size" in config table must be a positive integer, got boolean false')
         assert.has_error(function() llama.LlamaForCausalLM(tiny({ hidden_act = "swiglu" })) end,
            'models.llama: activation "swiglu" in config table is not supported (supported: gelu, gelu_fast, gelu_new, gelu_pytorch_tanh, relu, relu2, silu, swish, tanh, xielu)')
      end)

      it("reads the older rope_scaling form and names missing rope keys", function()
         local c = tiny({ rope_theta = 500000, rope_scaling = { rope_type = "llama3", factor = 8,
            low_freq_factor = 1, high_freq_factor = 4, original_max_position_embeddings = 8192 } })
         local m = llama.LlamaForCausalLM(c)
         assert.are.equal("llama3", m.config.rope.rope_type)
         assert.are.equal(500000, m.config.rope.rope_theta)
         assert.has_error(function()
            llama.LlamaForCausalLM(tiny({ rope_parameters = { rope_type = "llama3", rope_theta = 1e4, factor = 8 } }))
         end, 'models.llama: config key "rope_parameters.low_freq_factor" is missing in config table (needed by rope type "llama3")')
         assert.has_error(function()
            llama.LlamaForCausalLM(tiny({ rope_scaling = { type = "linear", factor = "2" } }))
         end, 'models.llama: config key "rope_scaling.factor" in config table must be a positive number, got string "2"')
      end)

      it("names the missing key and the file", function()
         local dir = H.tmpdir()
         H.write(dir .. "/config.json", '{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}')
         assert.has_error(function() llama.LlamaForCausalLM(dir) end,
            'models.llama: config key "intermediate_size" is missing in ' .. dir .. "/config.json")
         H.rmdir(dir)
      end)
   end)
end)
