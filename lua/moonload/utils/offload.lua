--- Accelerate-compatible offload folders (accelerate.utils.offload).
--
-- A folder holds index.json ({name: {"dtype", "shape"}}) and one raw <name>.dat per tensor:
-- C-contiguous little-endian element bytes, no header; bfloat16 as its 2-byte patterns with
-- dtype "bfloat16"; 0-d tensors as one element with shape []. An index entry may instead point
-- into a safetensors file ({"safetensors_file", "weight_name", "dtype"}), read in place.
-- Reading a .dat is a zero-copy view over a file mapping; writing goes to a temp file that is
-- renamed into place, so a folder never holds a half-written tensor or index.
local C = require("moonload.C")
local Tensor = require("moonload.tensor")
local dtypes = require("moonload.dtypes")
local cjson = require("cjson").new()   -- a private instance: settings stay local

-- Python's json writes "/" unescaped; so do we (paths in safetensors_file entries).
local function jstr(v)
   return (cjson.encode(v):gsub("\\/", "/"))
end

local ffi, lib = C.ffi, C.lib

local M = {}

-- --- files ----------------------------------------------------------------------------------

local function join(folder, name)
   if folder:sub(-1) == "/" then return folder .. name end
   return folder .. "/" .. name
end
M.join = join

local function shell_quote(s)
   return "'" .. s:gsub("'", "'\\''") .. "'"
end
M.shell_quote = shell_quote

local function is_dir(path)
   local f = io.open(path .. "/.", "r")
   if f then f:close(); return true end
   return false
end
M.is_dir = is_dir

local function file_exists(path)
   local f = io.open(path, "rb")
   if f then f:close(); return true end
   return false
end
M.file_exists = file_exists

local function mkdir_p(path, fn)
   if is_dir(path) then return end
   local ok = os.execute("mkdir -p " .. shell_quote(path) .. " 2>/dev/null")
   if not (ok == 0 or ok == true) or not is_dir(path) then
      error(string.format("%s: cannot create folder %s", fn, path), 3)
   end
end
M.mkdir_p = mkdir_p

--- list_dir(path) -> the names in a folder (hidden ones too); {} when it cannot be read.
function M.list_dir(path)
   local p = io.popen("ls -1A " .. M.shell_quote(path) .. " 2>/dev/null")
   local out = {}
   if p then
      for line in p:lines() do out[#out + 1] = line end
      p:close()
   end
   return out
end

-- Writes `chunks` (strings or {ptr, n} byte ranges) to path through path.tmp + rename.
local CHUNK = 64 * 1024 * 1024
local function write_atomic(path, fn, writer)
   local tmp = path .. ".tmp"
   local f, err = io.open(tmp, "wb")
   if not f then error(string.format("%s: cannot write %s: %s", fn, tmp, tostring(err)), 3) end
   local ok, werr = pcall(writer, f)
   local closed, cerr = f:close()
   if not ok or not closed then
      os.remove(tmp)
      error(string.format("%s: writing %s failed: %s", fn, path, tostring(ok and cerr or werr)), 3)
   end
   local renamed, rerr = os.rename(tmp, path)
   if not renamed then
      os.remove(tmp)
      error(string.format("%s: cannot rename %s into place: %s", fn, path, tostring(rerr)), 3)
   end
end
M.write_atomic = write_atomic

local function write_bytes(f, ptr, n)
   local p = ffi.cast("const char *", ptr)
   local off = 0
   while off < n do
      local len = math.min(CHUNK, n - off)
      assert(f:write(ffi.string(p + off, len)))
      off = off + len
   end
end

-- --- JSON for index.json: insertion order kept through an explicit key list ----------------

local function encode_entry(e)
   local parts = {}
   -- Accelerate's entry order: dtype, shape; safetensors entries: safetensors_file, weight_name, dtype
   local order = { "safetensors_file", "weight_name", "dtype", "shape" }
   local seen = {}
   for _, k in ipairs(order) do
      if e[k] ~= nil then
         seen[k] = true
         local v = e[k]
         if k == "shape" then
            -- json.dump(indent=2) layout: one dimension per line, [] for 0-d
            local dims = {}
            for i, d in ipairs(v) do dims[i] = string.format("      %d", d) end
            if #dims == 0 then
               parts[#parts + 1] = '    "shape": []'
            else
               parts[#parts + 1] = '    "shape": [\n' .. table.concat(dims, ",\n") .. "\n    ]"
            end
         else
            parts[#parts + 1] = "    " .. jstr(k) .. ": " .. jstr(v)
         end
      end
   end
   local extra = {}
   for k in pairs(e) do if not seen[k] then extra[#extra + 1] = k end end
   table.sort(extra)
   for _, k in ipairs(extra) do
      parts[#parts + 1] = "    " .. jstr(k) .. ": " .. jstr(e[k])
   end
   return "{\n" .. table.concat(parts, ",\n") .. "\n  }"
end

--- Encodes an index (name -> entry) as Accelerate's indent-2 JSON; keys in `order` first,
-- then the rest sorted.
function M.encode_index(index, order)
   local keys, seen = {}, {}
   for _, k in ipairs(order or {}) do
      if index[k] ~= nil and not seen[k] then keys[#keys + 1] = k; seen[k] = true end
   end
   local rest = {}
   for k in pairs(index) do if not seen[k] then rest[#rest + 1] = k end end
   table.sort(rest)
   for _, k in ipairs(rest) do keys[#keys + 1] = k end
   if #keys == 0 then return "{}" end
   local parts = {}
   for i, k in ipairs(keys) do parts[i] = "  " .. jstr(k) .. ": " .. encode_entry(index[k]) end
   return "{\n" .. table.concat(parts, ",\n") .. "\n}"
end

local read_json = require("moonload.utils.json").read
M.read_json = read_json

-- --- writing ----------------------------------------------------------------------------------

--- offload_weight(weight, weight_name, offload_folder, {index}) -> index.
-- Writes <folder>/<weight_name>.dat (raw bytes; bf16 as 2-byte values; 0-d as one element)
-- and, when an index table is given, records {dtype, shape} in it.
function M.offload_weight(weight, weight_name, offload_folder, opts)
   local fn = "offload_weight"
   if not Tensor.is_tensor(weight) then error(fn .. ": weight must be a tensor, got " .. type(weight), 2) end
   if type(weight_name) ~= "string" or weight_name == "" or weight_name:find("/", 1, true) then
      error(fn .. ": weight_name must be a non-empty name without '/', got " .. tostring(weight_name), 2)
   end
   if type(offload_folder) ~= "string" then error(fn .. ": offload_folder must be a path string", 2) end
   local index = opts and opts.index
   if weight:is_meta() then error(string.format('%s: "%s" is on the meta device (it has no data to write)', fn, weight_name), 2) end
   local w = weight:to("cpu"):contiguous()
   local shape = weight.shape
   local n = w:numel() * w:element_size()
   mkdir_p(offload_folder, fn)
   write_atomic(join(offload_folder, weight_name .. ".dat"), fn, function(f)
      -- numpy's memmap cannot map 0 bytes and writes one zero byte for an empty tensor: so do we
      if n > 0 then write_bytes(f, lib.ml_tensor_data(w._c), n) else assert(f:write("\0")) end
   end)
   if index ~= nil then
      index[weight_name] = { dtype = weight.dtype, shape = shape }
   end
   return index
end

--- save_offload_index(index, offload_folder): merges index into <folder>/index.json (atomic).
function M.save_offload_index(index, offload_folder, order)
   if index == nil or next(index) == nil then return end
   local fn = "save_offload_index"
   mkdir_p(offload_folder, fn)
   local path = join(offload_folder, "index.json")
   local current = {}
   if file_exists(path) then current = read_json(path, fn) end
   for k, v in pairs(index) do current[k] = v end
   local text = M.encode_index(current, order)
   write_atomic(path, fn, function(f) assert(f:write(text)) end)
end

local function ordered_keys(state_dict)
   local keys = {}
   for k in pairs(state_dict) do keys[#keys + 1] = k end
   table.sort(keys)
   return keys
end

--- offload_state_dict(save_dir, state_dict[, keys]): writes every tensor, then index.json.
-- `keys` (optional) gives the order of the index; the default is sorted names.
function M.offload_state_dict(save_dir, state_dict, keys)
   local fn = "offload_state_dict"
   if type(save_dir) ~= "string" then error(fn .. ": save_dir must be a path string", 2) end
   if type(state_dict) ~= "table" then error(fn .. ": state_dict must be a table of tensors", 2) end
   keys = keys or ordered_keys(state_dict)
   for _, name in ipairs(keys) do
      if not Tensor.is_tensor(state_dict[name]) then
         error(string.format('%s: state_dict["%s"] is not a tensor', fn, tostring(name)), 2)
      end
   end
   mkdir_p(save_dir, fn)
   local index = {}
   for _, name in ipairs(keys) do M.offload_weight(state_dict[name], name, save_dir, { index = index }) end
   M.save_offload_index(index, save_dir, keys)
   return index
end

-- --- reading ----------------------------------------------------------------------------------

local shape_buf = ffi.new("int64_t[8]")
local map_out = ffi.new("ml_mapping*[1]")
local storage_out = ffi.new("ml_storage*[1]")
local tensor_out = ffi.new("ml_tensor*[1]")

local function fail(fn, level)
   error(fn .. ": " .. ffi.string(lib.ml_last_error()), level + 1)
end

--- load_offloaded_weight(weight_file, weight_info) -> a CPU tensor viewing the file's mapping.
-- weight_info = {dtype = "float32", shape = {...}}; shape {} gives a 0-d tensor.
function M.load_offloaded_weight(weight_file, weight_info)
   local fn = "load_offloaded_weight"
   if type(weight_info) ~= "table" then error(fn .. ": weight_info must be a table {dtype, shape}", 2) end
   local dtype, shape = weight_info.dtype, weight_info.shape
   local dt = dtypes.by_name[dtype]
   if dt == nil then
      error(string.format("%s: %s has unknown dtype %s", fn, weight_file, tostring(dtype)), 2)
   end
   if type(shape) ~= "table" then error(string.format("%s: %s has no shape", fn, weight_file), 2) end
   local ndim, numel = #shape, 1
   if ndim > 8 then error(string.format("%s: %s has %d dims (at most 8)", fn, weight_file, ndim), 2) end
   for i = 1, ndim do
      local d = shape[i]
      if type(d) ~= "number" or d < 0 or d % 1 ~= 0 then
         error(string.format("%s: %s has a bad shape entry %s", fn, weight_file, tostring(d)), 2)
      end
      shape_buf[i - 1] = d
      numel = numel * d
   end
   if numel == 0 then
      return Tensor.empty(shape, { dtype = dtypes.names[dt] })
   end
   local nbytes = numel * tonumber(lib.ml_dtype_size(dt))
   if lib.ml_mapping_open(weight_file, map_out) ~= 0 then fail(fn, 2) end
   local map = map_out[0]
   local size = tonumber(lib.ml_mapping_size(map))
   if size < nbytes then
      lib.ml_mapping_release(map)
      error(string.format("%s: %s holds %d bytes, a %s tensor of shape [%s] needs %d", fn, weight_file, size,
         dtype, table.concat(shape, ", "), nbytes), 2)
   end
   local st = lib.ml_storage_from_mapping(map, 0, nbytes, storage_out)
   lib.ml_mapping_release(map)
   if st ~= 0 then fail(fn, 2) end
   local storage = storage_out[0]
   st = lib.ml_tensor_from_storage(storage, 0, dt, ndim, shape_buf, nil, tensor_out)
   lib.ml_storage_release(storage)
   if st ~= 0 then fail(fn, 2) end
   return Tensor.wrap(tensor_out[0])
end

-- --- PrefixedDataset ----------------------------------------------------------------------------

-- Both mapping classes index like tables: obj[key] reads an entry (nil when missing); methods
-- are reached through the class, so a tensor named like a method ("get") needs obj:get(name).
-- Instance state lives under a private table key, so no tensor name can shadow it.
local P = setmetatable({}, { __tostring = function() return "<private>" end })
M.PRIVATE = P

local function mapping_class(name)
   local cls = {}
   cls.__name = name
   cls.__index = function(self, key)
      local m = cls[key]
      if m ~= nil then return m end
      return cls.getitem(self, key)
   end
   return cls
end

local PrefixedDataset = mapping_class("PrefixedDataset")
M.PrefixedDataset_class = PrefixedDataset

local function dataset_get(dataset, key)
   local mt = getmetatable(dataset)
   if mt and rawget(mt, "getitem") then
      return mt.getitem(dataset, key)
   end
   return dataset[key]
end

local function dataset_keys(dataset)
   local mt = getmetatable(dataset)
   if mt and rawget(mt, "keys") and rawget(mt, "getitem") then return mt.keys(dataset) end
   local keys = {}
   for k in pairs(dataset) do keys[#keys + 1] = k end
   table.sort(keys)
   return keys
end
M.dataset_keys = dataset_keys

--- PrefixedDataset(dataset, prefix): a view where ds[k] = dataset[prefix .. k].
-- keys() lists the underlying full keys starting with prefix and len() the whole dataset's size
-- (Accelerate's quirks, kept).
function M.PrefixedDataset(dataset, prefix)
   if type(dataset) ~= "table" then error("PrefixedDataset: dataset must be a table or mapping, got " .. type(dataset), 2) end
   if type(prefix) ~= "string" then error("PrefixedDataset: prefix must be a string, got " .. type(prefix), 2) end
   return setmetatable({ [P] = { dataset = dataset, prefix = prefix } }, PrefixedDataset)
end

function PrefixedDataset.getitem(self, key)
   return dataset_get(self[P].dataset, self[P].prefix .. key)
end

function PrefixedDataset.get(self, key, default)
   local v = PrefixedDataset.getitem(self, key)
   if v == nil then return default end
   return v
end

function PrefixedDataset.keys(self)
   local prefix, out = self[P].prefix, {}
   for _, k in ipairs(dataset_keys(self[P].dataset)) do
      if k:sub(1, #prefix) == prefix then out[#out + 1] = k end
   end
   return out
end

function PrefixedDataset.len(self)
   return #dataset_keys(self[P].dataset)
end

function PrefixedDataset.__tostring(self)
   return string.format("PrefixedDataset(prefix=%q, %d keys)", self[P].prefix, #PrefixedDataset.keys(self))
end

-- --- OffloadedWeightsLoader -----------------------------------------------------------------

local OffloadedWeightsLoader = mapping_class("OffloadedWeightsLoader")
M.OffloadedWeightsLoader_class = OffloadedWeightsLoader

--- OffloadedWeightsLoader({state_dict, save_folder, index, device}): the in-memory state dict
-- wins over the folder's entries; keys are merged with a set; safetensors files stay open.
function M.OffloadedWeightsLoader(opts)
   opts = opts or {}
   local state_dict, save_folder, index = opts.state_dict, opts.save_folder, opts.index
   if state_dict == nil and save_folder == nil and index == nil then
      error("OffloadedWeightsLoader: Need either a `state_dict`, a `save_folder` or an `index` containing offloaded weights.", 2)
   end
   state_dict = state_dict or {}
   if index == nil and save_folder ~= nil then
      index = read_json(join(save_folder, "index.json"), "OffloadedWeightsLoader")
   end
   index = index or {}
   local all_keys, seen = {}, {}
   for _, k in ipairs(dataset_keys(state_dict)) do all_keys[#all_keys + 1] = k; seen[k] = true end
   local rest = {}
   for k in pairs(index) do if not seen[k] then rest[#rest + 1] = k; seen[k] = true end end
   table.sort(rest)
   for _, k in ipairs(rest) do all_keys[#all_keys + 1] = k end
   local device = opts.device
   if type(device) == "number" then device = "cuda:" .. device end
   return setmetatable({ [P] = { state_dict = state_dict, save_folder = save_folder, index = index, device = device,
                                 all_keys = all_keys, key_set = seen, handles = {} } }, OffloadedWeightsLoader)
end

local function open_safetensors(self, file)
   local handles = self[P].handles
   local h = handles[file]
   if h == nil then
      h = require("moonload.safetensors").safe_open(file)
      handles[file] = h
   end
   return h
end

function OffloadedWeightsLoader.getitem(self, key)
   local sd = self[P].state_dict
   local v = dataset_get(sd, key)
   if v ~= nil then return v end
   local info = self[P].index[key]
   if info == nil then return nil end
   local device = self[P].device
   local t
   if info.safetensors_file ~= nil then
      t = open_safetensors(self, info.safetensors_file):get_tensor(info.weight_name or key)
      if info.dtype ~= nil and info.dtype ~= t.dtype then t = t:to(info.dtype) end
   else
      local folder = self[P].save_folder
      if folder == nil then
         error(string.format('OffloadedWeightsLoader: "%s" is in the index but no save_folder was given', key), 2)
      end
      t = M.load_offloaded_weight(join(folder, key .. ".dat"), info)
   end
   if device ~= nil and t.device ~= device then t = t:to(device) end
   return t
end

function OffloadedWeightsLoader.get(self, key, default)
   local v = OffloadedWeightsLoader.getitem(self, key)
   if v == nil then return default end
   return v
end

--- Keys in order: the state dict's keys first, then the index's (sorted).
function OffloadedWeightsLoader.keys(self)
   local out = {}
   for i, k in ipairs(self[P].all_keys) do out[i] = k end
   return out
end

function OffloadedWeightsLoader.contains(self, key)
   return self[P].key_set[key] == true
end

function OffloadedWeightsLoader.len(self)
   return #self[P].all_keys
end

--- Closes the cached safetensors handles (safe to call twice).
function OffloadedWeightsLoader.close(self)
   local handles = self[P].handles
   for file, h in pairs(handles) do
      if h.close then h:close() end
      handles[file] = nil
   end
end

function OffloadedWeightsLoader.__tostring(self)
   return string.format("OffloadedWeightsLoader(%d keys, save_folder=%s)", #self[P].all_keys,
      tostring(self[P].save_folder))
end

--- extract_submodules_state_dict(state_dict, submodule_names): keys equal to a name or under
-- name + "." ("a.1" does not capture "a.10"; "" captures nothing, as in Accelerate).
function M.extract_submodules_state_dict(state_dict, submodule_names)
   local result = {}
   for key, value in pairs(state_dict) do
      for _, name in ipairs(submodule_names) do
         if key == name or key:sub(1, #name + 1) == name .. "." then
            result[key] = value
            break
         end
      end
   end
   return result
end

return M
