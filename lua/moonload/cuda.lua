-- ml.cuda: the GPUs as torch.cuda shows them: availability, synchronisation, and the caching
-- allocator's numbers. Devices are an index N (cuda:N) or a "cuda:N" string; default 0.
local C = require("moonload.C")
local Tensor = require("moonload.tensor")

local ffi, lib, check = C.ffi, C.lib, C.check

local M = {}

local function index_of(fn, device)
   if device == nil then return 0 end
   if type(device) == "number" then return device end
   local d = Tensor.parse_device(fn, device)
   if d.type ~= lib.ML_DEVICE_CUDA then
      error(string.format('%s: expected a cuda device, got "%s"', fn, tostring(device)), 3)
   end
   return d.index
end

--- True when a CUDA driver and at least one GPU are there (never raises).
function M.is_available() return lib.ml_cuda_device_count() > 0 end

function M.device_count() return lib.ml_cuda_device_count() end

--- Waits until every queued kernel and copy on the device has finished.
function M.synchronize(device)
   check(lib.ml_cuda_synchronize(index_of("synchronize", device)), 2)
end

--- Gives the allocator's idle blocks back to the driver (for other processes).
function M.empty_cache(device)
   check(lib.ml_cuda_empty_cache(index_of("empty_cache", device)), 2)
end

-- ml.memory_allocated / ml.reset_peak_memory count every device; these are their cuda views.
local function memory(fn, device)
   local i = index_of(fn, device)
   local in_use, peak = require("moonload").memory_allocated("cuda:" .. i)
   return in_use, peak, i
end

--- Bytes held by tensors on the device now, and at most since the last reset.
function M.memory_allocated(device) return (memory("memory_allocated", device)) end

function M.max_memory_allocated(device)
   local _, peak = memory("max_memory_allocated", device)
   return peak
end

--- Bytes the allocator holds: in tensors plus idle blocks kept for reuse.
function M.memory_reserved(device)
   local in_use, _, i = memory("memory_reserved", device)
   local cached = ffi.new("int64_t[1]")
   check(lib.ml_cuda_cached_bytes(i, cached), 2)
   return in_use + tonumber(cached[0])
end

function M.reset_peak_memory_stats(device)
   require("moonload").reset_peak_memory("cuda:" .. index_of("reset_peak_memory_stats", device))
end

--- free, total bytes of the device (idle allocator blocks count as free).
function M.mem_get_info(device)
   local f, t = ffi.new("int64_t[1]"), ffi.new("int64_t[1]")
   check(lib.ml_cuda_mem_get_info(index_of("mem_get_info", device), f, t), 2)
   return tonumber(f[0]), tonumber(t[0])
end

local function properties(fn, device)
   local p = ffi.new("ml_cuda_props")
   check(lib.ml_cuda_get_device_properties(index_of(fn, device), p), 3)
   return { name = ffi.string(p.name), total_memory = tonumber(p.total_memory), major = p.major, minor = p.minor,
            multi_processor_count = p.multi_processor_count }
end

--- get_device_properties([device]): {name, total_memory, major, minor, multi_processor_count},
-- as torch.cuda.get_device_properties.
function M.get_device_properties(device) return properties("get_device_properties", device) end

--- get_device_name([device]): the GPU's name ("NVIDIA H200").
function M.get_device_name(device) return properties("get_device_name", device).name end

--- get_device_capability([device]): major, minor (torch returns them as a tuple).
function M.get_device_capability(device)
   local p = properties("get_device_capability", device)
   return p.major, p.minor
end

-- ml.cuda(t[, i]) is t:cuda(i), like the other tensor methods exported on ml.
return setmetatable(M, { __call = function(_, t, i) return t:cuda(i) end })
