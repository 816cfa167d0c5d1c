-- Shared helpers for the models_*_spec files: fixtures and float comparisons.
local cjson = require("cjson")

local H = {}

H.FIX = "tests/fixtures/models"

function H.read_json(path)
   local f = assert(io.open(path, "rb"))
   local t = cjson.decode(f:read("*a"))
   f:close()
   return t
end

function H.expected(name)
   return H.read_json(H.FIX .. "/" .. name .. "/expected.json")
end

--- Largest absolute difference between a tensor and nested Lua lists of the same shape.
function H.max_abs_diff(t, ref)
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

function H.tmpdir()
   local p = os.tmpname()
   os.remove(p)
   assert(os.execute("mkdir -p " .. p) == 0 or true)
   return p
end

function H.write(path, text)
   local f = assert(io.open(path, "wb"))
   f:write(text)
   f:close()
end

function H.copy(src, dst)
   local a = assert(io.open(src, "rb"))
   local data = a:read("*a")
   a:close()
   H.write(dst, data)
end

function H.rmdir(p)
   os.execute("rm -rf '" .. p .. "'")
end

return H
