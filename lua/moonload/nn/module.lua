--- nn.Module: the base class of every layer and model (PyTorch's torch.nn.Module, in Lua).
--
--    local Block = nn.Module:extend("Block")
--    function Block:__init(d)
--       self.fc = nn.Linear(d, d)                          -- registers a child
--       self.scale = nn.Parameter(ml.ones(d))              -- registers a parameter
--       self:register_buffer("mask", ml.ones(d), false)    -- a non-persistent buffer
--    end
--    function Block:forward(x) return self.fc(x) * self.scale end
--
-- Registries, in registration order (ordered dicts, see ordered_dict.lua):
--    m._parameters   name -> tensor (a slot may hold nil: `m.bias = nil` keeps the name's place)
--    m._buffers      name -> tensor
--    m._modules      name -> child module
--    m._non_persistent_buffers_set   name -> true for buffers left out of state_dict
-- Registered things are not raw fields: reading m.fc / m.weight goes through __index (class
-- members first, then parameters, buffers, children, as PyTorch's getattr does), and assigning
-- to a registered name goes through __newindex, which replaces the value in its slot, so
-- `b.weight = a.weight` ties the two (one tensor object). Any other value (numbers, functions,
-- hooks' `forward`, `_hf_hook`, `_old_forward`) is stored as a plain field of the instance.
--
-- Calling `m(...)` runs `m.forward(m, ...)` through the instance's `forward` field when there is
-- one (hooks install theirs there) and the class's otherwise. An error raised inside gets the
-- dotted path of the innermost module that raised it ("h.0.attn: ...").
local class = require("moonload.class")
local OrderedDict = require("moonload.nn.ordered_dict")
local ctx = require("moonload.nn.init_context")
local C = require("moonload.C")
local Tensor = require("moonload.tensor")
local dtypes = require("moonload.dtypes")

local ffi, lib = C.ffi, C.lib
local is_tensor = Tensor.is_tensor
local od_methods = OrderedDict.methods
local od_get, od_set, od_has = od_methods.get, od_methods.set, od_methods.has

local Module = class.new("Module")
Module.__is_module = true

-- child -> the first module it was registered in, and its name there (for error paths).
-- Weak both ways: a child kept alive must not keep a whole model alive.
local parent_of = setmetatable({}, { __mode = "kv" })
local name_in_parent = setmetatable({}, { __mode = "k" })

local function is_module(x)
   if type(x) ~= "table" then return false end
   local mt = getmetatable(x)
   return type(mt) == "table" and mt.__is_module == true
end
Module.is_module = is_module

local function type_name(v)
   if is_tensor(v) then return "Tensor" end
   if is_module(v) then return v.__name end
   return type(v)
end

-- --- construction -------------------------------------------------------------------------

function Module.__new(cls)
   local obj = {
      training = false,
      _parameters = OrderedDict.new(),
      _buffers = OrderedDict.new(),
      _modules = OrderedDict.new(),
      _non_persistent_buffers_set = {},
   }
   return setmetatable(obj, cls)
end

--- Default constructor: nothing to set up (registries exist before __init runs).
function Module:__init() end

--- The default forward raises, as PyTorch's does.
function Module:forward()
   error(string.format('Module [%s] is missing the required "forward" function', self.__name), 2)
end

-- --- attribute access ---------------------------------------------------------------------

function Module.__index(self, k)
   local v = getmetatable(self)[k]
   if v ~= nil then return v end
   local od = rawget(self, "_parameters")
   if od == nil then return nil end
   local p = od._pos[k]
   if p then return rawget(od._vals, p) end
   od = rawget(self, "_buffers")
   p = od._pos[k]
   if p then return rawget(od._vals, p) end
   od = rawget(self, "_modules")
   p = od._pos[k]
   if p then return rawget(od._vals, p) end
   if type(k) == "number" and k < 0 then
      return rawget(self, #self + k + 1)   -- containers: s[-1] is the last child
   end
   return nil
end

local function has_attr(self, name)
   if rawget(self, name) ~= nil then return true end
   if getmetatable(self)[name] ~= nil then return true end
   return od_has(self._parameters, name) or od_has(self._buffers, name) or od_has(self._modules, name)
end

local function check_name(fn, what, name)
   if type(name) ~= "string" then
      error(string.format("%s: %s name should be a string, got %s", fn, what, type(name)), 4)
   end
   if name:find(".", 1, true) then
      error(string.format('%s: %s name can\'t contain ".", got "%s"', fn, what, name), 4)
   end
   if name == "" then
      error(string.format('%s: %s name can\'t be empty string ""', fn, what), 4)
   end
end

local function move_to(t, dev)
   if dev == nil or t == nil then return t end
   if t.device == dev then return t end
   return t:to(dev)
end

local function set_parameter(self, name, p)
   if p ~= nil then
      local moved = move_to(p, ctx.param_device())
      rawset(moved, "_is_param", true)
      rawset(p, "_is_param", true)
      p = moved
   end
   od_set(self._parameters, name, p)
end

local function set_buffer(self, name, t)
   od_set(self._buffers, name, move_to(t, ctx.buffer_device()))
end

local function set_child(self, name, m)
   if m ~= nil and parent_of[m] == nil and m ~= self then
      parent_of[m] = self
      name_in_parent[m] = name
   end
   od_set(self._modules, name, m)
end

--- Registers (or replaces, keeping its place) a parameter; p may be nil (an empty slot).
-- Under init_empty_weights/init_on_device the parameter is moved to that device.
function Module:register_parameter(name, p)
   check_name("register_parameter", "parameter", name)
   if has_attr(self, name) and not od_has(self._parameters, name) then
      error(string.format('register_parameter: attribute "%s" already exists', name), 2)
   end
   if p ~= nil and not is_tensor(p) then
      error(string.format("register_parameter: cannot assign %s to parameter \"%s\" (nn.Parameter or nil expected)",
         type_name(p), name), 2)
   end
   set_parameter(self, name, p)
end

--- register_buffer(name, t[, persistent = true]) (persistent may also be {persistent = b}).
function Module:register_buffer(name, t, persistent)
   if type(persistent) == "table" then persistent = persistent.persistent end
   if persistent == nil then persistent = true end
   check_name("register_buffer", "buffer", name)
   if has_attr(self, name) and not od_has(self._buffers, name) then
      error(string.format('register_buffer: attribute "%s" already exists', name), 2)
   end
   if t ~= nil and not is_tensor(t) then
      error(string.format("register_buffer: cannot assign %s to buffer \"%s\" (a tensor or nil expected)",
         type_name(t), name), 2)
   end
   set_buffer(self, name, t)
   self._non_persistent_buffers_set[name] = (not persistent) or nil
end

--- Registers (or replaces, keeping its place) a child module; m may be nil.
function Module:add_module(name, m)
   check_name("add_module", "module", name)
   if has_attr(self, name) and not od_has(self._modules, name) then
      error(string.format('add_module: attribute "%s" already exists', name), 2)
   end
   if m ~= nil and not is_module(m) then
      error(string.format("add_module: cannot assign %s as child module \"%s\" (nn.Module or nil expected)",
         type_name(m), name), 2)
   end
   set_child(self, name, m)
end
Module.register_module = Module.add_module

local function container_append(self, m)
   local od = self._modules
   if not is_module(m) then
      error(string.format("%s: cannot append %s (nn.Module expected)", self.__name, type_name(m)), 3)
   end
   set_child(self, tostring(#od._keys), m)
end

function Module.__newindex(self, k, v)
   if type(k) ~= "string" then
      local od = rawget(self, "_modules")
      if type(k) == "number" and od and od._vals == self then
         -- a container: list[#list + 1] = m appends; existing positions are raw fields.
         if k == #od._keys + 1 then return container_append(self, v) end
         error(string.format("%s: index %s is out of range (it holds %d modules; append at %d)",
            self.__name, tostring(k), #od._keys, #od._keys + 1), 2)
      end
      rawset(self, k, v)
      return
   end
   local params, buffers, modules = self._parameters, self._buffers, self._modules
   if is_module(v) then
      if od_has(params, k) then
         error(string.format('cannot assign %s as parameter "%s" (nn.Parameter, a tensor or nil expected)', v.__name, k), 2)
      end
      if od_has(buffers, k) then
         error(string.format('cannot assign %s as buffer "%s" (a tensor or nil expected)', v.__name, k), 2)
      end
      set_child(self, k, v)
   elseif is_tensor(v) and rawget(v, "_is_param") then
      if od_has(buffers, k) then
         od_methods.remove(buffers, k)
         self._non_persistent_buffers_set[k] = nil
      end
      if od_has(modules, k) then od_methods.remove(modules, k) end
      set_parameter(self, k, v)
   elseif od_has(params, k) then
      if v ~= nil and not is_tensor(v) then
         error(string.format('cannot assign %s as parameter "%s" (nn.Parameter, a tensor or nil expected)', type_name(v), k), 2)
      end
      set_parameter(self, k, v)
   elseif od_has(buffers, k) then
      if v ~= nil and not is_tensor(v) then
         error(string.format('cannot assign %s as buffer "%s" (a tensor or nil expected)', type_name(v), k), 2)
      end
      set_buffer(self, k, v)
   elseif od_has(modules, k) then
      if v ~= nil then
         error(string.format('cannot assign %s as child module "%s" (nn.Module or nil expected)', type_name(v), k), 2)
      end
      od_set(modules, k, nil)
   else
      rawset(self, k, v)
   end
end

-- --- calling ------------------------------------------------------------------------------

--- The dotted path of m from the outermost module it is registered in ("" for a root).
local function module_path(m)
   local parts, n = {}, 0
   local seen = {}
   while true do
      local p = parent_of[m]
      if p == nil or seen[p] then break end
      seen[p] = true
      local name = name_in_parent[m]
      if od_get(p._modules, name) ~= m then
         -- renamed or replaced since: find it again, or stop here
         name = nil
         for k, c in od_methods.items(p._modules) do
            if c == m then name = k; break end
         end
         if name == nil then break end
      end
      n = n + 1
      parts[n] = name
      m = p
   end
   local out = {}
   for i = n, 1, -1 do out[#out + 1] = parts[i] end
   return table.concat(out, ".")
end
Module._path = module_path

local last_annotated = nil

local function finish_call(self, ok, ...)
   if ok then return ... end
   local err = ...
   if type(err) == "string" and err ~= last_annotated then
      local path = module_path(self)
      if path ~= "" then err = path .. ": " .. err end
      last_annotated = err
   end
   error(err, 0)
end

function Module.__call(self, ...)
   return finish_call(self, pcall(self.forward, self, ...))
end

-- --- introspection ------------------------------------------------------------------------

local function join(prefix, name)
   if prefix == "" then return name end
   return prefix .. "." .. name
end

local function opts_or(prefix, a, b)
   if type(prefix) == "table" then
      return prefix.prefix or "", prefix
   end
   return prefix or "", nil
end

local function collect_modules(m, prefix, memo, out)
   if memo then
      if memo[m] then return end
      memo[m] = true
   end
   out[#out + 1] = { prefix, m }
   local od = m._modules
   local keys, vals = od._keys, od._vals
   for i = 1, #keys do
      local c = rawget(vals, i)
      if c ~= nil then collect_modules(c, join(prefix, keys[i]), memo, out) end
   end
end

local function list_iter(list)
   local i = 0
   return function()
      i = i + 1
      local e = list[i]
      if e then return e[1], e[2] end
   end
end

local function value_iter(list)
   local i = 0
   return function()
      i = i + 1
      local e = list[i]
      if e then return e[2] end
   end
end

--- {{name, module}, ...}: the module itself ("") and every descendant, shared ones once
-- (named_modules([prefix][, remove_duplicate = true]) or named_modules({prefix, remove_duplicate})).
function Module:named_modules_list(prefix, remove_duplicate)
   if type(prefix) == "table" then prefix, remove_duplicate = prefix.prefix, prefix.remove_duplicate end
   if remove_duplicate == nil then remove_duplicate = true end
   local out = {}
   collect_modules(self, prefix or "", remove_duplicate and {} or nil, out)
   return out
end

function Module:named_modules(...) return list_iter(self:named_modules_list(...)) end
function Module:modules(...) return value_iter(self:named_modules_list(...)) end
function Module:modules_list(...)
   local out = {}
   for i, e in ipairs(self:named_modules_list(...)) do out[i] = e[2] end
   return out
end

--- {{name, child}, ...}: direct children in registration order, each once.
function Module:named_children_list()
   local out, memo = {}, {}
   for name, c in od_methods.items(self._modules) do
      if not memo[c] then
         memo[c] = true
         out[#out + 1] = { name, c }
      end
   end
   return out
end

function Module:named_children() return list_iter(self:named_children_list()) end
function Module:children() return value_iter(self:named_children_list()) end
function Module:children_list()
   local out = {}
   for i, e in ipairs(self:named_children_list()) do out[i] = e[2] end
   return out
end

local function named_members(self, registry, prefix, recurse, remove_duplicate)
   if type(prefix) == "table" then
      prefix, recurse, remove_duplicate = prefix.prefix, prefix.recurse, prefix.remove_duplicate
   end
   prefix = prefix or ""
   if recurse == nil then recurse = true end
   if remove_duplicate == nil then remove_duplicate = true end
   local mods
   if recurse then
      mods = {}
      collect_modules(self, prefix, remove_duplicate and {} or nil, mods)
   else
      mods = { { prefix, self } }
   end
   local out, memo = {}, {}
   for i = 1, #mods do
      local mp, m = mods[i][1], mods[i][2]
      local od = m[registry]
      local keys, vals = od._keys, od._vals
      for j = 1, #keys do
         local v = rawget(vals, j)
         if v ~= nil and not memo[v] then
            if remove_duplicate then memo[v] = true end
            out[#out + 1] = { join(mp, keys[j]), v }
         end
      end
   end
   return out
end

--- {{name, tensor}, ...}: named_parameters_list([prefix][, recurse = true][, remove_duplicate = true]),
-- or with an options table {prefix, recurse, remove_duplicate}.
function Module:named_parameters_list(prefix, recurse, remove_duplicate)
   return named_members(self, "_parameters", prefix, recurse, remove_duplicate)
end
function Module:named_buffers_list(prefix, recurse, remove_duplicate)
   return named_members(self, "_buffers", prefix, recurse, remove_duplicate)
end

--- Iterates name, parameter in registration order with dotted names (a tied one once).
function Module:named_parameters(...) return list_iter(self:named_parameters_list(...)) end
function Module:named_buffers(...) return list_iter(self:named_buffers_list(...)) end

--- Iterates parameters (parameters([recurse = true])).
function Module:parameters(recurse)
   return value_iter(named_members(self, "_parameters", "", recurse, true))
end
function Module:buffers(recurse)
   return value_iter(named_members(self, "_buffers", "", recurse, true))
end
function Module:parameters_list(recurse)
   local out = {}
   for i, e in ipairs(named_members(self, "_parameters", "", recurse, true)) do out[i] = e[2] end
   return out
end
function Module:buffers_list(recurse)
   local out = {}
   for i, e in ipairs(named_members(self, "_buffers", "", recurse, true)) do out[i] = e[2] end
   return out
end

local function split_path(target)
   local parts = {}
   for atom in (target .. "."):gmatch("([^.]*)%.") do parts[#parts + 1] = atom end
   return parts
end

local function walk_modules(fn, self, parts, n, target)
   local mod = self
   for i = 1, n do
      local atom = parts[i]
      local child = od_get(mod._modules, atom)
      if child == nil then
         local raw = rawget(mod, atom)
         if raw == nil and not has_attr(mod, atom) then
            error(string.format('%s: %s has no attribute "%s" (looking up "%s")', fn, mod.__name, atom, target), 3)
         end
         if not is_module(raw) then
            error(string.format('%s: "%s" is not an nn.Module', fn, table.concat(parts, ".", 1, i)), 3)
         end
         child = raw
      end
      mod = child
   end
   return mod
end

--- The descendant at a dotted path ("" is the module itself); errors name the missing part.
function Module:get_submodule(target)
   if type(target) ~= "string" then
      error("get_submodule: target should be a string, got " .. type(target), 2)
   end
   if target == "" then return self end
   local parts = split_path(target)
   return walk_modules("get_submodule", self, parts, #parts, target)
end

--- set_submodule(target, module): puts module where the submodule at dotted path target is, in
-- the same place of its parent's order (torch.nn.Module.set_submodule); the parent must exist.
function Module:set_submodule(target, module)
   if type(target) ~= "string" or target == "" then
      error("set_submodule: target should be a non-empty string, got " .. tostring(target), 2)
   end
   if not is_module(module) then error("set_submodule: expected an nn.Module, got " .. type_name(module), 2) end
   local parts = split_path(target)
   local parent = walk_modules("set_submodule", self, parts, #parts - 1, target)
   set_child(parent, parts[#parts], module)
end

local function get_tensor(fn, what, registry, self, target)
   if type(target) ~= "string" then
      error(fn .. ": target should be a string, got " .. type(target), 3)
   end
   local parts = split_path(target)
   local mod = walk_modules(fn, self, parts, #parts - 1, target)
   local name = parts[#parts]
   if not has_attr(mod, name) then
      error(string.format('%s: %s has no attribute "%s" (looking up "%s")', fn, mod.__name, name, target), 3)
   end
   if not od_has(mod[registry], name) then
      error(string.format('%s: "%s" is not %s', fn, target, what), 3)
   end
   return od_get(mod[registry], name)
end

function Module:get_parameter(target)
   return get_tensor("get_parameter", "a parameter", "_parameters", self, target)
end

function Module:get_buffer(target)
   return get_tensor("get_buffer", "a buffer", "_buffers", self, target)
end

-- --- state ----------------------------------------------------------------------------------

local shape_tmp = ffi.new("int64_t[8]")
local stride_tmp = ffi.new("int64_t[8]")
local out_tmp = ffi.new("ml_tensor*[1]")

--- A new tensor object over the same data (PyTorch's detach(): ties by identity do not carry).
local function alias(t)
   local c = t._c
   local n = lib.ml_tensor_ndim(c)
   local sh, st = lib.ml_tensor_shape(c), lib.ml_tensor_strides(c)
   for i = 0, n - 1 do shape_tmp[i] = sh[i]; stride_tmp[i] = st[i] end
   C.check(lib.ml_tensor_as_strided(c, n, shape_tmp, stride_tmp, lib.ml_tensor_offset(c), out_tmp))
   return Tensor.wrap(out_tmp[0])
end
Module._alias = alias

-- Each (key, module, registry, name, tensor) entry of the state dict, in order, recursing
-- through every child slot (a shared module appears under each of its names, as in PyTorch).
local function state_entries(m, prefix, out)
   for name, p in od_methods.items(m._parameters) do
      out[#out + 1] = { prefix .. name, m, "_parameters", name, p }
   end
   local np = m._non_persistent_buffers_set
   for name, b in od_methods.items(m._buffers) do
      if not np[name] then out[#out + 1] = { prefix .. name, m, "_buffers", name, b } end
   end
   for name, c in od_methods.items(m._modules) do
      state_entries(c, prefix .. name .. ".", out)
   end
   return out
end

--- Parameters and persistent buffers by dotted name; returns the table and its keys in order.
-- Values are new tensor objects sharing the data ({keep_vars = true}: the registered objects).
function Module:state_dict(opts)
   opts = opts or {}
   local sd, keys = {}, {}
   for _, e in ipairs(state_entries(self, opts.prefix or "", {})) do
      keys[#keys + 1] = e[1]
      sd[e[1]] = opts.keep_vars and e[5] or alias(e[5])
   end
   return sd, keys
end

local function shape_str(s)
   return "[" .. table.concat(s, ", ") .. "]"
end

local function same_shape(a, b)
   if #a ~= #b then return false end
   for i = 1, #a do if a[i] ~= b[i] then return false end end
   return true
end

--- Copies a state dict into the module: load_state_dict(sd[, {strict = true, assign = false}])
-- -> missing, unexpected (lists of keys). Values are converted to each tensor's dtype; a meta
-- tensor (or any, with assign) is replaced in place by the value, so ties survive. Everything is
-- checked before anything is written: missing or unexpected keys (strict) and shape mismatches
-- (always) raise one error listing them all.
function Module:load_state_dict(sd, opts)
   if type(sd) ~= "table" or is_tensor(sd) or is_module(sd) then
      error("load_state_dict: a table name -> tensor is expected, got " .. type_name(sd), 2)
   end
   if type(opts) == "boolean" then opts = { strict = opts } end
   opts = opts or {}
   local strict = opts.strict ~= false
   local entries = state_entries(self, "", {})
   local expected, missing, errors, todo = {}, {}, {}, {}
   for _, e in ipairs(entries) do
      local key, target = e[1], e[5]
      expected[key] = true
      local v = sd[key]
      if v == nil then
         missing[#missing + 1] = key
      elseif not is_tensor(v) then
         errors[#errors + 1] = string.format('While copying the parameter named "%s", expected a tensor from checkpoint but received %s',
            key, type_name(v))
      elseif target ~= nil then
         local ts, vs = target.shape, v.shape
         if not same_shape(ts, vs) then
            errors[#errors + 1] = string.format("size mismatch for %s: copying a param with shape %s from checkpoint, the shape in current model is %s.",
               key, shape_str(vs), shape_str(ts))
         elseif v.device == "meta" and target.device ~= "meta" then
            errors[#errors + 1] = string.format('"%s" in the state dict is on the meta device (it has no data to copy)', key)
         else
            todo[#todo + 1] = { target, v }
         end
      end
   end
   local unexpected = {}
   for k in pairs(sd) do
      if not expected[k] then unexpected[#unexpected + 1] = tostring(k) end
   end
   table.sort(unexpected)
   local msgs = {}
   local function quoted(list)
      local q = {}
      for i, k in ipairs(list) do q[i] = '"' .. k .. '"' end
      return table.concat(q, ", ")
   end
   if strict and #missing > 0 then msgs[#msgs + 1] = "Missing key(s) in state_dict: " .. quoted(missing) .. "." end
   if strict and #unexpected > 0 then msgs[#msgs + 1] = "Unexpected key(s) in state_dict: " .. quoted(unexpected) .. "." end
   for _, m in ipairs(errors) do msgs[#msgs + 1] = m end
   if #msgs > 0 then
      error(string.format("load_state_dict: error(s) in loading state_dict for %s:\n\t%s", self.__name,
         table.concat(msgs, "\n\t")), 2)
   end
   for _, job in ipairs(todo) do
      local target, v = job[1], job[2]
      if opts.assign or target.device == "meta" then
         local conv = v:to(nil, target.dtype)
         if conv == v then conv = alias(v) end
         target:set_(conv)
      else
         target:copy_(v)
      end
   end
   return missing, unexpected
end

-- --- conversion and mode --------------------------------------------------------------------

-- Every distinct parameter and buffer tensor object under m, with a name for messages.
-- {name, tensor, stays float32} for each distinct parameter and buffer; a class lists the tensors
-- (buffers, or parameters such as int8 layers' scales) a dtype conversion leaves in float32 in its
-- keep_float32_buffers field.
local function distinct_tensors(m)
   local out, seen = {}, {}
   for _, e in ipairs(m:named_modules_list()) do
      local keep = e[2].keep_float32_buffers
      for _, reg in ipairs({ "_parameters", "_buffers" }) do
         for name, t in od_methods.items(e[2][reg]) do
            if not seen[t] then
               seen[t] = true
               out[#out + 1] = { join(e[1], name), t, keep ~= nil and keep[name] == true }
            end
         end
      end
   end
   return out
end

--- m:to(device_or_dtype[, dtype]): converts every parameter and buffer in place (the same tensor
-- objects take the new data, so ties survive). A dtype applies to floating-point tensors only,
-- and not to the buffers a class keeps in float32 (keep_float32_buffers: rotary frequencies,
-- which transformers builds in float32 whatever the model's dtype).
function Module:to(a, b)
   local dev, dt
   if type(a) == "table" and not is_tensor(a) then a, b = a.device, a.dtype end
   if is_tensor(a) then a, b = a.device, b or a.dtype end
   if type(a) == "number" then a = "cuda:" .. a end
   if type(a) == "string" and dtypes.canonical(a) then
      dt = dtypes.canonical(a)
   elseif a ~= nil then
      if type(a) ~= "string" then error("to: a device or dtype string is expected, got " .. type(a), 2) end
      dev = a
   end
   if b ~= nil then
      dt = dtypes.canonical(b)
      if not dt then error(string.format("to: unknown dtype %s (expected one of %s)", tostring(b), dtypes.list), 2) end
   end
   if dev ~= nil and not pcall(Tensor.parse_device, "to", dev) then
      error(string.format('to: "%s" is neither a device ("cpu", "meta", "cuda:N") nor a dtype (%s)', dev, dtypes.list), 2)
   end
   local list = distinct_tensors(self)
   if dev ~= nil and dev ~= "meta" then
      for _, e in ipairs(list) do
         if e[2].device == "meta" then
            error(string.format('to: cannot move "%s" from meta to %s: it has no data (load weights into the model first, e.g. with load_state_dict or load_checkpoint_and_dispatch)',
               e[1], dev), 2)
         end
      end
   end
   for _, e in ipairs(list) do
      local t = e[2]
      local tdt = dt
      if tdt and (not dtypes.floating[t.dtype] or e[3]) then tdt = nil end
      if dev ~= nil or tdt ~= nil then
         local n = t:to(dev, tdt)
         if n ~= t then t:set_(n) end
      end
   end
   return self
end

function Module:float() return self:to("float32") end
function Module:half() return self:to("float16") end
function Module:bfloat16() return self:to("bfloat16") end
function Module:double() return self:to("float64") end
function Module:cpu() return self:to("cpu") end
function Module:cuda(i) return self:to("cuda:" .. (i or 0)) end

--- Sets training mode on the module and its descendants (train(false) = eval()).
function Module:train(mode)
   if mode == nil then mode = true end
   for _, m in ipairs(self:modules_list()) do rawset(m, "training", mode and true or false) end
   return self
end

function Module:eval() return self:train(false) end

--- Calls fn(m) on every descendant (children first) and then on the module itself.
function Module:apply(fn)
   for _, c in ipairs(self:children_list()) do c:apply(fn) end
   fn(self)
   return self
end

-- --- printing -----------------------------------------------------------------------------

--- One line (or several) describing the module's own settings, shown inside its parentheses.
function Module:extra_repr() return "" end

local function add_indent(s, n)
   local lines = {}
   for line in (s .. "\n"):gmatch("(.-)\n") do lines[#lines + 1] = line end
   if #lines == 1 then return s end
   local pad = string.rep(" ", n)
   for i = 2, #lines do lines[i] = pad .. lines[i] end
   return table.concat(lines, "\n")
end
Module._add_indent = add_indent

local function repr(m)
   if m == nil then return "None" end
   return tostring(m)
end

function Module.__tostring(self)
   local extra_lines = {}
   local extra = self:extra_repr()
   if extra and extra ~= "" then
      for line in (extra .. "\n"):gmatch("(.-)\n") do extra_lines[#extra_lines + 1] = line end
   end
   local child_lines = {}
   local od = self._modules
   for i, key in ipairs(od._keys) do
      child_lines[#child_lines + 1] = "(" .. key .. "): " .. add_indent(repr(rawget(od._vals, i)), 2)
   end
   local lines = {}
   for _, l in ipairs(extra_lines) do lines[#lines + 1] = l end
   for _, l in ipairs(child_lines) do lines[#lines + 1] = l end
   local s = self.__name .. "("
   if #lines > 0 then
      if #extra_lines == 1 and #child_lines == 0 then
         s = s .. extra_lines[1]
      else
         s = s .. "\n  " .. table.concat(lines, "\n  ") .. "\n"
      end
   end
   return s .. ")"
end

-- --- helpers for layers -------------------------------------------------------------------

local function py_float(x)
   if x ~= x then return "nan" end
   if x == math.huge then return "inf" end
   if x == -math.huge then return "-inf" end
   local p = 1
   local s
   while p <= 17 do
      s = string.format("%." .. p .. "g", x)
      if tonumber(s) == x then break end
      p = p + 1
   end
   local mant, exp = string.format("%." .. (p - 1) .. "e", x):match("^(.-)e([-+]%d+)$")
   exp = tonumber(exp)
   if exp < -4 or exp >= 16 then
      return string.format("%se%s%02d", mant, exp < 0 and "-" or "+", math.abs(exp))
   end
   local dec = math.max(p - 1 - exp, 1)
   s = string.format("%." .. dec .. "f", x)
   if s:find("%.") then
      s = s:gsub("0+$", "")
      if s:sub(-1) == "." then s = s .. "0" end
   end
   return s
end

--- Python's repr of a value, for extra_repr strings that match PyTorch's.
function Module.py_repr(v)
   if v == true then return "True" end
   if v == false then return "False" end
   if v == nil then return "None" end
   if type(v) == "number" then
      if v % 1 == 0 and math.abs(v) < 2 ^ 53 then return string.format("%d", v) end
      return py_float(v)
   end
   if type(v) == "string" then return "'" .. v .. "'" end
   if type(v) == "table" then
      local parts = {}
      for i, x in ipairs(v) do parts[i] = Module.py_repr(x) end
      if #parts == 1 then return "(" .. parts[1] .. ",)" end
      return "(" .. table.concat(parts, ", ") .. ")"
   end
   return tostring(v)
end

--- An uninitialised parameter tensor, created directly where it will live: opts.device, else
-- the init context's parameter device, else cpu (opts.dtype, else float32).
function Module.new_parameter(shape, opts)
   opts = opts or {}
   local t = Tensor.empty(shape, { dtype = opts.dtype or "float32", device = opts.device or ctx.param_device() or "cpu" })
   rawset(t, "_is_param", true)
   return t
end

--- A buffer filled with value (not filled on meta), created on opts.device, else the init
-- context's buffer device, else cpu.
function Module.new_buffer(shape, value, opts)
   opts = opts or {}
   local t = Tensor.empty(shape, { dtype = opts.dtype or "float32", device = opts.device or ctx.buffer_device() or "cpu" })
   if t.device ~= "meta" then t:fill_(value) end
   return t
end

--- Python's repr of a float (1e-05, 0.1, 1.0).
Module.py_float = function(x)
   if x % 1 == 0 and math.abs(x) < 1e16 then return string.format("%d.0", x) end
   return py_float(x)
end

return Module
