-- ml.save_model: models written as Hugging Face folders and read back by from_pretrained with the
-- same logits, float and int8, whole, sharded, offloaded; what an earlier save leaves; bad input.
local ml = require("moonload")
local H = require("models_helpers")
local C = require("moonload.C")

local ids = ml.tensor({ { 5, 17, 42, 3, 8, 1 } }, { dtype = "int64" })
local fixture = "tests/fixtures/models/llama_tiny_untied"

local function files_in(dir)
   local out = require("moonload.utils.offload").list_dir(dir)
   table.sort(out)
   return out
end

local function read_json(path)
   local f = assert(io.open(path, "rb"))
   local t = require("cjson").decode(f:read("*a"))
   f:close()
   return t
end

-- Whether t's bytes are a view of a mapped file (zero-copy loading).
local function is_file_view(t)
   local ffi = C.ffi
   return C.lib.ml_tensor_file_source(t._c, ffi.new("const char*[1]"), ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]"),
      ffi.new("int64_t[1]")) == 0
end

describe("ml.save_model", function()
   H.collect_warnings()         -- (dispatching with offload warns of weights on meta)

   it("writes a folder from_pretrained reads back to the same logits, for every kind of checkpoint", function()
      -- tied heads (GPT-2, a tied Llama), names mapped on loading (Gemma 3 multimodal), MoE, Phi-3
      for _, dir in ipairs({ fixture, "tests/fixtures/models/gpt2_tiny", "tests/fixtures/models/llama_tiny_tied",
                             "tests/fixtures/models/gemma3_multimodal_tiny", "tests/fixtures/models/qwen3_moe_tiny",
                             "tests/fixtures/models/phi3_tiny" }) do
         local model = ml.models.from_pretrained(dir)
         local out = H.tmpdir()
         assert.are.same({ "model.safetensors", "config.json", "generation_config.json" }, ml.save_model(model, out))
         assert.is_true(ml.equal(ml.models.from_pretrained(out)(ids), model(ids)), dir)
         local f = ml.safetensors.safe_open(out .. "/model.safetensors")
         assert.are.equal("pt", f:metadata().format)
         f:close()
         H.rmdir(out)
      end
      -- a tied weight is written once, under its first name
      local out = H.tmpdir()
      ml.save_model(ml.models.from_pretrained("tests/fixtures/models/gpt2_tiny"), out)
      local keys = ml.safetensors.safe_open(out .. "/model.safetensors"):keys()
      local has_head = false
      for _, k in ipairs(keys) do if k == "lm_head.weight" then has_head = true end end
      assert.is_false(has_head)
      H.rmdir(out)
   end)

   it("writes the config's floats as floats, integral or not, as transformers' strict configs need them", function()
      -- (transformers refuses a time_step_scale of 1 or a time_step_limit of [0, ...]: they are typed float)
      for _, name in ipairs({ "mamba_tiny", "granitemoehybrid_tiny" }) do
         local dir = "tests/fixtures/models/" .. name
         local out = H.tmpdir()
         local model = ml.models.from_pretrained(dir)
         ml.save_model(model, out)
         local text = assert(io.open(out .. "/config.json")):read("*a")
         local want = H.read_json(dir .. "/config.json")
         local got = H.read_json(out .. "/config.json")
         for k, v in pairs(want) do assert.are.same(v, got[k], k) end
         if name == "mamba_tiny" then
            assert.truthy(text:find('"time_step_scale": 1.0,', 1, true), text)
            assert.truthy(text:find('"layer_norm_epsilon": 1e-05,', 1, true), text)
            assert.truthy(text:find('"hidden_size": 32,', 1, true), text)      -- (an integer stays one)
         else
            assert.truthy(text:find('"time_step_limit": %[%s*0%.0,'), text)
            assert.truthy(text:find('"embedding_multiplier": 3.0,', 1, true), text)
         end
         assert.is_true(ml.equal(ml.models.from_pretrained(out)(ids), model(ids)))
         H.rmdir(out)
      end
   end)

   it("shards at max_shard_size with an index, in the layout transformers writes", function()
      local model = ml.models.from_pretrained(fixture)
      local out = H.tmpdir()
      local written = ml.save_model(model, out, { max_shard_size = "30KB" })
      assert.are.same({ "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                        "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
                        "model.safetensors.index.json", "config.json", "generation_config.json" }, written)
      local index = read_json(out .. "/model.safetensors.index.json")
      local total = 0
      for _, p in pairs(model:state_dict()) do total = total + p:nbytes() end
      assert.are.equal(total, index.metadata.total_size)
      assert.are.equal("model-00001-of-00004.safetensors", index.weight_map["model.embed_tokens.weight"])
      for i = 1, 4 do
         local size = io.open(string.format("%s/model-%05d-of-00004.safetensors", out, i)):seek("end")
         assert.is_true(size < 30000 + 2000, "shard " .. i .. ": " .. size)
      end
      assert.is_true(ml.equal(ml.models.from_pretrained(out)(ids), model(ids)))
      local cfg = read_json(out .. "/config.json")
      assert.are.equal("float32", cfg.dtype)
      assert.are.equal("llama", cfg.model_type)
      assert.is_nil(cfg.quantization_config)
      H.rmdir(out)
   end)

   it("saves int8 layers, which load back as int8 views of the file", function()
      local model = ml.models.from_pretrained(fixture, { quantize = "int8" })
      local out = H.tmpdir()
      ml.save_model(model, out)
      local qc = read_json(out .. "/config.json").quantization_config
      assert.are.equal("moonload_q8", qc.quant_method)
      assert.are.equal(15, #qc.modules)
      assert.are.equal("model.layers.0.self_attn.q_proj", qc.modules[1])
      local back = ml.models.from_pretrained(out)
      local down = back.model.layers[1].mlp.down_proj
      assert.are.equal("QuantizedLinear", down.__name)
      assert.are.equal("int8", down.weight.dtype)
      assert.is_true(is_file_view(down.weight))
      assert.is_true(ml.equal(back(ids), model(ids)))
      -- 41 KB instead of 102 (float32)
      assert.is_true(io.open(out .. "/model.safetensors"):seek("end") < 42000)
      -- and through a device map: the planner sizes the int8 layers as they are
      local folder = H.tmpdir()
      local mapped = ml.models.from_pretrained(out, { device_map = "auto", max_memory = { cpu = 20000 },
         offload_folder = folder })
      local on_disk = 0
      for _, d in pairs(mapped.hf_device_map) do if d == "disk" then on_disk = on_disk + 1 end end
      assert.is_true(on_disk > 0)
      assert.is_true(ml.equal(mapped(ids), model(ids)))
      H.rmdir(folder)
      H.rmdir(out)
   end)

   it("takes offloaded weights from their hooks, in the model's dtype, and leaves the model as it was", function()
      local folder = H.tmpdir()
      local model = ml.models.from_pretrained("tests/fixtures/models/llama_tiny_bf16", { dtype = "float32",
         quantize = "int8", offload_folder = folder, device_map = { ["model.embed_tokens"] = "cpu",
         ["model.layers.0"] = "disk", ["model.layers.1"] = "cpu", ["model.norm"] = "disk", ["model.rotary_emb"] = "cpu",
         lm_head = "cpu" } })
      local want = model(ids)
      local out = H.tmpdir()
      ml.save_model(model, out)
      assert.is_true(model.model.norm.weight:is_meta())
      assert.is_true(ml.equal(model(ids), want))
      local back = ml.models.from_pretrained(out)
      assert.are.equal("float32", back.model.norm.weight.dtype)          -- the checkpoint's bfloat16, as computed
      assert.are.equal("QuantizedLinear", back.model.layers[1].self_attn.o_proj.__name)
      assert.is_true(ml.equal(back(ids), want))
      H.rmdir(out)
      H.rmdir(folder)
   end)

   it("finds a weight offloaded with its block (preload_module_classes)", function()
      local folder = H.tmpdir()
      local model = ml.models.from_pretrained(fixture, { offload_folder = folder, preload_module_classes = { "LlamaDecoderLayer" },
         device_map = { ["model.embed_tokens"] = "cpu", ["model.layers.0"] = "disk", ["model.layers.1"] = "cpu",
            ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" } })
      assert.is_nil(rawget(model.model.layers[1].mlp.up_proj, "_hf_hook"))       -- the block's hook holds it
      assert.is_true(model.model.layers[1].mlp.up_proj.weight:is_meta())
      local out = H.tmpdir()
      ml.save_model(model, out)
      assert.is_true(ml.equal(ml.models.from_pretrained(out)(ids), ml.models.from_pretrained(fixture)(ids)))
      H.rmdir(out)
      H.rmdir(folder)
   end)

   it("replaces an earlier save whole, and a failed save leaves it as it was", function()
      local model = ml.models.from_pretrained(fixture)
      local out = H.tmpdir()
      ml.save_model(model, out, { max_shard_size = "30KB" })
      ml.save_model(model, out)
      assert.are.same({ "config.json", "generation_config.json", "model.safetensors" }, files_in(out))
      -- a skeleton's weights are nowhere: nothing is written, nothing is left half-written
      local skeleton = ml.init_empty_weights(function() return ml.models.from_config(fixture .. "/config.json") end)
      local ok, err = pcall(ml.save_model, skeleton, out, { max_shard_size = "30KB" })
      assert.is_false(ok)
      assert.truthy(err:find('save_model: "model.embed_tokens.weight" is on the meta device and no hook holds its weights',
         1, true), err)
      assert.are.same({ "config.json", "generation_config.json", "model.safetensors" }, files_in(out))
      assert.is_true(ml.equal(ml.models.from_pretrained(out)(ids), model(ids)))
      H.rmdir(out)
   end)

   it("names what it cannot save or read", function()
      local model = ml.models.from_pretrained(fixture)
      local cases = {
         { function() ml.save_model(ml.nn.Linear(4, 4), "/tmp/x") end, "save_model: the model has no config read from a config.json or table" },
         { function() ml.save_model(model, "/tmp/x", { max_shard_size = "big" }) end, "save_model:" },
         { function() ml.save_model(model, "/tmp/x", { shard = 1 }) end, 'save_model: unknown option "shard" (expected max_shard_size)' },
         { function() ml.save_model(model, 3) end, "save_model: dir must be a folder path, got number" },
         { function() ml.save_model("model", "/tmp/x") end, "save_model: model must be an nn.Module, got string" },
      }
      for _, c in ipairs(cases) do
         local ok, err = pcall(c[1])
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[2], 1, true), tostring(err))
      end
      -- checkpoints quantized some other way, or listing what is not a linear layer
      local out = H.tmpdir()
      ml.save_model(model, out)
      local cfg = read_json(out .. "/config.json")
      for _, c in ipairs({
         { { quant_method = "bitsandbytes", load_in_4bit = true }, 'quantization_config in ' .. out .. '/config.json has quant_method "bitsandbytes"' },
         { { quant_method = "moonload_q8", bits = 8, block_size = 32, modules = { "model.norm" } },
           'lists "model.norm", which is not a linear layer or an embedding of the model' },
         { { quant_method = "moonload_q8", bits = 8, block_size = 64, modules = {} }, "must have bits 8, block_size 32" },
      }) do
         cfg.quantization_config = c[1]
         local f = io.open(out .. "/config.json", "wb")
         f:write(require("cjson").encode(cfg))
         f:close()
         local ok, err = pcall(ml.models.from_pretrained, out)
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[2], 1, true), tostring(err))
      end
      H.rmdir(out)
   end)
end)

describe("examples/int8.lua", function()
   it("quantizes, saves, loads back with the same logits, generates with both caches, and runs int4", function()
      local p = assert(io.popen("luajit examples/int8.lua " .. fixture .. " 2>&1"))
      local out = p:read("*a")
      p:close()
      assert.truthy(out:find("same logits: true", 1, true), out)
      local toks = {}
      for ids in out:gmatch("tokens/s%) %-> ([%d ]+)") do toks[#toks + 1] = ids end
      assert.are.equal(3, #toks, out)                  -- the float cache, the int8 cache, int4 weights
      assert.are.equal(toks[1], toks[2])
      assert.truthy(out:find('quantize = "int4": [%d.]+ s; linear weights [%d.]+ MB; top token as the float model\'s at int8 %d+, int4 %d+ of 12 positions'), out)
      for _, w in ipairs({ "int8", "int4" }) do
         assert.truthy(out:find(w .. " weights with int8 activations: generate 16 tokens [%d.]+ s against [%d.]+ s %([%d.]+x%); top token as the float model's at %d+ of 12 positions %-> [%d ]+"), out)
      end
   end)
end)

describe("ml.save_model on cuda #cuda", function()
   it("copies GPU weights to the CPU one shard at a time", function()
      local model = ml.models.from_pretrained(fixture, { quantize = "int8", device_map = { ["model.embed_tokens"] = 0,
         ["model.layers.0"] = 0, ["model.layers.1"] = "cpu", ["model.norm"] = 0, ["model.rotary_emb"] = 0, lm_head = 0 } })
      local want = model(ids):cpu()
      local out = H.tmpdir()
      ml.save_model(model, out, { max_shard_size = "20KB" })
      local back = ml.models.from_pretrained(out)
      assert.is_true(((back(ids) - want):abs():max() / want:abs():max()):item() < 1e-4)
      assert.are.equal("cuda:0", model.lm_head.weight.device)
      H.rmdir(out)
   end)
end)
