-- ml.utils device-map planning against accelerate's own results on mirrored models
-- (tests/fixtures/gen_accelerate.py -> planning.json): maps, warnings, info logs, verbose output.
local utils = require("moonload.utils")
local dm = require("moonload.utils.device_map")
local models = require("utils_models")
local cjson = require("cjson")

local fixture = models.read_json("tests/fixtures/accelerate/planning.json")

local function isnull(v) return v == nil or v == cjson.null end

local function table_of(pairs_list)
   local t = {}
   for _, p in ipairs(pairs_list) do t[p[1]] = p[2] end
   return t
end

local function without_availability(list)
   local out = {}
   for _, m in ipairs(list) do if not m:find("is not available, available devices are", 1, true) then out[#out + 1] = m end end
   return out
end

local function options(case)
   local o = {}
   for k, v in pairs(case.options) do o[k] = v end
   o.max_memory = table_of(case.max_memory)
   return o
end

describe("utils.device_map", function()
   describe("infer_auto_device_map", function()
      for _, case in ipairs(fixture.device_maps) do
         it("matches accelerate: " .. case.label, function()
            local model = models.make(case.model)
            local opts = options(case)
            local lines = {}
            if opts.verbose then opts.verbose = function(line) lines[#lines + 1] = line end end
            local map, keys, warnings, infos = models.capture(function()
               return utils.infer_auto_device_map(model, opts)
            end)
            assert.are.same(table_of(case.device_map), map)
            -- keys list every entry once, in module order
            local n = 0
            for _ in pairs(map) do n = n + 1 end
            assert.are.equal(n, #keys)
            if case.options.clean_result == false then
               local expected_keys = {}
               for i, p in ipairs(case.device_map) do expected_keys[i] = p[1] end
               assert.are.same(expected_keys, keys)
            end
            assert.are.same(case.warnings, without_availability(warnings))
            assert.are.same(case.infos, infos)
            if case.options.verbose then
               assert.are.equal(case.verbose, table.concat(lines, "\n") .. "\n")
            end
         end)
      end

      it("keeps cleaned keys in module order", function()
         local model = models.Stack()
         local _, keys = models.capture(function()
            return utils.infer_auto_device_map(model, { max_memory = { [0] = 500, [1] = 500, cpu = 2000 } })
         end)
         assert.are.same({ "emb", "lm_head", "layers.0", "layers.1", "layers.2.fc", "layers.2.norm", "layers.3",
                           "layers.4", "layers.5", "layers.6", "layers.7", "layers.8", "layers.9", "layers.10",
                           "layers.11" }, keys)
      end)

      it("names a bad max_memory key", function()
         assert.has_error(function()
            utils.infer_auto_device_map(models.ModelForTest(), { max_memory = { gpu0 = 10 } })
         end, 'infer_auto_device_map: max_memory key "gpu0" is not a device (use an integer, "cpu" or "disk")')
         assert.has_error(function()
            models.capture(function() utils.infer_auto_device_map(models.ModelForTest(), { max_memory = { [0] = "lots" } }) end)
         end, "infer_auto_device_map: `size` lots is not in a valid format. Use an integer for bytes, or a string with an unit (like '5.0GB').")
      end)

      it("also works on a model built on meta", function()
         local ml = require("moonload")
         local model = ml.init_empty_weights and ml.init_empty_weights(function() return models.NestedModel() end)
            or models.NestedModel()
         local map = models.capture(function()
            return utils.infer_auto_device_map(model, { max_memory = { [0] = 250, [1] = 250 } })
         end)
         assert.are.same({ linear0 = 0, ["sub.linear1"] = 0, ["sub.batchnorm"] = 1, ["sub.linear2"] = 1, head = 1 }, map)
      end)
   end)

   describe("fallback_allocate", function()
      for i, case in ipairs(fixture.fallback_allocate) do
         it("matches accelerate " .. i .. " (" .. case.model .. ", " .. tostring(case.limit) .. ")", function()
            local model = models.make(case.model)
            local sizes = utils.compute_module_sizes(model)
            local modules = models.top_level(model)
            local opts = { no_split_module_classes = case.no_split, tied_parameters = utils.find_tied_parameters(model) }
            if not isnull(case.error) then
               -- accelerate raises IndexError here; moonload names the tied parameter
               assert.has_error(function() utils.fallback_allocate(modules, sizes, case.limit, opts) end,
                  "fallback_allocate: tied parameter emb.weight is not inside any module left to place")
               return
            end
            local name, _, remaining = utils.fallback_allocate(modules, sizes, case.limit, opts)
            local expected = case.name
            if isnull(expected) then expected = nil end
            assert.are.equal(expected, name)
            local names = {}
            for j, e in ipairs(remaining) do names[j] = e[1] end
            assert.are.same(case.remaining, names)
         end)
      end
   end)

   describe("on transformers' GPT-2 (tiny config) vs ml.models.gpt2", function()
      local g = fixture.gpt2
      local ml = require("moonload")
      local model = ml.init_empty_weights(function() return ml.models.gpt2.GPT2LMHeadModel(g.config) end)

      it("has the same size and ties", function()
         assert.are.equal(g.total_size, utils.compute_module_sizes(model)[""])
         assert.are.same(g.tied, utils.find_tied_parameters(model))
      end)

      for i, case in ipairs(g.maps) do
         it("gives accelerate's map " .. i, function()
            local map, _, warnings = models.capture(function()
               return utils.infer_auto_device_map(model, { max_memory = table_of(case.max_memory),
                                                           no_split_module_classes = case.no_split })
            end)
            assert.are.same(table_of(case.device_map), map)
            assert.are.same(case.warnings, without_availability(warnings))
         end)
      end

      it("gives accelerate's balanced budgets", function()
         for _, case in ipairs(g.balanced) do
            local mm = models.capture(function()
               return utils.get_balanced_memory(model, { max_memory = { [0] = 1e6, [1] = 1e6, [2] = 1e6, cpu = 1e7 },
                  no_split_module_classes = { "GPT2Block" }, low_zero = case.low_zero })
            end)
            assert.are.same(table_of(case.result), mm)
         end
      end)
   end)

   describe("get_max_memory", function()
      it("normalises and orders like accelerate", function()
         for _, case in ipairs(fixture.max_memory) do
            if isnull(case.error) then
               local mm, keys = models.capture(function() return utils.get_max_memory(table_of(case.input)) end)
               local expected_keys = {}
               for i, p in ipairs(case.result) do expected_keys[i] = p[1] end
               assert.are.same(table_of(case.result), mm)
               assert.are.same(expected_keys, keys)
            end
         end
      end)

      it("rejects what accelerate rejects, naming the key", function()
         assert.has_error(function() utils.get_max_memory({ gpu0 = 10 }) end,
            'get_max_memory: max_memory key "gpu0" is not a device (use an integer, "cpu" or "disk")')
         assert.has_error(function() utils.get_max_memory({ ["cuda:0"] = 10 }) end,
            'get_max_memory: max_memory key "cuda:0" is not a device (use an integer, "cpu" or "disk")')
         assert.has_error(function() utils.get_max_memory({ [-1] = 10 }) end,
            'get_max_memory: max_memory key -1 is not a device (use an integer, "cpu" or "disk")')
      end)

      it("does not modify its input and warns about absent GPUs", function()
         local input = { cpu = "1GB", [3] = "1KB" }
         local mm, _, warnings = models.capture(function() return utils.get_max_memory(input) end)
         assert.are.same({ cpu = "1GB", [3] = "1KB" }, input)
         assert.are.same({ cpu = 1000000000, [3] = 1000 }, mm)
         local n = require("moonload.C").lib.ml_cuda_device_count()
         if n <= 3 then assert.are.equal(1, #warnings) end
      end)

      it("asks the CUDA seam for each GPU's free memory, skipping failing ones", function()
         local count, free = dm.cuda_device_count, dm.gpu_free_memory
         dm.cuda_device_count = function() return 3 end
         dm.gpu_free_memory = function(i) if i == 1 then return nil end return (i + 1) * 1000 end
         local ok, mm, keys, _, infos = pcall(models.capture, function() return utils.get_max_memory() end)
         dm.cuda_device_count, dm.gpu_free_memory = count, free
         assert.is_true(ok, tostring(mm))
         assert.are.same({ 0, 2, "cpu" }, keys)
         assert.are.equal(1000, mm[0])
         assert.are.equal(3000, mm[2])
         assert.is_nil(mm[1])
         assert.are.same({ "Device 1 seems unavailable, Proceeding to check subsequent devices." }, infos)
      end)

      it("is the same function as ml.infer_auto_device_map", function()
         assert.are.equal(utils.infer_auto_device_map, require("moonload").infer_auto_device_map)
      end)

      it("gives the available RAM as cpu when nothing is passed", function()
         local mm, keys = utils.get_max_memory()
         assert.is_true(mm.cpu > 0)
         assert.are.equal("cpu", keys[#keys])
         assert.is_nil(mm.disk)
         local f = assert(io.open("/proc/meminfo"))
         local text = f:read("*a")
         f:close()
         local avail = tonumber(text:match("MemAvailable:%s*(%d+)")) * 1024
         assert.is_true(math.abs(mm.cpu - avail) < 512 * 1024 * 1024)
      end)
   end)

   describe("get_balanced_memory", function()
      for _, case in ipairs(fixture.balanced) do
         it("matches accelerate: " .. case.label, function()
            local model = models.make(case.model)
            local mm = models.capture(function()
               return utils.get_balanced_memory(model, { max_memory = table_of(case.max_memory),
                  no_split_module_classes = not isnull(case.no_split) and case.no_split or nil,
                  low_zero = case.low_zero })
            end)
            assert.are.same(table_of(case.result), mm)
         end)
      end

      it("accepts a disk key (Accelerate crashed on it)", function()
         local mm = models.capture(function()
            return utils.get_balanced_memory(models.ModelForTest(), { max_memory = { [0] = 1000, [1] = 1000, disk = "1GB" } })
         end)
         assert.are.same({ [0] = 215, [1] = 1000, disk = 1000000000 }, mm)
      end)

      it("takes a set of no_split classes", function()
         local a = models.capture(function()
            return utils.get_balanced_memory(models.Stack(), { max_memory = { [0] = 10000, [1] = 10000, [2] = 10000 },
               no_split_module_classes = { Block = true } })
         end)
         assert.are.equal(620, a[0])
      end)
   end)

   describe("clean_device_map", function()
      it("gives accelerate's result (as a dict)", function()
         for _, case in ipairs(fixture.clean) do
            local input = table_of(case.input)
            local keys = {}
            for i, p in ipairs(case.input) do keys[i] = p[1] end
            local out, out_keys = utils.clean_device_map(input, keys)
            assert.are.same(table_of(case.output), out)
            assert.are.equal(#case.output, #out_keys)
         end
      end)

      it("takes Accelerate's module_name in an options table", function()
         local map = utils.clean_device_map({ ["a.x"] = 0, ["a.y"] = 0, ["b.x"] = 1, ["b.y"] = 1 }, { module_name = "a" })
         assert.are.same({ a = 0, ["b.x"] = 1, ["b.y"] = 1 }, map)
         local _, keys = utils.clean_device_map({ ["a.x"] = 0, ["a.y"] = 0, c = 1 }, { keys = { "c", "a.x", "a.y" } })
         assert.are.same({ "c", "a" }, keys)
      end)

      it("puts a merged entry where its first member was", function()
         local map, keys = utils.clean_device_map({ ["a.x"] = 0, ["a.y"] = 0, b = 1 }, { "a.x", "a.y", "b" })
         assert.are.same({ a = 0, b = 1 }, map)
         assert.are.same({ "a", "b" }, keys)
      end)
   end)

   describe("device_map_keys", function()
      it("orders a hand-written map by module order", function()
         local map = { head = "cpu", ["sub.linear2"] = 0, linear0 = 0, ["sub.batchnorm.weight"] = 1, ["sub.batchnorm"] = 1,
                       ["sub.linear1"] = 0, zzz = "disk", [""] = 0 }
         assert.are.same({ "", "linear0", "sub.linear1", "sub.batchnorm", "sub.batchnorm.weight", "sub.linear2", "head", "zzz" },
            utils.device_map_keys(map, models.NestedModel()))
         assert.are.same({ "scale", "a", "b", "mask" },
            utils.device_map_keys({ mask = 0, b = 0, a = 0, scale = 0 }, models.WithParam()))
      end)
   end)

   describe("check_device_map", function()
      for _, case in ipairs(fixture.check_device_map) do
         it("matches accelerate: " .. case.label, function()
            local model = models.make(case.model)
            local map = table_of(case.device_map)
            if isnull(case.error) then
               local _, _, warnings = models.capture(function() return utils.check_device_map(model, map) end)
               -- parameter and buffer names are valid keys here (Accelerate's Q6 warning is fixed)
               if case.label == "param key" then
                  assert.are.same({}, warnings)
               else
                  assert.are.same(case.warnings, warnings)
               end
            else
               assert.has_error(function() utils.check_device_map(model, map) end, "check_device_map: " .. case.error)
            end
         end)
      end

      it("rejects a value that is not a device", function()
         assert.has_error(function() utils.check_device_map(models.ModelForTest(), { [""] = "gpu" }) end,
            'check_device_map: device_map[""] = "gpu" is not a device (use an integer, "cpu" or "disk")')
      end)
   end)

   describe("find_tied_parameters", function()
      -- Accelerate's group order follows a Python set (hash-seeded): compare groups sorted
      local function by_first(groups)
         table.sort(groups, function(a, b) return a[1] < b[1] end)
         return groups
      end

      it("matches accelerate (groups compared in sorted order)", function()
         for _, case in ipairs(fixture.tied) do
            assert.are.same(by_first(case.tied), by_first(utils.find_tied_parameters(models.make(case.model))), case.model)
         end
      end)

      it("orders groups by the canonical parameter's position", function()
         assert.are.same({ { "0.weight", "1.weight" }, { "0.bias", "1.bias" } },
            utils.find_tied_parameters(models.SequentialTwice()))
      end)
   end)
end)
