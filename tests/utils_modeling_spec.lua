-- ml.utils modeling: set_module_tensor_to_device, named_module_tensors, tied parameters,
-- align_module_device, and checkpoint loading (single file, sharded, flat index, folder; device
-- maps with disk; dtype; strict) against checkpoints written by torch/safetensors.
local ml = require("moonload")
local utils = require("moonload.utils")
local modeling = require("moonload.utils.modeling")
local models = require("utils_models")
local nn = require("moonload.nn")

local CKPT = "tests/fixtures/accelerate/ckpt/"
local values = models.read_json("tests/fixtures/accelerate/ckpt_values.json")

local function tmpdir()
   local p = io.popen("mktemp -d")
   local dir = p:read("*l")
   p:close()
   return dir
end
local function rmtree(path) os.execute("rm -rf '" .. path .. "'") end

local function empty_model()
   return ml.init_empty_weights(function() return models.ModelForTest() end)
end

local function check_value(t, name, tol)
   local e = values.tensors[name]
   assert.are.same(e.shape, t.shape, name)
   local got = t:to("cpu"):to("float64"):reshape(-1):tolist()
   for i, v in ipairs(e.values) do
      assert.is_true(math.abs(got[i] - v) <= (tol or 0), name .. "[" .. i .. "]: " .. got[i] .. " vs " .. v)
   end
end

local function check_all(model, tol, skip)
   local sd = model:state_dict()
   for name in pairs(values.tensors) do
      if not (skip and skip[name]) then check_value(sd[name], name, tol) end
   end
end

describe("utils.modeling", function()
   describe("set_module_tensor_to_device", function()
      it("moves to meta without allocating and keeps the registry kind", function()
         local m = models.ModelForTest()
         local before = ml.memory_allocated("cpu")
         utils.set_module_tensor_to_device(m, "linear1.weight", "meta")
         utils.set_module_tensor_to_device(m, "batchnorm.running_mean", "meta")
         assert.are.equal("meta", m.linear1.weight.device)
         assert.are.equal("meta", m.batchnorm.running_mean.device)
         assert.is_true(ml.memory_allocated("cpu") <= before)
         assert.is_true(m.linear1._parameters:has("weight"))
         assert.is_true(m.batchnorm._buffers:has("running_mean"))
         assert.is_false(m.batchnorm._parameters:has("running_mean"))
      end)

      it("needs a value to leave meta", function()
         local m = empty_model()
         assert.has_error(function() utils.set_module_tensor_to_device(m, "linear1.weight", "cpu") end,
            "set_module_tensor_to_device: linear1.weight is on the meta device, we need a `value` to put in on cpu.")
      end)

      it("checks shapes with Accelerate's message", function()
         local m = models.ModelForTest()
         assert.has_error(function()
            utils.set_module_tensor_to_device(m, "linear1.weight", "cpu", { value = ml.zeros(2, 2) })
         end, 'set_module_tensor_to_device: Trying to set a tensor of shape [2, 2] in "linear1.weight" (which has shape [4, 3]), this looks incorrect.')
         assert.are.same({ 4, 3 }, m.linear1.weight.shape)
      end)

      it("names unknown tensors and submodules", function()
         local m = models.ModelForTest()
         assert.has_error(function() utils.set_module_tensor_to_device(m, "linear1.scale", "cpu") end,
            'set_module_tensor_to_device: Linear does not have a parameter or a buffer named scale (in "linear1.scale").')
         assert.has_error(function() utils.set_module_tensor_to_device(m, "linear9.weight", "cpu") end,
            'set_module_tensor_to_device: ModelForTest has no attribute linear9 (in "linear9.weight").')
         assert.has_error(function() utils.set_module_tensor_to_device(m, "linear1.weight", "disk") end,
            'set_module_tensor_to_device: "disk" is a placement, not a tensor device (for linear1.weight)')
      end)

      it("casts a value to the old dtype, or to dtype except integers", function()
         local m = models.ModelForTest()
         utils.set_module_tensor_to_device(m, "linear1.bias", "cpu", { value = ml.ones(4):half() })
         assert.are.equal("float32", m.linear1.bias.dtype)
         utils.set_module_tensor_to_device(m, "linear1.bias", "cpu", { value = ml.ones(4), dtype = "float16" })
         assert.are.equal("float16", m.linear1.bias.dtype)
         utils.set_module_tensor_to_device(m, "batchnorm.num_batches_tracked", "cpu",
            { value = ml.tensor(5, { dtype = "int64" }), dtype = "float16" })
         assert.are.equal("int64", m.batchnorm.num_batches_tracked.dtype)
         assert.are.equal(5, m.batchnorm.num_batches_tracked:item())
      end)

      it("sets the dtype of a meta tensor, leaving integers", function()
         local m = models.ModelForTest()
         utils.set_module_tensor_to_device(m, "linear2.weight", "meta", { dtype = "bfloat16" })
         utils.set_module_tensor_to_device(m, "batchnorm.num_batches_tracked", "meta", { dtype = "bfloat16" })
         assert.are.equal("bfloat16", m.linear2.weight.dtype)
         assert.are.equal("meta", m.linear2.weight.device)
         assert.are.equal("int64", m.batchnorm.num_batches_tracked.dtype)
      end)

      it("uses a CPU value of the right dtype as it is (no copy)", function()
         local m = models.ModelForTest()
         local v = ml.randn(5, 4)
         utils.set_module_tensor_to_device(m, "linear2.weight", "cpu", { value = v })
         assert.are.equal(v:data_ptr(), m.linear2.weight:data_ptr())
      end)

      it("shares one copy per device through tied_params_map", function()
         local m = models.TiedModel()
         local w = m.emb.weight
         local tied = { [w:data_ptr()] = {} }
         utils.set_module_tensor_to_device(m, "emb.weight", "meta", { tied_params_map = tied })
         assert.is_not_nil(tied[w:data_ptr()]["meta"])
         -- the second name finds the first one's copy
         utils.set_module_tensor_to_device(m, "head.weight", "meta", { tied_params_map = tied })
         assert.are.equal(m.emb.weight, m.head.weight)
         local v = ml.randn(8, 4)
         local tied2 = { [v:data_ptr()] = {} }
         utils.set_module_tensor_to_device(m, "emb.weight", "cpu", { value = v, tied_params_map = tied2 })
         utils.set_module_tensor_to_device(m, "head.weight", "cpu", { value = v, tied_params_map = tied2 })
         assert.are.equal(m.emb.weight, m.head.weight)
         assert.are.equal(m.emb.weight, tied2[v:data_ptr()]["cpu"])
      end)

      it("accepts integer devices as cuda:N (errors cleanly without a GPU)", function()
         if require("moonload.C").lib.ml_cuda_device_count() > 0 then return end
         local m = models.ModelForTest()
         assert.has_error(function() utils.set_module_tensor_to_device(m, "linear1.bias", 0) end)
         assert.are.equal("cpu", m.linear1.bias.device)
      end)
   end)

   describe("named_module_tensors", function()
      it("yields parameters then buffers, direct or recursive", function()
         local names = {}
         for n in utils.named_module_tensors(models.ModelForTest(), { recurse = true }) do names[#names + 1] = n end
         assert.are.same({ "linear1.weight", "linear1.bias", "batchnorm.weight", "batchnorm.bias", "linear2.weight",
                           "linear2.bias", "batchnorm.running_mean", "batchnorm.running_var",
                           "batchnorm.num_batches_tracked" }, names)
         names = {}
         for n in utils.named_module_tensors(models.WithParam(), { include_buffers = false }) do names[#names + 1] = n end
         assert.are.same({ "scale" }, names)
      end)

      it("drops non-persistent buffers by qualified name (Accelerate's Q7 bug fixed)", function()
         local Sub = nn.Module:extend("Sub")
         function Sub:__init() self:register_buffer("mask", ml.ones(1), false) end
         local Root = nn.Module:extend("Root")
         function Root:__init()
            self:register_buffer("mask", ml.ones(2))
            self.sub = Sub()
         end
         local names = {}
         for n in utils.named_module_tensors(Root(), { recurse = true, remove_non_persistent = true }) do
            names[#names + 1] = n
         end
         assert.are.same({ "mask" }, names)
      end)
   end)

   describe("tied parameters", function()
      it("reties a group to its first member not on meta", function()
         local m = models.TiedModel()
         local tied = utils.find_tied_parameters(m)
         assert.are.same({ { "emb.weight", "head.weight" } }, tied)
         m.head.weight = ml.zeros(8, 4)
         utils.set_module_tensor_to_device(m, "emb.weight", "meta")
         utils.retie_parameters(m, tied)
         assert.are.equal(m.emb.weight, m.head.weight)
         assert.are.equal("cpu", m.emb.weight.device)
      end)

      it("does nothing when the whole group is on meta", function()
         local m = models.TiedModel()
         local tied = utils.find_tied_parameters(m)
         m.head.weight = ml.empty({ 8, 4 }, { device = "meta" })
         m.emb.weight = ml.empty({ 8, 4 }, { device = "meta" })
         local h = m.head.weight
         utils.retie_parameters(m, tied)
         assert.are.equal(h, m.head.weight)
      end)

      it("warns when a custom map splits a tie across devices", function()
         local _, _, warnings = models.capture(function()
            utils.check_tied_parameters_on_same_device({ { "emb.weight", "head.weight" } }, { emb = 0, head = "cpu" })
         end)
         assert.are.same({ "Tied parameters are on different devices: {'emb.weight': 0, 'head.weight': 'cpu'}. Please modify your custom device map or set `device_map='auto'`. " }, warnings)
      end)
   end)

   describe("align_module_device and introspection", function()
      it("has no offloaded params on a plain module", function()
         assert.is_false(utils.has_offloaded_params(models.ModelForTest()))
      end)

      it("moves direct parameters for the call and back", function()
         local lin = nn.Linear(2, 2)
         local w = lin.weight
         local r1, r2 = utils.align_module_device(lin, { execution_device = "cpu" }, function()
            return lin.weight.device, 2
         end)
         assert.are.same({ "cpu", 2 }, { r1, r2 })
         assert.are.equal(w, lin.weight)
         assert.has_error(function()
            utils.align_module_device(lin, { execution_device = "cpu" }, function() error("boom", 0) end)
         end, "boom")
         assert.are.equal(7, utils.align_module_device(lin, function() return 7 end))
      end)

      it("onloads an offloaded module for the call and gathers an offloaded model's state dict", function()
         local m = models.ModelForTest()
         local ref = {}
         for k, v in pairs(m:state_dict()) do ref[k] = v:clone() end
         ml.cpu_offload(m)
         assert.is_true(utils.has_offloaded_params(m.linear1))
         assert.is_false(utils.has_offloaded_params(m))
         assert.are.equal("meta", m.linear1.weight.device)
         local inside = utils.align_module_device(m.linear1, function() return m.linear1.weight.device end)
         assert.are.equal("cpu", inside)
         assert.are.equal("meta", m.linear1.weight.device)
         local sd = utils.get_state_dict_offloaded_model(m)
         local n = 0
         for k, v in pairs(ref) do
            n = n + 1
            assert.is_true(ml.equal(sd[k], v), k)
         end
         assert.are.equal(9, n)
      end)

      it("gets a CPU state dict of a plain model", function()
         local m = models.ModelForTest()
         local sd = utils.get_state_dict_offloaded_model(m)
         assert.is_true(ml.equal(sd["linear1.weight"], m.linear1.weight))
         assert.is_not_nil(sd["batchnorm.num_batches_tracked"])
      end)
   end)

   describe("load_state_dict", function()
      it("maps a safetensors file, zero-copy on CPU", function()
         local before = ml.memory_allocated("cpu")
         local sd, keys = utils.load_state_dict(CKPT .. "model.safetensors")
         assert.are.equal(9, #keys)
         assert.are.equal(before, ml.memory_allocated("cpu"))
         check_value(sd["linear2.weight"], "linear2.weight")
      end)

      it("refuses pickled checkpoints with a clear error", function()
         assert.has_error(function() utils.load_state_dict("x/pytorch_model.bin") end,
            "load_state_dict: x/pytorch_model.bin is not a .safetensors file (moonload reads safetensors checkpoints only; convert pickled .bin files with the safetensors package)")
      end)
   end)

   describe("load_checkpoint_in_model", function()
      local dir
      before_each(function() dir = tmpdir() end)
      after_each(function() rmtree(dir) end)

      it("loads a single file into an empty model as zero-copy views", function()
         local m = empty_model()
         local before = ml.memory_allocated("cpu")
         utils.load_checkpoint_in_model(m, CKPT .. "model.safetensors")
         assert.is_true(ml.memory_allocated("cpu") <= before)
         local C = require("moonload.C")
         for name, t in pairs(m:state_dict()) do
            assert.is_true(C.lib.ml_storage_is_borrowed(C.lib.ml_tensor_storage(t._c)), name)
         end
         check_all(m)
      end)

      for _, case in ipairs({ { "a weight_map index", "sharded/model.safetensors.index.json" },
                              { "a flat index", "flat/weights.index.json" },
                              { "a folder holding an index", "sharded" },
                              { "a folder holding model.safetensors", "" } }) do
         it("loads " .. case[1], function()
            local m = empty_model()
            utils.load_checkpoint_in_model(m, CKPT .. case[2], { device_map = { [""] = "cpu" } })
            check_all(m)
         end)
      end

      it("keeps disk entries in the checkpoint and buffers with their values (Q8 fixed)", function()
         local m = empty_model()
         local off = dir .. "/offload"
         utils.load_checkpoint_in_model(m, CKPT .. "sharded",
            { device_map = { linear1 = "cpu", batchnorm = "disk", linear2 = "disk" }, offload_folder = off })
         check_value(m.linear1.weight, "linear1.weight")
         assert.are.equal("meta", m.linear2.weight.device)
         assert.are.equal("meta", m.batchnorm.weight.device)
         -- accelerate leaves running_mean at 0 here; moonload loads the checkpoint's 7s to CPU
         assert.are.same({ 0, 0, 0, 0 }, values.accelerate_disk_load.running_mean_after_load)
         check_value(m.batchnorm.running_mean, "batchnorm.running_mean")
         assert.are.equal("cpu", m.batchnorm.running_mean.device)
         local index = models.read_json(off .. "/index.json")
         local names = {}
         for k, e in pairs(index) do
            names[#names + 1] = k
            assert.is_truthy(e.safetensors_file:match("^/.*%.safetensors$"))
            assert.are.equal(k, e.weight_name)
         end
         table.sort(names)
         assert.are.same({ "batchnorm.bias", "batchnorm.weight", "linear2.bias", "linear2.weight" }, names)
         -- no .dat copies were written
         local p = io.popen("ls -A '" .. off .. "'")
         assert.are.equal("index.json\n", p:read("*a"))
         p:close()
         local loader = utils.OffloadedWeightsLoader({ save_folder = off })
         check_value(loader["linear2.weight"], "linear2.weight")
         check_value(utils.PrefixedDataset(loader, "batchnorm.")["bias"], "batchnorm.bias")
      end)

      it("offloads buffers too with offload_buffers", function()
         local m = empty_model()
         local off = dir .. "/offload"
         utils.load_checkpoint_in_model(m, CKPT .. "model.safetensors",
            { device_map = { linear1 = "cpu", batchnorm = "disk", linear2 = "cpu" }, offload_folder = off,
              offload_buffers = true })
         assert.are.equal("meta", m.batchnorm.running_mean.device)
         local index = models.read_json(off .. "/index.json")
         assert.is_not_nil(index["batchnorm.running_mean"])
         assert.is_not_nil(index["batchnorm.num_batches_tracked"])
         assert.are.equal("int64", index["batchnorm.num_batches_tracked"].dtype)
      end)

      it("needs an offload_folder for disk entries", function()
         local m = empty_model()
         assert.has_error(function()
            utils.load_checkpoint_in_model(m, CKPT .. "model.safetensors", { device_map = { [""] = "disk" } })
         end, "load_checkpoint_in_model: At least one of the model submodule will be offloaded to disk, please pass along an `offload_folder`.")
      end)

      it("casts floats to dtype and never integers", function()
         local m = empty_model()
         utils.load_checkpoint_in_model(m, CKPT .. "model.safetensors", { device_map = { [""] = "cpu" }, dtype = "float16" })
         assert.are.equal("float16", m.linear1.weight.dtype)
         assert.are.equal("float16", m.batchnorm.running_mean.dtype)
         assert.are.equal("int64", m.batchnorm.num_batches_tracked.dtype)
         check_all(m, 2e-3)
      end)

      it("keeps keep_in_fp32_modules in float32 with dtype float16", function()
         local m = empty_model()
         utils.load_checkpoint_in_model(m, CKPT .. "model.safetensors",
            { device_map = { [""] = "cpu" }, dtype = "float16", keep_in_fp32_modules = { "linear2" } })
         assert.are.equal("float16", m.linear1.weight.dtype)
         assert.are.equal("float32", m.linear2.weight.dtype)
      end)

      it("round-trips CPU weights through a temp folder with offload_state_dict", function()
         local m = empty_model()
         utils.load_checkpoint_in_model(m, CKPT .. "model.safetensors",
            { device_map = { [""] = "cpu" }, offload_state_dict = true })
         check_all(m)
         assert.are.equal("cpu", m.linear1.weight.device)
      end)

      it("refuses a checkpoint whose tensors do not fit, changing nothing", function()
         local m = models.ModelForTest()
         local w = m.linear1.weight
         assert.has_error(function()
            utils.load_checkpoint_in_model(m, CKPT .. "bad_shape.safetensors")
         end, 'load_checkpoint_in_model: the checkpoint at ' .. CKPT .. 'bad_shape.safetensors does not fit ModelForTest: "linear1.weight" has shape [2, 2] in ' .. CKPT .. 'bad_shape.safetensors, the model expects [4, 3]')
         assert.are.equal(w, m.linear1.weight)
         assert.is_false(ml.equal(m.linear2.bias, ml.tensor(values.tensors["linear2.bias"].values)))
      end)

      it("warns about unexpected keys, and strict refuses them", function()
         local m = empty_model()
         local _, _, warnings = models.capture(function()
            return utils.load_checkpoint_in_model(m, CKPT .. "extra_key.safetensors")
         end)
         assert.are.equal(1, #warnings)
         assert.is_truthy(warnings[1]:find("were not used when initializing ModelForTest: [linear3.weight]", 1, true))
         check_all(m)
         local m2 = empty_model()
         assert.has_error(function()
            utils.load_checkpoint_in_model(m2, CKPT .. "extra_key.safetensors", { strict = true })
         end, "load_checkpoint_in_model: the checkpoint at " .. CKPT .. "extra_key.safetensors does not match ModelForTest (strict): unexpected keys: linear3.weight")
         assert.are.equal("meta", m2.linear1.weight.device)
      end)

      it("names missing keys with strict (moonload extension)", function()
         local m = models.NestedModel()
         assert.has_error(function()
            utils.load_checkpoint_in_model(m, CKPT .. "model.safetensors", { strict = true })
         end)
         local ok, err = pcall(utils.load_checkpoint_in_model, m, CKPT .. "model.safetensors", { strict = true })
         assert.is_false(ok)
         assert.is_truthy(err:find("missing keys: head.bias, head.weight, linear0.bias, linear0.weight", 1, true))
      end)

      it("refuses offload_8bit_bnb (no bitsandbytes in moonload)", function()
         assert.has_error(function()
            utils.load_checkpoint_in_model(empty_model(), CKPT .. "model.safetensors", { offload_8bit_bnb = true })
         end, "load_checkpoint_in_model: offload_8bit_bnb is not supported (moonload has no bitsandbytes int8 weights)")
      end)

      it("requires a device for every tensor of the map", function()
         local m = empty_model()
         assert.has_error(function()
            utils.load_checkpoint_in_model(m, CKPT .. "model.safetensors", { device_map = { linear1 = "cpu", linear2 = "cpu" } })
         end, "load_checkpoint_in_model: batchnorm.bias doesn't have any device set.")
      end)

      it("explains bad checkpoint paths", function()
         local m = empty_model()
         assert.has_error(function() utils.load_checkpoint_in_model(m, "no/such/place") end,
            "load_checkpoint_in_model: `checkpoint` should be the path to a file containing a whole state dict, or the index of a sharded checkpoint, or a folder containing a sharded checkpoint or the whole state dict, but got no/such/place.")
         assert.has_error(function() utils.load_checkpoint_in_model(m, dir) end,
            "load_checkpoint_in_model: " .. dir .. " is not a folder containing a `.index.json` file or a pytorch_model.bin or a model.safetensors file")
      end)

      it("reties tied weights after loading", function()
         local m = ml.init_empty_weights(function() return models.TiedModel() end)
         local path = dir .. "/tied.safetensors"
         ml.safetensors.save_file({ ["emb.weight"] = ml.randn(8, 4), ["block.weight"] = ml.randn(4, 4),
                                    ["block.bias"] = ml.randn(4) }, path, { format = "pt" })
         utils.load_checkpoint_in_model(m, path)
         assert.are.equal("cpu", m.head.weight.device)
         assert.are.equal(m.emb.weight, m.head.weight)
      end)
   end)
end)
