--- Size accounting (accelerate.utils.modeling): file-size strings, dtype sizes, module sizes and
-- the largest layer. Sizes are plain Lua numbers of bytes; a bool element counts 1/8 byte and
-- sizes computed with `dtype` never upcast and leave integer tensors alone, as in Accelerate.
local modeling = require("moonload.utils.modeling")

local M = {}

local SIZE_MESSAGE = "`size` %s is not in a valid format. Use an integer for bytes, or a string with an unit (like '5.0GB')."

-- Python's float() on a prefix: optional spaces, sign, digits with one dot, exponent.
local function parse_float(s)
   local body = s:match("^%s*(.-)%s*$")
   if not (body:match("^[+-]?%d+%.?%d*$") or body:match("^[+-]?%.%d+$")
           or body:match("^[+-]?%d+%.?%d*[eE][+-]?%d+$") or body:match("^[+-]?%.%d+[eE][+-]?%d+$")) then
      return nil
   end
   return tonumber(body)
end

local function trunc(x)
   if x >= 0 then return math.floor(x) end
   return math.ceil(x)
end

-- Suffixes checked case-insensitively in Accelerate's order; a decimal unit whose original
-- string ends in a lowercase "b" means bits (integer-divided by 8).
local UNITS = {
   { "GIB", 2 ^ 30, false }, { "MIB", 2 ^ 20, false }, { "KIB", 2 ^ 10, false },
   { "GB", 1e9, true }, { "MB", 1e6, true }, { "KB", 1e3, true },
}

--- Parses a size: a number of bytes is returned as is; "10GiB", "1.5GB", "10MB", "10KiB"...
-- (lowercase trailing "b" = bits). `fn` names the caller in the error.
function M.parse_size(size, fn)
   fn = fn or "convert_file_size_to_int"
   if type(size) == "number" then
      if size ~= size or size < 0 or size == math.huge then
         error(string.format("%s: " .. SIZE_MESSAGE, fn, tostring(size)), 3)
      end
      return size
   end
   if type(size) ~= "string" then
      error(string.format("%s: `size` must be a number of bytes or a string like '5.0GB', got %s", fn, type(size)), 3)
   end
   local upper = size:upper()
   local result = -1
   for _, unit in ipairs(UNITS) do
      local suffix, scale, bits = unit[1], unit[2], unit[3]
      if upper:sub(-#suffix) == suffix then
         local value = parse_float(size:sub(1, -#suffix - 1))
         if value == nil then break end
         result = trunc(value * scale)
         if bits and size:sub(-1) == "b" then result = math.floor(result / 8) end
         break
      end
   end
   if result ~= result or result < 0 or result == math.huge then
      error(string.format("%s: " .. SIZE_MESSAGE, fn, size), 3)
   end
   return result
end

--- convert_file_size_to_int(size): bytes from a number or a size string (Accelerate's rules).
function M.convert_file_size_to_int(size)
   return M.parse_size(size, "convert_file_size_to_int")
end

local BYTE_SIZES = {
   float32 = 4, float16 = 2, bfloat16 = 2, float64 = 8, int64 = 8, int32 = 4, int16 = 2,
   int8 = 1, uint8 = 1, bool = 1 / 8,
   -- names Accelerate knows that moonload tensors do not have (sizes only)
   uint16 = 2, uint32 = 4, uint64 = 8, complex64 = 8, complex128 = 16,
   float8_e4m3fn = 1, float8_e5m2 = 1, float8_e4m3fnuz = 1, float8_e5m2fnuz = 1, float8_e8m0fnu = 1,
   int4 = 1 / 2, int2 = 1 / 4, fp8 = 1,
   -- moonload's int8 and int4 weights with their float32 scale per 32 values (nn.QuantizedLinear):
   -- what a float weight will take once quantized, for planning (special_dtypes)
   q8 = 1 + 4 / 32, q4 = 1 / 2 + 4 / 32,
}

-- "float16" or "torch.float16" -> "float16"; nil stays nil.
function M.proper_dtype(dtype, fn)
   if dtype == nil then return nil end
   if type(dtype) ~= "string" then
      error(string.format("%s: dtype must be a string like \"float16\", got %s", fn, type(dtype)), 3)
   end
   local name = dtype:gsub("^torch%.", "")
   if BYTE_SIZES[name] == nil then
      error(string.format("%s: unknown dtype %q", fn, dtype), 3)
   end
   return name
end

--- dtype_byte_size(dtype): bytes per element ("bool" = 1/8, as in Accelerate).
function M.dtype_byte_size(dtype)
   return BYTE_SIZES[M.proper_dtype(dtype, "dtype_byte_size")]
end

local INTEGER = { int64 = true, int32 = true, int16 = true, int8 = true, uint8 = true, bool = true,
                  uint16 = true, uint32 = true, uint64 = true }
M.is_integer_dtype = function(dt) return INTEGER[dt] == true end

local zero_default = { __index = function() return 0 end }

--- compute_module_sizes(model, {dtype, special_dtypes, buffers_only}) -> sizes, keys.
-- `sizes` maps "" / module names / tensor names to bytes and reads 0 for unknown names (like
-- Accelerate's defaultdict); `keys` lists its keys in Accelerate's insertion order.
function M.compute_module_sizes(model, opts)
   opts = opts or {}
   local fn = "compute_module_sizes"
   local dtype = M.proper_dtype(opts.dtype, fn)
   local dtype_size = dtype and BYTE_SIZES[dtype]
   local special = {}
   if opts.special_dtypes then
      for k, v in pairs(opts.special_dtypes) do special[k] = BYTE_SIZES[M.proper_dtype(v, fn)] end
   end
   local sizes, keys = setmetatable({}, zero_default), {}
   local function add(name, size)
      local v = rawget(sizes, name)
      if v == nil then keys[#keys + 1] = name; v = 0 end
      sizes[name] = v + size
   end
   local iter
   if opts.buffers_only then
      iter = model:named_buffers("", true)
   else
      iter = modeling.named_module_tensors(model, { recurse = true })
   end
   for name, t in iter do
      local tdt = t.dtype
      local size
      if special[name] then
         size = t:numel() * special[name]
      elseif dtype == nil or INTEGER[tdt] then
         size = t:numel() * BYTE_SIZES[tdt]
      else
         size = t:numel() * math.min(dtype_size, BYTE_SIZES[tdt])
      end
      add("", size)
      local pos = 1
      while true do
         local dot = name:find(".", pos, true)
         if not dot then break end
         add(name:sub(1, dot - 1), size)
         pos = dot + 1
      end
      add(name, size)
   end
   return sizes, keys
end

--- compute_module_total_buffer_size(model, {dtype, special_dtypes}): bytes of all buffers.
function M.compute_module_total_buffer_size(model, opts)
   opts = opts or {}
   local sizes = M.compute_module_sizes(model, { dtype = opts.dtype, special_dtypes = opts.special_dtypes,
                                                 buffers_only = true })
   return rawget(sizes, "") or 0
end

local function class_set(list)
   local set = {}
   for _, c in ipairs(list or {}) do set[c] = true end
   return set
end
M.class_set = class_set

--- get_max_layer_size(modules, module_sizes, no_split_module_classes) -> size, names.
-- `modules` is a list of {name, module_or_tensor}; a layer is an entry without children or of a
-- no-split class.
function M.get_max_layer_size(modules, module_sizes, no_split_module_classes)
   local no_split = no_split_module_classes
   if no_split == nil or no_split[1] ~= nil or next(no_split) == nil then no_split = class_set(no_split) end
   local max_size, names = 0, {}
   -- a stack holding the work list reversed: the front of the list is the top
   local stack = {}
   for i = #modules, 1, -1 do stack[#stack + 1] = modules[i] end
   while #stack > 0 do
      local entry = table.remove(stack)
      local name, m = entry[1], entry[2]
      local children = modeling.children_list(m)
      if #children == 0 or no_split[modeling.class_name(m)] then
         local size = module_sizes[name] or 0
         if size > max_size then
            max_size, names = size, { name }
         elseif size == max_size then
            names[#names + 1] = name
         end
      else
         for i = #children, 1, -1 do
            stack[#stack + 1] = { name .. "." .. children[i][1], children[i][2] }
         end
      end
   end
   return max_size, names
end

return M
