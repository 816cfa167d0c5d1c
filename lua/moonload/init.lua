--- moonload: big-model inference for LuaJIT. `local ml = require("moonload")`.
-- Tensor constructors and math live here directly; submodules (ml.nn, ml.hooks, ml.utils,
-- ml.safetensors, ml.models, ml.tokenizers) load on first use, and the big-model functions of
-- moonload.big_modeling (init_empty_weights, dispatch_model, ...) are reachable as ml.<name>.
local C = require("moonload.C")
local Tensor = require("moonload.tensor")

local ffi, lib = C.ffi, C.lib

local ml = {}

ml.Tensor = Tensor
ml.is_tensor = Tensor.is_tensor
ml.tensor, ml.empty, ml.zeros, ml.ones, ml.full = Tensor.tensor, Tensor.empty, Tensor.zeros, Tensor.ones, Tensor.full
ml.arange, ml.rand, ml.randn = Tensor.arange, Tensor.rand, Tensor.randn
ml.cat, ml.stack, ml.where = Tensor.cat, Tensor.stack, Tensor.where

-- Every tensor method is also a function: ml.add(a, b), ml.softmax(x, -1), ml.matmul(a, b).
-- ml.cuda is the module (torch.cuda); calling it still moves a tensor, as the method export would.
ml.cuda = require("moonload.cuda")

for name, fn in pairs(Tensor.methods) do
   if ml[name] == nil then ml[name] = fn end
end

--- Seeds the generator behind rand/randn, sampling and module initialisation.
function ml.manual_seed(n)
   lib.ml_manual_seed(n)
end

function ml.set_num_threads(n) lib.ml_set_num_threads(n) end
function ml.get_num_threads() return lib.ml_get_num_threads() end

--- set_quantized_activations("int8" | "float32") -> previous: how int8 and int4 linears meet
-- their input on the CPU. "int8" (or MOONLOAD_QUANTIZED_ACTIVATIONS=int8 at start) rounds each
-- row to int8 in blocks of 32 and multiplies integers, as llama.cpp and PyTorch's dynamic int8
-- do: faster, with a second rounding. "float32", the default, widens the weights instead.
local activation_bits = { float32 = 0, int8 = 8 }
function ml.set_quantized_activations(dtype)
   local bits = activation_bits[dtype]
   if not bits then
      error("set_quantized_activations: expected \"int8\" or \"float32\", got " .. tostring(dtype), 2)
   end
   local previous = ml.get_quantized_activations()
   C.check(lib.ml_set_quantized_activations(bits))
   return previous
end

function ml.get_quantized_activations()
   return lib.ml_get_quantized_activations() == 8 and "int8" or "float32"
end

local activations_env = os.getenv("MOONLOAD_QUANTIZED_ACTIVATIONS")
if activations_env and activations_env ~= "" then
   if not activation_bits[activations_env] then
      error('MOONLOAD_QUANTIZED_ACTIVATIONS must be "int8" or "float32", got ' .. activations_env, 2)
   end
   ml.set_quantized_activations(activations_env)
end

--- Bytes moonload holds on a device now and at most since the last reset: in_use, peak.
function ml.memory_allocated(device)
   local d = Tensor.parse_device("memory_allocated", device or "cpu")
   local in_use, peak = ffi.new("int64_t[1]"), ffi.new("int64_t[1]")
   C.check(lib.ml_device_memory(d, in_use, peak))
   return tonumber(in_use[0]), tonumber(peak[0])
end

function ml.reset_peak_memory(device)
   C.check(lib.ml_device_reset_peak(Tensor.parse_device("reset_peak_memory", device or "cpu")))
end

--- set_gc_cap(device, bytes) -> previous: dead tensors never hold more than `bytes` on the
-- device before moonload runs a full collection (0 restores the default rule: cpu 64 MiB or a
-- quarter of the live bytes, cuda 64 MiB or a quarter of the free memory). A device map planned with reserve_for
-- sets it to the garbage share of the memory it reserved.
local cap_prev = ffi.new("int64_t[1]")
function ml.set_gc_cap(device, bytes)
   local d = Tensor.parse_device("set_gc_cap", device)
   if type(bytes) ~= "number" or bytes < 0 or bytes ~= math.floor(bytes) then
      error("set_gc_cap: bytes must be an integer >= 0, got " .. tostring(bytes), 2)
   end
   C.check(lib.ml_gc_set_cap(d, bytes, cap_prev))
   return tonumber(cap_prev[0])
end

function ml.cuda_device_count() return lib.ml_cuda_device_count() end

--- Bytes of freed large CPU blocks kept for reuse by the next tensors of the same size.
function ml.cpu_cached_bytes() return tonumber(lib.ml_cpu_cached_bytes()) end

--- The most bytes that cache keeps (MOONLOAD_CPU_CACHE_MB, default 256 MiB).
function ml.cpu_cache_limit() return tonumber(lib.ml_cpu_cache_limit()) end

--- Sets that limit (0 turns the cache off), giving back what is cached beyond it; returns the
-- previous limit. A device map planned with reserve_for sets it to the plan's garbage share.
function ml.set_cpu_cache_limit(bytes)
   if type(bytes) ~= "number" or bytes < 0 or bytes ~= math.floor(bytes) then
      error("set_cpu_cache_limit: bytes must be an integer >= 0, got " .. tostring(bytes), 2)
   end
   return tonumber(lib.ml_cpu_cache_set_limit(bytes))
end

--- Gives the cached CPU blocks back to the operating system.
function ml.empty_cache() lib.ml_cpu_empty_cache() end

-- Submodules, loaded lazily so `require("moonload")` stays cheap and free of cycles.
local submodules = {
   nn = "moonload.nn", hooks = "moonload.hooks", utils = "moonload.utils",
   safetensors = "moonload.safetensors", gguf = "moonload.gguf", models = "moonload.models", tokenizers = "moonload.tokenizers",
}
-- Names exported at the top level from other modules, as Accelerate does.
local reexports = {
   init_empty_weights = "moonload.big_modeling", init_on_device = "moonload.big_modeling",
   cpu_offload = "moonload.big_modeling", cpu_offload_with_hook = "moonload.big_modeling",
   disk_offload = "moonload.big_modeling", dispatch_model = "moonload.big_modeling",
   load_checkpoint_and_dispatch = "moonload.big_modeling",
   infer_auto_device_map = "moonload.utils", quantize = "moonload.quantize", save_model = "moonload.save",
}

setmetatable(ml, {
   __index = function(t, k)
      local mod = submodules[k]
      if mod then
         local v = require(mod)
         rawset(t, k, v)
         return v
      end
      mod = reexports[k]
      if mod then
         local v = require(mod)[k]
         rawset(t, k, v)
         return v
      end
      return nil
   end,
})

ml.__version = "0.1.0"

return ml
