-- ml.models gpt-oss (attention sinks, alternating sliding and full layers, stacked experts with
-- the clamped SwiGLU, MXFP4 checkpoints) against transformers (tests/fixtures/gen_models.py
-- gpt_oss gpt_oss_mxfp4): names, logits, greedy ids past the sliding window, padded batches,
-- MXFP4 experts kept packed (in RAM, on disk, under a dtype conversion), and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local gpt_oss = require("moonload.models.gpt_oss")
local H = require("models_helpers")

local TOL = 1e-4

local function checkpoint_names(name)
   local want = {}
   for k in pairs(ml.safetensors.load_file(H.FIX .. "/" .. name .. "/model.safetensors")) do want[#want + 1] = k end
   table.sort(want)
   return want
end

local function model_names(model)
   local have = {}
   for k in pairs(model:state_dict()) do have[#have + 1] = k end
   table.sort(have)
   return have
end

describe("models.gpt_oss (tests/fixtures/models/gpt_oss_tiny: sinks, a 4-token window on layers 1 and 3, float experts)", function()
   local exp = H.expected("gpt_oss_tiny")
   local model = models.from_pretrained(H.FIX .. "/gpt_oss_tiny")

   it("builds GptOssForCausalLM with every tensor of the checkpoint, under its names", function()
      assert.are.equal("GptOssForCausalLM", model.__name)
      assert.are.same(checkpoint_names("gpt_oss_tiny"), model_names(model))
      local layers = model.model.layers
      assert.are.same({ 4, false, 4 }, { layers[1].self_attn.window, layers[2].self_attn.window or false,
         layers[3].self_attn.window })
      assert.are.same({ 4, 64, 128 }, layers[1].mlp.experts.gate_up_proj.shape)
      assert.are.equal("yarn", model.config.rope.rope_type)
   end)

   it("gives transformers' logits and greedy ids (12 tokens past the window), and decodes with the cache as a full forward", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[2], 3), { exp.logits[2] }) < TOL)
   end)

   H.it_matches_padded(model, "gpt_oss_tiny", "positions")

   it("lets the sinks take probability from the keys (without them the logits move)", function()
      local m = models.from_pretrained(H.FIX .. "/gpt_oss_tiny")
      for _, layer in ipairs(m.model.layers) do layer.self_attn.sinks:fill_(-math.huge) end
      assert.is_true(H.max_abs_diff(m(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) > 0.05)
   end)

   it("runs only the experts the router picked", function()
      local m = models.from_pretrained(H.FIX .. "/gpt_oss_tiny")
      local ran = H.experts_run(m.model.layers[2].mlp.experts, function() m({ { 5 } }) end)
      table.sort(ran)
      assert.are.equal(2, #ran)                      -- top 2 of 4 for one token
      assert.are_not.equal(ran[1], ran[2])
   end)
end)

describe("models.gpt_oss MXFP4 checkpoint (tests/fixtures/models/gpt_oss_mxfp4_tiny: the hub's format)", function()
   H.collect_warnings()                       -- (the disk offload note) kept quiet
   local exp = H.expected("gpt_oss_mxfp4_tiny")
   local model = models.from_pretrained(H.FIX .. "/gpt_oss_mxfp4_tiny")

   it("keeps the experts as MXFP4 blocks and scales under the checkpoint's names, the rest as stored", function()
      assert.are.same(checkpoint_names("gpt_oss_mxfp4_tiny"), model_names(model))
      local experts = model.model.layers[1].mlp.experts
      assert.is_true(experts.mxfp4)
      assert.are.equal("uint8", experts.gate_up_proj_blocks.dtype)
      assert.are.same({ 4, 128, 2, 16 }, experts.gate_up_proj_blocks.shape)
      assert.are.same({ 4, 64, 2 }, experts.down_proj_scales.shape)
      assert.are.equal("float32", experts.gate_up_proj_bias.dtype)
      assert.are.equal("float32", model.model.layers[1].mlp.router.weight.dtype)
   end)

   it("gives the logits and greedy ids of transformers loading the folder (it dequantizes on a CPU)", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      -- decoding steps multiply straight from the blocks; the prompt expanded them
      assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[2], 3), { exp.logits[2] }) < TOL)
   end)

   H.it_matches_padded(model, "gpt_oss_mxfp4_tiny", "positions")

   it("keeps blocks and scales uint8 when a dispatch converts to bfloat16 and puts experts on disk", function()
      local dir = H.tmpdir()
      local m = models.from_pretrained(H.FIX .. "/gpt_oss_mxfp4_tiny",
         { dtype = "bfloat16", device_map = "auto", max_memory = { cpu = 150000 }, offload_folder = dir })
      local seen = 0
      for name, mod in m:named_modules() do
         local h = rawget(mod, "_hf_hook")
         local wm = h and h.weights_map
         if wm and mod.__name == "GptOssExperts" then
            assert.are.equal("uint8", wm.gate_up_proj_blocks.dtype, name)
            assert.are.equal("uint8", wm.down_proj_scales.dtype, name)
            seen = seen + 1
         end
      end
      assert.is_true(seen >= 1, "MXFP4 experts read from disk: " .. seen)
      local logits = m(ml.tensor(exp.input_ids, { dtype = "int64" })):float()
      assert.is_true(H.max_abs_diff(logits:narrow(1, 1, 1), { exp.logits[1] }) < 0.6)   -- (bfloat16 over logits up to 8)
      H.rmdir(dir)
   end)

   it("saves back as an MXFP4 checkpoint that loads to the same model; refuses int8 layers beside the experts", function()
      local dir = H.tmpdir()
      ml.save_model(model, dir)
      local cfg = H.read_json(dir .. "/config.json")
      assert.are.equal("mxfp4", cfg.quantization_config.quant_method)
      local again = models.from_pretrained(dir)
      assert.are.equal("uint8", again.model.layers[3].mlp.experts.down_proj_blocks.dtype)
      assert.is_true(H.max_abs_diff(again(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      H.rmdir(dir)
      local q = models.from_pretrained(H.FIX .. "/gpt_oss_mxfp4_tiny", { quantize = "int8" })
      local ok, err = pcall(ml.save_model, q, H.tmpdir())
      assert.is_false(ok)
      assert.truthy(tostring(err):find('one quantization_config cannot describe both MXFP4 experts ("model.layers.0.mlp.experts") and int8/int4 layers', 1, true), err)
   end)

   it("names an MXFP4 quantization_config on a model without gpt-oss experts, and sizes MXFP4 cannot block", function()
      local dir = H.tmpdir()
      H.copy(H.FIX .. "/qwen3_tiny/model.safetensors", dir .. "/model.safetensors")
      local cfg = H.read_json(H.FIX .. "/qwen3_tiny/config.json")
      cfg.quantization_config = { quant_method = "mxfp4" }
      H.write(dir .. "/config.json", require("cjson").encode(cfg))
      local ok, err = pcall(models.from_pretrained, dir)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('has quant_method "mxfp4", which moonload reads for gpt-oss\'s experts', 1, true), err)
      H.rmdir(dir)
      local c = H.read_json(H.FIX .. "/gpt_oss_mxfp4_tiny/config.json")
      c.intermediate_size = 48
      ok, err = pcall(gpt_oss.config, c)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("MXFP4 experts need hidden_size and intermediate_size in multiples of 32, got 64 and 48", 1, true), err)
   end)
end)

describe("models.gpt_oss config", function()
   it("reads the hub's keys (experts_per_token, rope_scaling) and names what is wrong", function()
      local base = H.read_json(H.FIX .. "/gpt_oss_tiny/config.json")
      local function with(over)
         local c = {}
         for k, v in pairs(base) do c[k] = v end
         for k, v in pairs(over) do c[k] = v end
         return c
      end
      local cfg = gpt_oss.config(with({ num_experts_per_tok = require("cjson").null, experts_per_token = 3 }))
      assert.are.equal(3, cfg.num_experts_per_tok)
      assert.are.equal(1.702, cfg.swiglu_alpha)
      -- without layer_types, transformers' default: the first layer of each pair slides
      cfg = gpt_oss.config(with({ layer_types = require("cjson").null, num_hidden_layers = 4 }))
      assert.are.same({ 4, false, 4, false }, cfg.layer_windows)
      cfg = gpt_oss.config(with({ sliding_window = require("cjson").null }))
      assert.are.same({ false, false, false }, cfg.layer_windows)
      local cases = {
         { { num_experts_per_tok = 5 }, "num_experts_per_tok 5 is more than num_local_experts 4" },
         { { swiglu_limit = -1 }, 'config key "swiglu_limit" must be a positive number, got -1' },
         { { num_local_experts = 0 }, 'config key "num_local_experts" must be an integer >= 1, got 0' },
      }
      for _, c in ipairs(cases) do
         local ok, err = pcall(gpt_oss.config, with(c[1]))
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[2], 1, true), tostring(err))
      end
   end)
end)

describe("hub configs (gpt-oss-20b's and -120b's config.json, built empty)", function()
   local fix = H.read_json(H.FIX .. "/gpt_oss_hub_configs.json")
   for _, name in ipairs({ "gpt_oss_20b", "gpt_oss_120b" }) do
      it(name .. ": transformers' parameter count and shapes (experts as MXFP4), scales, YaRN frequencies", function()
         local c = fix[name].config
         local m = ml.init_empty_weights(function() return gpt_oss.GptOssForCausalLM(c) end)
         -- MXFP4 blocks hold two weights a byte; their scales are not parameters of the dense model
         local count, shapes, bytes = 0, {}, 0
         for pname, p in m:named_parameters() do
            shapes[pname] = p.shape
            bytes = bytes + p:nbytes()
            if pname:find("_blocks$") then count = count + 2 * p:numel()
            elseif not pname:find("_scales$") then count = count + p:numel() end
         end
         assert.are.equal(fix[name].parameters, count)              -- 20,914,757,184 for 20b
         for pname, shape in pairs(fix[name].shapes) do
            local blocks = shapes[pname .. "_blocks"]
            if blocks then        -- transformers' (E, in, out) stacked weight: (E, out, in / 32, 16) blocks
               assert.are.same({ shape[1], shape[3], shape[2] / 32, 16 }, blocks, pname)
               assert.are.same({ shape[1], shape[3], shape[2] / 32 }, shapes[pname .. "_scales"], pname)
            else
               assert.are.same(shape, shapes[pname], pname)
            end
         end
         assert.is_true(math.abs(rawget(m.model.layers[1].self_attn, "scale") - fix[name].softmax_scale) < 1e-12)
         assert.is_true(math.abs(rawget(m.model.rotary_emb, "attention_scaling") - fix[name].rope_attention_scaling) < 1e-12)
         assert.is_true(H.max_abs_diff(m.model.rotary_emb.inv_freq, fix[name].inv_freq) < 1e-7)
         assert.are.equal(128, m.model.layers[1].self_attn.window)
         assert.is_nil(m.model.layers[2].self_attn.window)
         -- what the weights weigh as the hub stores them (bfloat16 but the experts): 13.76 GB for
         -- 20b, 65.25 GB for 120b, under a third of their bfloat16 size (41.8 and 233.7 GB)
         m:to("bfloat16")
         local stored = 0
         for _, p in m:named_parameters() do stored = stored + p:nbytes() end
         assert.is_true(stored < 2 * fix[name].parameters / 3, string.format("%.2f GB stored", stored / 1e9))
      end)
   end
end)

describe("examples/gpt_oss.lua", function()
   it("runs the MXFP4 test folder with its experts on disk and prints the model's greedy tokens", function()
      local p = assert(io.popen("luajit examples/gpt_oss.lua 2>/dev/null"))
      local text = p:read("*a")
      p:close()
      assert.truthy(text:find("GptOssForCausalLM, [%d.]+ MB of weights in RAM, [%d.]+ MB on disk; MXFP4 experts 0.07 MB %(0.28 MB as bfloat16%)"), text)
      assert.truthy(text:find("attention windows by layer: 4 full 4", 1, true), text)
      local want = models.from_pretrained(H.FIX .. "/gpt_oss_mxfp4_tiny", { dtype = "bfloat16" }):generate({ 1, 5, 17, 42, 3 },
         { max_new_tokens = 16, eos_token_id = false })
      assert.are.same({ unpack(want, 6) }, H.printed_ids(text))
   end)
end)
