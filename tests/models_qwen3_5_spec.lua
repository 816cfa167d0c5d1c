-- ml.models Qwen3.5 (Qwen3-Next's hybrid with the linear attention's projections apart; dense, or
-- sparse with experts stacked per projection; multimodal checkpoints read for their language
-- model) against transformers (tests/fixtures/gen_models.py qwen3_5 qwen3_5_moe_multimodal):
-- names, logits, greedy ids, decoding through the cache, padded batches, stacked experts read per
-- token, offload, and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local qwen3_5 = require("moonload.models.qwen3_5")
local H = require("models_helpers")

-- (as in models_qwen3_next_spec.lua: the fixtures' hidden states reach 70, and transformers' own
-- float64 logits are 2.9e-4 from the float32 ones it wrote for the MoE; ours 4.6e-4 from float64)
local TOL = 1e-3
local DENSE, SPARSE = "qwen3_5_tiny", "qwen3_5_moe_multimodal_tiny"

local sorted_keys = H.sorted_keys

local function ids_tensor(ids) return ml.tensor(ids, { dtype = "int64" }) end

local function matches_padded(model, name)
   local pad = H.read_json(H.FIX .. "/" .. name .. "/padded.json")
   local logits = model(pad.input_ids, { attention_mask = pad.attention_mask })
   assert.is_true(H.max_abs_diff(logits:select(1, 1):narrow(1, 3, 5),
      { pad.logits[1][3], pad.logits[1][4], pad.logits[1][5], pad.logits[1][6], pad.logits[1][7] }) < TOL)
   assert.is_true(H.max_abs_diff(logits:select(1, 2), pad.logits[2]) < TOL)
   assert.are.same(pad.greedy_ids, model:generate(pad.input_ids, { attention_mask = pad.attention_mask,
      max_new_tokens = pad.max_new_tokens, eos_token_id = false }))
end

describe("models.qwen3_5 dense (tests/fixtures/models/qwen3_5_tiny: Qwen3_5ForCausalLM)", function()
   local exp = H.expected(DENSE)
   local model = models.from_pretrained(H.FIX .. "/" .. DENSE)

   it("builds Qwen3_5ForCausalLM with every tensor of the checkpoint, under its names", function()
      assert.are.equal("Qwen3_5ForCausalLM", model.__name)
      assert.are.same(sorted_keys(ml.safetensors.load_file(H.FIX .. "/" .. DENSE .. "/model.safetensors")),
         sorted_keys((model:state_dict())))
      local layers = model.model.layers
      assert.are.equal("Qwen3_5GatedDeltaNet", layers[1].linear_attn.__name)
      assert.are.same({ 56, 32 }, layers[1].linear_attn.in_proj_qkv.weight.shape)
      assert.is_nil(layers[1].linear_attn.in_proj_qkvz)
      assert.are.equal("Qwen3_5Attention", layers[2].self_attn.__name)
      assert.are.equal("Qwen3_5MLP", layers[3].mlp.__name)
      assert.are.equal("Qwen3_5TextModel", model.model.__name)
   end)

   it("gives transformers' logits and greedy ids, and decodes through the cache as one forward", function()
      assert.is_true(H.max_abs_diff(model(ids_tensor(exp.input_ids)), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[1], 4), { exp.logits[1] }) < TOL)
   end)

   it("counts positions from a left-padded batch's mask and zeroes padding before the linear layers", function()
      matches_padded(model, DENSE)
   end)
end)

describe("models.qwen3_5 MoE (tests/fixtures/models/qwen3_5_moe_multimodal_tiny: a multimodal checkpoint, experts stacked)", function()
   H.collect_warnings()
   local exp = H.expected(SPARSE)
   local model = models.from_pretrained(H.FIX .. "/" .. SPARSE)

   it("loads the language model of Qwen3_5MoeForConditionalGeneration and leaves the vision tower out", function()
      assert.are.equal("Qwen3_5MoeForCausalLM", model.__name)
      local want = {}
      for k in pairs(ml.safetensors.load_file(H.FIX .. "/" .. SPARSE .. "/model.safetensors")) do
         if not k:find("^model%.visual%.") then want[#want + 1] = (k:gsub("^model%.language_model%.", "model.")) end
      end
      table.sort(want)
      assert.are.same(want, sorted_keys((model:state_dict())))
      local mlp = model.model.layers[1].mlp
      assert.are.equal("Qwen3_5MoeSparseMoeBlock", mlp.__name)
      assert.are.same({ 6, 32, 32 }, mlp.experts.gate_up_proj.shape)           -- (E, 2 x 16 gate then up, hidden)
      assert.are.same({ 6, 32, 16 }, mlp.experts.down_proj.shape)
      assert.is_true(model.config._source:find("(text_config)", 1, true) ~= nil)
   end)

   it("gives transformers' logits and greedy ids, and decodes through the cache as one forward", function()
      assert.is_true(H.max_abs_diff(model(ids_tensor(exp.input_ids)), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[2], 3), { exp.logits[2] }) < TOL)
   end)

   it("counts positions from a left-padded batch's mask and zeroes padding before the linear layers", function()
      matches_padded(model, SPARSE)
   end)

   it("runs only the experts the router picked, from views of the stacked weights", function()
      local m = models.from_pretrained(H.FIX .. "/" .. SPARSE)
      local ran = H.experts_run(m.model.layers[1].mlp.experts, function() m({ { 5 } }) end)
      assert.are.equal(2, #ran)                        -- top 2 of 6 for one token
      assert.are_not.equal(ran[1], ran[2])
   end)

   it("gives the same tokens with its experts on disk under a CPU budget", function()
      local dir = H.tmpdir()
      local m = models.from_pretrained(H.FIX .. "/" .. SPARSE, { device_map = "auto", max_memory = { cpu = 150000 },
         offload_folder = dir, device_overrides = { ["%.mlp%.experts$"] = "disk" } })
      assert.are.equal("disk", m.hf_device_map["model.layers.0.mlp.experts"])
      assert.are.same(exp.greedy_ids[1], m:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(dir)
   end)

   it("reads a text-only folder (qwen3_5_moe_text, transformers' Qwen3_5MoeForCausalLM names) alike", function()
      local dir = H.tmpdir()
      local full = H.read_json(H.FIX .. "/" .. SPARSE .. "/config.json")
      local text = full.text_config
      text.architectures = { "Qwen3_5MoeForCausalLM" }
      local f = assert(io.open(dir .. "/config.json", "w"))
      f:write(require("cjson").encode(text))
      f:close()
      local tensors = {}
      for k, t in pairs(ml.safetensors.load_file(H.FIX .. "/" .. SPARSE .. "/model.safetensors")) do
         if not k:find("^model%.visual%.") then tensors[(k:gsub("^model%.language_model%.", "model."))] = t end
      end
      ml.safetensors.save_file(tensors, dir .. "/model.safetensors")
      local m = models.from_pretrained(dir)
      assert.are.equal("Qwen3_5MoeForCausalLM", m.__name)
      assert.is_true(H.max_abs_diff(m(ids_tensor(exp.input_ids)), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   it("plans the stacked experts' int8 sizes (the projections whose in-features allow it)", function()
      local m = ml.init_empty_weights(function() return qwen3_5.Qwen3_5MoeForCausalLM(H.FIX .. "/" .. SPARSE) end)
      local plan = {}
      require("moonload.big_modeling")._plan_int8(m, plan, { quantize = "int8" })
      assert.are.equal("q8", plan.special_dtypes["model.layers.0.mlp.experts.gate_up_proj"])   -- in: hidden 32
      assert.is_nil(plan.special_dtypes["model.layers.0.mlp.experts.down_proj"])                -- in: 16
   end)

   it("leaves stacked experts offloaded by their hook in floats, and says why", function()
      local m = models.from_pretrained(H.FIX .. "/" .. SPARSE)
      ml.cpu_offload(m, { execution_device = "cpu" })
      local _, report = ml.quantize(m, { dtype = "int8" })
      assert.truthy(report.skipped["model.layers.0.mlp.experts"]:find("offloaded by their hook", 1, true))
   end)

   it("names a multimodal config without its text_config", function()
      local ok, err = pcall(qwen3_5.Qwen3_5MoeForCausalLM, { model_type = "qwen3_5_moe", _source = "test" })
      assert.is_false(ok)
      assert.truthy(tostring(err):find('a qwen3_5_moe config needs its "text_config"', 1, true), tostring(err))
   end)
end)

describe("examples/hybrid.lua on a Qwen3.5-MoE folder", function()
   it("puts the stacked experts on disk and prints the model's greedy tokens", function()
      local p = assert(io.popen("luajit examples/hybrid.lua " .. H.FIX .. "/" .. SPARSE .. " 2>/dev/null"))
      local text = p:read("*a")
      p:close()
      local ram, disk = text:match("Qwen3_5MoeForCausalLM, ([%d.]+) MB of weights in RAM, ([%d.]+) MB on disk")
      assert.truthy(ram, text)
      assert.is_true(tonumber(disk) > 0, text)
      local want = models.from_pretrained(H.FIX .. "/" .. SPARSE, { dtype = "bfloat16" }):generate({ 1, 5, 17, 42, 3 },
         { max_new_tokens = 16, eos_token_id = false })
      assert.are.same({ unpack(want, 6) }, H.printed_ids(text))
   end)
end)

describe("hub configs (transformers' defaults: Qwen3-Next-80B-A3B, Qwen3.5-35B-A3B, Qwen3.5-9B), built empty", function()
   local fix = H.read_json(H.FIX .. "/qwen3_next_hub_configs.json")
   local classes = { qwen3_next_80b_a3b = require("moonload.models.qwen3_next").Qwen3NextForCausalLM,
                     qwen3_5_35b_a3b = qwen3_5.Qwen3_5MoeForCausalLM, qwen3_5_9b = qwen3_5.Qwen3_5ForCausalLM }
   for _, name in ipairs({ "qwen3_next_80b_a3b", "qwen3_5_35b_a3b", "qwen3_5_9b" }) do
      it(name .. ": transformers' parameter count and shapes", function()
         local m = ml.init_empty_weights(function() return classes[name](fix[name].config) end)
         local count, shapes = 0, {}
         for pname, p in m:named_parameters() do
            shapes[pname] = p.shape
            count = count + p:numel()
         end
         assert.are.equal(fix[name].parameters, count)              -- 79,674,391,296 for Qwen3-Next
         for pname, shape in pairs(fix[name].shapes) do
            local per_expert = pname:match("^(.*%.mlp%.experts)%.gate_up_proj$")
            if per_expert and not shapes[pname] then   -- Qwen3-Next's experts: modules of their own here
               assert.are.same({ shape[2] / 2, shape[3] }, shapes[per_expert .. ".0.gate_proj.weight"], pname)
               assert.are.same({ shape[2] / 2, shape[3] }, shapes[per_expert .. "." .. (shape[1] - 1) .. ".up_proj.weight"], pname)
            elseif pname:find("%.mlp%.experts%.down_proj$") and not shapes[pname] then
               local e = pname:gsub("%.down_proj$", "")
               assert.are.same({ shape[2], shape[3] }, shapes[e .. ".0.down_proj.weight"], pname)
            else
               assert.are.same(shape, shapes[pname], pname)
            end
         end
         assert.is_not_nil(m.model.layers[fix[name].full_layer + 1].self_attn)
         assert.is_not_nil(m.model.layers[1].linear_attn)
      end)
   end
end)

describe("models.qwen3_5 MoE with its experts apart (as transformers saves them)", function()
   H.collect_warnings()
   it("builds one module per expert for such a folder and gives the same logits and tokens", function()
      local exp = H.expected(SPARSE)
      local dir = H.tmpdir()
      H.copy(H.FIX .. "/" .. SPARSE .. "/config.json", dir .. "/config.json")
      local tensors = {}
      for k, t in pairs(ml.safetensors.load_file(H.FIX .. "/" .. SPARSE .. "/model.safetensors")) do
         local prefix = k:match("^(.*%.mlp%.experts)%.gate_up_proj$")
         if prefix then
            local I = t:size(2) / 2
            for e = 1, t:size(1) do
               tensors[prefix .. "." .. (e - 1) .. ".gate_proj.weight"] = t:select(1, e):narrow(1, 1, I):contiguous()
               tensors[prefix .. "." .. (e - 1) .. ".up_proj.weight"] = t:select(1, e):narrow(1, I + 1, I):contiguous()
            end
         elseif k:find("%.mlp%.experts%.down_proj$") then
            local p = k:gsub("%.down_proj$", "")
            for e = 1, t:size(1) do tensors[p .. "." .. (e - 1) .. ".down_proj.weight"] = t:select(1, e):contiguous() end
         else
            tensors[k] = t
         end
      end
      ml.safetensors.save_file(tensors, dir .. "/model.safetensors")
      local m = models.from_pretrained(dir)
      assert.are.equal("ModuleList", m.model.layers[1].mlp.experts.__name)
      assert.are.same({ 16, 32 }, m.model.layers[1].mlp.experts[6].up_proj.weight.shape)
      assert.is_true(H.max_abs_diff(m(ids_tensor(exp.input_ids)), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, m:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))

      -- quantize unstacks the hub's stacked experts into int8 linear layers viewing their slices:
      -- the same int8 model as from the experts apart, saved and read back alike
      local stacked = models.from_pretrained(H.FIX .. "/" .. SPARSE)
      local _, report = ml.quantize(stacked, { dtype = "int8" })
      ml.quantize(m, { dtype = "int8" })
      assert.are.equal("QuantizedLinear", stacked.model.layers[1].mlp.experts[1].gate_proj.__name)
      assert.is_nil(report.skipped["model.layers.0.mlp.experts"])
      local want = m(ids_tensor(exp.input_ids))
      assert.are.equal(0, H.max_abs_diff(stacked(ids_tensor(exp.input_ids)), want:tolist()))
      local saved = H.tmpdir()
      ml.save_model(stacked, saved)
      local back = models.from_pretrained(saved)
      assert.are.equal("QuantizedLinear", back.model.layers[2].mlp.experts[6].gate_proj.__name)   -- (down: in 16, kept float)
      assert.are.equal(0, H.max_abs_diff(back(ids_tensor(exp.input_ids)), want:tolist()))
      H.rmdir(saved)
      H.rmdir(dir)
   end)
end)
