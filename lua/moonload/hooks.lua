--- ml.hooks: Accelerate's model hooks (accelerate.hooks) in Lua.
--
-- A hook wraps a module's forward: add_hook_to_module keeps the original in module._old_forward,
-- stores the hook in module._hf_hook and installs an instance-level `forward` that runs
--   hook:pre_forward(module, ...) -> old forward -> hook:post_forward(module, outputs...)
-- reading module._hf_hook at call time (so flipping a hook field after attaching takes effect).
-- Lua has no kwargs: pre_forward gets and returns the positional arguments, and a trailing plain
-- table argument plays the kwargs role for skip_keys. post_forward gets every return value.
--
-- AlignDevicesHook moves weights through the C hook runtime (core/src/hookrt.c): an offloading
-- hook registers its tensors' sources (from its weights map) as a group, materializes them on
-- the execution device before forward (a zero-copy view into the mapping for disk weights used
-- on the CPU) and releases them after, tied weights materialized once; the runtime learns the
-- order modules run in and prefetches the next module's mapped pages on a worker thread.
local C = require("moonload.C")
local Tensor = require("moonload.tensor")
local log = require("moonload.utils.log")
local class = require("moonload.class")

local ffi, lib = C.ffi, C.lib
local unpack, select = unpack, select

local M = {}

-- The tensor and offload utilities hooks need, from their own files (moonload.utils loads
-- planning code hooks never use).
local utils_mod
local function utils()
   if utils_mod then return utils_mod end
   local modeling, offload = require("moonload.utils.modeling"), require("moonload.utils.offload")
   utils_mod = {
      named_module_tensors = modeling.named_module_tensors,
      set_module_tensor_to_device = modeling.set_module_tensor_to_device,
      get_non_persistent_buffers = modeling.get_non_persistent_buffers,
      PrefixedDataset = offload.PrefixedDataset,
   }
   return utils_mod
end

-- --- devices ----------------------------------------------------------------------------------

--- Normalises a device value: integer N -> "cuda:N", "cuda" -> "cuda:0", strings as they are.
local function norm_device(d)
   if d == nil then return nil end
   if type(d) == "number" then return "cuda:" .. d end
   if d == "cuda" then return "cuda:0" end
   return d
end
M.norm_device = norm_device

local function is_plain_table(v)
   return type(v) == "table" and getmetatable(v) == nil
end

local function has_to(v)
   if type(v) ~= "table" then return false end
   local ok, f = pcall(function() return v.to end)
   return ok and type(f) == "function"
end

--- send_to_device(x, device[, skip_keys]): tensors (and objects with a :to method) go to the
-- device; plain tables are rebuilt with their values sent (keys listed in skip_keys are kept as
-- they are, at any depth); anything else is returned as is. A table whose values are all
-- already in place is returned itself (so caches the model mutates in place keep their identity).
-- device nil: a no-op.
local function send_to_device(x, device, skip_keys)
   if device == nil then return x end
   if Tensor.is_tensor(x) then return x:to(device) end
   if type(x) ~= "table" then return x end
   if not is_plain_table(x) then
      if has_to(x) and not x.__name then return x:to(device) end
      return x
   end
   if type(skip_keys) == "string" then skip_keys = { skip_keys } end
   local skip
   if skip_keys then
      skip = {}
      for _, k in ipairs(skip_keys) do skip[k] = true end
   end
   local copy
   for k, v in pairs(x) do
      if not (skip and skip[k]) then
         local nv = send_to_device(v, device, skip_keys)
         if nv ~= v then
            if not copy then
               copy = {}
               for k2, v2 in pairs(x) do copy[k2] = v2 end
            end
            copy[k] = nv
         end
      end
   end
   return copy or x
end
M.send_to_device = function(x, device, skip_keys) return send_to_device(x, norm_device(device), skip_keys) end

--- find_device(data): the device of the first tensor found depth-first (list part first).
local function find_device(x)
   if Tensor.is_tensor(x) then return x.device end
   if not is_plain_table(x) then return nil end
   local n = #x
   for i = 1, n do
      local d = find_device(x[i])
      if d then return d end
   end
   for k, v in pairs(x) do
      if not (type(k) == "number" and k >= 1 and k <= n and k % 1 == 0) then
         local d = find_device(v)
         if d then return d end
      end
   end
   return nil
end
M.find_device = find_device

-- --- classes ------------------------------------------------------------------------------------

--- ModelHook: the base class. Subclass with ModelHook:extend("Name") and override any of
-- init_hook(module) -> module, pre_forward(module, ...) -> ..., post_forward(module, ...) -> ...,
-- detach_hook(module) -> module, and hold_begin() / hold_end(), called around hooks.hold (a hook
-- that moves weights keeps them in place between the calls in a hold). Field no_grad (false) is
-- kept for compatibility.
local ModelHook = class.new("ModelHook")
ModelHook.__tostring = function(self)
   if self.__repr then return self:__repr() end
   return getmetatable(self).__name .. "()"
end
ModelHook.no_grad = false
function ModelHook:init_hook(module) return module end
function ModelHook:pre_forward(module, ...) return ... end
function ModelHook:post_forward(module, ...) return ... end
function ModelHook:detach_hook(module) return module end
function ModelHook:hold_begin() end
function ModelHook:hold_end() end
function ModelHook.is_hook(x)
   return class.is_a(x, ModelHook)
end
M.ModelHook = ModelHook

local function pack(...) return { n = select("#", ...), ... } end

--- SequentialHook(h1, h2, ...): runs every hook in order at each event (post_forward in the
-- same order, as Accelerate does). Its own no_grad is what the wrapper reads.
local SequentialHook = ModelHook:extend("SequentialHook")
function SequentialHook:__init(...)
   self.hooks = { ... }
end
function SequentialHook:init_hook(module)
   for _, h in ipairs(self.hooks) do module = h:init_hook(module) end
   return module
end
function SequentialHook:pre_forward(module, ...)
   local args = pack(...)
   for _, h in ipairs(self.hooks) do args = pack(h:pre_forward(module, unpack(args, 1, args.n))) end
   return unpack(args, 1, args.n)
end
function SequentialHook:post_forward(module, ...)
   local out = pack(...)
   for _, h in ipairs(self.hooks) do out = pack(h:post_forward(module, unpack(out, 1, out.n))) end
   return unpack(out, 1, out.n)
end
function SequentialHook:detach_hook(module)
   for _, h in ipairs(self.hooks) do module = h:detach_hook(module) end
   return module
end
function SequentialHook:hold_begin()
   for _, h in ipairs(self.hooks) do h:hold_begin() end
end
function SequentialHook:hold_end()
   for _, h in ipairs(self.hooks) do h:hold_end() end
end
function SequentialHook:__repr()
   local parts = {}
   for i, h in ipairs(self.hooks) do parts[i] = tostring(h) end
   return "SequentialHook(" .. table.concat(parts, ", ") .. ")"
end
M.SequentialHook = SequentialHook

-- --- attaching and removing ----------------------------------------------------------------------

local function call_old(module, ...)
   return module._old_forward(module, ...)
end

local function run_post(hook, module, ...)
   return hook:post_forward(module, ...)
end

--- add_hook_to_module(module, hook[, append]): attaches hook (replacing the current one, whose
-- detach_hook is not called), or with append chains it after the current one in a
-- SequentialHook (the old hook is detached and initialised again, as in Accelerate).
function M.add_hook_to_module(module, hook, append)
   if not ModelHook.is_hook(hook) then
      error("add_hook_to_module: hook must be a ModelHook (made with ModelHook:extend), got " .. type(hook), 2)
   end
   if append and module._hf_hook ~= nil then
      local old = module._hf_hook
      M.remove_hook_from_module(module)
      hook = SequentialHook(old, hook)
   end
   if module._hf_hook == nil or module._old_forward == nil then
      module._old_forward = module.forward
   end
   module = hook:init_hook(module)
   module._hf_hook = hook
   local target = module
   module.forward = function(_, ...)
      local h = target._hf_hook
      return run_post(h, target, call_old(target, h:pre_forward(target, ...)))
   end
   return module
end

--- remove_hook_from_module(module[, recurse]): detaches the hook (detach_hook runs), restores the
-- original forward, clears _hf_hook / _old_forward and removes dispatch_model's move guard.
function M.remove_hook_from_module(module, recurse)
   local hook = module._hf_hook
   if hook ~= nil then
      hook:detach_hook(module)
      module._hf_hook = nil
   end
   local old = module._old_forward
   if old ~= nil then
      module.forward = nil
      if module.forward ~= old then module.forward = old end
      module._old_forward = nil
   end
   if module._ml_move_guard then
      module.to = nil
      module.cuda = nil
      module._ml_move_guard = nil
   end
   if recurse then
      for _, child in module:named_children() do M.remove_hook_from_module(child, true) end
   end
   return module
end

--- remove_hook_from_submodules(module): removes the hooks of module and all its descendants.
function M.remove_hook_from_submodules(module)
   M.remove_hook_from_module(module)
   for _, child in module:named_children() do M.remove_hook_from_submodules(child) end
end

-- --- module tensors -------------------------------------------------------------------------------

local function list_tensors(module, include_buffers, recurse, remove_non_persistent)
   local res = {}
   for name, t in utils().named_module_tensors(module, {
      include_buffers = include_buffers, recurse = recurse,
      remove_non_persistent = remove_non_persistent }) do
      res[#res + 1] = { name, t }
   end
   return res
end

-- The module owning a dotted tensor name and the tensor's own name.
local function owner_of(module, name)
   local prefix, leaf = name:match("^(.*)%.([^.]+)$")
   if not prefix then return module, name end
   return module:get_submodule(prefix), leaf
end

local function get_tensor(module, name)
   local owner, leaf = owner_of(module, name)
   return owner[leaf]
end

local function put_tensor(module, name, t)
   local owner, leaf = owner_of(module, name)
   owner[leaf] = t
end

local function non_persistent_buffers(module, recurse)
   return utils().get_non_persistent_buffers(module, { recurse = recurse, fqns = true })
end

-- Weights-map access: a plain table, or an object (PrefixedDataset, OffloadedWeightsLoader) that
-- may offer :get(key) and indexing.
local function wm_get(wm, key)
   if wm == nil then return nil end
   if type(wm) == "table" and getmetatable(wm) ~= nil then
      local ok, getter = pcall(function() return wm.get end)
      if ok and type(getter) == "function" then
         local ok2, v = pcall(getter, wm, key)
         if ok2 then return v end
         return nil
      end
   end
   local ok, v = pcall(function() return wm[key] end)
   if ok then return v end
   return nil
end

M.weights_map_get = wm_get

local function wm_index(wm, key)
   local v = wm[key]
   if v == nil then v = wm_get(wm, key) end
   return v
end

-- --- the runtime ------------------------------------------------------------------------------------

local runtime_ptr
local runtime_closed = false
local function env_flag(name, default)
   local v = os.getenv(name)
   if v == nil or v == "" then return default end
   v = v:lower()
   if v == "0" or v == "false" or v == "off" or v == "no" then return false end
   return true
end

--- The process-wide hook runtime (created on first use). MOONLOAD_PREFETCH=0 turns prefetch off,
-- MOONLOAD_DROP_PAGES=0|1|2|auto sets the page-drop level after release (see set_drop_pages).
local prefetch_lookahead = 32 * 1024 * 1024        -- the core's default (hookrt.c)
function M.runtime()
   if runtime_ptr then return runtime_ptr end
   local p = ffi.new("ml_hookrt*[1]")
   C.check(lib.ml_hookrt_new(p))
   runtime_ptr = ffi.gc(p[0], function(rt)
      runtime_closed = true          -- groups collected after this (at exit) have nothing to free
      lib.ml_hookrt_release(rt)
   end)
   local drop_env = os.getenv("MOONLOAD_DROP_PAGES")
   local drop = drop_env == "auto" and 3 or tonumber(drop_env or "") or -1
   C.check(lib.ml_hookrt_configure(runtime_ptr, env_flag("MOONLOAD_PREFETCH", true) and 1 or 0, drop))
   local lookahead = tonumber(os.getenv("MOONLOAD_PREFETCH_LOOKAHEAD") or "")
   if lookahead then
      C.check(lib.ml_hookrt_set_prefetch_window(runtime_ptr, -1, lookahead))
      prefetch_lookahead = lookahead
   end
   local stream_ahead = tonumber(os.getenv("MOONLOAD_STREAM_AHEAD") or "")
   if stream_ahead then C.check(lib.ml_hookrt_set_stream_window(runtime_ptr, stream_ahead)) end
   return runtime_ptr
end

--- set_prefetch(on): turns the prefetch worker on or off; returns the previous setting.
local prefetch_on = nil
function M.set_prefetch(on)
   local rt = M.runtime()
   local prev = prefetch_on
   if prev == nil then prev = env_flag("MOONLOAD_PREFETCH", true) end
   C.check(lib.ml_hookrt_configure(rt, on and 1 or 0, -1))
   prefetch_on = not not on
   return prev
end

-- Calls setter(runtime, bytes) for fn, with a Lua type check first (the C side checks >= 0);
-- errors point at fn's caller.
local function set_runtime_bytes(fn, setter, bytes)
   if type(bytes) ~= "number" then error(fn .. ": bytes must be a number >= 0, got " .. type(bytes), 3) end
   C.check(setter(M.runtime(), bytes), 3)
end

--- set_drop_pages(level[, auto_above_bytes]): 0 keeps released pages mapped, 1 drops them from
-- the process, 2 also evicts them from the page cache, "auto" (the default; also 3) drops them
-- only once the offloaded weights mapped by all hooks exceed auto_above_bytes (default: half the
-- physical memory), so models that fit in RAM keep their disk weights mapped between forwards.
-- Environment: MOONLOAD_DROP_PAGES=0|1|2|auto.
function M.set_drop_pages(level, auto_above_bytes)
   if level == "auto" then level = 3 end
   C.check(lib.ml_hookrt_configure(M.runtime(), -1, level))
   if auto_above_bytes then set_runtime_bytes("set_drop_pages", lib.ml_hookrt_set_auto_drop, auto_above_bytes) end
end

--- set_auto_drop_above(bytes): the threshold of the "auto" drop level alone (see set_drop_pages),
-- leaving the level as it is. load_checkpoint_and_dispatch and from_pretrained set it from
-- max_memory.cpu when the map has disk entries (one threshold for the process: the latest wins).
function M.set_auto_drop_above(bytes)
   set_runtime_bytes("set_auto_drop_above", lib.ml_hookrt_set_auto_drop, bytes)
end

--- set_stream_window(bytes): with a cuda execution device, weights in host memory are uploaded
-- ahead along the learned order: the next module's, then on while the bytes in flight stay
-- within `bytes` (default 64 MiB, also MOONLOAD_STREAM_AHEAD; 0 = one module ahead), and always
-- past a module far smaller than the one after it (a norm, to the next big matrix). Device memory
-- then holds the resident weights, the running module and at most max(window, one module) (and
-- the norm before it).
-- Uploads ahead only take memory that is free at the time, and when the running module needs
-- more than is left the device gives them back: the window then narrows to half of what was in
-- flight, or stops when that was one module. Each forward that gives nothing back widens it
-- again (doubling from 1 MiB; a stopped one retries one module ahead after a backoff that doubles
-- with each failure). Calling this starts over from `bytes`.
function M.set_stream_window(bytes)
   set_runtime_bytes("set_stream_window", lib.ml_hookrt_set_stream_window, bytes)
end

--- set_compute_in_place(tokens): with a cuda execution device, a hooked module whose weights are
-- all in host memory (CPU RAM or a mapped file) runs on the CPU when its first input has fewer
-- than `tokens` rows (numel / last dim: batch x sequence), instead of streaming its weights to
-- the GPU; inputs go to the CPU and outputs come back to the execution device. Reading weights
-- in place from RAM beats sending them over PCIe for a few tokens (decoding), while prefill
-- streams (llama.cpp's policy). 0, the default, always streams, as Accelerate does. Only hooks
-- on the module that holds the weights (not place_submodules ones) take this path. An embedding's
-- token ids (batch, sequence) count batch rows, so a lookup, which reads only a few rows of its
-- table, runs in place for a prompt too. A hooked module called inside one running in place
-- runs in place too (its weights in host memory), whatever its rows. Also
-- MOONLOAD_COMPUTE_IN_PLACE_BELOW. Returns the previous setting.
local in_place_below = tonumber(os.getenv("MOONLOAD_COMPUTE_IN_PLACE_BELOW") or "") or 0
local in_place_forwards = 0
local in_place_owner = nil    -- the innermost hooked module running on the CPU in place now
function M.set_compute_in_place(tokens)
   if type(tokens) ~= "number" or tokens < 0 or tokens ~= math.floor(tokens) then
      error("set_compute_in_place: tokens must be an integer >= 0, got " .. tostring(tokens), 2)
   end
   local prev = in_place_below
   in_place_below = tokens
   return prev
end

--- set_lookup_in_place(on): with a cuda execution device, a hooked lookup table (nn.Embedding,
-- nn.QuantizedEmbedding: a class with `lookup_table = true`) whose weights are all in host memory
-- gathers its rows on the CPU and sends only those to the GPU, for any number of tokens, instead
-- of streaming the whole table for a few rows of it (llama.cpp keeps its token embeddings on the
-- CPU for the same reason): a forward of 512 tokens through Llama 3's 128256 x 4096 bfloat16
-- table moves 4 MiB, not 1 GiB. On by default; off (or MOONLOAD_LOOKUP_IN_PLACE=0) streams the
-- table as Accelerate does. Returns the previous setting.
local lookup_in_place = env_flag("MOONLOAD_LOOKUP_IN_PLACE", true)
function M.set_lookup_in_place(on)
   if type(on) ~= "boolean" then error("set_lookup_in_place: expected true or false, got " .. tostring(on), 2) end
   local prev = lookup_in_place
   lookup_in_place = on
   return prev
end

--- set_prefetch_window(min_bytes, lookahead_bytes): prefetch reads ahead along the learned
-- order while the mapped bytes ahead stay within lookahead_bytes (default 32 MiB, also
-- MOONLOAD_PREFETCH_LOOKAHEAD); groups smaller than min_bytes (64 KiB) are skipped. nil keeps one.
function M.set_prefetch_window(min_bytes, lookahead_bytes)
   C.check(lib.ml_hookrt_set_prefetch_window(M.runtime(), min_bytes or -1, lookahead_bytes or -1))
   if lookahead_bytes then prefetch_lookahead = lookahead_bytes end
end

--- The bytes prefetch may map ahead now (set_prefetch_window's lookahead_bytes): memory budgets
-- keep room for them.
function M.prefetch_lookahead()
   M.runtime()
   return prefetch_lookahead
end

--- Runtime counters: materialize_calls, releases, bytes_viewed, bytes_copied, tied_hits,
-- bytes_dropped, prefetch_jobs, prefetch_bytes, prefetch_pages, shared_copies, bytes_streamed,
-- streams_dropped, streams_reclaimed (uploads given back because the device ran out of memory);
-- and the current groups (one per offloading hook alive), bytes_mapped (the mapped bytes of their
-- sources: what the "auto" drop level compares with its threshold), streams_pending and
-- stream_window (the bytes streamed ahead now: narrowed after running out of memory, -1 when stopped);
-- stream_waits (materializations that blocked on an upload streamed ahead), stream_drains (of those,
-- the ones with no upload queued behind: the copy engine ran dry until the host asked for more) and
-- stream_wait_s (the seconds the host spent blocked there), stream_busy_s (the seconds the upload
-- worker spent copying: a forward bound by its transfers that took longer lost the rest idle).
function M.runtime_stats()
   local s = ffi.new("ml_hookrt_stats")
   lib.ml_hookrt_get_stats(M.runtime(), s)
   local r = {}
   for _, k in ipairs({ "materialize_calls", "releases", "bytes_viewed", "bytes_copied", "tied_hits",
      "bytes_dropped", "prefetch_jobs", "prefetch_bytes", "prefetch_pages", "shared_copies",
      "bytes_streamed", "streams_dropped", "groups", "bytes_mapped", "streams_pending", "streams_reclaimed",
      "stream_window", "stream_waits", "stream_drains" }) do
      r[k] = tonumber(s[k])
   end
   r.stream_wait_s = tonumber(s.stream_wait_ns) / 1e9
   r.stream_busy_s = tonumber(s.stream_busy_ns) / 1e9
   r.in_place_forwards = in_place_forwards   -- modules run on the CPU by set_compute_in_place
   return r
end

--- hold(module, fn, ...) -> fn(...): the hooks of module and its submodules keep the weights
-- they move onto their devices from a module's first forward inside fn until fn returns (or
-- raises). A block schedule calls a layer once per block of rows and tokens: the layer's weights
-- are loaded (streamed, read from disk) once for all of them.
function M.hold(module, fn, ...)
   local held = {}
   for _, m in ipairs(module:modules_list()) do
      local h = rawget(m, "_hf_hook")
      if h ~= nil then
         h:hold_begin()
         held[#held + 1] = h
      end
   end
   local res = pack(pcall(fn, ...))
   for i = #held, 1, -1 do held[i]:hold_end() end
   if not res[1] then error(res[2], 0) end
   return unpack(res, 2, res.n)
end

--- with_weights(module, fn, ...) -> fn(...) while module's hook has its own weights where it puts
-- them for a forward (as its pre_forward does; post_forward puts them back after fn): for code
-- that reads a layer's weights as tensors instead of calling it (DeepSeek's absorbed attention
-- under cpu_offload's per-layer hooks, LongCat's float32 router). The arguments go through the
-- hook as a forward's would, and fn gets them as it gives them back: their rows decide, as for a
-- forward, whether the module runs in place (set_compute_in_place). A module without a hook just
-- runs fn.
function M.with_weights(module, fn, ...)
   local h = rawget(module, "_hf_hook")
   if h == nil then return fn(...) end
   local args = pack(h:pre_forward(module, ...))
   local res = pack(pcall(fn, unpack(args, 1, args.n)))
   h:post_forward(module)
   if not res[1] then error(res[2], 0) end
   return unpack(res, 2, res.n)
end

--- Waits until the prefetch worker is idle.
function M.wait_prefetch()
   C.check(lib.ml_hookrt_wait(M.runtime()))
end

-- --- AlignDevicesHook -----------------------------------------------------------------------------

--- A private key of a tied_params_map (dispatch_model sets it): original tensor object -> the meta
-- object offloading hooks put in its place, shared by every module the original was tied into.
M.TIED_META = setmetatable({}, { __tostring = function() return "<tied meta objects>" end })

local AlignDevicesHook = ModelHook:extend("AlignDevicesHook")

--- AlignDevicesHook({execution_device, offload, io_same_device, weights_map, offload_buffers,
-- place_submodules, skip_keys, tied_params_map})
function AlignDevicesHook:__init(opts)
   opts = opts or {}
   self.execution_device = norm_device(opts.execution_device)
   self.offload = opts.offload or false
   self.io_same_device = opts.io_same_device or false
   self.weights_map = opts.weights_map
   self.offload_buffers = opts.offload_buffers or false
   self.place_submodules = opts.place_submodules or false
   self.skip_keys = opts.skip_keys
   self.tied_params_map = opts.tied_params_map
   self.input_device = nil
   self.tied_params_names = {}
end

function AlignDevicesHook:__repr()
   local sk = self.skip_keys
   if type(sk) == "table" then sk = "{" .. table.concat(sk, ", ") .. "}" end
   return string.format("AlignDevicesHook(execution_device=%s, offload=%s, io_same_device=%s, offload_buffers=%s, place_submodules=%s, skip_keys=%s)",
      tostring(self.execution_device), tostring(self.offload), tostring(self.io_same_device),
      tostring(self.offload_buffers), tostring(self.place_submodules), tostring(sk))
end

function AlignDevicesHook:init_hook(module)
   if self.execution_device == "meta" then self.tied_params_map = nil end
   self._lookup = module.lookup_table == true
   local u = utils()
   if not self.offload and self.execution_device ~= nil then
      for _, e in ipairs(list_tensors(module, true, self.place_submodules, false)) do
         u.set_module_tensor_to_device(module, e[1], self.execution_device, { tied_params_map = self.tied_params_map })
      end
   elseif self.offload then
      self.original_devices = {}
      for _, e in ipairs(list_tensors(module, true, self.place_submodules, false)) do
         self.original_devices[#self.original_devices + 1] = { e[1], e[2].device }
      end
      if self.weights_map == nil then
         local wm = {}
         for _, e in ipairs(list_tensors(module, self.offload_buffers, self.place_submodules, false)) do
            wm[e[1]] = e[2]:to("cpu")
         end
         self.weights_map = wm
      end
      -- The offloaded tensors become fresh meta tensors private to this hook: ties to modules
      -- that keep real weights are not disturbed (dispatch_model reties afterwards).
      self.slots = {}
      for _, e in ipairs(list_tensors(module, self.offload_buffers, self.place_submodules, true)) do
         local name, t = e[1], e[2]
         if self.tied_params_map ~= nil and not t:is_meta() and self.tied_params_map[t:data_ptr()] ~= nil then
            self.tied_params_names[name] = true
         end
         -- one meta object per original object, so weights tied by identity stay tied
         local share = self.tied_params_map and self.tied_params_map[M.TIED_META]
         local meta = share and share[t]
         if meta == nil then
            meta = Tensor.empty(t.shape, { dtype = t.dtype, device = "meta" })
            if share then share[t] = meta end
         end
         put_tensor(module, name, meta)
         local owner, leaf = owner_of(module, name)
         self.slots[#self.slots + 1] = { name = name, owner = owner, leaf = leaf, meta_c = meta._c, dtype = t.dtype }
      end
      if self.execution_device ~= nil then
         if not self.offload_buffers then
            for name, b in module:named_buffers("", self.place_submodules) do
               if not b:is_meta() then put_tensor(module, name, b:to(self.execution_device)) end
            end
         else
            local np = non_persistent_buffers(module, self.place_submodules)
            for name, b in module:named_buffers("", self.place_submodules) do
               if np[name] and not b:is_meta() then put_tensor(module, name, b:to(self.execution_device)) end
            end
         end
      end
   end
   return module
end

-- A hook's group lives as long as the hook: dropping a dispatched model without removing its
-- hooks must still free its sources (host weights, mappings) and any uploads streamed ahead.
local function free_group(gid)
   if not runtime_closed and runtime_ptr then lib.ml_hookrt_group_free(runtime_ptr, gid[0]) end
end

-- Registers the hook's tensors with the runtime, resolving each from the weights map once.
-- `on_cpu`: the second group, materialized on the CPU for set_compute_in_place.
function AlignDevicesHook:_group(on_cpu)
   local key = on_cpu and "_cpu_gid" or "_gid"
   if self[key] then return self[key] end
   local rt = M.runtime()
   local dev = Tensor.parse_device("AlignDevicesHook", on_cpu and "cpu" or self.execution_device or "cpu")
   local gid = ffi.new("int[1]")
   C.check(lib.ml_hookrt_group_new(rt, dev, gid))
   local g = gid[0]
   local ok, err = pcall(function()
      for _, s in ipairs(self.slots) do
         local v = wm_index(self.weights_map, s.name)
         if not Tensor.is_tensor(v) then
            error(string.format("AlignDevicesHook: the weights map has no tensor for %q (got %s)", s.name, type(v)), 0)
         end
         s.src = v
         C.check(lib.ml_hookrt_group_add(rt, g, v._c, Tensor.parse_dtype("AlignDevicesHook", s.dtype)))
      end
   end)
   if not ok then
      lib.ml_hookrt_group_free(rt, g)
      error(err, 0)
   end
   self[key] = g
   self[key .. "_guard"] = ffi.gc(ffi.new("int[1]", g), free_group)
   self._outs = self._outs or ffi.new("ml_tensor*[?]", math.max(#self.slots, 1))
   return g
end

-- Whether this call runs on the CPU, every weight in host memory: a lookup table
-- (set_lookup_in_place), or few rows (set_compute_in_place).
function AlignDevicesHook:_runs_in_place(...)
   local lookup = lookup_in_place and self._lookup
   if (in_place_below <= 0 and not lookup) or self.place_submodules or #self.slots == 0 then return false end
   local dev = self.execution_device
   if type(dev) ~= "string" or dev:sub(1, 5) ~= "cuda:" then return false end
   -- (inside a module already running in place its hooked parts follow it, whatever their rows:
   -- Qwen3-Next's conv sees a decoding step's token with the taps before it)
   local x = ...
   if not lookup and in_place_owner == nil
      and (not Tensor.is_tensor(x) or x:dim() == 0 or x:numel() / x:size(-1) >= in_place_below) then
      return false
   end
   if self._host_resident == nil then
      local all = true
      for _, s in ipairs(self.slots) do
         local v = s.src or wm_index(self.weights_map, s.name)
         all = all and Tensor.is_tensor(v) and v.device == "cpu"
      end
      self._host_resident = all
   end
   return self._host_resident
end

-- Drops the slot's reference to its materialized tensor now, not at the next Lua collection:
-- the device memory goes back to the allocator before the next module needs it.
local function release_materialized(s)
   local c = s.dev_c
   if c == nil then return end
   s.dev_c = nil
   ffi.gc(c, nil)
   lib.ml_tensor_release(c)
end

function AlignDevicesHook:pre_forward(module, ...)
   if self.io_same_device then
      -- the model's outermost hook: a forward starts, read its first offloaded weights ahead
      self.input_device = find_device({ ... })
      in_place_owner = nil              -- (a forward that raised left its modules unfinished)
      C.check(lib.ml_hookrt_forward_begins(M.runtime()))
   end
   local in_place
   if self._held_out then
      -- inside hooks.hold, after the first call: the weights are still where that call put them
      in_place = self._in_place
   else
      in_place = self.offload and self:_runs_in_place(...)
   end
   if self.offload and #self.slots > 0 and not self._held_out then
      local g = self:_group(in_place)
      if self._active_gid and self._active_gid ~= g then
         -- the last forward raised before post_forward, on the other device: let its copy go
         C.check(lib.ml_hookrt_release_group(M.runtime(), self._active_gid))
      end
      self._active_gid = g
      local n = #self.slots
      local outs = self._outs
      C.check(lib.ml_hookrt_materialize(M.runtime(), g, outs, n))
      local dev_name = in_place and "cpu" or self.execution_device or "cpu"
      for i = 1, n do
         local s = self.slots[i]
         local c = outs[i - 1]
         local owner, leaf = s.owner, s.leaf
         local cur = owner[leaf]
         if Tensor.is_tensor(cur) and (cur == s.obj or cur:is_meta()) then
            -- ours (still materialized when the last forward raised before post_forward)
            release_materialized(s)
            rawset(cur, "_c", ffi.gc(c, lib.ml_tensor_release))
            s.obj, s.dev_c = cur, c
         elseif Tensor.is_tensor(cur) and cur.device == dev_name then
            -- retied to a live tensor elsewhere (dispatch_model's retie): it is already in place
            lib.ml_tensor_release(c)
            s.obj = nil
         else
            local t = Tensor.wrap(c)
            owner[leaf] = t
            s.obj, s.dev_c = t, c
         end
      end
   end
   self._in_place = in_place
   if in_place then
      in_place_forwards = in_place_forwards + 1
      -- a module inside another one running in place (gpt-oss's attention holds its sinks and
      -- its hooked projections): its outputs stay on the CPU for the enclosing forward
      self._enclosing = in_place_owner or false
      in_place_owner = self
   end
   local dev = in_place and "cpu" or self.execution_device
   if dev == nil then return ... end
   local n = select("#", ...)
   if n == 0 then return end
   local args = { ... }
   local last = args[n]
   for i = 1, n do
      if i == n and is_plain_table(last) then
         args[i] = send_to_device(last, dev, self.skip_keys)
      else
         args[i] = send_to_device(args[i], dev)
      end
   end
   return unpack(args, 1, n)
end

-- Each of a forward's results sent to dev.
local function send_outputs(dev, skip_keys, ...)
   local n = select("#", ...)
   if n <= 1 then return send_to_device((...), dev, skip_keys) end
   local out = { ... }
   for i = 1, n do out[i] = send_to_device(out[i], dev, skip_keys) end
   return unpack(out, 1, n)
end

-- Puts the materialized weights back to meta and lets the runtime release the group.
function AlignDevicesHook:_release()
   for _, s in ipairs(self.slots) do
      if s.obj ~= nil then rawset(s.obj, "_c", s.meta_c) end
      release_materialized(s)
      s.obj = nil
   end
   C.check(lib.ml_hookrt_release_group(M.runtime(), self._active_gid))
   self._active_gid = nil
end

function AlignDevicesHook:post_forward(module, ...)
   local in_place = self._in_place
   if (self._holds or 0) > 0 then
      self._held_out = self._active_gid ~= nil       -- released by hold_end
   else
      if self.offload and self._active_gid then self:_release() end
      self._in_place = false
   end
   if self.io_same_device and self.input_device ~= nil then return send_outputs(self.input_device, self.skip_keys, ...) end
   -- ran on the CPU in place of the execution device: the output goes where it would have been,
   -- unless the enclosing module runs on the CPU too
   if in_place then
      local enclosing = self._enclosing
      in_place_owner = enclosing or nil
      if enclosing then return ... end
      return send_outputs(self.execution_device, self.skip_keys, ...)
   end
   return ...
end

-- hooks.hold: from the first forward on, the weights stay materialized until the hold ends.
function AlignDevicesHook:hold_begin()
   self._holds = (self._holds or 0) + 1
end

function AlignDevicesHook:hold_end()
   self._holds = self._holds - 1
   if self._holds > 0 then return end
   self._held_out = nil
   self._in_place = false
   if self.offload and self._active_gid then self:_release() end
end

function AlignDevicesHook:detach_hook(module)
   if self.offload then
      local u = utils()
      for _, e in ipairs(self.original_devices or {}) do
         local name, dev = e[1], e[2]
         if dev ~= "meta" then
            local v = wm_get(self.weights_map, name)
            local cur = get_tensor(module, name)
            if v ~= nil then
               u.set_module_tensor_to_device(module, name, dev, { value = v })
            elseif cur ~= nil and not cur:is_meta() then
               u.set_module_tensor_to_device(module, name, dev)
            end
         end
      end
      for _, key in ipairs({ "_gid", "_cpu_gid" }) do
         if self[key] then
            lib.ml_hookrt_group_free(M.runtime(), self[key])
            ffi.gc(self[key .. "_guard"], nil)
            self[key], self[key .. "_guard"] = nil, nil
         end
      end
   end
   return module
end
M.AlignDevicesHook = AlignDevicesHook

-- --- attach helpers ---------------------------------------------------------------------------------

local function in_list(list, x)
   if not list then return false end
   for _, v in ipairs(list) do if v == x then return true end end
   return false
end

local function has_state(module)
   local sd = module:state_dict({ keep_vars = true })
   return next(sd) ~= nil
end

--- offload_hook(module) -> module's own offloading AlignDevicesHook (offload = true, with a weights
-- map), or nil: a layer offloaded with its block (preload_module_classes) has none.
function M.offload_hook(module)
   local hook = rawget(module, "_hf_hook")
   if hook == nil or not require("moonload.class").is_a(hook, AlignDevicesHook) or not hook.offload
      or hook.weights_map == nil then
      return nil
   end
   return hook
end

--- offload_like(module, hook, weights_map): module offloaded as hook offloads (its execution
-- device, io and skip settings) over weights_map instead, replacing any hook module had: how a
-- layer swapped for a quantized one, or given new weights, keeps being streamed.
function M.offload_like(module, hook, weights_map)
   if rawget(module, "_hf_hook") ~= nil then M.remove_hook_from_module(module) end
   M.add_hook_to_module(module, AlignDevicesHook({ execution_device = hook.execution_device, offload = true,
      weights_map = weights_map, io_same_device = hook.io_same_device, skip_keys = hook.skip_keys }))
end

--- attach_execution_device_hook(module, execution_device, {skip_keys, preload_module_classes,
-- tied_params_map}): an input-moving AlignDevicesHook on every module (recursively) that has no
-- hook and a non-empty state dict; stops below preload classes.
function M.attach_execution_device_hook(module, execution_device, opts)
   opts = opts or {}
   if module._hf_hook == nil and has_state(module) then
      M.add_hook_to_module(module, AlignDevicesHook({
         execution_device = execution_device, skip_keys = opts.skip_keys,
         tied_params_map = opts.tied_params_map }))
   end
   if in_list(opts.preload_module_classes, module.__name) then return end
   for _, child in module:named_children() do
      M.attach_execution_device_hook(child, execution_device, opts)
   end
end

local function prefixed(weights_map, prefix)
   if weights_map == nil then return nil end
   return utils().PrefixedDataset(weights_map, prefix)
end

local function has_direct_tensors(module)
   for _ in utils().named_module_tensors(module) do return true end
   return false
end

--- attach_align_device_hook(module, {execution_device, offload, weights_map, offload_buffers,
-- module_name, skip_keys, preload_module_classes, tied_params_map}): an AlignDevicesHook
-- (appended) on every module with direct tensors, recursively; a preload-class module with
-- offload loads all its descendants' weights itself and its children get no hook.
function M.attach_align_device_hook(module, opts)
   opts = opts or {}
   local module_name = opts.module_name or ""
   local full_offload = (opts.offload and opts.preload_module_classes
      and in_list(opts.preload_module_classes, module.__name)) or false
   if has_direct_tensors(module) or full_offload then
      local wm = prefixed(opts.weights_map, module_name ~= "" and (module_name .. ".") or "")
      M.add_hook_to_module(module, AlignDevicesHook({
         execution_device = opts.execution_device, offload = opts.offload, weights_map = wm,
         offload_buffers = opts.offload_buffers, place_submodules = full_offload,
         skip_keys = opts.skip_keys, tied_params_map = opts.tied_params_map }), true)
   end
   if full_offload then return end
   for name, child in module:named_children() do
      local o = {}
      for k, v in pairs(opts) do o[k] = v end
      o.module_name = module_name ~= "" and (module_name .. "." .. name) or name
      M.attach_align_device_hook(child, o)
   end
end

--- attach_align_device_hook_on_blocks(module, {execution_device, offload, weights_map,
-- offload_buffers, module_name, skip_keys, preload_module_classes, tied_params_map}):
-- execution_device and offload may be single values or tables keyed by module name (§2.8).
function M.attach_align_device_hook_on_blocks(module, opts)
   opts = opts or {}
   local exec, offload = opts.execution_device, opts.offload or false
   local module_name = opts.module_name or ""
   if type(exec) ~= "table" and type(offload) ~= "table" then
      if not offload then
         M.add_hook_to_module(module, AlignDevicesHook({
            execution_device = exec, io_same_device = true, skip_keys = opts.skip_keys,
            place_submodules = true, tied_params_map = opts.tied_params_map }))
      else
         M.attach_align_device_hook(module, {
            execution_device = exec, offload = true, weights_map = opts.weights_map,
            offload_buffers = opts.offload_buffers, module_name = module_name,
            skip_keys = opts.skip_keys, tied_params_map = opts.tied_params_map })
      end
      return
   end
   if type(exec) ~= "table" then
      local e = {}
      for k in pairs(offload) do e[k] = exec end
      exec = e
   end
   if type(offload) ~= "table" then
      local o = {}
      for k in pairs(exec) do o[k] = offload end
      offload = o
   end
   if exec[module_name] ~= nil and offload[module_name] ~= nil and not offload[module_name] then
      M.add_hook_to_module(module, AlignDevicesHook({
         execution_device = exec[module_name], offload_buffers = opts.offload_buffers,
         io_same_device = module_name == "", place_submodules = true, skip_keys = opts.skip_keys,
         tied_params_map = opts.tied_params_map }))
      M.attach_execution_device_hook(module, exec[module_name], {
         skip_keys = opts.skip_keys, tied_params_map = opts.tied_params_map })
   elseif exec[module_name] ~= nil and offload[module_name] then
      M.attach_align_device_hook(module, {
         execution_device = exec[module_name], offload = true, weights_map = opts.weights_map,
         offload_buffers = opts.offload_buffers, module_name = module_name,
         skip_keys = opts.skip_keys, preload_module_classes = opts.preload_module_classes,
         tied_params_map = opts.tied_params_map })
      if module._hf_hook == nil then
         M.add_hook_to_module(module, AlignDevicesHook({
            execution_device = exec[module_name], io_same_device = module_name == "",
            skip_keys = opts.skip_keys, tied_params_map = opts.tied_params_map }))
      end
      M.attach_execution_device_hook(module, exec[module_name], {
         preload_module_classes = opts.preload_module_classes, skip_keys = opts.skip_keys,
         tied_params_map = opts.tied_params_map })
   elseif module_name == "" then
      M.add_hook_to_module(module, AlignDevicesHook({
         execution_device = exec[""], io_same_device = true, skip_keys = opts.skip_keys,
         tied_params_map = opts.tied_params_map }))
   end
   for name, child in module:named_children() do
      local o = {}
      for k, v in pairs(opts) do o[k] = v end
      o.execution_device, o.offload = exec, offload
      o.module_name = module_name ~= "" and (module_name .. "." .. name) or name
      M.attach_align_device_hook_on_blocks(child, o)
   end
end

-- --- CpuOffload -------------------------------------------------------------------------------------

local function first_param(module)
   for _, p in module:named_parameters() do return p end
   return nil
end

local function default_device()
   if lib.ml_cuda_device_count() > 0 then return "cuda:0" end
   return "cpu"
end

local UserCpuOffloadHook = class.new("UserCpuOffloadHook")

--- UserCpuOffloadHook(model, hook): :offload() puts the model back on the CPU, :remove() detaches.
function UserCpuOffloadHook:__init(model, hook)
   self.model = model
   self.hook = hook
end
function UserCpuOffloadHook:offload() self.hook:init_hook(self.model) end
function UserCpuOffloadHook:remove() M.remove_hook_from_module(self.model) end
M.UserCpuOffloadHook = UserCpuOffloadHook

--- CpuOffload({execution_device, prev_module_hook}): keeps the whole model on the CPU until its
-- forward, moves it to the execution device there and leaves it there; a previous model's
-- UserCpuOffloadHook is offloaded first.
local CpuOffload = ModelHook:extend("CpuOffload")
function CpuOffload:__init(opts)
   opts = opts or {}
   self.execution_device = norm_device(opts.execution_device) or default_device()
   self.prev_module_hook = opts.prev_module_hook
end
function CpuOffload:__repr()
   return string.format("CpuOffload(execution_device=%s)", tostring(self.execution_device))
end
function CpuOffload:init_hook(module)
   return module:to("cpu")
end
function CpuOffload:pre_forward(module, ...)
   local prev = self.prev_module_hook
   if prev ~= nil and class.is_a(prev, UserCpuOffloadHook) then
      local p = first_param(prev.model)
      if p ~= nil and p.device ~= "cpu" then prev:offload() end
   end
   local p = first_param(module)
   if p ~= nil and p.device == self.execution_device then return ... end
   module:to(self.execution_device)
   local n = select("#", ...)
   local args = { ... }
   for i = 1, n do args[i] = send_to_device(args[i], self.execution_device) end
   return unpack(args, 1, n)
end
M.CpuOffload = CpuOffload

M.warn = log.warn

return M
