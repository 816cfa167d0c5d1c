-- Shared helpers for the models_*_spec files: fixtures and float comparisons.
local N = require("nn_helpers")

local H = {}

H.FIX = "tests/fixtures/models"

H.read_json = N.read_json
H.max_abs_diff = N.max_abs_diff

function H.expected(name)
   return H.read_json(H.FIX .. "/" .. name .. "/expected.json")
end

--- The names of model's parameters, in registration order.
function H.param_names(model)
   local names = {}
   for name in model:named_parameters() do names[#names + 1] = name end
   return names
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

--- A fresh temporary file holding text; returns its path.
function H.tmpfile(text)
   local p = os.tmpname()
   H.write(p, text)
   return p
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
