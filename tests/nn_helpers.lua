-- Shared helpers for the nn_*_spec files (and, through models_helpers, the models_*_spec files):
-- the PyTorch fixtures of tests/fixtures/gen_nn.py and float comparisons.
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

return M
