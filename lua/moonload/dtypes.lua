--- Dtype names <-> the C enum, and the few per-dtype facts the Lua side needs.
local lib = require("moonload.C").lib

local M = {}

M.names = {
   [tonumber(lib.ML_FLOAT32)] = "float32", [tonumber(lib.ML_FLOAT16)] = "float16",
   [tonumber(lib.ML_BFLOAT16)] = "bfloat16", [tonumber(lib.ML_FLOAT64)] = "float64",
   [tonumber(lib.ML_INT64)] = "int64", [tonumber(lib.ML_INT32)] = "int32",
   [tonumber(lib.ML_INT16)] = "int16", [tonumber(lib.ML_INT8)] = "int8",
   [tonumber(lib.ML_UINT8)] = "uint8", [tonumber(lib.ML_BOOL)] = "bool",
   [tonumber(lib.ML_FLOAT8_E4M3FN)] = "float8_e4m3fn", [tonumber(lib.ML_FLOAT8_E5M2)] = "float8_e5m2",
}

M.by_name = {}
for code, name in pairs(M.names) do M.by_name[name] = code end
-- PyTorch spellings users paste in.
for alias, name in pairs({ float = "float32", half = "float16", double = "float64", long = "int64",
                           int = "int32", short = "int16" }) do
   M.by_name[alias] = M.by_name[name]
end
for name, code in pairs(M.by_name) do M.by_name["torch." .. name] = code end

M.list = "float32, float16, bfloat16, float64, int64, int32, int16, int8, uint8, bool, float8_e4m3fn, float8_e5m2"

-- The dtypes a model's dtype conversion applies to. The float8 ones are storage for quantized
-- weights (nn.Fp8Linear): a conversion leaves them as they are, as it leaves int8 weights.
M.floating = { float32 = true, float16 = true, bfloat16 = true, float64 = true }
M.float8 = { float8_e4m3fn = true, float8_e5m2 = true }

--- Canonical name for any accepted spelling ("torch.half" -> "float16"), or nil.
function M.canonical(name)
   local code = M.by_name[name]
   return code and M.names[code] or nil
end

return M
