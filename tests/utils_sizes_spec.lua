-- ml.utils sizes: convert_file_size_to_int, dtype_byte_size, compute_module_sizes,
-- compute_module_total_buffer_size, get_max_layer_size, against accelerate's own results.
local utils = require("moonload.utils")
local models = require("utils_models")
local cjson = require("cjson")

local fixture = models.read_json("tests/fixtures/accelerate/planning.json")

local function isnull(v) return v == nil or v == cjson.null end

describe("utils.sizes", function()
   describe("convert_file_size_to_int", function()
      it("matches accelerate on every size string of the fixture", function()
         assert.is_true(#fixture.size_strings >= 20)
         for _, case in ipairs(fixture.size_strings) do
            local input, value, err = case[1], case[2], case[3]
            if isnull(err) then
               assert.are.equal(value, utils.convert_file_size_to_int(input), input)
            else
               assert.has_error(function() utils.convert_file_size_to_int(input) end,
                  "convert_file_size_to_int: " .. err)
            end
         end
      end)

      it("returns numbers of bytes unchanged and rejects other types", function()
         assert.are.equal(500, utils.convert_file_size_to_int(500))
         assert.are.equal(0, utils.convert_file_size_to_int(0))
         assert.has_error(function() utils.convert_file_size_to_int(true) end,
            "convert_file_size_to_int: `size` must be a number of bytes or a string like '5.0GB', got boolean")
         assert.has_error(function() utils.convert_file_size_to_int(-3) end,
            "convert_file_size_to_int: `size` -3 is not in a valid format. Use an integer for bytes, or a string with an unit (like '5.0GB').")
      end)

      it("pins the values of the reference table", function()
         local t = { ["10GiB"] = 10737418240, ["10GB"] = 10000000000, ["10Gb"] = 1250000000,
                     ["10MB"] = 10000000, ["10mb"] = 1250000, ["10KiB"] = 10240, ["10kb"] = 1250,
                     ["1MiB"] = 1048576, ["1.5GB"] = 1500000000, ["0MB"] = 0, ["10 GB"] = 10000000000 }
         for k, v in pairs(t) do assert.are.equal(v, utils.convert_file_size_to_int(k), k) end
      end)
   end)

   describe("dtype_byte_size", function()
      it("matches accelerate, bool = 1/8", function()
         for name, size in pairs(fixture.dtype_byte_size) do
            assert.are.equal(size, utils.dtype_byte_size(name), name)
            assert.are.equal(size, utils.dtype_byte_size("torch." .. name), name)
         end
         assert.are.equal(0.125, utils.dtype_byte_size("bool"))
      end)

      it("names an unknown dtype", function()
         assert.has_error(function() utils.dtype_byte_size("float13") end, 'dtype_byte_size: unknown dtype "float13"')
      end)
   end)

   describe("compute_module_sizes", function()
      it("matches accelerate's sizes and key order for every mirrored model", function()
         for _, case in ipairs(fixture.sizes) do
            local model = models.make(case.model)
            local opts = { dtype = not isnull(case.dtype) and case.dtype or nil,
                           special_dtypes = not isnull(case.special_dtypes) and case.special_dtypes or nil }
            local sizes, keys = utils.compute_module_sizes(model, opts)
            local label = case.model .. " " .. tostring(opts.dtype)
            assert.are.equal(#case.sizes, #keys, label)
            for i, pair in ipairs(case.sizes) do
               assert.are.equal(pair[1], keys[i], label)
               assert.are.equal(pair[2], sizes[pair[1]], label .. " " .. pair[1])
            end
            assert.are.equal(0, sizes["no.such.module"])
            if not isnull(case.buffer_total) then
               assert.are.equal(case.buffer_total, utils.compute_module_total_buffer_size(model, opts), label)
            end
         end
      end)
   end)

   describe("get_max_layer_size", function()
      it("matches accelerate with and without no_split classes", function()
         for _, case in ipairs(fixture.max_layer) do
            local model = models.make(case.model)
            local sizes = utils.compute_module_sizes(model)
            local modules = models.top_level(model)
            local size, names = utils.get_max_layer_size(modules, sizes, case.no_split)
            assert.are.equal(case.size, size, case.model)
            assert.are.same(case.names, names, case.model)
         end
      end)
   end)
end)
