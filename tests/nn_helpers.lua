-- Shared helpers for the nn_*_spec files (and, through models_helpers, the models_*_spec files):
-- the PyTorch fixtures of tests/fixtures/gen_nn.py, float comparisons, and the inputs the recurrent
-- kernels' specs (ops_delta_rule_spec, ops_ssm_scan_spec) rebuild from closed formulas.
local cjson = require("cjson")

local M = {}

function M.read_json(path)
   local f = assert(io.open(path, "rb"))
   local t = cjson.decode(f:read("*a"))
   f:close()
   return t
end

--- tests/fixtures/nn.json, decoded.
function M.fixture()
   return M.read_json("tests/fixtures/nn.json")
end

--- Largest absolute difference between a tensor and nested Lua lists of the same shape.
function M.max_abs_diff(t, ref)
   local got = t:tolist()
   local worst = 0
   local function walk(a, b, path)
      if type(b) == "table" then
         assert(type(a) == "table" and #a == #b,
            string.format("shape mismatch at %s: %s vs %d", path, type(a) == "table" and #a or type(a), #b))
         for i = 1, #b do walk(a[i], b[i], path .. "[" .. i .. "]") end
      else
         local d = math.abs(a - b)
         if d ~= d then d = math.huge end
         if d > worst then worst = d end
      end
   end
   walk(got, ref, "")
   return worst
end

--- The largest difference between tensor t and a flat list, relative to the list's largest magnitude.
function M.rel_err(t, want)
   local got = t:float():contiguous():view(-1):tolist()
   assert(#want == #got, string.format("element count: %d, want %d", #got, #want))
   local diff, top = 0, 0
   for i = 1, #want do
      diff = math.max(diff, math.abs(got[i] - want[i]))
      top = math.max(top, math.abs(want[i]))
   end
   return diff / top
end

--- Raises unless rel_err(t, want) <= tol, naming what.
function M.assert_rel_close(t, want, tol, what)
   local e = M.rel_err(t, want)
   assert(e <= tol, string.format("%s: relative error %.3g over %.3g", what, e, tol))
end

--- A float32 tensor of shape whose element n (row-major, from 0) is f(n), as
-- tests/fixtures/recurrence_fixtures.py's formula makes it.
function M.formula(shape, f)
   local n = 1
   for _, s in ipairs(shape) do n = n * s end
   local list = {}
   for i = 0, n - 1 do list[i + 1] = f(i) end
   return require("moonload").tensor(list):view(shape)
end

--- Each argument moved to device dev (nil ones stay nil), as many results as arguments.
function M.on_device(dev, ...)
   local r = { ... }
   for i = 1, select("#", ...) do r[i] = r[i] and r[i]:to(dev) end
   return unpack(r, 1, select("#", ...))
end

--- The number a Lua script (run from the repository root with moonload on its path) prints,
-- run in a process of its own under each of envs (e.g. "MOONLOAD_NO_AVX512=1": a CPU path chosen
-- once per process): {[env] = number or nil, ...}, and each process's output.
function M.printed_under(envs, script)
   local values, outputs = {}, {}
   script = 'package.path = "lua/?.lua;lua/?/init.lua;" .. package.path\n' .. script
   for _, env in ipairs(envs) do
      local p = assert(io.popen(env .. " luajit -e '" .. script:gsub("'", "'\\''") .. "' 2>&1"))
      local out = p:read("*a")
      p:close()
      values[env], outputs[env] = tonumber(out:match("^%s*(%S+)")), out
   end
   return values, outputs
end

return M
