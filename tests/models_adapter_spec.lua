-- LoRA adapters saved by peft (models/adapter.lua, nn.LoraLinear) against peft's own logits
-- (tests/fixtures/gen_lora.py): wrapped and merged, on a Llama with modules_to_save and an
-- alpha_pattern and on GPT-2's Conv1D with rank-stabilized scaling; over int8 and int4 layers,
-- offloaded layers and a GPU; and the errors for what is not read.
local ml = require("moonload")
local F = ml.nn.F
local H = require("models_helpers")
local cjson = require("cjson")

local LORA = "tests/fixtures/lora/"
local TOL = 1e-4

local function expected(name) return H.read_json(LORA .. name .. "/expected.json") end
local function base_of(exp) return H.FIX .. "/" .. exp.base end
local function rel(a, b) return ((a - b):abs():max() / b:abs():max()):item() end

describe("LoRA adapters (peft)", function()
   H.collect_warnings()

   for _, name in ipairs({ "llama_lora", "gpt2_lora" }) do
      it(name .. ": gives peft's logits and greedy ids, wrapped and merged", function()
         local exp = expected(name)
         local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
         local model = ml.models.from_pretrained(base_of(exp))
         assert.is_true(H.max_abs_diff(model(ids), exp.base_logits) < TOL)
         local _, report = ml.models.load_adapter(model, LORA .. name)
         assert.is_true(H.max_abs_diff(model(ids), exp.logits) < TOL)
         assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens,
            eos_token_id = false }))
         assert.are.equal(name == "llama_lora" and 6 or 4, #report.adapted)
         assert.are.equal("LoraLinear", model:get_submodule(report.adapted[1]).__name)
         -- merged: the float weights take the adapter, no wrapper is left
         local merged, mreport = ml.models.from_pretrained(base_of(exp), { adapter = LORA .. name, merge_adapter = true }), nil
         assert.is_true(H.max_abs_diff(merged(ids), exp.merged_logits) < TOL)
         for _, m in ipairs(merged:modules_list()) do assert.are_not.equal("LoraLinear", m.__name) end
         _, mreport = ml.models.load_adapter(ml.models.from_pretrained(base_of(exp)), LORA .. name, { merge = true })
         assert.are.equal(#report.adapted, #mreport.merged)
      end)
   end

   it("reads alpha_pattern, modules_to_save and rank-stabilized scaling from the config", function()
      local model = ml.models.from_pretrained(base_of(expected("llama_lora")))
      local _, report = ml.models.load_adapter(model, LORA .. "llama_lora")
      assert.are.same({ "lm_head.weight" }, report.replaced)
      assert.are.equal(8 / 4, model.model.layers[1].self_attn.v_proj.scaling)
      assert.are.equal(2 / 4, model.model.layers[2].self_attn.v_proj.scaling)   -- its alpha_pattern entry
      local gpt2 = ml.models.from_pretrained(base_of(expected("gpt2_lora")))
      ml.models.load_adapter(gpt2, LORA .. "gpt2_lora")
      assert.are.equal(4 / math.sqrt(8), gpt2.transformer.h[1].attn.c_attn.scaling)
      local repr = tostring(gpt2.transformer.h[1].attn.c_attn)
      assert.truthy(repr:find("in_features=32, out_features=96, r=8, scaling=1.41421", 1, true), repr)
      assert.truthy(repr:find("(base_layer): Conv1D(nf=96, nx=32)", 1, true), repr)
   end)

   it("adds the adapter to int8 and int4 layers as they compute (QLoRA)", function()
      ml.manual_seed(4)
      -- one layer: the quantized layer's output plus the low-rank product, exactly
      local base = ml.nn.Linear(64, 24)
      local A, B = ml.randn(4, 64), ml.randn(24, 4)
      local x = ml.randn(3, 64)
      for _, bits in ipairs({ 8, 4 }) do
         local q = ml.nn.QuantizedLinear.from_float(base, bits)
         local want = q(x) + F.linear(F.linear(x, A), B) * 0.5
         local lora = ml.nn.LoraLinear(q, A, B, 0.5)
         assert.is_true(rel(lora(x), want) < 1e-5)
      end
      -- whole models: merge keeps the quantized layers wrapped; the trained lm_head (a float
      -- weight in the file) is quantized again to the layer's width; with int8 the logits stay
      -- close to peft's float ones (int4 moves this tiny random model's by half their range)
      local exp = expected("llama_lora")
      local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
      for _, q in ipairs({ "int8", "int4" }) do
         local model = ml.models.from_pretrained(base_of(exp), { quantize = q })
         local _, report = ml.models.load_adapter(model, LORA .. "llama_lora", { merge = true })
         assert.are.equal(0, #report.merged)
         assert.are.equal(6, #report.adapted)
         assert.are.equal("QuantizedLinear weights (kept beside them)", report.kept["model.layers.0.self_attn.q_proj"])
         assert.are.equal(q == "int8" and "int8" or "uint8", model.lm_head.weight.dtype)
         if q == "int8" then assert.is_true(rel(model(ids), ml.tensor(exp.logits)) < 0.05) end
      end
   end)

   it("adapts offloaded layers and replaces an offloaded lm_head through its hook", function()
      local exp = expected("llama_lora")
      local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
      local dir = H.tmpdir()
      local model = ml.models.from_pretrained(base_of(exp), { offload_folder = dir, device_map = {
         ["model.embed_tokens"] = "cpu", ["model.layers.0"] = "disk", ["model.layers.1"] = "cpu",
         ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "disk" } })
      assert.is_true(model.lm_head.weight:is_meta())
      local _, report = ml.models.load_adapter(model, LORA .. "llama_lora", { merge = true })
      assert.are.equal("offloaded (its weights come through its hook)", report.kept["model.layers.0.mlp.down_proj"])
      assert.is_true(model.lm_head.weight:is_meta())                    -- still read through its hook
      assert.is_true(H.max_abs_diff(model(ids), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("runs under cpu_offload put on after it, and in bfloat16", function()
      local exp = expected("llama_lora")
      local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
      local model = ml.models.from_pretrained(base_of(exp), { adapter = LORA .. "llama_lora" })
      ml.cpu_offload(model, { execution_device = "cpu" })
      assert.is_true(model.model.layers[1].self_attn.q_proj.lora_A.weight:is_meta())     -- brought by its hook
      assert.is_true(H.max_abs_diff(model(ids), exp.logits) < TOL)
      local bf = ml.models.from_pretrained(base_of(exp), { adapter = LORA .. "llama_lora" }):to("bfloat16")
      assert.is_true(rel(bf(ids):to("float32"), ml.tensor(exp.logits)) < 0.06)     -- (the base alone: 0.026)
   end)

   it("is saved by save_model merged into the weights, as a plain checkpoint", function()
      for _, name in ipairs({ "llama_lora", "gpt2_lora" }) do
         local exp = expected(name)
         local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
         local out = H.tmpdir()
         ml.save_model(ml.models.from_pretrained(base_of(exp), { adapter = LORA .. name }), out)
         local back = ml.models.from_pretrained(out)                 -- (strict: every name is the base's)
         assert.is_true(H.max_abs_diff(back(ids), exp.merged_logits) < TOL, name)
         H.rmdir(out)
      end
      local q = ml.models.from_pretrained(base_of(expected("llama_lora")), { quantize = "int8", adapter = LORA .. "llama_lora" })
      local ok, err = pcall(ml.save_model, q, "/tmp/never")
      assert.is_false(ok)
      assert.truthy(err:find('save_model: "model.layers.0.self_attn.q_proj" has a LoRA adapter over QuantizedLinear weights, which cannot be merged', 1, true), err)
   end)

   it("names what it does not read and what does not fit", function()
      local llama = function() return ml.models.from_pretrained(base_of(expected("llama_lora"))) end
      local dir = H.tmpdir()
      local function adapter_with(cfg_changes)
         local f = io.open(LORA .. "llama_lora/adapter_config.json", "rb")
         local cfg = cjson.decode(f:read("*a"))
         f:close()
         for k, v in pairs(cfg_changes) do cfg[k] = v end
         f = io.open(dir .. "/adapter_config.json", "wb")
         f:write(cjson.encode(cfg))
         f:close()
         H.copy(LORA .. "llama_lora/adapter_model.safetensors", dir .. "/adapter_model.safetensors")
         return dir
      end
      local cases = {
         { function() ml.models.load_adapter(llama(), "tests/fixtures/models") end,
           "load_adapter: no adapter_config.json in tests/fixtures/models" },
         { function() ml.models.load_adapter(llama(), adapter_with({ peft_type = "PREFIX_TUNING" })) end,
           'adapter_config.json has peft_type "PREFIX_TUNING"; only LoRA adapters ("LORA") are read' },
         { function() ml.models.load_adapter(llama(), adapter_with({ peft_type = "LORA", use_dora = true })) end,
           "adapter_config.json uses use_dora (DoRA's magnitude vectors), which moonload does not read" },
         { function() ml.models.load_adapter(llama(), adapter_with({ use_dora = false, bias = "all" })) end,
           'uses bias "all" (trained biases), which moonload does not read' },
         { function() ml.models.load_adapter(llama(), LORA .. "gpt2_lora") end,
           'has LoRA weights for "transformer.h.0.attn.c_attn", which is not a module of the model' },
         { function() ml.models.load_adapter(ml.models.from_pretrained(H.FIX .. "/qwen3_tiny"), LORA .. "llama_lora") end,
           'load_adapter: "model.layers.0.self_attn.q_proj": lora_A [4, 32] and lora_B [32, 4] do not fit a layer of 32 -> 64 features' },
         { function() ml.models.load_adapter(llama(), LORA .. "llama_lora", { merged = true }) end,
           'load_adapter: unknown option "merged" (expected merge)' },
         { function() ml.models.from_pretrained(base_of(expected("llama_lora")), { adapter = 3 }) end,
           "from_pretrained: adapter must be the folder of a peft LoRA adapter, got number" },
      }
      for _, c in ipairs(cases) do
         local ok, err = pcall(c[1])
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[2], 1, true), tostring(err))
      end
      -- a failed load leaves the model as it was
      local model = llama()
      local before = model(ml.tensor({ { 1, 2, 3 } }, { dtype = "int64" }))
      local f = io.open(dir .. "/adapter_config.json", "wb")
      f:write(cjson.encode({ peft_type = "LORA", lora_alpha = 8, r = 4 }))
      f:close()
      local st = ml.safetensors.load_file(LORA .. "llama_lora/adapter_model.safetensors")
      st["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"] = ml.zeros(31, 4)
      ml.safetensors.save_file(st, dir .. "/adapter_model.safetensors")
      assert.has_error(function() ml.models.load_adapter(model, dir) end)
      assert.are.equal("Linear", model.model.layers[1].self_attn.q_proj.__name)
      assert.is_true(ml.equal(model(ml.tensor({ { 1, 2, 3 } }, { dtype = "int64" })), before))
      H.rmdir(dir)
   end)
end)

describe("LoRA adapters on cuda #cuda", function()
   H.collect_warnings()
   it("puts the adapter where each layer computes, and gives the CPU's logits over cuda:0 + cpu + disk", function()
      local exp = expected("llama_lora")
      local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
      local dir = H.tmpdir()
      local model = ml.models.from_pretrained(base_of(exp), { offload_folder = dir, adapter = LORA .. "llama_lora",
         device_map = { ["model.embed_tokens"] = 0, ["model.layers.0"] = 0, ["model.layers.1"] = "cpu",
            ["model.norm"] = 0, ["model.rotary_emb"] = 0, lm_head = "disk" } })
      assert.are.equal("cuda:0", model.model.layers[1].self_attn.q_proj.lora_A.weight.device)
      assert.is_true(rel(model(ids:to("cuda:0")):to("cpu"), ml.tensor(exp.logits)) < 1e-4)
      H.rmdir(dir)
   end)
end)
