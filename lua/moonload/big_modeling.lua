--- The big-model API (accelerate.big_modeling): meta initialisation, CPU and disk offload,
-- dispatch by device map and checkpoint loading with dispatch. Reached as ml.<name>.
--
-- Differences from Accelerate, on purpose (reference section 7):
--  * parameters are created directly on meta (Q2), never allocated on the CPU first;
--  * dispatch_model's main device is the first non-cpu/disk device in map order (Q3); a plain
--    Lua table has no order, so its keys are taken in the model's module order;
--  * the single-device path always moves the model (Q4); removing hooks removes every move
--    guard (Q5);
--  * load_checkpoint_and_dispatch does not spill the CPU part of the state dict to a temporary
--    folder by default when the map has "disk" (offload_state_dict defaults to false): CPU
--    weights loaded from safetensors are views into the file mapping, so there is no RAM to save
--    and the spill would only add a full write and read. Passing offload_state_dict = true
--    still does it.
local hooks = require("moonload.hooks")
local init_context = require("moonload.nn.init_context")
local log = require("moonload.utils.log")

local M = {}
local dispatch_weights, hold_tied_in_memory, module_key

-- A tied tensor is written once: the other names of its group are removed from sd (the hooks'
-- weights map reads them under the kept name).
local function drop_tied_duplicates(sd, tied_params)
   for _, group in ipairs(tied_params) do
      local kept = false
      for _, name in ipairs(group) do
         if sd[name] ~= nil then
            if kept then sd[name] = nil else kept = true end
         end
      end
   end
end

local utils_mod
local function utils()
   utils_mod = utils_mod or require("moonload.utils")
   return utils_mod
end

local function callable(f)
   if type(f) == "function" then return true end
   local mt = type(f) == "table" and getmetatable(f)
   return mt and mt.__call ~= nil or false
end

-- --- meta initialisation -------------------------------------------------------------------------

local TRUTHY = { y = true, yes = true, t = true, ["true"] = true, on = true, ["1"] = true }
local FALSY = { n = true, no = true, f = true, ["false"] = true, off = true, ["0"] = true }

-- include_buffers default from MOONLOAD_INIT_INCLUDE_BUFFERS, else ACCELERATE_INIT_INCLUDE_BUFFERS.
local function env_include_buffers(fn)
   for _, name in ipairs({ "MOONLOAD_INIT_INCLUDE_BUFFERS", "ACCELERATE_INIT_INCLUDE_BUFFERS" }) do
      local v = os.getenv(name)
      if v ~= nil then
         local l = v:lower()
         if TRUTHY[l] then return true end
         if FALSY[l] then return false end
         error(string.format("%s: invalid truth value %q in %s (use 1/0, true/false, yes/no, on/off)", fn, v, name), 3)
      end
   end
   return false
end

--- init_on_device(device, fn[, {include_buffers}]): runs fn with new parameters (and buffers
-- with include_buffers) created directly on device; returns fn's results.
function M.init_on_device(device, fn, opts)
   if type(device) == "number" then device = "cuda:" .. device end
   if type(device) ~= "string" then
      error("init_on_device: device must be a device string or an integer, got " .. type(device), 2)
   end
   if not callable(fn) then
      error("init_on_device: a function to run is expected as the second argument, got " .. type(fn), 2)
   end
   opts = opts or {}
   local include_buffers = opts.include_buffers
   if include_buffers == nil then include_buffers = env_include_buffers("init_on_device") end
   return init_context.with_devices(device, include_buffers and device or nil, fn)
end

--- init_empty_weights([{include_buffers}, ]fn): runs fn with parameters created on meta (no
-- memory at all); returns fn's results (the model).
function M.init_empty_weights(a, b)
   local opts, fn
   if callable(a) then fn, opts = a, b or {} else opts, fn = a or {}, b end
   if type(opts) ~= "table" then
      error("init_empty_weights: options must be a table like {include_buffers = true}, got " .. type(opts), 2)
   end
   if not callable(fn) then
      error("init_empty_weights: a function building the model is expected, got " .. type(fn), 2)
   end
   local include_buffers = opts.include_buffers
   if include_buffers == nil then include_buffers = env_include_buffers("init_empty_weights") end
   return init_context.with_devices("meta", include_buffers and "meta" or nil, fn)
end

-- --- helpers ----------------------------------------------------------------------------------

local function first_param_device(model)
   for _, p in model:named_parameters() do return p.device end
   return "cpu"
end

local function is_dir(path)
   local f = io.open(path .. "/.", "r")
   if f then f:close(); return true end
   return false
end

local function file_exists(path)
   local f = io.open(path, "rb")
   if f then f:close(); return true end
   return false
end

local function has_index(dir)
   return dir ~= nil and is_dir(dir) and file_exists(dir .. "/index.json")
end

-- A device-map value as a canonical string; errors name the key and the value.
local function map_device(fn, key, v)
   if type(v) == "number" and v >= 0 and v % 1 == 0 then return "cuda:" .. v end
   if v == "cpu" or v == "disk" or v == "meta" then return v end
   if type(v) == "string" then
      if v == "cuda" then return "cuda:0" end
      if v:match("^cuda:%d+$") then return v end
   end
   error(string.format('%s: unknown device %s for "%s" in device_map (use an integer, "cuda:N", "cpu" or "disk")',
      fn, type(v) == "string" and ('"' .. v .. '"') or tostring(v), key), 3)
end

-- Keys of a device map in order: an ordered map's own order, else the model's module and
-- tensor order (unknown names last, sorted).
local function ordered_keys(model, device_map)
   local mt = getmetatable(device_map)
   if mt ~= nil then
      local ok, keys = pcall(function() return device_map:keys() end)
      if ok and type(keys) == "table" then return keys end
   end
   local rank, n = {}, 0
   for name in model:named_modules() do
      n = n + 1
      if rank[name] == nil then rank[name] = n end
   end
   for name in model:named_parameters("", true, false) do
      n = n + 1
      if rank[name] == nil then rank[name] = n end
   end
   for name in model:named_buffers() do
      n = n + 1
      if rank[name] == nil then rank[name] = n end
   end
   local keys = {}
   for k in pairs(device_map) do keys[#keys + 1] = k end
   table.sort(keys, function(a, b)
      local ra, rb = rank[a] or math.huge, rank[b] or math.huge
      if ra ~= rb then return ra < rb end
      return a < b
   end)
   return keys
end

-- A plain copy of a device map (ordered maps become plain tables), devices as given.
local function plain_map(model, device_map)
   local out = {}
   for _, k in ipairs(ordered_keys(model, device_map)) do out[k] = device_map[k] end
   return out
end

-- --- offload ------------------------------------------------------------------------------------

--- cpu_offload(model, {execution_device, offload_buffers, state_dict, preload_module_classes,
-- pin_memory}): every parameter stays in a CPU state dict and is put on the execution device
-- only for the forward of the module that owns it. pin_memory = true (moonload's, as ZeRO-
-- Inference does) first copies the state dict into page-locked memory, which the GPU's DMA reads
-- directly: uploads skip the staging copy, at the cost of RAM that cannot be swapped (and of the
-- zero-copy mapping when the weights came from a checkpoint). pin_memory = "in_place" page-locks
-- the weights where they lie instead (t:pin_memory({in_place = true})): no copy and no second RAM;
-- a checkpoint's mapping is locked whole, and tensors of small blocks stay pageable (staged).
function M.cpu_offload(model, opts)
   opts = opts or {}
   local exec = hooks.norm_device(opts.execution_device) or first_param_device(model)
   local state_dict = opts.state_dict
   if state_dict == nil then
      state_dict = {}
      for name, t in pairs(model:state_dict()) do state_dict[name] = t:to("cpu") end
   end
   if opts.pin_memory == "in_place" then
      for _, t in pairs(state_dict) do t:pin_memory({ in_place = true }) end
   elseif opts.pin_memory then
      -- one pinned copy per tensor, so ties stay tied: the state dict may hold a tied tensor
      -- under each name as an object of its own, so the key is where its data is and its layout
      -- (the address printed whole: tostring keeps 14 digits, which made two 8-byte FP8 scales
      -- side by side in a checkpoint one key)
      local pinned, sd = {}, {}
      for name, t in pairs(state_dict) do
         local key = string.format("%.0f %s %s %s", t:data_ptr(), t.dtype, table.concat(t.shape, "x"),
            table.concat(t:stride(), "x"))
         if pinned[key] == nil then pinned[key] = t:pin_memory() end
         sd[name] = pinned[key]
      end
      state_dict = sd
   end
   hooks.add_hook_to_module(model, hooks.AlignDevicesHook({ io_same_device = true }), true)
   hooks.attach_align_device_hook(model, {
      execution_device = exec, offload = true, offload_buffers = opts.offload_buffers,
      weights_map = state_dict, preload_module_classes = opts.preload_module_classes,
      tied_params_map = { [hooks.TIED_META] = {} } })     -- tied modules keep one meta object
   return model
end

--- cpu_offload_with_hook(model, {execution_device, prev_module_hook}) -> model, hook: the whole
-- model moves to the execution device at its forward and stays until hook:offload() or the
-- forward of the next model chained through prev_module_hook.
function M.cpu_offload_with_hook(model, opts)
   opts = opts or {}
   local hook = hooks.CpuOffload({ execution_device = opts.execution_device, prev_module_hook = opts.prev_module_hook })
   hooks.add_hook_to_module(model, hook, true)
   return model, hooks.UserCpuOffloadHook(model, hook)
end

--- disk_offload(model, offload_dir, {execution_device, offload_buffers, preload_module_classes}):
-- writes the state dict as an offload folder (unless offload_dir already holds an index.json)
-- and reads each module's weights from it (mapped, zero-copy on a cpu device) at its forward.
function M.disk_offload(model, offload_dir, opts)
   opts = opts or {}
   if type(offload_dir) ~= "string" then
      error("disk_offload: offload_dir must be a folder path, got " .. type(offload_dir), 2)
   end
   local u = utils()
   local tied_params = u.find_tied_parameters(model)
   if not has_index(offload_dir) then
      local sd = model:state_dict()
      drop_tied_duplicates(sd, tied_params)
      u.offload_state_dict(offload_dir, sd)
   end
   local exec = hooks.norm_device(opts.execution_device) or first_param_device(model)
   local weights_map = dispatch_weights(u.OffloadedWeightsLoader({ save_folder = offload_dir }), tied_params)
   hooks.add_hook_to_module(model, hooks.AlignDevicesHook({ io_same_device = true }), true)
   hooks.attach_align_device_hook(model, {
      execution_device = exec, offload = true, offload_buffers = opts.offload_buffers,
      weights_map = weights_map, preload_module_classes = opts.preload_module_classes,
      tied_params_map = { [hooks.TIED_META] = {} } })
   return model
end

-- --- dispatch -----------------------------------------------------------------------------------

-- The weights map dispatch_model hands to its hooks, over an OffloadedWeightsLoader:
--  * a tied name missing from the loader is read under another name of its group (checkpoints
--    and offload folders hold a tied tensor once), or else is the tensor a module of its group
--    holds (a shared block stored under a CPU layer, used again by a layer on disk);
--  * an index entry pointing into a safetensors file is read raw (a zero-copy view, no dtype
--    cast): the hook runtime converts to the module's dtype at each forward and lets the copy go
--    after, where the loader would cast once and keep a converted copy of every disk weight;
--  * values are memoized by the key they were found under, so every name of a tied group gets
--    the same tensor (one mapping, not one per module).
local DispatchWeights = { __name = "DispatchWeights" }

local function raw_lookup(self, key)
   local off = require("moonload.utils.offload")
   local inner = self.inner
   if getmetatable(inner) == off.OffloadedWeightsLoader_class then
      local st = inner[off.PRIVATE]
      local sd = st.state_dict
      local v = sd and sd[key]
      if v ~= nil then return v end
      local info = st.index and st.index[key]
      if info ~= nil and info.safetensors_file ~= nil and st.device == nil then
         local h = self.handles[info.safetensors_file]
         if h == nil then
            h = require("moonload.safetensors").safe_open(info.safetensors_file)
            self.handles[info.safetensors_file] = h
         end
         return h:get_tensor(info.weight_name or key)
      end
   end
   local v = inner[key]
   if v ~= nil then return v end
   return self.held[key]
end

function DispatchWeights.getitem(self, key)
   local memo = self.memo
   local v = memo[key]
   if v ~= nil then return v end
   v = raw_lookup(self, key)
   if v ~= nil then memo[key] = v; return v end
   local others = self.aliases[key]
   if others then
      for _, k in ipairs(others) do
         v = memo[k]
         if v == nil then
            v = raw_lookup(self, k)
            if v ~= nil then memo[k] = v end
         end
         if v ~= nil then return v end
      end
   end
   return nil
end
function DispatchWeights.get(self, key, default)
   local v = DispatchWeights.getitem(self, key)
   if v == nil then return default end
   return v
end
function DispatchWeights.keys(self)
   return require("moonload.utils.offload").dataset_keys(self.inner)
end
DispatchWeights.__index = function(self, key)
   local m = DispatchWeights[key]
   if m ~= nil then return m end
   return DispatchWeights.getitem(self, key)
end
DispatchWeights.__tostring = function(self) return "DispatchWeights(" .. tostring(self.inner) .. ")" end

-- held: {name = tensor} for the tied names whose module keeps its weights.
dispatch_weights = function(inner, tied_params, held)
   local aliases = {}
   for _, group in ipairs(tied_params) do
      for _, name in ipairs(group) do
         local others = {}
         for _, o in ipairs(group) do if o ~= name then others[#others + 1] = o end end
         aliases[name] = others
      end
   end
   return setmetatable({ inner = inner, aliases = aliases, memo = {}, handles = {}, held = held or {} }, DispatchWeights)
end

local function install_move_guard(model)
   local orig_to, orig_cuda = model.to, model.cuda
   local function has_meta()
      for _, p in model:named_parameters() do
         if p:is_meta() then return true end
      end
      return false
   end
   -- As Accelerate: warn when a device is given (a dtype-only `to` does not warn), and refuse
   -- any conversion while offloaded weights sit on meta (their real values live in the hooks).
   local function guard(fn, orig, moves)
      return function(self, ...)
         if moves(...) then
            log.warn("You shouldn't move a model that is dispatched using moonload hooks.")
         end
         if has_meta() then
            error(fn .. ": You can't move a model that has some modules offloaded to cpu or disk.", 2)
         end
         return orig(self, ...)
      end
   end
   local dtypes = require("moonload.dtypes").by_name
   model.to = guard("to", orig_to, function(a, b)
      if require("moonload.tensor").is_tensor(a) then return true end
      return a ~= nil and not (type(a) == "string" and dtypes[a])
   end)
   if orig_cuda then model.cuda = guard("cuda", orig_cuda, function() return true end) end
   model._ml_move_guard = true
end

-- The device map's key for a tensor's name: its longest mapped prefix.
function module_key(keys, name)
   local best
   for _, k in ipairs(keys) do
      if (k == "" or name == k or name:sub(1, #k + 1) == k .. ".") and (not best or #k > #best) then best = k end
   end
   return best
end

-- A tied group split between an offloaded module and one that holds its weights (a custom map
-- putting the embedding on disk and the head on the CPU): the tensor is on meta, having gone with
-- the offloaded side, so each holding module gets its own copy, read from the dispatch's weights
-- map (which finds a tied name under any name of its group). Without this, its hook had no value
-- to place.
function hold_tied_in_memory(model, tied_params, keys, dmap, offload, weights_map)
   for _, group in ipairs(tied_params) do
      for _, name in ipairs(group) do
         local k = module_key(keys, name)
         local ok, p = pcall(model.get_parameter, model, name)
         if k and not offload[k] and dmap[k] ~= "disk" and ok and p ~= nil and p:is_meta() and weights_map ~= nil then
            local v = hooks.weights_map_get(weights_map, name)
            if require("moonload.tensor").is_tensor(v) and not v:is_meta() then
               utils().set_module_tensor_to_device(model, name, dmap[k], { value = v })
            end
         end
      end
   end
end

--- dispatch_model(model, device_map, {main_device, state_dict, offload_dir, offload_index,
-- offload_buffers, skip_keys, preload_module_classes, force_hooks}): places the model by the
-- map. One device (not disk) without force_hooks: a plain move. Otherwise hooks: modules on
-- the main device hold their weights, "cpu" (unless cpu is the main device) and "disk" modules
-- are offloaded and materialized at their forward.
function M.dispatch_model(model, device_map, opts)
   opts = opts or {}
   if type(device_map) ~= "table" then
      error("dispatch_model: device_map must be a table of module name -> device, got " .. type(device_map), 2)
   end
   local u = utils()
   local keys = ordered_keys(model, device_map)
   local dmap = {}
   for _, k in ipairs(keys) do dmap[k] = map_device("dispatch_model", k, device_map[k]) end
   u.check_device_map(model, device_map)

   local devices, seen = {}, {}
   for _, k in ipairs(keys) do
      local d = dmap[k]
      if not seen[d] then seen[d] = true; devices[#devices + 1] = d end
   end
   local use_hooks = #devices > 1 or seen.disk or opts.force_hooks
   if use_hooks then
      local main_device = hooks.norm_device(opts.main_device)
      if main_device == nil then
         for _, d in ipairs(devices) do
            if d ~= "cpu" and d ~= "disk" then main_device = d; break end
         end
         main_device = main_device or "cpu"
      end
      local state_dict = opts.state_dict
      local cpu_modules, disk_modules = {}, {}
      for _, k in ipairs(keys) do
         if dmap[k] == "cpu" then cpu_modules[#cpu_modules + 1] = k end
         if dmap[k] == "disk" then disk_modules[#disk_modules + 1] = k end
      end
      local full_sd
      if main_device ~= "cpu" and state_dict == nil and #cpu_modules > 0 then
         full_sd = model:state_dict()
         state_dict = u.extract_submodules_state_dict(full_sd, cpu_modules)
      end
      local offload_dir, offload_index = opts.offload_dir, opts.offload_index
      if #disk_modules > 0 then
         if offload_dir == nil and offload_index == nil then
            error("dispatch_model: We need an `offload_dir` to dispatch this model according to this `device_map`, the following submodules need to be offloaded: "
               .. table.concat(disk_modules, ", ") .. ".", 2)
         end
         if offload_index == nil and not has_index(offload_dir) then
            full_sd = full_sd or model:state_dict()
            local disk_sd
            if dmap[""] == "disk" then
               disk_sd = full_sd        -- the whole model on disk (Accelerate writes nothing here, Q17)
            else
               disk_sd = u.extract_submodules_state_dict(full_sd, disk_modules)
            end
            for name, t in pairs(disk_sd) do
               if t:is_meta() then
                  error(string.format('dispatch_model: "%s" is mapped to disk but has no data (on meta) and %s holds no index.json to read it from',
                     name, tostring(offload_dir)), 2)
               end
            end
            drop_tied_duplicates(disk_sd, u.find_tied_parameters(model))
            u.offload_state_dict(offload_dir, disk_sd)
         end
      end
      local execution_device, offload = {}, {}
      local offloaded_devices = main_device == "cpu" and { disk = true } or { cpu = true, disk = true }
      for _, k in ipairs(keys) do
         local d = dmap[k]
         execution_device[k] = (d == "cpu" or d == "disk") and main_device or d
         offload[k] = offloaded_devices[d] or false
      end
      execution_device[""] = main_device
      local save_folder = #disk_modules > 0 and offload_dir or nil
      local weights_map
      if state_dict ~= nil or save_folder ~= nil or offload_index ~= nil then
         weights_map = u.OffloadedWeightsLoader({
            state_dict = state_dict, save_folder = save_folder, index = offload_index,
            device = offload_index ~= nil and main_device or nil })
      end
      local tied_params = u.find_tied_parameters(model)
      local tied_params_map = { [hooks.TIED_META] = {} }
      local held = {}
      for _, group in ipairs(tied_params) do
         for _, name in ipairs(group) do
            local ok, p = pcall(model.get_parameter, model, name)
            if ok and p ~= nil and not p:is_meta() then
               tied_params_map[p:data_ptr()] = {}
               local k = module_key(keys, name)
               if k and not offload[k] then held[name] = p end
            end
         end
      end
      if weights_map ~= nil then weights_map = dispatch_weights(weights_map, tied_params, held) end
      hold_tied_in_memory(model, tied_params, keys, dmap, offload, weights_map)
      hooks.attach_align_device_hook_on_blocks(model, {
         execution_device = execution_device, offload = offload, offload_buffers = opts.offload_buffers,
         weights_map = weights_map, skip_keys = opts.skip_keys,
         preload_module_classes = opts.preload_module_classes, tied_params_map = tied_params_map })
      local off = {}
      for _, d in ipairs({ "cpu", "disk" }) do
         if seen[d] and offloaded_devices[d] then off[#off + 1] = d end
      end
      if #off > 0 then
         log.warn("Some parameters are on the meta device because they were offloaded to the "
            .. table.concat(off, " and ") .. ".")
      end
      u.retie_parameters(model, tied_params)
      install_move_guard(model)
   else
      local device = devices[1]
      if device ~= nil and device ~= "meta" then model:to(device) end
   end
   model.hf_device_map = plain_map(model, device_map)
   return model
end

local DEVICE_MAP_STRINGS = { auto = true, balanced = true, balanced_low_0 = true, sequential = true }

-- Disk weights are read in place from the checkpoint's mapping, so their pages count in the
-- process's memory while they stay mapped. A CPU budget in max_memory bounds that too: once the
-- mapped weights the hooks hold pass what the budget leaves, released pages leave the process
-- after each forward (the hooks' auto drop level). With a GPU main device the "cpu" modules are
-- offloaded through the hooks as well (counted among those mapped bytes); with the CPU as main
-- device they stay in the model, beside the budget's remainder.
-- cpu_reserved: what a reserve_for plan kept of the CPU budget for the run (cache, activations).
function M._bound_mapped_disk_weights(model, device_map, max_memory, dtype, cpu_reserved)
   if type(device_map) ~= "table" or type(max_memory) ~= "table" or max_memory.cpu == nil then return end
   local u = utils()
   local sizes = u.compute_module_sizes(model, { dtype = dtype })
   local on_disk, on_gpu, cpu_bytes, largest_disk = false, false, 0, 0
   for name, dev in pairs(device_map) do
      if dev == "disk" then
         on_disk = true
         largest_disk = math.max(largest_disk, sizes[name] or 0)
      elseif dev == "cpu" then cpu_bytes = cpu_bytes + sizes[name]
      elseif dev ~= "meta" then on_gpu = true end
   end
   if not on_disk then return end
   local budget = u.convert_file_size_to_int(max_memory.cpu)
   if on_gpu then return hooks.set_auto_drop_above(budget) end
   -- With a reserve_for plan the budget is a promise. Pages are dropped as a module is released,
   -- so beside what stays mapped comes the module running (the largest on disk, mapped whole);
   -- the pages prefetch reads ahead are in the plan's workspace.
   local ahead = cpu_reserved and cpu_reserved > 0 and largest_disk or 0
   hooks.set_auto_drop_above(math.max(0, budget - cpu_bytes - (cpu_reserved or 0) - ahead))
end

--- reserve_for and device_overrides are for a planned map: an error (at `level`) with a table
-- or no device_map.
function M._check_reserve_for_map(opts, who, level)
   for _, key in ipairs({ "reserve_for", "device_overrides" }) do
      if opts[key] ~= nil and type(opts.device_map) ~= "string" then
         error(who .. ": " .. key .. ' plans a device map, so device_map must be "auto", "balanced", "balanced_low_0" or "sequential"', level)
      end
   end
end

--- The device map the options ask for: a table as given, or a string ("auto", "balanced",
-- "balanced_low_0", "sequential") planned by infer_auto_device_map. With reserve_for =
-- {batch_size, max_length, prompt_length} the plan also budgets the key-value cache and the
-- activations of generating that much (utils/runtime_memory.lua). Returns the map and, for a
-- reserve_for plan, {reserve_for, garbage, cpu = bytes reserved on the CPU}.
function M._plan_device_map(model, opts, who)
   local device_map = opts.device_map
   if type(device_map) == "string" and not DEVICE_MAP_STRINGS[device_map] then
      error(who .. ": If passing a string for `device_map`, please choose 'auto', 'balanced', 'balanced_low_0' or 'sequential' (got \""
         .. device_map .. "\").", 3)
   end
   if device_map ~= nil and type(device_map) ~= "string" and type(device_map) ~= "table" then
      error(who .. ": device_map must be a string or a table, got " .. type(device_map), 3)
   end
   require("moonload.quantize").check_option(opts.quantize, who, 3, opts.quantize_embeddings)
   M._check_reserve_for_map(opts, who, 4)
   if type(device_map) ~= "string" then return device_map end
   local u = utils()
   local plan = { max_memory = opts.max_memory, no_split_module_classes = opts.no_split_module_classes,
                  dtype = opts.dtype, offload_buffers = opts.offload_buffers, device_overrides = opts.device_overrides }
   local reserved
   if opts.reserve_for ~= nil then
      local rm = require("moonload.utils.runtime_memory")
      local r = rm.check_reserve_for(opts.reserve_for)
      r.dtype = r.dtype or opts.dtype
      local garbage
      plan.runtime_sizes, plan.workspace_size, garbage = rm.runtime_memory_sizes(model, r)
      reserved = { reserve_for = r, garbage = garbage, runtime_sizes = plan.runtime_sizes,
                   workspace_size = plan.workspace_size }
      if r.kv_cache_device then M._cache_on_device(plan, reserved, r.kv_cache_device, u, who) end
   end
   if opts.quantize ~= nil then M._plan_int8(model, plan, opts) end
   if device_map ~= "sequential" then
      -- (from the budgets as adjusted above: a cache kept elsewhere, int8 scales)
      plan.max_memory = u.get_balanced_memory(model, {
         max_memory = plan.max_memory, no_split_module_classes = opts.no_split_module_classes,
         special_dtypes = plan.special_dtypes,
         dtype = opts.dtype, low_zero = device_map == "balanced_low_0",
         runtime_sizes = plan.runtime_sizes, workspace_size = plan.workspace_size })
   end
   return u.infer_auto_device_map(model, plan), reserved
end

-- Whether budgets (get_max_memory's, GPUs keyed by index) include a GPU.
local function has_gpu(max_memory)
   for k in pairs(max_memory) do
      if type(k) == "number" then return true end
   end
   return false
end

-- reserve_for's kv_cache_device: the caches come off that device's budget (the planner then places
-- the layers in what is left) instead of following their layers. With no GPU in the budgets the
-- CPU runs everything and the caches are there already: nothing changes.
function M._cache_on_device(plan, reserved, device, u, who)
   local max_memory = u.get_max_memory(plan.max_memory, who)
   if not has_gpu(max_memory) and device == "cpu" then return end
   local key = device == "cpu" and "cpu" or tonumber(device:match("^cuda:(%d+)$"))
   local total = 0
   for _, bytes in pairs(plan.runtime_sizes) do total = total + bytes end
   if max_memory[key] ~= nil then
      if max_memory[key] < total then
         error(string.format("%s: reserve_for: the key-value cache (%.0f bytes) does not fit in max_memory for %s (%.0f bytes)",
            who, total, device, max_memory[key]), 4)
      end
      max_memory[key] = max_memory[key] - total
   end
   plan.max_memory, plan.runtime_sizes = max_memory, nil
   reserved.cache_elsewhere = { device = device, bytes = total }
end

-- quantize = "int8" or "int4": the linear layers ml.quantize will turn into int8 (int4) count as
-- such wherever the planner puts them, their float32 scales with them (sizes.lua's "q8", 36 bytes
-- per 32 weights; "q4", 20): load_checkpoint_and_dispatch quantizes layers bound for a GPU in CPU
-- memory, before they move.
function M._plan_int8(model, plan, opts)
   local quantize = require("moonload.quantize")
   local special = {}
   for k, v in pairs(opts.special_dtypes or {}) do special[k] = v end
   local planned = opts.quantize == "int4" and "q4" or "q8"
   for _, c in ipairs(quantize.candidates(model, nil, opts.quantize_embeddings)) do
      if not c[3] then special[c[1] .. ".weight"] = planned end
   end
   -- experts stacked per projection quantize too, split into linear layers first (quantize.lua)
   for _, e in ipairs(model:named_modules_list()) do
      local name, m = e[1], e[2]
      if type(m.quantized_projections) == "function" then
         for _, p in ipairs(m:quantized_projections()) do special[name .. "." .. p] = planned end
      end
   end
   plan.special_dtypes = special
end

-- After dispatching a reserve_for plan that computes on the CPU: it collects its garbage once it
-- holds the plan's share (ml.set_gc_cap) and its block cache keeps as much at most; the model
-- remembers what it was planned for
-- (generate warns beyond it). Returns the bytes the plan reserved on the CPU.
local function apply_reserve(model, device_map, reserved)
   if not reserved then return 0 end
   local ml = require("moonload")
   local on_gpu = false
   for _, dev in pairs(device_map) do
      if type(dev) == "number" or (type(dev) == "string" and dev:match("^cuda:%d+$")) then on_gpu = true end
   end
   -- A GPU keeps its default threshold: an allocation that fails there collects and tries again,
   -- and capping it would run a full collection every few layers of a prefill.
   local cpu_reserved = 0
   if not on_gpu then
      ml.set_gc_cap("cpu", reserved.garbage)
      ml.set_cpu_cache_limit(reserved.garbage)
      cpu_reserved = reserved.workspace_size.cpu
      for _, bytes in pairs(reserved.runtime_sizes) do cpu_reserved = cpu_reserved + bytes end
   elseif reserved.cache_elsewhere and reserved.cache_elsewhere.device == "cpu" then
      cpu_reserved = reserved.cache_elsewhere.bytes
   end
   local r = reserved.reserve_for
   rawset(model, "reserved_for", { batch_size = r.batch_size, max_length = r.max_length, prompt_length = r.prompt_length,
      micro_batch_size = r.micro_batch_size, prefill_chunk_size = r.prefill_chunk_size, kv_cache_device = r.kv_cache_device,
      kv_cache_dtype = r.kv_cache_dtype })
   return cpu_reserved
end
M._apply_reserve = apply_reserve

--- load_checkpoint_and_dispatch(model, checkpoint, {device_map, max_memory,
-- no_split_module_classes, offload_folder, offload_buffers, dtype, offload_state_dict,
-- skip_keys, preload_module_classes, force_hooks, strict, reserve_for, device_overrides,
-- quantize}): loads a checkpoint (a .safetensors file, a sharded index .json or a folder) into
-- the model by the device map ("auto", "balanced", "balanced_low_0", "sequential" or a table),
-- then dispatches it. quantize = "int8" ("int4") plans with its sizes (see _plan_int8), quantizes the
-- linear layers in memory before dispatching (those bound for a GPU loaded to the CPU for it) and
-- the offloaded ones after (ml.quantize).
function M.load_checkpoint_and_dispatch(model, checkpoint, opts)
   opts = opts or {}
   local u = utils()
   local device_map, reserved = M._plan_device_map(model, opts, "load_checkpoint_and_dispatch")
   local offload_state_dict = opts.offload_state_dict
   if offload_state_dict == nil then offload_state_dict = false end
   u.load_checkpoint_in_model(model, checkpoint, {
      device_map = M._load_map(device_map, opts.quantize), offload_folder = opts.offload_folder, dtype = opts.dtype,
      offload_state_dict = offload_state_dict, offload_buffers = opts.offload_buffers,
      strict = opts.strict })
   if device_map == nil then return M._quantize_after(model, opts) end
   -- layers in memory become int8 (int4) here, on the CPU, so those bound for a GPU move there so
   if opts.quantize ~= nil then require("moonload.quantize").quantize(model, { dtype = opts.quantize, embeddings = opts.quantize_embeddings }) end
   local cpu_reserved = apply_reserve(model, device_map, reserved)
   M._bound_mapped_disk_weights(model, device_map, opts.max_memory, opts.dtype, cpu_reserved)
   return M._quantize_after(model, opts, M.dispatch_model(model, device_map, {
      offload_dir = opts.offload_folder, offload_buffers = opts.offload_buffers,
      skip_keys = opts.skip_keys, preload_module_classes = opts.preload_module_classes,
      force_hooks = opts.force_hooks }))
end

-- The map load_checkpoint_in_model loads by: with quantize, what is bound for a GPU is loaded to
-- the CPU (views of the checkpoint where the dtype agrees), quantized there, and moved by
-- dispatch_model: the GPU never holds the float weights.
function M._load_map(device_map, quantize)
   if quantize == nil or type(device_map) ~= "table" then return device_map end
   local load_map = {}
   for name, dev in pairs(device_map) do
      load_map[name] = (dev == "cpu" or dev == "disk" or dev == "meta") and dev or "cpu"
   end
   return load_map
end

--- With quantize = "int8" or "int4": the linear layers not quantized yet (offloaded ones, whose
-- hooks now hold their weights) become quantized (ml.quantize); the model comes back (dispatched,
-- when given).
function M._quantize_after(model, opts, dispatched)
   model = dispatched or model
   if opts.quantize == nil then return model end                 -- (checked by _plan_device_map)
   require("moonload.quantize").quantize(model, { offload_folder = opts.offload_folder, dtype = opts.quantize,
      embeddings = opts.quantize_embeddings })
   return model
end

return M
