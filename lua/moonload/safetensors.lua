--- ml.safetensors: reading and writing .safetensors files (API.md "Files").
--
-- Reading maps the file once and validates the whole header in C (core/src/safetensors.c);
-- CPU tensors are zero-copy views of the mapping when the data is aligned to the element size
-- (always so for files written by the reference writer or by save_file), copies otherwise.
-- Tensors keep the mapping alive on their own: closing a handle never invalidates them.
-- Writing goes to a temporary file in the same directory, fsync'd and renamed into place.
local C = require("moonload.C")
local Tensor = require("moonload.tensor")
local dtypes = require("moonload.dtypes")

local ffi, lib = C.ffi, C.lib

local M = {}

local handle_out = ffi.new("ml_safetensors*[1]")
local tensor_out = ffi.new("ml_tensor*[1]")
local index_out = ffi.new("int64_t[1]")
local info = ffi.new("ml_safetensors_info")

local function c_error(level)
   error(ffi.string(lib.ml_last_error()), level + 1)
end

local function device_of(fn, opts, level)
   if opts ~= nil and type(opts) ~= "table" then
      error(string.format("%s: options must be a table like {device = \"cpu\"}, got %s", fn, type(opts)), level + 1)
   end
   local dev = opts and opts.device or "cpu"
   return Tensor.parse_device(fn, dev), (type(dev) == "number" and "cuda:" .. dev or dev)
end

-- --- safe_open handles ------------------------------------------------------------------------

local SafeOpen = {}
SafeOpen.__index = SafeOpen
M.SafeOpen = SafeOpen

local function live(self, fn)
   local h = self._h
   if h == nil then
      error(string.format("%s: the safe_open handle for %s is closed", fn, self.path), 3)
   end
   return h
end

local function index_of(self, h, fn, name)
   if type(name) ~= "string" then
      error(string.format("%s: tensor name must be a string, got %s", fn, type(name)), 3)
   end
   if lib.ml_safetensors_find(h, name, index_out) ~= 0 then c_error(3) end
   return index_out[0]
end

--- Opens and validates a file; returns a handle. opts.device ("cpu" default, "meta", "cuda:N")
--- is where get_tensor puts tensors.
function M.safe_open(path, opts)
   if type(path) ~= "string" then
      error("safe_open: path must be a string, got " .. type(path), 2)
   end
   local dev, devname = device_of("safe_open", opts, 2)
   if lib.ml_safetensors_open(path, handle_out) ~= 0 then c_error(2) end
   local h = ffi.gc(handle_out[0], lib.ml_safetensors_release)
   return setmetatable({ _h = h, path = path, device = devname, _dev = dev }, SafeOpen)
end

--- Tensor names, sorted (byte order), as the reference's keys().
function SafeOpen:keys()
   local h = live(self, "keys")
   local keys = {}
   for i = 0, tonumber(lib.ml_safetensors_count(h)) - 1 do
      lib.ml_safetensors_info_at(h, i, info)
      keys[#keys + 1] = ffi.string(info.name)
   end
   return keys
end

--- The tensor called name, on the handle's device (or opts.device). Only its bytes are touched.
function SafeOpen:get_tensor(name, opts)
   local h = live(self, "get_tensor")
   local i = index_of(self, h, "get_tensor", name)
   local dev = self._dev
   if opts ~= nil then dev = device_of("get_tensor", opts, 2) end
   if lib.ml_safetensors_tensor(h, i, dev, tensor_out) ~= 0 then c_error(2) end
   return Tensor.wrap(tensor_out[0])
end

--- The header's __metadata__ as a table of strings, or nil when the file has none.
function SafeOpen:metadata()
   local h = live(self, "metadata")
   local n = tonumber(lib.ml_safetensors_metadata_count(h))
   if n < 0 then return nil end
   local meta = {}
   for i = 0, n - 1 do
      meta[ffi.string(lib.ml_safetensors_metadata_key(h, i))] = ffi.string(lib.ml_safetensors_metadata_value(h, i))
   end
   return meta
end

--- Where a tensor's bytes are, without reading them: {dtype (moonload name, nil when moonload
--- has no such dtype), st_dtype ("F32"...), shape, data_offsets = {begin, end} (relative to the
--- data section), file_offset (absolute byte offset of begin), nbytes}.
function SafeOpen:tensor_info(name)
   local h = live(self, "tensor_info")
   local i = index_of(self, h, "tensor_info", name)
   lib.ml_safetensors_info_at(h, i, info)
   local shape = {}
   for d = 0, info.ndim - 1 do shape[d + 1] = tonumber(info.shape[d]) end
   local b, e = tonumber(info.begin), tonumber(info["end"])
   return {
      dtype = info.dtype >= 0 and dtypes.names[tonumber(info.dtype)] or nil,
      st_dtype = ffi.string(info.st_dtype),
      shape = shape,
      data_offsets = { b, e },
      file_offset = tonumber(info.file_offset),
      nbytes = e - b,
   }
end

--- Page-cache hint for one tensor's bytes: "willneed" starts reading them in the background,
--- "dontneed" drops them from memory (tensors viewing them stay valid and fault them back in).
function SafeOpen:advise(name, what)
   local h = live(self, "advise")
   local i = index_of(self, h, "advise", name)
   local advice = ({ willneed = 0, dontneed = 1 })[what]
   if not advice then
      error(string.format("advise: expected \"willneed\" or \"dontneed\", got %s", tostring(what)), 2)
   end
   if lib.ml_safetensors_advise(h, i, advice) ~= 0 then c_error(2) end
end

--- Releases the mapping held by the handle (tensors already returned stay valid). Safe twice.
function SafeOpen:close()
   local h = self._h
   if h == nil then return end
   self._h = nil
   lib.ml_safetensors_release(ffi.gc(h, nil))
end

function SafeOpen:__tostring()
   if self._h == nil then return string.format("safe_open(%q, closed)", self.path) end
   return string.format("safe_open(%q, %d tensors, device=%s)", self.path,
      tonumber(lib.ml_safetensors_count(self._h)), self.device)
end

-- --- whole files --------------------------------------------------------------------------

--- Every tensor of a file as a table name -> tensor (opts.device: "cpu" default, "meta", "cuda:N").
function M.load_file(path, opts)
   if type(path) ~= "string" then
      error("load_file: path must be a string, got " .. type(path), 2)
   end
   local dev = device_of("load_file", opts, 2)
   if lib.ml_safetensors_open(path, handle_out) ~= 0 then c_error(2) end
   local h = ffi.gc(handle_out[0], lib.ml_safetensors_release)
   local out = {}
   for i = 0, tonumber(lib.ml_safetensors_count(h)) - 1 do
      if lib.ml_safetensors_tensor(h, i, dev, tensor_out) ~= 0 then
         lib.ml_safetensors_release(ffi.gc(h, nil))
         c_error(2)
      end
      local t = Tensor.wrap(tensor_out[0])
      lib.ml_safetensors_info_at(h, i, info)
      out[ffi.string(info.name)] = t
   end
   lib.ml_safetensors_release(ffi.gc(h, nil))
   return out
end

local function sorted_keys(t)
   local keys = {}
   for k in pairs(t) do keys[#keys + 1] = k end
   table.sort(keys)
   return keys
end

--- Writes tensors (a table name -> tensor) and optional metadata (string -> string) to path,
--- atomically: on any error path is left as it was.
function M.save_file(tensors, path, metadata)
   if type(tensors) ~= "table" or Tensor.is_tensor(tensors) then
      error("save_file: tensors must be a table of name -> tensor, got " ..
         (Tensor.is_tensor(tensors) and "a tensor" or type(tensors)), 2)
   end
   if type(path) ~= "string" then error("save_file: path must be a string, got " .. type(path), 2) end
   if metadata ~= nil and type(metadata) ~= "table" then
      error("save_file: metadata must be a table of string -> string, got " .. type(metadata), 2)
   end
   for k, v in pairs(tensors) do
      if type(k) ~= "string" then
         error(string.format("save_file: tensor names must be strings, got %s %s", type(k), tostring(k)), 2)
      end
      if not Tensor.is_tensor(v) then
         error(string.format("save_file: value for %q is not a tensor (%s)", k, type(v)), 2)
      end
   end
   local names = sorted_keys(tensors)
   local n = #names
   local cnames = ffi.new("const char*[?]", n + 1)
   local ctensors = ffi.new("ml_tensor*[?]", n + 1)
   for i, k in ipairs(names) do
      cnames[i - 1] = k
      ctensors[i - 1] = tensors[k]._c
   end
   local mkeys = {}
   if metadata then
      for k, v in pairs(metadata) do
         if type(k) ~= "string" or type(v) ~= "string" then
            error(string.format("save_file: metadata must map strings to strings (%s %s -> %s)",
               type(k), tostring(k), type(v)), 2)
         end
      end
      mkeys = sorted_keys(metadata)
   end
   local ck = ffi.new("const char*[?]", #mkeys + 1)
   local cv = ffi.new("const char*[?]", #mkeys + 1)
   for i, k in ipairs(mkeys) do
      ck[i - 1] = k
      cv[i - 1] = metadata[k]
   end
   local st = lib.ml_safetensors_save(path, n, cnames, ctensors, metadata and #mkeys or -1, ck, cv)
   if st ~= 0 then c_error(2) end
end

return M
