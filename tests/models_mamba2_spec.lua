-- ml.models Mamba-2 language model (Mamba2ForCausalLM: every layer a norm and a Mamba-2 mixer, the
-- residual in float32; models/mamba2.lua) against transformers (tests/fixtures/gen_models.py mamba2):
-- names, logits, greedy ids, decoding token by token through the mixers' carried conv inputs and
-- states, padded batches, block schedules, offload, the tied head, the older embedding name, and bad
-- configs.
local ml = require("moonload")
local models = require("moonload.models")
local mamba2 = require("moonload.models.mamba2")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "mamba2_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.mamba2 (tests/fixtures/models/mamba2_tiny: 3 mixer layers, an untied head)", function()
   H.collect_warnings()
   local exp = H.expected(NAME)
   local model = models.from_pretrained(DIR)

   it("builds Mamba2ForCausalLM with every tensor of the checkpoint, under its backbone.* names", function()
      assert.are.equal("Mamba2ForCausalLM", model.__name)
      local want = H.sorted_keys(ml.safetensors.load_file(DIR .. "/model.safetensors"))
      assert.are.same(want, H.sorted_keys((model:state_dict())))
      for i = 1, 3 do
         assert.are.equal("Mamba2Block", model.backbone.layers[i].__name)
         assert.are.same({ H = 4, P = 16, G = 2, N = 8, width = 64, conv_dim = 96, taps = 4, limit = { 0, math.huge } },
            model.backbone.layers[i].mixer.geometry)
      end
      assert.are_not.equal(model.backbone.embeddings.weight, model.lm_head.weight)
   end)

   H.it_matches_expected(model, NAME)

   it("carries each mixer's last conv inputs and float32 state in the cache, which cannot be cropped", function()
      local ids = exp.input_ids[1]
      local cache = model:new_cache()
      local out = { model({ { ids[1], ids[2], ids[3], ids[4] } }, { cache = cache }) }
      for i = 5, #ids do out[#out + 1] = model({ { ids[i] } }, { cache = cache }) end
      assert.is_true(H.max_abs_diff(ml.cat(out, 2), { exp.logits[1] }) < TOL)
      for i = 1, 3 do
         assert.are.same({ 1, 3, 96 }, cache.states[i].conv.shape)
         assert.are.same({ 1, 4, 16, 8 }, cache.states[i].recurrent.shape)
         assert.are.equal("float32", cache.states[i].recurrent.dtype)
      end
      assert.are.equal(#ids, cache.length)                 -- (advanced without any attention layer)
      assert.is_false(cache:can_crop(#ids - 1))
   end)

   H.it_matches_padded(model, NAME, "zeroes padding before the mixers")

   H.it_runs_stateful(model, NAME, H.alternating_layers("backbone", 3, { ["backbone.embeddings"] = "cpu",
      ["backbone.norm_f"] = "disk", lm_head = "cpu" }))

   it("keeps the residual stream in float32 under bfloat16 weights (residual_in_fp32)", function()
      local m = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local x = m.backbone.embeddings(ml.tensor({ { 1, 7, 9 } }, { dtype = "int64" }))
      assert.are.equal("bfloat16", x.dtype)
      local h = m.backbone.layers[1](x)
      assert.are.equal("float32", h.dtype)
      assert.are.equal("float32", m.backbone.layers[2](h).dtype)
      assert.are.equal("bfloat16", m.backbone.norm_f(h).dtype)             -- (normalized in float32)
      local raw = H.read_json(DIR .. "/config.json")
      raw.residual_in_fp32 = false
      local cfg = mamba2.config(raw)
      local plain = mamba2.Mamba2ForCausalLM(cfg):to("bfloat16")
      assert.are.equal("bfloat16", plain.backbone.layers[1](x).dtype)
   end)

   it("loads the older name of the embedding (backbone.embedding.weight) as transformers does", function()
      local dir = H.tmpdir()
      local tensors = ml.safetensors.load_file(DIR .. "/model.safetensors")
      tensors["backbone.embedding.weight"], tensors["backbone.embeddings.weight"] = tensors["backbone.embeddings.weight"], nil
      ml.safetensors.save_file(tensors, dir .. "/model.safetensors", { format = "pt" })
      H.copy(DIR .. "/config.json", dir .. "/config.json")
      local m = models.from_pretrained(dir)
      assert.is_true(H.max_abs_diff(m(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("names what is wrong in a config", function()
      local cases = {
         { { num_heads = 2 }, "num_heads 2 x head_dim 16 must equal expand 2 x hidden_size 32" },
         { { expand = 4 }, "num_heads 4 x head_dim 16 must equal expand 4 x hidden_size 32" },
         { { n_groups = 3 }, "num_heads 4 is not a multiple of n_groups 3" },
         { { hidden_act = "gelu" }, 'config key "hidden_act" is "gelu" (supported: silu' },
         { { state_size = 0 }, 'config key "state_size" in config table must be a positive integer, got number 0' },
         { { use_bias = "no" }, 'config key "use_bias" in config table must be a boolean, got string "no"' },
         { { layer_norm_epsilon = 0 }, 'config key "layer_norm_epsilon" in config table must be a positive number' },
         { { time_step_limit = { 2, 1 } }, 'config key "time_step_limit" must be [min, max] with min <= max, got [2, 1]' },
      }
      for _, c in ipairs(cases) do H.assert_config_fails(mamba2.config, DIR, c[1], c[2]) end
   end)
end)

describe("models.mamba2 (tests/fixtures/models/mamba2_tiny_tied: a tied head, biased projections, one group)", function()
   H.collect_warnings()
   local name = "mamba2_tiny_tied"
   local dir = H.FIX .. "/" .. name
   local model = models.from_pretrained(dir)

   it("ties the head to the embedding and holds the projections' biases", function()
      local want = H.sorted_keys(ml.safetensors.load_file(dir .. "/model.safetensors"))
      want[#want + 1] = "lm_head.weight"                   -- (tied: not in the file)
      table.sort(want)
      assert.are.same(want, H.sorted_keys((model:state_dict())))
      assert.are.equal(model.backbone.embeddings.weight, model.lm_head.weight)
      assert.is_not_nil(model.backbone.layers[1].mixer.in_proj.bias)
      assert.are.equal(1, model.backbone.layers[1].mixer.geometry.G)
   end)

   H.it_matches_expected(model, name)
end)

describe("examples/hybrid.lua on a Mamba-2 folder", function()
   it("names every layer a mixer and keeps only their states", function()
      local dir = H.FIX .. "/mamba2_tiny"
      local p = assert(io.popen("luajit examples/hybrid.lua " .. dir .. " 2>/dev/null"))
      local text = p:read("*a")
      p:close()
      assert.truthy(text:find("layers: mamba mamba mamba", 1, true), text)
      local want = models.from_pretrained(dir, { dtype = "bfloat16" }):generate({ 1, 5, 17, 42, 3 },
         { max_new_tokens = 16, eos_token_id = false })
      assert.are.same({ unpack(want, 6) }, H.printed_ids(text))
      assert.truthy(text:find("cache: [%d.]+ KB of fixed%-size state %+ 0%.0 KB of keys and values\n"), text)
   end)
end)
