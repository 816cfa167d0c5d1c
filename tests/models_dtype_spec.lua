-- from_pretrained's dtype: "auto" (the default, as transformers 5) takes the checkpoint's own, so a
-- bfloat16 checkpoint stays bfloat16 and its weights stay views of the file; rotary frequencies
-- stay float32 through dtype conversions, as transformers builds them.
local ml = require("moonload")
local models = require("moonload.models")
local cjson = require("cjson")
local H = require("models_helpers")

local function q_weight(model) return model.model.layers[1].self_attn.q_proj.weight end

-- A copy of a fixture folder with config.json's dtype set (nil: removed).
local function with_config_dtype(name, dtype)
   local dir = H.tmpdir()
   local cfg = H.read_json(H.FIX .. "/" .. name .. "/config.json")
   cfg.dtype, cfg.torch_dtype = dtype, nil
   H.write(dir .. "/config.json", cjson.encode(cfg))
   H.copy(H.FIX .. "/" .. name .. "/model.safetensors", dir .. "/model.safetensors")
   return dir
end

describe("from_pretrained dtype", function()
   H.collect_warnings()

   it("keeps a bfloat16 checkpoint in bfloat16, read in place, with transformers' logits and tokens", function()
      local exp = H.expected("llama_tiny_bf16")
      collectgarbage()
      local before = ml.memory_allocated("cpu")
      local model = models.from_pretrained(H.FIX .. "/llama_tiny_bf16")
      assert.are.equal("bfloat16", q_weight(model).dtype)
      assert.are.equal("float32", model.model.rotary_emb.inv_freq.dtype)
      assert.is_true(ml.memory_allocated("cpu") - before < 4096, "the weights were copied")
      local logits = model(ml.tensor(exp.input_ids, { dtype = "int64" })):float()
      local ref = ml.tensor(exp.logits)
      -- bfloat16 arithmetic: within a tenth of the largest logit (it is 0.08 here)
      assert.is_true((logits - ref):abs():max():item() < 0.1 * ref:abs():max():item())
      assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      -- the same through a device map
      local mapped = models.from_pretrained(H.FIX .. "/llama_tiny_bf16", { device_map = "auto", max_memory = { cpu = "1GB" } })
      assert.are.equal("bfloat16", q_weight(mapped).dtype)
      assert.are.same(exp.greedy_ids[1], mapped:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)

   it("converts when asked, and without a config dtype takes the checkpoint's", function()
      local model = models.from_pretrained(H.FIX .. "/llama_tiny_bf16", { dtype = "float32" })
      assert.are.equal("float32", q_weight(model).dtype)
      local dir = with_config_dtype("llama_tiny_bf16", nil)
      assert.are.equal("bfloat16", q_weight(models.from_pretrained(dir)).dtype)
      H.rmdir(dir)
      -- a float32 fixture says float32
      assert.are.equal("float32", q_weight(models.from_pretrained(H.FIX .. "/mistral_tiny")).dtype)
   end)

   it("names a config dtype that is not a floating one", function()
      local dir = with_config_dtype("llama_tiny_bf16", "int8")
      local ok, err = pcall(models.from_pretrained, dir)
      H.rmdir(dir)
      assert.is_false(ok)
      assert.truthy(err:find('from_pretrained: dtype "int8" in', 1, true), err)
   end)

   it("Module:to leaves the buffers a class keeps in float32", function()
      local model = models.from_pretrained(H.FIX .. "/mistral_tiny")
      model:to("bfloat16")
      assert.are.equal("bfloat16", q_weight(model).dtype)
      assert.are.equal("float32", model.model.rotary_emb.inv_freq.dtype)
      model:to("float16")
      assert.are.equal("float32", model.model.rotary_emb.inv_freq.dtype)
   end)
end)
