--- Shared by the ops_*_spec files: loads the PyTorch fixtures written by
-- tests/fixtures/gen_ops_elementwise.py, builds their inputs through the Lua API, runs each case's
-- call and compares every output (dtype, shape, values) with PyTorch's; and the same for the
-- records of tests/fixtures/gen_ops_nn.py (ops_nn_spec, ops_matmul_spec).
local cjson = require("cjson")
local assert = require("luassert")
local ml = require("moonload")
local C = require("moonload.C")

local ffi, lib = C.ffi, C.lib

local M = {}

local HERE = debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]*$") or "."

function M.load(name)
   local f = assert(io.open(HERE .. "/fixtures/" .. name, "rb"))
   local doc = cjson.decode(f:read("*a"))
   f:close()
   return doc
end

local SPECIAL = { nan = 0 / 0, inf = math.huge, ["-inf"] = -math.huge }

local function value(v)
   if type(v) == "string" then return assert(SPECIAL[v], "bad fixture value " .. v) end
   return v
end

local function numel(shape)
   local n = 1
   for i = 1, #shape do n = n * shape[i] end
   return n
end

--- The tensor an input spec describes: base data (moved to device when given), then its view
-- steps (taken on that device, so kernels see the strided layout).
function M.build(spec, device)
   local t
   local n = numel(spec.shape)
   if n == 0 then
      t = ml.zeros(spec.shape, { dtype = spec.dtype })
   elseif #spec.shape == 0 then
      t = ml.tensor(value(spec.data[1]), { dtype = spec.dtype })
   else
      local flat = {}
      for i = 1, #spec.data do flat[i] = value(spec.data[i]) end
      t = ml.tensor(flat, { dtype = spec.dtype }):reshape(spec.shape)
   end
   if device then t = t:to(device) end
   for _, v in ipairs(spec.views or {}) do
      if v[1] == "transpose" then t = t:transpose(v[2], v[3])
      elseif v[1] == "narrow" then t = t:narrow(v[2], v[3], v[4])
      elseif v[1] == "expand" then t = t:expand(v[2])
      else error("unknown view step " .. tostring(v[1])) end
   end
   return t
end

--- Flat row-major values of t as numbers (bools as 0/1).
function M.flat(t)
   local n = t:numel()
   if n == 0 then return {} end
   local list = t:dim() == 0 and { t:item() } or t:reshape(n):tolist()
   for i = 1, #list do
      if list[i] == true then list[i] = 1 elseif list[i] == false then list[i] = 0 end
   end
   return list
end

-- atol, rtol per dtype: one unit in the last place for the half types.
local TOL = {
   float32 = { 1e-6, 1e-5 }, float64 = { 1e-12, 1e-12 }, float16 = { 1e-3, 1e-3 }, bfloat16 = { 8e-3, 8e-3 },
}

--- Asserts t matches an encoded expected tensor; tol = {rtol, atol} overrides the dtype's.
function M.check(t, expected, what, tol)
   assert(ml.is_tensor(t), what .. ": expected a tensor result, got " .. type(t))
   assert.are.equal(expected.dtype, t.dtype, what .. ": dtype")
   assert.are.same(expected.shape, t.shape, what .. ": shape")
   local got = M.flat(t)
   assert.are.equal(#expected.data, #got, what .. ": element count")
   local d = TOL[expected.dtype] or { 0, 0 }
   local atol, rtol = d[1], d[2]
   if tol then atol, rtol = tol.atol or atol, tol.rtol or rtol end
   for i = 1, #got do
      local e, g = value(expected.data[i]), got[i]
      local ok = (e ~= e and g ~= g) or e == g or math.abs(e - g) <= atol + rtol * math.abs(e)
      if not ok then error(string.format("%s: element %d is %.9g, expected %.9g", what, i, g, e), 2) end
   end
end

--- Runs a fixture case through the Lua API, its inputs on device (default cpu); returns the
-- results as a list.
function M.run(case, device)
   local inputs = {}
   for i, spec in ipairs(case.inputs) do inputs[i] = M.build(spec, device) end
   local function arg(a)
      if type(a) == "table" then
         if a.t then return inputs[a.t] end
         if a[1] ~= nil and type(a[1]) == "table" and a[1].t then
            local list = {}
            for i = 1, #a do list[i] = inputs[a[i].t] end
            return list
         end
         return a
      end
      if type(a) == "string" and SPECIAL[a] == nil then return a end   -- e.g. gelu's "tanh"
      return value(a)
   end
   local args = {}
   for i = 1, #case.args do args[i] = arg(case.args[i]) end
   local fn = case.call:match("^ml%.(.*)$")
   if fn then return { ml[fn](unpack(args, 1, #case.args)) } end
   local x = inputs[1]
   return { x[case.call](x, unpack(args, 1, #case.args)) }
end

--- Defines one `it` per fixture case of a file (cases with `special` are left to the spec);
-- describe and it are the spec's (busted gives them to spec files only).
function M.define(file, describe, it)
   local doc = M.load(file)
   describe("matches PyTorch " .. doc.meta.torch .. " (" .. file .. ")", function()
      for _, case in ipairs(doc.cases) do
         if not case.special then
            it(case.name, function()
               local results = M.run(case)
               assert.are.equal(#case.out, #results, case.name .. ": number of results")
               for k = 1, #case.out do M.check(results[k], case.out[k], case.name, case.tol) end
            end)
         end
      end
   end)
   return doc
end

-- The CUDA kernels use the device's float intrinsics: a few units in the last place.
local CUDA_TOL = {
   float32 = { 1e-5, 1e-4 }, float64 = { 1e-12, 1e-11 }, float16 = { 2e-3, 2e-3 }, bfloat16 = { 1.6e-2, 1.6e-2 },
}

--- The same cases with their inputs on cuda:0 (make test-cuda, make test-cuda-sim): results stay
-- on the device and match PyTorch's within the CUDA tolerances. The spec tags the describe #cuda.
function M.define_cuda(file, describe, it)
   local doc = M.load(file)
   describe("on cuda:0 matches PyTorch " .. doc.meta.torch .. " (" .. file .. ") #cuda", function()
      for _, case in ipairs(doc.cases) do
         if not case.special and #case.inputs > 0 then
            it(case.name, function()
               local results = M.run(case, "cuda:0")
               assert.are.equal(#case.out, #results, case.name .. ": number of results")
               for k = 1, #case.out do
                  assert.are.equal("cuda:0", results[k].device, case.name .. ": result device")
                  local d = CUDA_TOL[case.out[k].dtype]
                  local tol = d and { atol = d[1], rtol = d[2] } or nil
                  if case.tol then tol = { atol = math.max(case.tol.atol or 0, tol and tol.atol or 0),
                                           rtol = math.max(case.tol.rtol or 0, tol and tol.rtol or 0) } end
                  M.check(results[k]:cpu(), case.out[k], case.name, tol)
               end
            end)
         end
      end
   end)
end

-- --- gen_ops_nn.py fixtures (ops_nn_spec, ops_matmul_spec): a record is { shape, dtype, data,
-- view }, values set and read back through the C core as float64, view ops with 0-based dims.

--- The tensor a fixture record describes: base values (moved to device when given), then its
-- view ops.
function M.nn_build(rec, device)
   local t = ml.empty(rec.shape, { dtype = rec.dtype })
   local n = #rec.data
   if n > 0 then
      local buf = ffi.new("double[?]", n)
      for i = 1, n do buf[i - 1] = rec.data[i] end
      C.check(lib.ml_tensor_write_f64(t._c, buf, n))
   end
   if device then t = t:to(device) end
   for _, op in ipairs(rec.view or {}) do
      if op[1] == "transpose" then t = t:transpose(op[2] + 1, op[3] + 1)
      elseif op[1] == "narrow" then t = t:narrow(op[2] + 1, op[3] + 1, op[4])
      elseif op[1] == "expand" then t = t:expand(op[2])
      elseif op[1] == "permute" then
         local dims = {}
         for i, d in ipairs(op[2]) do dims[i] = d + 1 end
         t = t:permute(dims)
      else error("unknown view op " .. tostring(op[1])) end
   end
   return t
end

--- Flat row-major values of a cpu tensor, read through the core as float64.
function M.values(t)
   local n = t:numel()
   local buf = ffi.new("double[?]", math.max(n, 1))
   C.check(lib.ml_tensor_read_f64(t._c, buf, n))
   local out = {}
   for i = 1, n do out[i] = buf[i - 1] end
   return out
end

-- atol, rtol per dtype; the CUDA kernels get looser ones for the reduced-precision dtypes.
local NN_TOL = { float32 = { 1e-5, 1e-4 }, float64 = { 1e-10, 1e-10 }, float16 = { 2e-3, 2e-3 },
                 bfloat16 = { 2e-2, 1e-2 }, int64 = { 0, 0 } }
local NN_CUDA_TOL = { float32 = { 1e-4, 1e-3 }, float64 = { 1e-9, 1e-9 }, float16 = { 1e-2, 1e-2 },
                      bfloat16 = { 5e-2, 2e-2 }, int64 = NN_TOL.int64 }

local function matches(expected, got, what, tol)
   assert.are.same(expected.shape, got.shape, what .. ": shape")
   assert.are.equal(expected.dtype, got.dtype, what .. ": dtype")
   local ev, gv = expected.data, M.values(got)
   local atol, rtol = tol[expected.dtype][1], tol[expected.dtype][2]
   assert.are.equal(#ev, #gv, what .. ": element count")
   for i = 1, #ev do
      local e, g = ev[i], gv[i]
      local ok = (e ~= e and g ~= g) or e == g or math.abs(e - g) <= atol + rtol * math.abs(e)
      if not ok then
         error(string.format("%s: element %d is %.9g, expected %.9g", what, i, g, e), 3)
      end
   end
end

--- Asserts a cpu tensor has a record's shape, dtype and values within the dtype's tolerance
-- (NaN matches NaN).
function M.assert_matches(expected, got, what)
   matches(expected, got, what, NN_TOL)
end

--- The same for a result of a CUDA kernel: on cuda:0, compared on the cpu with the CUDA tolerances.
function M.assert_matches_cuda(expected, got, what)
   assert.are.equal("cuda:0", got.device, what .. ": device")
   matches(expected, got:cpu(), what, NN_CUDA_TOL)
end

--- The message of the error fn raises, without the "file:line: " prefix.
function M.errmsg(fn)
   local ok, err = pcall(fn)
   assert.is_false(ok, "expected an error")
   return (tostring(err):gsub("^[^:]*:%d+: ", ""))
end

return M
