--- ml.Tensor: a Lua table {_c = ml_tensor*} over the C core's refcounted tensor.
--
-- Conventions (API.md "Tensors"): dimensions and positions given as Lua arguments are 1-based
-- and negative ones count from the end (-1 = last), as in Torch7: t:size(1), t:narrow(2, 1, 3)
-- (dim 2, starting at its first element), t:select(1, -1) (last row). Index *values* held in
-- tensors (token ids, argmax/topk results, gather indices) are 0-based data.
-- The table is the identity: t:set_(other) swaps the C tensor underneath, so a parameter shared
-- by two modules stays shared when its data moves between devices.
local C = require("moonload.C")
local dtypes = require("moonload.dtypes")

local ffi, lib, check = C.ffi, C.lib, C.check

local Tensor = {}
local methods = {}
Tensor.methods = methods

-- One reusable out-parameter pair: Lua is single-threaded, and every call reads it at once.
local out1 = ffi.new("ml_tensor*[1]")
local out2 = ffi.new("ml_tensor*[1]")
local shape_buf = ffi.new("int64_t[8]")
local stride_buf = ffi.new("int64_t[8]")
local int_buf = ffi.new("int[8]")
local bool_buf = ffi.new("bool[1]")

-- Dead tensors hold memory LuaJIT's collector cannot see (it sees small wrappers): the core
-- raises this flag once enough has been allocated since the last collection (ml_gc_flag).
local gc_flag = lib.ml_gc_flag()

local function wrap(p)
   if gc_flag[0] ~= 0 then
      collectgarbage()
      lib.ml_gc_done()
   end
   return setmetatable({ _c = ffi.gc(p, lib.ml_tensor_release) }, Tensor)
end
Tensor.wrap = wrap

local function is_tensor(x)
   return type(x) == "table" and getmetatable(x) == Tensor
end
Tensor.is_tensor = is_tensor

-- --- argument helpers ---------------------------------------------------------------------

local dtype_of_name, name_of_dtype = dtypes.by_name, dtypes.names

local function parse_dtype(fn, name)
   local dt = dtype_of_name[name]
   if not dt then
      error(string.format("%s: unknown dtype %s (expected one of %s)", fn, tostring(name), dtypes.list), 3)
   end
   return dt
end
Tensor.parse_dtype = parse_dtype

local device_cache = {}
local function parse_device(fn, dev)
   if type(dev) == "number" then dev = "cuda:" .. dev end
   local d = device_cache[dev]
   if d then return d end
   if type(dev) ~= "string" then
      error(string.format("%s: device must be a string like \"cpu\" or \"cuda:0\", got %s", fn, type(dev)), 3)
   end
   d = ffi.new("ml_device")
   if lib.ml_device_parse(dev, d) ~= 0 then error(fn .. ": " .. ffi.string(lib.ml_last_error()), 3) end
   device_cache[dev] = d
   return d
end
Tensor.parse_device = parse_device

local name_buf = ffi.new("char[32]")
local function device_name(d)
   lib.ml_device_name(d, name_buf, 32)
   return ffi.string(name_buf)
end
Tensor.device_name = device_name

--- Lua dim (1-based, negative from the end) -> C dim (0-based); n is the valid count.
local function cdim(fn, d, n, level)
   if type(d) ~= "number" or d % 1 ~= 0 then
      error(string.format("%s: dimension must be an integer, got %s", fn, tostring(d)), (level or 2) + 1)
   end
   local m = n > 0 and n or 1
   if d == 0 or d > m or d < -m then
      error(string.format("%s: dimension %d is out of range for a %d-d tensor (dims are 1-based; -1 is the last)",
         fn, d, n), (level or 2) + 1)
   end
   return d > 0 and d - 1 or d + m
end
Tensor.cdim = cdim

--- A shape from a list {2, 3} or varargs 2, 3 (a trailing table after numbers is options).
local function shape_args(fn, ...)
   local first = ...
   local shape, opts
   if type(first) == "table" and not is_tensor(first) then
      shape, opts = first, select(2, ...)
   else
      shape = {}
      local n = select("#", ...)
      for i = 1, n do
         local v = select(i, ...)
         if type(v) == "table" then opts = v; break end
         if v ~= nil then shape[#shape + 1] = v end
      end
   end
   for i = 1, #shape do
      local v = shape[i]
      if type(v) ~= "number" or v % 1 ~= 0 then
         error(string.format("%s: shape entry %d is %s, expected an integer", fn, i, tostring(v)), 3)
      end
   end
   if #shape > 8 then error(fn .. ": at most 8 dimensions are supported, got " .. #shape, 3) end
   return shape, opts or {}
end

local function fill_shape(shape)
   for i = 1, #shape do shape_buf[i - 1] = shape[i] end
   return #shape, shape_buf
end

-- --- construction -------------------------------------------------------------------------

local cpu_device = parse_device("cpu", "cpu")

local function empty(shape, dtype, device)
   local n, buf = fill_shape(shape)
   check(lib.ml_tensor_empty(dtype, n, buf, device, out1), 3)
   return wrap(out1[0])
end

local function make(fn, opts, shape)
   local dt = opts.dtype and parse_dtype(fn, opts.dtype) or lib.ML_FLOAT32
   local dev = opts.device and parse_device(fn, opts.device) or cpu_device
   return empty(shape, dt, dev)
end

function Tensor.empty(...)
   local shape, opts = shape_args("empty", ...)
   return make("empty", opts, shape)
end

function Tensor.full(shape, value, opts)
   if type(value) ~= "number" and type(value) ~= "boolean" then
      error("full: fill value must be a number, got " .. type(value), 2)
   end
   local t = make("full", opts or {}, (shape_args("full", shape)))
   check(lib.ml_tensor_fill_(t._c, value == true and 1 or value == false and 0 or value), 2)
   return t
end

--- A constructor taking a shape (list or varargs) and options, then filling the new tensor.
local function filled_constructor(fn, fill)
   return function(...)
      local shape, opts = shape_args(fn, ...)
      return fill(make(fn, opts, shape))
   end
end

local function fill_with(v)
   return function(t)
      check(lib.ml_tensor_fill_(t._c, v), 4)
      return t
   end
end

Tensor.zeros = filled_constructor("zeros", fill_with(0))
Tensor.ones = filled_constructor("ones", fill_with(1))
Tensor.rand = filled_constructor("rand", function(t) return methods.uniform_(t, 0, 1) end)
Tensor.randn = filled_constructor("randn", function(t) return methods.normal_(t, 0, 1) end)

--- arange(stop) / arange(start, stop[, step])[, opts]; dtype int64 when all are integers.
function Tensor.arange(a, b, c, d)
   local start, stop, step, opts
   if type(b) ~= "number" then start, stop, step, opts = 0, a, 1, b
   elseif type(c) ~= "number" then start, stop, step, opts = a, b, 1, c
   else start, stop, step, opts = a, b, c, d end
   opts = opts or {}
   local integral = start % 1 == 0 and stop % 1 == 0 and step % 1 == 0
   local dt = opts.dtype and parse_dtype("arange", opts.dtype) or (integral and lib.ML_INT64 or lib.ML_FLOAT32)
   check(lib.ml_arange(start, stop, step, dt, out1), 2)
   local t = wrap(out1[0])
   if opts.device and opts.device ~= "cpu" then return t:to(opts.device) end
   return t
end

--- ml.tensor(nested_table_or_number, opts): float32 unless opts.dtype says otherwise
-- (bool when every value is a boolean).
function Tensor.tensor(data, opts)
   opts = opts or {}
   if is_tensor(data) then
      local t = data:clone()
      if opts.dtype or opts.device then t = t:to(opts.device or t.device, opts.dtype or t.dtype) end
      return t
   end
   local shape, flat, all_bool = {}, {}, true
   local function walk(x, depth)
      local tx = type(x)
      if tx == "table" then
         local n = #x
         if shape[depth] == nil then shape[depth] = n
         elseif shape[depth] ~= n then
            error(string.format("tensor: ragged nested table: expected %d elements at depth %d, got %d",
               shape[depth], depth, n), 4)
         end
         for i = 1, n do walk(x[i], depth + 1) end
      elseif tx == "number" then
         if shape[depth] ~= nil and depth <= #shape then
            error("tensor: ragged nested table: a number where a list was expected at depth " .. depth, 4)
         end
         all_bool = false
         flat[#flat + 1] = x
      elseif tx == "boolean" then
         flat[#flat + 1] = x and 1 or 0
      else
         error("tensor: expected numbers, booleans or nested tables, got " .. tx, 4)
      end
   end
   walk(data, 1)
   if #flat == 0 then all_bool = false end
   local dt = opts.dtype and parse_dtype("tensor", opts.dtype) or (all_bool and lib.ML_BOOL or lib.ML_FLOAT32)
   local t = empty(shape, dt, cpu_device)
   local n = #flat
   if n > 0 then
      local buf = ffi.new("double[?]", n)
      for i = 1, n do buf[i - 1] = flat[i] end
      check(lib.ml_tensor_write_f64(t._c, buf, n), 2)
   end
   if opts.device and opts.device ~= "cpu" then return t:to(opts.device) end
   return t
end

-- --- fields ---------------------------------------------------------------------------------

local properties = {}

function properties.shape(t)
   local c = t._c
   local n, sh = lib.ml_tensor_ndim(c), lib.ml_tensor_shape(c)
   local s = {}
   for i = 1, n do s[i] = tonumber(sh[i - 1]) end
   return s
end

function properties.dtype(t) return name_of_dtype[tonumber(lib.ml_tensor_dtype(t._c))] end

function properties.device(t) return device_name(lib.ml_tensor_device(t._c)) end

function properties.ndim(t) return lib.ml_tensor_ndim(t._c) end

-- t[{i, {a, b}, {}}], Torch7's indexing, as a view: per dim from the first, a number selects
-- (the dim goes), {a, b} keeps positions a..b (1-based, inclusive, negative from the end), {a}
-- position a alone, {} the whole dim; dims not listed stay whole.
local function index_view(t, spec)
   local n = lib.ml_tensor_ndim(t._c)
   if #spec > n then
      error(string.format("index: %d indices for a tensor of %d dims", #spec, n), 3)
   end
   local v, dim = t, 1
   for i = 1, #spec do
      local s = spec[i]
      if type(s) == "number" then
         v = methods.select(v, dim, s)
      elseif type(s) == "table" then
         local size = tonumber(lib.ml_tensor_shape(v._c)[dim - 1])
         local a, b = s[1] or 1, s[2] or s[1] or size
         if type(a) ~= "number" or type(b) ~= "number" then
            error(string.format("index: range %d must hold positions, got %s and %s", i, type(a), type(b)), 3)
         end
         if a < 0 then a = a + size + 1 end
         if b < 0 then b = b + size + 1 end
         if a < 1 or b > size or a > b + 1 then
            error(string.format("index: range {%s, %s} is out of range for dimension %d of size %d (positions are 1-based, inclusive)",
               tostring(s[1]), tostring(s[2] or s[1]), i, size), 3)
         end
         v = methods.narrow(v, dim, a, b - a + 1)
         dim = dim + 1
      else
         error(string.format("index: entry %d must be a position or a {first, last} range, got %s", i, type(s)), 3)
      end
   end
   return v
end

Tensor.__index = function(t, k)
   local m = methods[k]
   if m then return m end
   local p = properties[k]
   if p then return p(t) end
   if type(k) == "number" then return methods.select(t, 1, k) end
   if type(k) == "table" then return index_view(t, k) end
   return nil
end

Tensor.__newindex = function(t, k, v)
   if type(k) == "number" or type(k) == "table" then
      local view = type(k) == "number" and methods.select(t, 1, k) or index_view(t, k)
      if is_tensor(v) then methods.copy_(view, v) else methods.fill_(view, v) end
      return
   end
   rawset(t, k, v)
end

function methods.dim(t) return lib.ml_tensor_ndim(t._c) end
function methods.numel(t) return tonumber(lib.ml_tensor_numel(t._c)) end
function methods.element_size(t) return tonumber(lib.ml_dtype_size(lib.ml_tensor_dtype(t._c))) end
function methods.nbytes(t)
   return tonumber(lib.ml_tensor_numel(t._c)) * tonumber(lib.ml_dtype_size(lib.ml_tensor_dtype(t._c)))
end

function methods.size(t, d)
   if d == nil then return properties.shape(t) end
   local c = t._c
   local n = lib.ml_tensor_ndim(c)
   return tonumber(lib.ml_tensor_shape(c)[cdim("size", d, n)])
end

function methods.stride(t, d)
   local c = t._c
   local n, st = lib.ml_tensor_ndim(c), lib.ml_tensor_strides(c)
   if d ~= nil then return tonumber(st[cdim("stride", d, n)]) end
   local s = {}
   for i = 1, n do s[i] = tonumber(st[i - 1]) end
   return s
end

function methods.storage_offset(t) return tonumber(lib.ml_tensor_offset(t._c)) end
function methods.is_contiguous(t) return lib.ml_tensor_is_contiguous(t._c) end
function methods.is_meta(t) return lib.ml_tensor_device(t._c).type == lib.ML_DEVICE_META end

--- Address of the first element as a Lua number (0 for meta); identifies shared storage.
function methods.data_ptr(t)
   local p = lib.ml_tensor_data(t._c)
   if p == nil then return 0 end
   return tonumber(ffi.cast("uintptr_t", p))
end

-- --- conversion -----------------------------------------------------------------------------

-- Ops that may hand back their input (a new reference to t's own C tensor) return t itself.
local function self_or_wrap(t, p)
   if p == t._c then lib.ml_tensor_release(p); return t end
   return wrap(p)
end

--- t:to(device_or_dtype[, dtype][, {non_blocking, copy}]); returns t itself when nothing changes
-- (unless copy = true). Copies are complete on return, so non_blocking is accepted and changes
-- nothing.
function methods.to(t, a, b, opts)
   if type(b) == "table" and not is_tensor(b) then b, opts = nil, b end
   if type(a) == "table" and not is_tensor(a) then a, opts = nil, a end
   if is_tensor(a) then a, b = a.device, a.dtype end
   local dev, dt
   if type(a) == "string" and dtype_of_name[a] then
      dt = dtype_of_name[a]
   elseif a ~= nil then
      dev = parse_device("to", a)
   end
   if b ~= nil then dt = parse_dtype("to", b) end
   local c = t._c
   dev = dev or lib.ml_tensor_device(c)
   dt = dt or lib.ml_tensor_dtype(c)
   check(lib.ml_tensor_to(c, dev, dt, out1))
   local r = self_or_wrap(t, out1[0])
   if r == t and opts and opts.copy then return methods.clone(t) end
   return r
end

--- t:pin_memory([{in_place = false}]) -> a copy in page-locked host memory (t itself when already
-- pinned); needs CUDA. With in_place, t itself, its bytes page-locked where they lie (no copy, no
-- second RAM): a tensor of a checkpoint's mapping locks the whole file, one in its own block of
-- 256 KiB or more that block; a smaller one shares its pages and stays pageable (t:is_pinned()
-- says which). The lock goes with the block or the mapping.
function methods.pin_memory(t, opts)
   if opts and opts.in_place then
      local pinned = ffi.new("bool[1]")
      check(lib.ml_tensor_pin_memory_in_place(t._c, pinned))
      return t
   end
   check(lib.ml_tensor_pin_memory(t._c, out1))
   return self_or_wrap(t, out1[0])
end

function methods.is_pinned(t) return lib.ml_tensor_is_pinned(t._c) end

function methods.float(t) return methods.to(t, "float32") end
function methods.half(t) return methods.to(t, "float16") end
function methods.bfloat16(t) return methods.to(t, "bfloat16") end
function methods.double(t) return methods.to(t, "float64") end
function methods.long(t) return methods.to(t, "int64") end
function methods.int(t) return methods.to(t, "int32") end
function methods.bool(t) return methods.to(t, "bool") end
function methods.cpu(t) return methods.to(t, "cpu") end
function methods.cuda(t, i) return methods.to(t, "cuda:" .. (i or 0)) end
function methods.type_as(t, other) return methods.to(t, other.dtype) end

function methods.contiguous(t)
   check(lib.ml_tensor_contiguous(t._c, out1))
   return self_or_wrap(t, out1[0])
end

function methods.clone(t)
   check(lib.ml_tensor_clone(t._c, out1))
   return wrap(out1[0])
end

--- Makes t share other's data, shape and dtype in place (same Lua object).
function methods.set_(t, other)
   rawset(t, "_c", other._c)
   return t
end

function methods.copy_(t, src)
   if not is_tensor(src) then src = Tensor.tensor(src) end
   check(lib.ml_tensor_copy_(t._c, src._c))
   return t
end

function methods.fill_(t, v)
   check(lib.ml_tensor_fill_(t._c, v == true and 1 or v == false and 0 or v))
   return t
end
function methods.zero_(t) return methods.fill_(t, 0) end

function methods.uniform_(t, a, b)
   check(lib.ml_uniform_(t._c, a or 0, b or 1))
   return t
end

function methods.normal_(t, mean, std)
   check(lib.ml_normal_(t._c, mean or 0, std or 1))
   return t
end

--- Reinterprets the bytes as another dtype of the same element size.
function methods.view_dtype(t, dtype)
   check(lib.ml_tensor_view_dtype(t._c, parse_dtype("view_dtype", dtype), out1))
   return wrap(out1[0])
end

local function read_values(t, fn)
   local n = methods.numel(t)
   local dt = lib.ml_tensor_dtype(t._c)
   if lib.ml_tensor_device(t._c).type == lib.ML_DEVICE_META then
      error(fn .. ": tensor is on the meta device and has no data", 3)
   end
   local integer = dt == lib.ML_INT64 or dt == lib.ML_INT32 or dt == lib.ML_INT16 or dt == lib.ML_INT8
      or dt == lib.ML_UINT8 or dt == lib.ML_BOOL
   local buf
   if integer and dt == lib.ML_INT64 then
      buf = ffi.new("int64_t[?]", math.max(n, 1))
      check(lib.ml_tensor_read_i64(t._c, buf, n), 3)
   else
      buf = ffi.new("double[?]", math.max(n, 1))
      check(lib.ml_tensor_read_f64(t._c, buf, n), 3)
   end
   return buf, n, dt
end

local function convert_value(v, dt)
   if dt == lib.ML_BOOL then return v ~= 0 end
   return tonumber(v)
end

function methods.item(t)
   local n = methods.numel(t)
   if n ~= 1 then
      error(string.format("item: tensor has %d elements, item() needs exactly one", n), 2)
   end
   local buf, _, dt = read_values(t, "item")
   return convert_value(buf[0], dt)
end

function methods.tolist(t)
   local buf, _, dt = read_values(t, "tolist")
   local shape = properties.shape(t)
   if #shape == 0 then return convert_value(buf[0], dt) end
   local pos = 0
   local function build(d)
      local out = {}
      if d == #shape then
         for i = 1, shape[d] do out[i] = convert_value(buf[pos], dt); pos = pos + 1 end
      else
         for i = 1, shape[d] do out[i] = build(d + 1) end
      end
      return out
   end
   return build(1)
end

-- --- views ----------------------------------------------------------------------------------

function methods.view(t, ...)
   local shape = shape_args("view", ...)
   if is_tensor(...) then shape = (...).shape end
   local n, buf = fill_shape(shape)
   check(lib.ml_tensor_view(t._c, n, buf, out1))
   return wrap(out1[0])
end

function methods.view_as(t, other) return methods.view(t, other.shape) end

function methods.reshape(t, ...)
   local shape = shape_args("reshape", ...)
   local n, buf = fill_shape(shape)
   check(lib.ml_tensor_reshape(t._c, n, buf, out1))
   return wrap(out1[0])
end

function methods.transpose(t, d0, d1)
   local n = lib.ml_tensor_ndim(t._c)
   check(lib.ml_tensor_transpose(t._c, cdim("transpose", d0, n), cdim("transpose", d1, n), out1))
   return wrap(out1[0])
end

function methods.t(t)
   local n = lib.ml_tensor_ndim(t._c)
   if n > 2 then error(string.format("t: expects a tensor with at most 2 dimensions, got %d", n), 2) end
   if n < 2 then return t end
   return methods.transpose(t, 1, 2)
end

function methods.permute(t, ...)
   local dims = type(...) == "table" and ... or { ... }
   local n = lib.ml_tensor_ndim(t._c)
   if #dims ~= n then
      error(string.format("permute: %d dims given for a %d-d tensor", #dims, n), 2)
   end
   local seen = {}
   for i = 1, n do
      local d = cdim("permute", dims[i], n)
      if seen[d] then error(string.format("permute: dimension %d is repeated", d + 1), 2) end
      seen[d] = true
      int_buf[i - 1] = d
   end
   check(lib.ml_tensor_permute(t._c, int_buf, out1))
   return wrap(out1[0])
end

--- narrow(dim, start, length): start is 1-based (negative counts from the end).
function methods.narrow(t, dim, start, length)
   local n = lib.ml_tensor_ndim(t._c)
   local d = cdim("narrow", dim, n)
   local size = n > 0 and tonumber(lib.ml_tensor_shape(t._c)[d]) or 0
   local s = start > 0 and start - 1 or start + size
   if start == 0 or s < 0 then
      error(string.format("narrow: start %d is out of range for dimension %d of size %d (positions are 1-based)",
         start, dim, size), 2)
   end
   check(lib.ml_tensor_narrow(t._c, d, s, length, out1))
   return wrap(out1[0])
end

--- select(dim, index): index is 1-based (negative counts from the end); drops the dim.
function methods.select(t, dim, index)
   local n = lib.ml_tensor_ndim(t._c)
   local d = cdim("select", dim, n, 3)
   local size = n > 0 and tonumber(lib.ml_tensor_shape(t._c)[d]) or 0
   if type(index) ~= "number" or index == 0 or index > size or index < -size then
      error(string.format("select: index %s is out of range for dimension %d of size %d (positions are 1-based)",
         tostring(index), dim, size), 3)
   end
   check(lib.ml_tensor_select(t._c, d, index > 0 and index - 1 or index + size, out1), 3)
   return wrap(out1[0])
end

function methods.unsqueeze(t, dim)
   local n = lib.ml_tensor_ndim(t._c)
   check(lib.ml_tensor_unsqueeze(t._c, cdim("unsqueeze", dim, n + 1), out1))
   return wrap(out1[0])
end

function methods.squeeze(t, dim)
   local n = lib.ml_tensor_ndim(t._c)
   check(lib.ml_tensor_squeeze(t._c, dim == nil and -1 or cdim("squeeze", dim, n), out1))
   return wrap(out1[0])
end

function methods.expand(t, ...)
   local shape = shape_args("expand", ...)
   local n, buf = fill_shape(shape)
   check(lib.ml_tensor_expand(t._c, n, buf, out1))
   return wrap(out1[0])
end

function methods.expand_as(t, other) return methods.expand(t, other.shape) end

--- flatten([start_dim=1[, end_dim=-1]])
function methods.flatten(t, start_dim, end_dim)
   local shape = properties.shape(t)
   local n = #shape
   if n == 0 then return methods.reshape(t, { 1 }) end
   local s = cdim("flatten", start_dim or 1, n) + 1
   local e = cdim("flatten", end_dim or -1, n) + 1
   if s > e then error("flatten: start_dim comes after end_dim", 2) end
   local new, prod = {}, 1
   for i = 1, s - 1 do new[#new + 1] = shape[i] end
   for i = s, e do prod = prod * shape[i] end
   new[#new + 1] = prod
   for i = e + 1, n do new[#new + 1] = shape[i] end
   return methods.reshape(t, new)
end

--- split(split_size_or_sizes, dim=1) -> list of views.
function methods.split(t, size, dim)
   dim = dim or 1
   local total = methods.size(t, dim)
   local parts, pos = {}, 1
   if type(size) == "table" then
      local sum = 0
      for i = 1, #size do sum = sum + size[i] end
      if sum ~= total then
         error(string.format("split: sizes add up to %d but dimension %d has size %d", sum, dim, total), 2)
      end
      for i = 1, #size do parts[i] = methods.narrow(t, dim, pos, size[i]); pos = pos + size[i] end
   else
      if size <= 0 then error("split: split_size must be positive, got " .. tostring(size), 2) end
      while pos <= total do
         local len = math.min(size, total - pos + 1)
         parts[#parts + 1] = methods.narrow(t, dim, pos, len)
         pos = pos + len
      end
   end
   return parts
end

--- chunk(chunks, dim=1) -> list of views (the last may be smaller), as in PyTorch.
function methods.chunk(t, chunks, dim)
   local total = methods.size(t, dim or 1)
   local size = math.ceil(total / chunks)
   if size == 0 then size = 1 end
   return methods.split(t, size, dim)
end

-- --- math -----------------------------------------------------------------------------------

local U = {
   neg = lib.ML_OP_NEG, abs = lib.ML_OP_ABS, sqrt = lib.ML_OP_SQRT, rsqrt = lib.ML_OP_RSQRT,
   exp = lib.ML_OP_EXP, log = lib.ML_OP_LOG, tanh = lib.ML_OP_TANH, sigmoid = lib.ML_OP_SIGMOID,
   relu = lib.ML_OP_RELU, silu = lib.ML_OP_SILU, sin = lib.ML_OP_SIN, cos = lib.ML_OP_COS,
   reciprocal = lib.ML_OP_RECIPROCAL, logical_not = lib.ML_OP_LOGICAL_NOT,
}
for name, op in pairs(U) do
   methods[name] = function(t)
      check(lib.ml_unary(op, t._c, out1))
      return wrap(out1[0])
   end
end

--- softplus([beta = 1[, threshold = 20]]): log(1 + exp(beta x)) / beta, x itself where beta x >
-- threshold, as torch.nn.functional.softplus (the defaults in one kernel).
function methods.softplus(t, beta, threshold)
   beta, threshold = beta or 1, threshold or 20
   if beta == 1 and threshold == 20 then
      check(lib.ml_unary(lib.ML_OP_SOFTPLUS, t._c, out1))
      return wrap(out1[0])
   end
   local bx = t * beta
   return Tensor.where(bx:gt(threshold), t, (bx:minimum(threshold):exp() + 1):log() / beta)
end

--- gelu([approximate = "none" | "tanh"]) (also accepts {approximate = ...}).
function methods.gelu(t, approximate)
   if type(approximate) == "table" then approximate = approximate.approximate end
   local op
   if approximate == nil or approximate == "none" then op = lib.ML_OP_GELU
   elseif approximate == "tanh" then op = lib.ML_OP_GELU_TANH
   else error("gelu: approximate must be \"none\" or \"tanh\", got " .. tostring(approximate), 2) end
   check(lib.ml_unary(op, t._c, out1))
   return wrap(out1[0])
end

local B = {
   add = lib.ML_OP_ADD, sub = lib.ML_OP_SUB, mul = lib.ML_OP_MUL, div = lib.ML_OP_DIV,
   pow = lib.ML_OP_POW, maximum = lib.ML_OP_MAXIMUM, minimum = lib.ML_OP_MINIMUM,
   eq = lib.ML_OP_EQ, ne = lib.ML_OP_NE, lt = lib.ML_OP_LT, le = lib.ML_OP_LE, gt = lib.ML_OP_GT,
   ge = lib.ML_OP_GE, logical_and = lib.ML_OP_LOGICAL_AND, logical_or = lib.ML_OP_LOGICAL_OR,
}

local function binary(op, a, b, level)
   level = (level or 2) + 1
   if is_tensor(a) then
      if is_tensor(b) then
         check(lib.ml_binary(op, a._c, b._c, out1), level)
      else
         if type(b) == "boolean" then b = b and 1 or 0 end
         if type(b) ~= "number" then error("expected a tensor or a number, got " .. type(b), level) end
         check(lib.ml_binary_scalar(op, a._c, b, false, out1), level)
      end
   else
      if type(a) == "boolean" then a = a and 1 or 0 end
      if type(a) ~= "number" then error("expected a tensor or a number, got " .. type(a), level) end
      check(lib.ml_binary_scalar(op, b._c, a, true, out1), level)
   end
   return wrap(out1[0])
end
Tensor.binary = binary

for name, op in pairs(B) do
   methods[name] = function(a, b) return binary(op, a, b, 2) end
end

--- add(other[, alpha]) / sub(other[, alpha]) as in PyTorch.
function methods.add(a, b, alpha)
   if alpha ~= nil and alpha ~= 1 then b = binary(lib.ML_OP_MUL, b, alpha, 2) end
   return binary(lib.ML_OP_ADD, a, b, 2)
end
function methods.sub(a, b, alpha)
   if alpha ~= nil and alpha ~= 1 then b = binary(lib.ML_OP_MUL, b, alpha, 2) end
   return binary(lib.ML_OP_SUB, a, b, 2)
end

methods.greater, methods.less, methods.equal_elementwise = methods.gt, methods.lt, methods.eq

function methods.clamp(t, lo, hi)
   local r = t
   if lo ~= nil then r = binary(lib.ML_OP_MAXIMUM, r, lo, 2) end
   if hi ~= nil then r = binary(lib.ML_OP_MINIMUM, r, hi, 2) end
   return r
end

Tensor.__add = function(a, b) return binary(lib.ML_OP_ADD, a, b, 2) end
Tensor.__sub = function(a, b) return binary(lib.ML_OP_SUB, a, b, 2) end
Tensor.__mul = function(a, b) return binary(lib.ML_OP_MUL, a, b, 2) end
Tensor.__div = function(a, b) return binary(lib.ML_OP_DIV, a, b, 2) end
Tensor.__pow = function(a, b) return binary(lib.ML_OP_POW, a, b, 2) end
Tensor.__unm = function(a)
   check(lib.ml_unary(lib.ML_OP_NEG, a._c, out1))
   return wrap(out1[0])
end

-- --- reductions ---------------------------------------------------------------------------

--- Fills int_buf from a dim or list of dims; returns the count (0 = all dims).
local function reduce_dims(fn, t, dim)
   if dim == nil then return 0 end
   local n = lib.ml_tensor_ndim(t._c)
   if type(dim) == "table" then
      for i = 1, #dim do int_buf[i - 1] = cdim(fn, dim[i], n, 3) end
      return #dim
   end
   int_buf[0] = cdim(fn, dim, n, 3)
   return 1
end

local function reducer(fn, op)
   return function(t, dim, keepdim)
      if type(dim) == "table" and dim.dim == nil and #dim == 0 and next(dim) ~= nil then
         dim, keepdim = dim.dim, dim.keepdim
      end
      local nd = reduce_dims(fn, t, dim)
      check(lib.ml_reduce(op, t._c, nd, int_buf, keepdim and true or false, out1))
      return wrap(out1[0])
   end
end
methods.sum = reducer("sum", lib.ML_REDUCE_SUM)
methods.mean = reducer("mean", lib.ML_REDUCE_MEAN)
methods.prod = reducer("prod", lib.ML_REDUCE_PROD)
methods.argmax = reducer("argmax", lib.ML_REDUCE_ARGMAX)
methods.argmin = reducer("argmin", lib.ML_REDUCE_ARGMIN)

local function max_or_min(fn, op, is_min)
   return function(t, dim, keepdim)
      if is_tensor(dim) then
         return binary(is_min and lib.ML_OP_MINIMUM or lib.ML_OP_MAXIMUM, t, dim, 2)
      end
      if dim == nil then
         check(lib.ml_reduce(op, t._c, 0, int_buf, false, out1))
         return wrap(out1[0])
      end
      local d = cdim(fn, dim, lib.ml_tensor_ndim(t._c))
      check(lib.ml_max_dim(t._c, d, keepdim and true or false, is_min, out1, out2))
      return wrap(out1[0]), wrap(out2[0])
   end
end
--- max() -> 0-d tensor; max(dim[, keepdim]) -> values, indices (0-based); max(other) -> maximum.
methods.max = max_or_min("max", lib.ML_REDUCE_MAX, false)
methods.min = max_or_min("min", lib.ML_REDUCE_MIN, true)

--- topk(k[, dim=-1[, largest=true]]) -> values, indices (0-based), sorted.
function methods.topk(t, k, dim, largest)
   local d = cdim("topk", dim or -1, lib.ml_tensor_ndim(t._c))
   check(lib.ml_topk(t._c, k, d, largest ~= false, out1, out2))
   return wrap(out1[0]), wrap(out2[0])
end

function methods.softmax(t, dim)
   if dim == nil then error("softmax: dim is required", 2) end
   check(lib.ml_softmax(t._c, cdim("softmax", dim, lib.ml_tensor_ndim(t._c)), false, out1))
   return wrap(out1[0])
end

function methods.log_softmax(t, dim)
   if dim == nil then error("log_softmax: dim is required", 2) end
   check(lib.ml_softmax(t._c, cdim("log_softmax", dim, lib.ml_tensor_ndim(t._c)), true, out1))
   return wrap(out1[0])
end

function methods.cumsum(t, dim)
   check(lib.ml_cumsum(t._c, cdim("cumsum", dim, lib.ml_tensor_ndim(t._c)), out1))
   return wrap(out1[0])
end

function methods.matmul(a, b)
   check(lib.ml_matmul(a._c, b._c, out1))
   return wrap(out1[0])
end

function methods.masked_fill(t, mask, value)
   if value == true then value = 1 elseif value == false then value = 0 end
   check(lib.ml_masked_fill(t._c, mask._c, value, out1))
   return wrap(out1[0])
end

function methods.tril(t, k)
   check(lib.ml_triangle(t._c, k or 0, false, out1))
   return wrap(out1[0])
end

function methods.triu(t, k)
   check(lib.ml_triangle(t._c, k or 0, true, out1))
   return wrap(out1[0])
end

function methods.gather(t, dim, index)
   check(lib.ml_gather(t._c, cdim("gather", dim, lib.ml_tensor_ndim(t._c)), index._c, out1))
   return wrap(out1[0])
end

function methods.index_select(t, dim, index)
   check(lib.ml_index_select(t._c, cdim("index_select", dim, lib.ml_tensor_ndim(t._c)), index._c, out1))
   return wrap(out1[0])
end

--- True when shapes and values are equal (PyTorch's torch.equal).
function methods.equal(a, b)
   check(lib.ml_equal(a._c, b._c, bool_buf))
   return bool_buf[0]
end

function methods.allclose(a, b, rtol, atol, equal_nan)
   if type(rtol) == "table" then rtol, atol, equal_nan = rtol.rtol, rtol.atol, rtol.equal_nan end
   check(lib.ml_allclose(a._c, b._c, rtol or 1e-5, atol or 1e-8, equal_nan and true or false, bool_buf))
   return bool_buf[0]
end

--- multinomial(): one 0-based index per row drawn from non-negative weights.
function methods.multinomial(t)
   check(lib.ml_multinomial(t._c, out1))
   return wrap(out1[0])
end

function methods.where(cond, a, b) return Tensor.where(cond, a, b) end

-- Ops with no CUDA kernel run on host copies of cuda operands; results go back to the operand's
-- device. multinomial draws once per sampled token (its sequential sums are what make the pick
-- the CPU's); equal and allclose answer with a boolean.
local function host_fallback(name, moves_result)
   local op = methods[name]
   methods[name] = function(t, ...)
      if lib.ml_tensor_device(t._c).type ~= lib.ML_DEVICE_CUDA then return op(t, ...) end
      local dev = properties.device(t)
      local args = { ... }
      for i = 1, select("#", ...) do
         if is_tensor(args[i]) then args[i] = methods.cpu(args[i]) end
      end
      local r1, r2 = op(methods.cpu(t), unpack(args, 1, select("#", ...)))
      if not moves_result then return r1, r2 end
      return is_tensor(r1) and methods.to(r1, dev) or r1, is_tensor(r2) and methods.to(r2, dev) or r2
   end
end
host_fallback("multinomial", true)
host_fallback("equal", false)
host_fallback("allclose", false)

-- --- functions over several tensors ----------------------------------------------------------

local function as_tensor_like(x, like)
   if is_tensor(x) then return x end
   return Tensor.full({}, x, { dtype = like.dtype, device = like.device })
end

--- where(cond, a, b): a and b may be numbers.
function Tensor.where(cond, a, b)
   local like = is_tensor(a) and a or is_tensor(b) and b or cond
   if not is_tensor(a) and not is_tensor(b) then like = { dtype = "float32", device = cond.device } end
   a, b = as_tensor_like(a, like), as_tensor_like(b, like)
   check(lib.ml_where(cond._c, a._c, b._c, out1))
   return wrap(out1[0])
end

--- cat(list, dim=1)
function Tensor.cat(list, dim)
   local n = #list
   if n == 0 then error("cat: expected a non-empty list of tensors", 2) end
   local ptrs = ffi.new("ml_tensor*[?]", n)
   for i = 1, n do
      if not is_tensor(list[i]) then error("cat: element " .. i .. " is not a tensor", 2) end
      ptrs[i - 1] = list[i]._c
   end
   local nd = lib.ml_tensor_ndim(list[1]._c)
   check(lib.ml_cat(n, ptrs, cdim("cat", dim or 1, nd), out1))
   return wrap(out1[0])
end

--- stack(list, dim=1): unsqueeze each at dim, then cat.
function Tensor.stack(list, dim)
   if #list == 0 then error("stack: expected a non-empty list of tensors", 2) end
   local nd = lib.ml_tensor_ndim(list[1]._c)
   local d = cdim("stack", dim or 1, nd + 1) + 1
   local parts = {}
   for i = 1, #list do parts[i] = methods.unsqueeze(list[i], d) end
   return Tensor.cat(parts, d)
end

-- --- printing -------------------------------------------------------------------------------

Tensor.__tostring = function(t) return require("moonload.tensor_print")(t) end
Tensor.__name = "Tensor"

return Tensor
