--- Tensor placement, tied parameters and checkpoint loading (accelerate.utils.modeling).
--
-- Modules are ml.nn modules (API.md "Modules"): registries m._parameters / m._buffers /
-- m._modules (ordered), class name m.__name. Devices: an integer N means "cuda:N"; "cpu",
-- "meta", "cuda:N" are tensor devices; "disk" is a placement only.
local Tensor = require("moonload.tensor")
local log = require("moonload.utils.log")
local offload = require("moonload.utils.offload")

local M = {}

-- --- module access ------------------------------------------------------------------------

function M.is_module(x)
   return type(x) == "table" and not Tensor.is_tensor(x) and type(x.named_children) == "function"
end

function M.class_name(m)
   if M.is_module(m) then return m.__name end
   return nil
end

--- {name, child} list of the direct children (empty for tensors).
function M.children_list(m)
   local out = {}
   if not M.is_module(m) then return out end
   for name, child in m:named_children() do out[#out + 1] = { name, child } end
   return out
end

local function direct_params(m)
   local out = {}
   for name, p in m:named_parameters("", false) do out[#out + 1] = { name, p } end
   return out
end
M.direct_params = direct_params

local function direct_buffers(m)
   local out = {}
   for name, b in m:named_buffers("", false) do out[#out + 1] = { name, b } end
   return out
end
M.direct_buffers = direct_buffers

-- "parameter", "buffer" or nil for a direct tensor of m.
local function tensor_kind(m, name)
   local params, buffers = rawget(m, "_parameters"), rawget(m, "_buffers")
   if params ~= nil and buffers ~= nil and params.has then
      if params:has(name) then return "parameter" end
      if buffers:has(name) then return "buffer" end
      return nil
   end
   for n in m:named_parameters("", false) do if n == name then return "parameter" end end
   for n in m:named_buffers("", false) do if n == name then return "buffer" end end
   return nil
end
M.tensor_kind = tensor_kind

-- Names of m's direct non-persistent buffers, as a set.
local function non_persistent_set(m)
   local set = rawget(m, "_non_persistent_buffers_set")
   if type(set) == "table" then
      local out = {}
      for k, v in pairs(set) do
         if type(k) == "number" then out[v] = true elseif v then out[k] = true end
      end
      return out
   end
   -- Fallback through the API: direct buffers that state_dict leaves out.
   local out, sd = {}, m:state_dict()
   for name in m:named_buffers("", false) do
      if sd[name] == nil then out[name] = true end
   end
   return out
end

--- get_non_persistent_buffers(module, {recurse, fqns}) -> set of names.
-- With recurse, names are qualified ("sub.mask") when fqns is true and bare otherwise, as in
-- Accelerate.
function M.get_non_persistent_buffers(module, opts)
   opts = opts or {}
   if not opts.recurse then return non_persistent_set(module) end
   local out = {}
   for prefix, m in module:named_modules() do
      for name in pairs(non_persistent_set(m)) do
         if opts.fqns then out[prefix == "" and name or (prefix .. "." .. name)] = true else out[name] = true end
      end
   end
   return out
end

--- named_module_tensors(module, {include_buffers = true, recurse = false,
-- remove_non_persistent = false}): iterator over name, tensor: parameters first, then buffers.
-- Non-persistent buffers are matched by qualified name (Accelerate's bare-name bug, Q7, fixed).
function M.named_module_tensors(module, opts)
   opts = opts or {}
   local recurse = opts.recurse == true
   local include_buffers = opts.include_buffers ~= false
   local items = {}
   for name, p in module:named_parameters("", recurse) do items[#items + 1] = { name, p } end
   if include_buffers then
      local skip = {}
      if opts.remove_non_persistent then
         skip = M.get_non_persistent_buffers(module, { recurse = recurse, fqns = true })
      end
      for name, b in module:named_buffers("", recurse) do
         if not skip[name] then items[#items + 1] = { name, b } end
      end
   end
   local i = 0
   return function()
      i = i + 1
      local e = items[i]
      if e then return e[1], e[2] end
   end
end

-- --- devices --------------------------------------------------------------------------------

--- Canonical device string: 0 -> "cuda:0", "cuda" -> "cuda:0"; "cpu", "meta", "disk" as they are.
function M.device_string(device, fn)
   local t = type(device)
   if t == "number" then
      if device < 0 or device % 1 ~= 0 then
         error(string.format("%s: device %s is not a device (use an integer, \"cpu\", \"meta\" or \"cuda:N\")", fn, tostring(device)), 3)
      end
      return "cuda:" .. string.format("%d", device)
   end
   if t ~= "string" then
      error(string.format("%s: device must be an integer or a string, got %s", fn, t), 3)
   end
   if device == "cuda" then return "cuda:0" end
   return device
end

local function shape_str(shape)
   local parts = {}
   for i, d in ipairs(shape) do parts[i] = string.format("%d", d) end
   return "[" .. table.concat(parts, ", ") .. "]"
end
M.shape_str = shape_str

local function same_shape(a, b)
   if #a ~= #b then return false end
   for i = 1, #a do if a[i] ~= b[i] then return false end end
   return true
end

-- Shape equality on the C side (no Lua lists: hooks call this per tensor per forward).
local lib = require("moonload.C").lib
local function same_shape_t(a, b)
   local ac, bc = a._c, b._c
   local n = lib.ml_tensor_ndim(ac)
   if n ~= lib.ml_tensor_ndim(bc) then return false end
   local sa, sb = lib.ml_tensor_shape(ac), lib.ml_tensor_shape(bc)
   for i = 0, n - 1 do if sa[i] ~= sb[i] then return false end end
   return true
end

-- The dtypes a dtype argument never casts: integers, bools, and float8 (quantized storage).
local NEVER_CAST = { int64 = true, int32 = true, int16 = true, int8 = true, uint8 = true, bool = true,
                     float8_e4m3fn = true, float8_e5m2 = true }

-- --- set_module_tensor_to_device ------------------------------------------------------------

local function describe_module(m, path)
   local cls = M.class_name(m) or "module"
   if path == nil or path == "" then return cls end
   return string.format('%s "%s"', cls, path)
end

-- Stores t in module's slot `name` of the given kind (a parameter-flagged tensor assigned to a
-- buffer name would otherwise be re-registered as a parameter).
local function assign(module, kind, name, t)
   if kind == "buffer" and rawget(t, "_is_param") then
      rawget(module, "_buffers"):set(name, t)
   else
      module[name] = t
   end
end

-- dotted name -> its parts (names are few and reused every forward)
local split_cache = {}

--- set_module_tensor_to_device(module, tensor_name, device, {value, dtype, fp16_statistics,
-- tied_params_map, non_blocking, clear_cache}). Puts the named parameter or buffer (dotted name)
-- on device, optionally with a new value. A value keeps the old tensor's dtype unless dtype is
-- given (integers, bools and float8 never cast). tied_params_map[data_ptr][device] shares one copy of a
-- tied tensor per device (device keys are canonical strings: "cuda:0", "cpu").
function M.set_module_tensor_to_device(module, tensor_name, device, opts)
   local fn = "set_module_tensor_to_device"
   local value, dtype, tied
   if opts ~= nil then value, dtype, tied = opts.value, opts.dtype, opts.tied_params_map end
   if type(tensor_name) ~= "string" then
      error(string.format("%s: tensor_name must be a string, got %s", fn, type(tensor_name)), 2)
   end
   local parts = split_cache[tensor_name]
   if parts == nil then
      parts = {}
      for part in tensor_name:gmatch("[^.]+") do parts[#parts + 1] = part end
      if #parts == 0 then parts[1] = tensor_name end
      split_cache[tensor_name] = parts
   end
   local n = #parts
   for i = 1, n - 1 do
      local part = parts[i]
      local sub = module[part]
      if not M.is_module(sub) then
         error(string.format('%s: %s has no attribute %s (in "%s").', fn,
            describe_module(module, table.concat(parts, ".", 1, i - 1)), part, tensor_name), 2)
      end
      module = sub
   end
   local name = parts[n]
   local kind = tensor_kind(module, name)
   if kind == nil then
      error(string.format('%s: %s does not have a parameter or a buffer named %s (in "%s").', fn,
         describe_module(module), name, tensor_name), 2)
   end
   device = M.device_string(device, fn)
   if device == "disk" then
      error(string.format('%s: "disk" is a placement, not a tensor device (for %s)', fn, tensor_name), 2)
   end
   local old = module[name]

   if tied ~= nil then
      if value ~= nil then
         local e = tied[value:data_ptr()]
         if e ~= nil and e[device] ~= nil then assign(module, kind, name, e[device]); return end
      end
      if old ~= nil then
         local e = tied[old:data_ptr()]
         if e ~= nil and e[device] ~= nil then assign(module, kind, name, e[device]); return end
      end
   end

   if old == nil then
      -- a registered slot holding nothing (e.g. bias = nil): only a value can fill it
      if value == nil then return end
   elseif old:is_meta() and device ~= "meta" and value == nil then
      error(string.format("%s: %s is on the meta device, we need a `value` to put in on %s.", fn, tensor_name, device), 2)
   end

   if value ~= nil then
      if not Tensor.is_tensor(value) then
         if type(value) == "number" or type(value) == "table" then
            value = Tensor.tensor(value)
         else
            error(string.format("%s: value for %s must be a tensor, got %s", fn, tensor_name, type(value)), 2)
         end
      end
      if old ~= nil then
         if not same_shape_t(value, old) then
            error(string.format('%s: Trying to set a tensor of shape %s in "%s" (which has shape %s), this looks incorrect.',
               fn, shape_str(value.shape), tensor_name, shape_str(old.shape)), 2)
         end
      end
      if dtype == nil then
         if old ~= nil and value.dtype ~= old.dtype then value = value:to(old.dtype) end
      elseif not NEVER_CAST[value.dtype] and value.dtype ~= dtype then
         value = value:to(dtype)
      end
   end

   local new
   if value == nil then
      new = old:to(device)
      if dtype ~= nil and device == "meta" and not NEVER_CAST[old.dtype] and new.dtype ~= dtype then
         new = new:to(dtype)
      end
   else
      new = value:to(device)
   end
   if kind == "parameter" and rawget(new, "_is_param") == nil and new ~= old then
      rawset(new, "_is_param", true)
   end
   if new ~= old then assign(module, kind, name, new) end

   if tied ~= nil then
      local e = old ~= nil and tied[old:data_ptr()] or nil
      if e ~= nil then
         if e[device] == nil then e[device] = new end
      elseif value ~= nil then
         e = tied[value:data_ptr()]
         if e ~= nil and e[device] == nil then e[device] = new end
      end
   end
end

-- --- tied parameters ---------------------------------------------------------------------

--- find_tied_parameters(model) -> list of sorted name groups sharing one tensor object.
function M.find_tied_parameters(model)
   local canonical_order = {}
   local by_tensor = {}
   for name, p in model:named_parameters("", true, true) do
      by_tensor[p] = name
      canonical_order[#canonical_order + 1] = name
   end
   local aliases = {}
   for name, p in model:named_parameters("", true, false) do
      local canon = by_tensor[p]
      if canon ~= nil and canon ~= name then
         aliases[canon] = aliases[canon] or {}
         aliases[canon][name] = true
      end
   end
   local groups = {}
   for _, canon in ipairs(canonical_order) do
      local set = aliases[canon]
      if set then
         local group = { canon }
         for a in pairs(set) do group[#group + 1] = a end
         table.sort(group)
         groups[#groups + 1] = group
      end
   end
   return groups
end

local function resolve(model, dotted)
   local m, last = model, dotted
   local start = 1
   while true do
      local dot = dotted:find(".", start, true)
      if not dot then break end
      m = m[dotted:sub(start, dot - 1)]
      if m == nil then return nil end
      start = dot + 1
   end
   last = dotted:sub(start)
   return m, last
end
M.resolve = resolve

--- retie_parameters(model, tied_params): points every name of a group at the group's first
-- member that is not on meta (nothing happens when all are on meta).
function M.retie_parameters(model, tied_params)
   for _, group in ipairs(tied_params) do
      local keep
      for _, name in ipairs(group) do
         local m, last = resolve(model, name)
         local p = m and m[last]
         if p ~= nil and not p:is_meta() then keep = p; break end
      end
      if keep ~= nil then
         for _, name in ipairs(group) do
            local m, last = resolve(model, name)
            if m ~= nil and m[last] ~= keep then m[last] = keep end
         end
      end
   end
end

-- Device of a tensor name under a device map: the longest key that is the name or a prefix.
local function lookup_device(name, device_map)
   local n = name
   while true do
      local d = device_map[n]
      if d ~= nil then return d, n end
      if n == "" then return nil end
      local cut = n:match("^(.*)%.[^.]*$")
      n = cut or ""
   end
end
M.lookup_device = lookup_device

local function pyrepr_value(v)
   if type(v) == "string" then return "'" .. v .. "'" end
   return tostring(v)
end

--- check_tied_parameters_on_same_device(tied_params, device_map): warns when a tie spans devices.
function M.check_tied_parameters_on_same_device(tied_params, device_map)
   for _, group in ipairs(tied_params) do
      local devices, seen, parts = {}, {}, {}
      for _, name in ipairs(group) do
         local d = lookup_device(name, device_map)
         if d == nil then
            error(string.format("check_tied_parameters_on_same_device: The `device_map` does not contain the module %s.", name), 2)
         end
         parts[#parts + 1] = string.format("'%s': %s", name, pyrepr_value(d))
         local key = tostring(d)
         if not seen[key] then seen[key] = true; devices[#devices + 1] = d end
      end
      if #devices > 1 then
         log.warn(string.format("Tied parameters are on different devices: {%s}. Please modify your custom device map or set `device_map='auto'`. ",
            table.concat(parts, ", ")))
      end
   end
end

-- --- introspection helpers (hooks) -------------------------------------------------------------

local function pack(...) return { n = select("#", ...), ... } end

--- has_offloaded_params(module): the module has an offloading AlignDevicesHook.
function M.has_offloaded_params(module)
   local hook = rawget(module, "_hf_hook")
   if hook == nil then return false end
   local mt = getmetatable(hook)
   local cls = hook.__name or (mt and mt.__name)
   return cls == "AlignDevicesHook" and hook.offload == true
end

--- align_module_device(module, {execution_device}, fn) -> fn's results.
-- An offloaded module gets its weights onloaded (to execution_device when given) for fn; a
-- plain module with execution_device gets its direct parameters moved there and back.
function M.align_module_device(module, opts, fn)
   if type(opts) == "function" then fn, opts = opts, nil end
   opts = opts or {}
   if type(fn) ~= "function" then error("align_module_device: a function to run is required", 2) end
   local exec = opts.execution_device
   if M.has_offloaded_params(module) then
      local hook = module._hf_hook
      local original = hook.execution_device
      if exec ~= nil then hook.execution_device = exec end
      hook:pre_forward(module)
      local results = pack(pcall(fn))
      hook:post_forward(module, nil)
      hook.execution_device = original
      if not results[1] then error(results[2], 0) end
      return unpack(results, 2, results.n)
   elseif exec ~= nil then
      local moved = {}
      for _, e in ipairs(direct_params(module)) do
         moved[#moved + 1] = { e[1], e[2].device }
         M.set_module_tensor_to_device(module, e[1], exec)
      end
      local results = pack(pcall(fn))
      for _, e in ipairs(moved) do M.set_module_tensor_to_device(module, e[1], e[2]) end
      if not results[1] then error(results[2], 0) end
      return unpack(results, 2, results.n)
   end
   return fn()
end

--- get_state_dict_offloaded_model(model): a CPU state dict of a model with offloaded modules.
function M.get_state_dict_offloaded_model(model)
   local state_dict, placeholders = {}, {}
   for name, m in model:named_modules() do
      if name ~= "" then
         M.align_module_device(m, { execution_device = "cpu" }, function()
            for key, t in pairs(m:state_dict()) do
               local full = name .. "." .. key
               if not key:find(".", 1, true) then
                  if t:is_meta() then
                     placeholders[full] = true
                  else
                     state_dict[full] = t:to("cpu"):clone()
                     placeholders[full] = nil
                  end
               end
            end
         end)
      end
   end
   for key, t in pairs(model:state_dict()) do
      if not key:find(".", 1, true) and not t:is_meta() then state_dict[key] = t:to("cpu"):clone() end
   end
   local left = {}
   for k in pairs(placeholders) do if state_dict[k] == nil then left[#left + 1] = k end end
   if #left > 0 then
      table.sort(left)
      log.warn("The following tensors were not saved because they were still on meta device: " .. table.concat(left, ", "))
   end
   return state_dict
end

M.extract_submodules_state_dict = offload.extract_submodules_state_dict

-- --- checkpoints ------------------------------------------------------------------------------

local function safetensors() return require("moonload.safetensors") end

local function ends_with(s, suffix) return s:sub(-#suffix) == suffix end

--- load_state_dict(checkpoint_file, {device_map}) -> state dict (name -> tensor), keys.
-- A .safetensors file is mapped: CPU tensors are zero-copy views. With a device map, each
-- tensor goes to its module's device ("disk" entries load to CPU, as in Accelerate).
function M.load_state_dict(checkpoint_file, opts)
   local fn = "load_state_dict"
   if type(checkpoint_file) ~= "string" then error(fn .. ": checkpoint_file must be a path string", 2) end
   if not ends_with(checkpoint_file, ".safetensors") then
      error(string.format("%s: %s is not a .safetensors file (moonload reads safetensors checkpoints only; "
         .. "convert pickled .bin files with the safetensors package)", fn, checkpoint_file), 2)
   end
   local device_map = opts and opts.device_map
   local h = safetensors().safe_open(checkpoint_file)
   local meta = h:metadata()
   local format = meta and meta.format
   if format == nil then
      log.warn(string.format("The safetensors archive passed at %s does not contain metadata. Make sure to save your model with the `save_pretrained` method. Defaulting to 'pt' metadata.", checkpoint_file))
   elseif format == "tf" or format == "flax" then
      h:close()
      error(string.format("%s: The checkpoint passed was saved with %s, we need a the pt format.", fn, format), 2)
   elseif format ~= "pt" then
      h:close()
      error(string.format("%s: The safetensors archive passed at %s does not contain the valid metadata. Make sure you save your model with the `save_pretrained` method.", fn, checkpoint_file), 2)
   end
   local keys = h:keys()
   local sd = {}
   for _, k in ipairs(keys) do
      local dev = "cpu"
      if device_map ~= nil then
         local d = lookup_device(k, device_map)
         if d ~= nil and d ~= "disk" then dev = M.device_string(d, fn) end
      end
      sd[k] = h:get_tensor(k, dev ~= "cpu" and { device = dev } or nil)
   end
   h:close()
   return sd, keys
end

local list_dir = offload.list_dir

local function dirname(path)
   return path:match("^(.*)/[^/]*$") or "."
end

-- The working directory, asked of the shell once (PWD may be stale when a parent process set
-- the cwd without updating it, and LuaJIT itself cannot change directory).
local cwd_cache
local function abspath(path)
   if path:sub(1, 1) == "/" then return path end
   if cwd_cache == nil then
      local p = io.popen("pwd")
      cwd_cache = p and p:read("*l") or os.getenv("PWD") or "."
      if p then p:close() end
   end
   return cwd_cache .. "/" .. path:gsub("^%./", "")
end
M.abspath = abspath

--- Resolves a checkpoint (file, index .json, or folder) -> list of shard files, index or nil.
function M.checkpoint_files(checkpoint, fn)
   fn = fn or "load_checkpoint_in_model"
   if type(checkpoint) ~= "string" then
      error(string.format("%s: checkpoint must be a path string, got %s", fn, type(checkpoint)), 3)
   end
   local index_file, single
   if offload.is_dir(checkpoint) then
      local entries = list_dir(checkpoint)
      local set = {}
      for _, e in ipairs(entries) do set[e] = true end
      if set["model.safetensors"] then
         single = offload.join(checkpoint, "model.safetensors")
      elseif set["pytorch_model.bin"] then
         single = offload.join(checkpoint, "pytorch_model.bin")
      else
         local found = {}
         for _, e in ipairs(entries) do if ends_with(e, ".index.json") then found[#found + 1] = e end end
         if #found == 0 then
            error(string.format("%s: %s is not a folder containing a `.index.json` file or a pytorch_model.bin or a model.safetensors file", fn, checkpoint), 3)
         elseif #found > 1 then
            table.sort(found)
            error(string.format("%s: %s containing more than one `.index.json` file, delete the irrelevant ones (%s).", fn, checkpoint, table.concat(found, ", ")), 3)
         end
         index_file = offload.join(checkpoint, found[1])
      end
   elseif offload.file_exists(checkpoint) then
      if ends_with(checkpoint, ".json") then index_file = checkpoint else single = checkpoint end
   else
      error(string.format("%s: `checkpoint` should be the path to a file containing a whole state dict, or the index of a sharded checkpoint, or a folder containing a sharded checkpoint or the whole state dict, but got %s.", fn, checkpoint), 3)
   end
   if single then return { single }, nil end
   local index = offload.read_json(index_file, fn)
   local wm = index.weight_map
   if type(wm) ~= "table" then wm = index end
   local folder = dirname(index_file)
   local set, shards = {}, {}
   for name, file in pairs(wm) do
      if type(file) ~= "string" then
         error(string.format('%s: %s maps "%s" to %s, expected a file name', fn, index_file, tostring(name), tostring(file)), 3)
      end
      if not set[file] then set[file] = true; shards[#shards + 1] = file end
   end
   table.sort(shards)
   for i, s in ipairs(shards) do shards[i] = offload.join(folder, s) end
   return shards, wm
end

local tty_cache
local function stderr_is_tty()
   if tty_cache == nil then
      local r = os.execute("[ -t 2 ]")
      tty_cache = (r == 0 or r == true)
   end
   return tty_cache
end

local function progress(label, i, n)
   if not stderr_is_tty() then return end
   local width = 30
   local filled = n > 0 and math.floor(width * i / n) or width
   io.stderr:write(string.format("\r%s [%s%s] %d/%d", label, string.rep("#", filled), string.rep(" ", width - filled), i, n))
   if i == n then io.stderr:write("\n") end
   io.stderr:flush()
end

local function sorted(list) table.sort(list); return list end

local function mktemp_dir()
   local p = io.popen("mktemp -d 2>/dev/null")
   local dir = p and p:read("*l")
   if p then p:close() end
   if not dir or dir == "" then error("load_checkpoint_in_model: cannot create a temporary folder", 3) end
   return dir
end

--- load_offloaded_weights(model, index, offload_folder): puts every indexed tensor on CPU.
function M.load_offloaded_weights(model, index, offload_folder)
   if index == nil or next(index) == nil then return end
   for name, info in pairs(index) do
      if not name:find("SCB", 1, true) then
         local w = offload.load_offloaded_weight(offload.join(offload_folder, name .. ".dat"), info)
         M.set_module_tensor_to_device(model, name, "cpu", { value = w })
      end
   end
end

--- load_checkpoint_in_model(model, checkpoint, {device_map, offload_folder, dtype,
-- offload_state_dict, offload_buffers, keep_in_fp32_modules, offload_8bit_bnb, strict}).
-- checkpoint: a .safetensors file, a sharded index .json (weight_map or flat), or a folder
-- holding model.safetensors or one *.index.json. Tensors go straight to their device: CPU
-- tensors of matching dtype are zero-copy views into the checkpoint. "disk" tensors become
-- offload-index entries pointing into the checkpoint file (no second copy). Disk-mapped buffers
-- keep their checkpoint values (loaded to CPU when offload_buffers is false: Accelerate's Q8 bug
-- fixed). strict raises on unexpected and (moonload extension) missing keys, before loading.
function M.load_checkpoint_in_model(model, checkpoint, opts)
   local fn = "load_checkpoint_in_model"
   opts = opts or {}
   if not M.is_module(model) then error(fn .. ": model must be an nn.Module", 2) end
   local device_map = opts.device_map
   local offload_folder = opts.offload_folder
   local dtype = opts.dtype
   if dtype ~= nil then
      if type(dtype) ~= "string" then error(fn .. ": dtype must be a string like \"float16\"", 2) end
      dtype = dtype:gsub("^torch%.", "")
      if not require("moonload.dtypes").by_name[dtype] then
         error(string.format("%s: unknown dtype %s", fn, opts.dtype), 2)
      end
   end
   -- Only honoured with dtype float16, matched by substring, as in Accelerate (Q9 mirrored).
   local keep_fp32 = opts.keep_in_fp32_modules
   if opts.offload_8bit_bnb then
      error(fn .. ": offload_8bit_bnb is not supported (moonload has no bitsandbytes int8 weights)", 2)
   end
   local offload_buffers = opts.offload_buffers == true

   local tied_params = M.find_tied_parameters(model)
   if device_map ~= nil then
      if type(device_map) ~= "table" then
         error(string.format("%s: device_map must be a table (name -> device), got %s", fn, type(device_map)), 2)
      end
      M.check_tied_parameters_on_same_device(tied_params, device_map)
   end
   local has_disk = false
   if device_map ~= nil then
      for _, d in pairs(device_map) do if d == "disk" then has_disk = true end end
   end
   if has_disk and offload_folder == nil then
      error(fn .. ": At least one of the model submodule will be offloaded to disk, please pass along an `offload_folder`.", 2)
   end

   local shards, weight_map = M.checkpoint_files(checkpoint, fn)
   -- a tensor the index places in another shard is that shard's (a rewritten checkpoint's shards
   -- link the source files, which also hold the names its rewritten layers replace)
   local function elsewhere(file, k)
      local f = weight_map and weight_map[k]
      return f ~= nil and file:sub(-#f - 1) ~= "/" .. f
   end

   -- Everything the model expects, and where.
   local expected, buffer_names = {}, {}
   for name, t in pairs(model:state_dict()) do expected[name] = t end
   for name in model:named_buffers("", true) do buffer_names[name] = true end
   -- tensors their class keeps in float32 whatever dtype asks (int8 and fp8 layers' scales, a
   -- router's weight: keep_float32_buffers)
   local keep_float32 = {}
   for _, e in ipairs(model:named_modules_list()) do
      for key in pairs(rawget(getmetatable(e[2]) or {}, "keep_float32_buffers") or e[2].keep_float32_buffers or {}) do
         keep_float32[e[1] == "" and key or (e[1] .. "." .. key)] = true
      end
   end

   -- Validate all shards first: nothing is changed when a checkpoint does not fit.
   local seen, unexpected, mismatched = {}, {}, {}
   for _, file in ipairs(shards) do
      if not ends_with(file, ".safetensors") then
         error(string.format("%s: %s is not a .safetensors file (moonload reads safetensors checkpoints only)", fn, file), 2)
      end
      local h = safetensors().safe_open(file)
      for _, k in ipairs(h:keys()) do
         if not k:find("SCB", 1, true) and not elsewhere(file, k) then
            seen[k] = true
            local t = expected[k]
            if t == nil then
               unexpected[#unexpected + 1] = k
            else
               local info = h:tensor_info(k)
               if not same_shape(info.shape, t.shape) then
                  mismatched[#mismatched + 1] = string.format('"%s" has shape %s in %s, the model expects %s',
                     k, shape_str(info.shape), file, shape_str(t.shape))
               end
               if info.dtype == nil then
                  mismatched[#mismatched + 1] = string.format('"%s" has dtype %s in %s, which moonload does not support', k, info.st_dtype, file)
               end
            end
         end
      end
      h:close()
   end
   local missing = {}
   for name in pairs(expected) do if not seen[name] then missing[#missing + 1] = name end end
   sorted(missing); sorted(unexpected)
   local cls = M.class_name(model) or "model"
   if #mismatched > 0 then
      table.sort(mismatched)
      error(string.format("%s: the checkpoint at %s does not fit %s: %s", fn, checkpoint, cls, table.concat(mismatched, "; ")), 2)
   end
   if opts.strict and (#unexpected > 0 or #missing > 0) then
      local parts = {}
      if #unexpected > 0 then parts[#parts + 1] = "unexpected keys: " .. table.concat(unexpected, ", ") end
      if #missing > 0 then parts[#parts + 1] = "missing keys: " .. table.concat(missing, ", ") end
      error(string.format("%s: the checkpoint at %s does not match %s (strict): %s", fn, checkpoint, cls, table.concat(parts, "; ")), 2)
   end
   if device_map ~= nil then
      local names = {}
      for name in pairs(expected) do names[#names + 1] = name end
      for _, name in ipairs(sorted(names)) do
         if seen[name] and lookup_device(name, device_map) == nil then
            error(string.format("%s: %s doesn't have any device set.", fn, name), 2)
         end
      end
   end

   if offload_folder ~= nil then offload.mkdir_p(offload_folder, fn) end
   local offload_index = {}
   local state_dict_folder, state_dict_index
   if opts.offload_state_dict then
      state_dict_folder = mktemp_dir()
      state_dict_index = {}
   end

   for si, file in ipairs(shards) do
      local h = safetensors().safe_open(file)
      local keys = h:keys()
      local abs = abspath(file)
      for ki, name in ipairs(keys) do
         if expected[name] ~= nil and not name:find("SCB", 1, true) and not elsewhere(file, name) then
            local info = h:tensor_info(name)
            -- (float8 weights are quantized storage, converted by their layer, not here)
            local is_float = require("moonload.dtypes").floating[info.dtype] == true
            local new_dtype = dtype
            if dtype ~= nil and keep_float32[name] then new_dtype = "float32" end
            if dtype ~= nil and is_float and keep_fp32 ~= nil and dtype == "float16" then
               for _, key in ipairs(keep_fp32) do
                  if (name:find(key, 1, true) and name:find(key .. ".", 1, true)) or key == name then
                     new_dtype = "float32"
                     break
                  end
               end
            end
            local device
            if device_map == nil then
               local cur = expected[name]
               device = cur:is_meta() and "cpu" or cur.device
            else
               device = lookup_device(name, device_map)
            end
            if device == "disk" then
               if offload_buffers or not buffer_names[name] then
                  M.set_module_tensor_to_device(model, name, "meta", { dtype = new_dtype or info.dtype })
                  offload_index[name] = { safetensors_file = abs, weight_name = name,
                                          dtype = (is_float and new_dtype) or info.dtype }
               else
                  M.set_module_tensor_to_device(model, name, "cpu", { value = h:get_tensor(name), dtype = new_dtype })
               end
            elseif device == "cpu" and state_dict_folder ~= nil then
               local t = h:get_tensor(name)
               M.set_module_tensor_to_device(model, name, "meta", { dtype = new_dtype or info.dtype })
               if new_dtype ~= nil and is_float and t.dtype ~= new_dtype then t = t:to(new_dtype) end
               offload.offload_weight(t, name, state_dict_folder, { index = state_dict_index })
            else
               local dev = M.device_string(device, fn)
               M.set_module_tensor_to_device(model, name, dev, { value = h:get_tensor(name), dtype = new_dtype })
            end
         end
         if ki % 64 == 0 or ki == #keys then
            progress(string.format("Loading checkpoint shard %d/%d", si, #shards), ki, #keys)
         end
      end
      h:close()
   end

   if not opts.strict and #unexpected > 0 then
      log.warn(string.format("Some weights of the model checkpoint at %s were not used when initializing %s: %s. This may or may not be an issue - make sure that the checkpoint does not have unnecessary parameters, or that the model definition correctly corresponds to the checkpoint.",
         checkpoint, cls, "[" .. table.concat(unexpected, ", ") .. "]"))
   end
   if offload_folder ~= nil then offload.save_offload_index(offload_index, offload_folder) end
   if state_dict_folder ~= nil then
      M.load_offloaded_weights(model, state_dict_index, state_dict_folder)
      -- the CPU tensors are views of the temp files: they stay valid after the unlink
      os.execute("rm -rf " .. offload.shell_quote(state_dict_folder))
   end
   M.retie_parameters(model, tied_params)
   return unexpected, missing
end

return M
