-- ml.utils offload folders: Accelerate's index.json + <name>.dat format, both directions,
-- checked against a folder written by accelerate (tests/fixtures/gen_accelerate.py).
local ml = require("moonload")
local offload = require("moonload.utils.offload")
local cjson = require("cjson")

local FIX = "tests/fixtures/accelerate/"

local function read_file(path)
   local f = assert(io.open(path, "rb"))
   local s = f:read("*a")
   f:close()
   return s
end

local function tmpdir()
   local path = os.tmpname()
   os.remove(path)
   assert(os.execute("mkdir -p " .. path) == 0 or true)
   return path
end

local function rmtree(path) os.execute("rm -rf '" .. path .. "'") end

local expected = cjson.decode(read_file(FIX .. "offload_values.json"))

-- Values as Lua numbers, int64 compared exactly through tolist.
local function values_of(t)
   local flat = t:reshape(-1)
   if t.dtype == "bool" then
      local out = {}
      for i, v in ipairs(flat:tolist()) do out[i] = v and 1 or 0 end
      return out
   end
   return flat:tolist()
end

local function build(name)
   local e = expected.tensors[name]
   local vals = e.values
   local t = ml.tensor(vals, { dtype = "float64" })
   if e.dtype == "bool" then
      t = ml.tensor(vals, { dtype = "float64" }):to("bool")
   elseif e.dtype == "int64" then
      t = ml.tensor(vals, { dtype = "int64" })
   else
      t = t:to(e.dtype)
   end
   if #e.shape == 0 then return t:reshape({}) end
   return t:reshape(e.shape)
end

describe("utils.offload", function()
   describe("reading an accelerate-written folder", function()
      it("loads every dtype, bf16 and 0-d tensors with exact values", function()
         local index = cjson.decode(read_file(FIX .. "offload/index.json"))
         for _, name in ipairs(expected.order) do
            local e = expected.tensors[name]
            local t = offload.load_offloaded_weight(FIX .. "offload/" .. name .. ".dat", index[name])
            assert.are.equal(e.dtype, t.dtype, name)
            assert.are.same(e.shape, t.shape, name)
            local got = values_of(t)
            assert.are.equal(#e.values, #got, name)
            for i, v in ipairs(e.values) do assert.are.equal(v, got[i], name .. "[" .. i .. "]") end
         end
      end)

      it("gives zero-copy views over the file mapping", function()
         local index = cjson.decode(read_file(FIX .. "offload/index.json"))
         local before = ml.memory_allocated("cpu")
         local t = offload.load_offloaded_weight(FIX .. "offload/w.float64.dat", index["w.float64"])
         assert.are.equal(before, ml.memory_allocated("cpu"))
         assert.is_true(t:data_ptr() ~= 0)
      end)

      it("serves the folder through OffloadedWeightsLoader", function()
         local loader = offload.OffloadedWeightsLoader({ save_folder = FIX .. "offload" })
         assert.are.equal(#expected.order, loader:len())
         assert.are.equal("bfloat16", loader["w.bfloat16"].dtype)
         assert.are.equal(42, loader["s.int64"]:item())
         assert.is_nil(loader["nope"])
         assert.are.equal("dflt", loader:get("nope", "dflt"))
      end)

      it("rejects a .dat file too small for its index entry", function()
         assert.has_error(function()
            offload.load_offloaded_weight(FIX .. "offload/w.int8.dat", { dtype = "int8", shape = { 4, 4 } })
         end, "load_offloaded_weight: " .. FIX .. "offload/w.int8.dat holds 3 bytes, a int8 tensor of shape [4, 4] needs 16")
      end)

      it("rejects an unknown dtype", function()
         assert.has_error(function()
            offload.load_offloaded_weight(FIX .. "offload/w.int8.dat", { dtype = "complex32", shape = { 1 } })
         end, "load_offloaded_weight: " .. FIX .. "offload/w.int8.dat has unknown dtype complex32")
      end)
   end)

   describe("writing", function()
      local dir
      before_each(function() dir = tmpdir() end)
      after_each(function() rmtree(dir) end)

      it("writes byte-identical .dat files and an equivalent index.json", function()
         local sd = {}
         for _, name in ipairs(expected.order) do sd[name] = build(name) end
         offload.offload_state_dict(dir, sd, expected.order)
         local theirs = cjson.decode(read_file(FIX .. "offload/index.json"))
         local ours = cjson.decode(read_file(dir .. "/index.json"))
         assert.are.same(theirs, ours)
         for _, name in ipairs(expected.order) do
            local a = read_file(FIX .. "offload/" .. name .. ".dat")
            local b = read_file(dir .. "/" .. name .. ".dat")
            assert.are.equal(expected.tensors.bytes[name .. ".dat"], #b, name)
            assert.is_true(a == b, name .. ".dat differs from accelerate's")
         end
         -- The index text keeps Accelerate's layout (indent 2, given order).
         assert.are.equal(read_file(FIX .. "offload/index.json"), read_file(dir .. "/index.json"))
      end)

      it("round-trips every dtype through load_offloaded_weight", function()
         local index = {}
         for _, name in ipairs(expected.order) do
            local t = build(name)
            offload.offload_weight(t, name, dir, { index = index })
            local back = offload.load_offloaded_weight(dir .. "/" .. name .. ".dat", index[name])
            assert.are.same(t.shape, back.shape)
            assert.are.equal(t.dtype, back.dtype)
            assert.is_true(ml.equal(t, back), name)
         end
      end)

      it("merges save_offload_index into an existing index.json and ignores empty ones", function()
         offload.save_offload_index({ a = { dtype = "float32", shape = { 2 } } }, dir)
         offload.save_offload_index({ b = { dtype = "int8", shape = {} } }, dir)
         offload.save_offload_index({}, dir)
         offload.save_offload_index(nil, dir)
         assert.are.same({ a = { dtype = "float32", shape = { 2 } }, b = { dtype = "int8", shape = {} } },
            cjson.decode(read_file(dir .. "/index.json")))
      end)

      it("leaves no temp files and refuses meta tensors without writing", function()
         local w = ml.empty({ 2, 2 }, { device = "meta" })
         assert.has_error(function() offload.offload_weight(w, "w", dir) end,
            'offload_weight: "w" is on the meta device (it has no data to write)')
         assert.is_nil(io.open(dir .. "/w.dat", "rb"))
         offload.offload_weight(ml.ones({ 3 }), "x", dir)
         local p = io.popen("ls -A '" .. dir .. "'")
         local listing = p:read("*a")
         p:close()
         assert.are.equal("x.dat\n", listing)
      end)
   end)

   describe("OffloadedWeightsLoader", function()
      it("needs one source", function()
         assert.has_error(function() offload.OffloadedWeightsLoader({}) end,
            "OffloadedWeightsLoader: Need either a `state_dict`, a `save_folder` or an `index` containing offloaded weights.")
      end)

      it("lets the in-memory state dict win and dedups keys", function()
         local sd = { ["w.float32"] = ml.zeros({ 1 }), extra = ml.ones({ 2 }) }
         local loader = offload.OffloadedWeightsLoader({ state_dict = sd, save_folder = FIX .. "offload" })
         assert.are.equal(sd["w.float32"], loader["w.float32"])
         assert.are.equal(#expected.order + 1, loader:len())
         local keys = loader:keys()
         assert.are.equal("extra", keys[1])
         assert.are.equal("w.float32", keys[2])
         assert.is_true(loader:contains("s.int64"))
         assert.is_false(loader:contains("zzz"))
      end)

      it("serves names that look like its methods as entries", function()
         local t = ml.ones({ 1 })
         local loader = offload.OffloadedWeightsLoader({ state_dict = { prefix = t, device = t } })
         assert.are.equal(t, loader["prefix"])
         assert.are.equal(t, loader["device"])
      end)
   end)

   describe("PrefixedDataset", function()
      it("prefixes lookups and keeps Accelerate's unfiltered len and full keys", function()
         local a, b, c = ml.ones({ 1 }), ml.zeros({ 1 }), ml.ones({ 2 })
         local ds = offload.PrefixedDataset({ ["l1.weight"] = a, ["l1.bias"] = b, ["l2.weight"] = c }, "l1.")
         assert.are.equal(a, ds["weight"])
         assert.are.equal(b, ds:get("bias"))
         assert.is_nil(ds["missing"])
         assert.are.equal(3, ds:len())
         assert.are.same({ "l1.bias", "l1.weight" }, ds:keys())
      end)

      it("stacks over an OffloadedWeightsLoader", function()
         local loader = offload.OffloadedWeightsLoader({ save_folder = FIX .. "offload" })
         local ds = offload.PrefixedDataset(loader, "s.")
         assert.are.equal(2.5, ds["float32"]:item())
         assert.are.equal(-3.5, ds["bfloat16"]:item())
      end)
   end)

   describe("extract_submodules_state_dict", function()
      it("matches whole names only", function()
         local sd = { ["a.1.w"] = 1, ["a.10.w"] = 2, ["a.1"] = 3, ["b"] = 4 }
         assert.are.same({ ["a.1.w"] = 1, ["a.1"] = 3 }, offload.extract_submodules_state_dict(sd, { "a.1" }))
         assert.are.same({}, offload.extract_submodules_state_dict(sd, { "" }))
      end)
   end)
end)
