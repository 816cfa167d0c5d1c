-- device_overrides (utils/device_overrides.lua): modules matched by a Lua pattern are pinned to a
-- device, the planner places the rest in what the budgets leave, and the dispatched model gives
-- the plain model's logits and tokens.
local ml = require("moonload")
local u = require("moonload.utils")
local H = require("models_helpers")

local DIR = "tests/fixtures/models/qwen3_moe_tiny"

local function skeleton()
   return ml.init_empty_weights(function() return ml.models.from_config(DIR .. "/config.json") end)
end

local function experts_bytes(sizes)
   local n = 0
   for name, bytes in pairs(sizes) do
      if name:find("%.experts$") then n = n + bytes end
   end
   return n
end

describe("device_overrides", function()
   H.collect_warnings()         -- (GPU budgets on a machine without one warn; disk maps warn)

   it("pins the experts and places the rest around them, splitting the layers that hold them", function()
      local m = skeleton()
      local sizes = u.compute_module_sizes(m)
      local experts = experts_bytes(sizes)
      local map, keys = u.infer_auto_device_map(m, { max_memory = { [0] = sizes[""] - experts, cpu = experts },
         device_overrides = { ["%.experts$"] = "cpu" } })
      -- layers 0 and 2 are sparse (their experts on the CPU), layer 1 dense: whole on GPU 0
      assert.are.same({ "model.embed_tokens", "model.layers.0.self_attn", "model.layers.0.mlp.experts",
         "model.layers.0.mlp.gate", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
         "model.layers.1", "model.layers.2.self_attn", "model.layers.2.mlp.experts", "model.layers.2.mlp.gate",
         "model.layers.2.input_layernorm", "model.layers.2.post_attention_layernorm", "model.norm",
         "model.rotary_emb", "lm_head" }, keys)
      for _, k in ipairs(keys) do
         assert.are.equal(k:find("experts", 1, true) and "cpu" or 0, map[k], k)
      end
      -- without them, the same GPU budget keeps whole layers, experts included, and the rest
      -- of the model goes off the GPU
      local plain = u.infer_auto_device_map(m, { max_memory = { [0] = sizes[""] - experts, cpu = experts } })
      assert.are_not.equal(0, plain.lm_head)
   end)

   it("splits a whole-model entry down to the pinned modules", function()
      local m = skeleton()
      local map = u.infer_auto_device_map(m, { max_memory = { cpu = 10 ^ 9 }, device_overrides = { ["layers%.2%.mlp$"] = "disk" } })
      assert.are.equal("disk", map["model.layers.2.mlp"])
      assert.are.equal("cpu", map["model.layers.2.self_attn"])
      assert.are.equal("cpu", map["model.layers.0"])
      assert.are.equal("cpu", map.lm_head)
      assert.is_nil(map[""])
      assert.is_nil(map["model.layers.2"])
   end)

   it("takes the pinned bytes off their device's budget", function()
      local m = skeleton()
      local sizes = u.compute_module_sizes(m)
      local experts = experts_bytes(sizes)
      local ok, err = pcall(u.infer_auto_device_map, m, { max_memory = { cpu = experts - 1 },
         device_overrides = { ["%.experts$"] = "cpu" } })
      assert.is_false(ok)
      assert.truthy(err:find(string.format("max_memory for cpu (%d bytes) cannot hold the modules device_overrides pins there (%d bytes)",
         experts - 1, experts), 1, true), err)
      -- what is left of the CPU holds the rest: nothing else goes to disk
      local map = u.infer_auto_device_map(m, { max_memory = { cpu = sizes[""] }, device_overrides = { ["%.experts$"] = "cpu" } })
      for k, d in pairs(map) do assert.are.equal("cpu", d, k) end
   end)

   it("names a bad pattern, a bad device and patterns that disagree", function()
      local m = skeleton()
      local cases = {
         { { nothing = "disk" }, 'device_overrides pattern "nothing" matches no module' },
         { { experts = "gpu" }, 'device_overrides["experts"] must be "cpu", "disk", a GPU index or "cuda:N", got gpu' },
         { { ["experts["] = "cpu" }, 'device_overrides pattern "experts[": malformed pattern' },
         { { experts = "cpu", mlp = "disk" }, 'device_overrides pattern "experts" matches only modules inside those pattern "mlp" pins' },
         { { ["layers%.0$"] = "cpu", ["%.0$"] = "disk" }, "device_overrides send model.layers.0 to" },
         { { [1] = "cpu" }, "device_overrides keys must be Lua patterns over module names, got number" },
      }
      for _, c in ipairs(cases) do
         local ok, err = pcall(u.infer_auto_device_map, m, { max_memory = { cpu = 10 ^ 9 }, device_overrides = c[1] })
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[2], 1, true), tostring(err))
      end
      assert.has_error(function() u.infer_auto_device_map(m, { device_overrides = "experts" }) end,
         "infer_auto_device_map: device_overrides must be a table {[pattern] = device}, got string")
      local ok, err = pcall(ml.models.from_pretrained, DIR, { device_map = { [""] = "cpu" }, device_overrides = { experts = "cpu" } })
      assert.is_false(ok)
      assert.truthy(err:find('from_pretrained: device_overrides plans a device map, so device_map must be "auto"', 1, true), err)
   end)

   it("dispatches from_pretrained's plan: experts on disk, the rest in RAM, the plain model's tokens", function()
      local plain = ml.models.from_pretrained(DIR)
      local dir = H.tmpdir()
      local model = ml.models.from_pretrained(DIR, { device_map = "auto", max_memory = { cpu = "1MB" },
         offload_folder = dir, device_overrides = { ["%.experts$"] = "disk" } })
      for name, d in pairs(model.hf_device_map) do
         assert.are.equal(name:find("%.experts$") and "disk" or "cpu", d, name)
      end
      assert.is_true(model.model.layers[1].mlp.experts[1].gate_proj.weight:is_meta())
      assert.is_false(model.model.layers[1].self_attn.q_proj.weight:is_meta())
      local ids = ml.tensor({ { 5, 17, 42, 3 } }, { dtype = "int64" })
      assert.is_true((model(ids) - plain(ids)):abs():max():item() < 1e-5)
      assert.are.same(plain:generate({ 5, 17, 42 }, { max_new_tokens = 6 }), model:generate({ 5, 17, 42 }, { max_new_tokens = 6 }))
      H.rmdir(dir)
   end)
end)
