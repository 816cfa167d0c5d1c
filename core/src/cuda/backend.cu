// backend.cu: libmoonload_cuda.so's entry point and device plumbing: per-device streams and
// cuBLAS handles, a caching allocator (freed blocks are kept per size and reused, so weights
// released after a layer's forward are re-used by the next layer without cudaFree/cudaMalloc),
// pinned host memory, synchronous and asynchronous copies with events.
#include "common.cuh"

#include <mutex>
#include <unordered_map>
#include <vector>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// --- devices ------------------------------------------------------------------------------

static DeviceState g_states[ML_CUDA_MAX_DEVICES];
static std::mutex g_state_mutex;
static int g_device_count = -1;

static int device_count(void) {
  if (g_device_count < 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    g_device_count = n > ML_CUDA_MAX_DEVICES ? ML_CUDA_MAX_DEVICES : n;
  }
  return g_device_count;
}

ml_status ml_cuda_device_state(int device, DeviceState **out) {
  if (device < 0 || device >= device_count())
    return ml_fail(ML_EINVAL, "device cuda:%d does not exist (%d CUDA devices)", device, device_count());
  CUDA_TRY(cudaSetDevice(device));
  DeviceState *s = &g_states[device];
  if (!s->ready) {
    std::lock_guard<std::mutex> lock(g_state_mutex);
    if (!s->ready) {
      CUDA_TRY(cudaStreamCreateWithFlags(&s->compute, cudaStreamNonBlocking));
      CUDA_TRY(cudaStreamCreateWithFlags(&s->copy, cudaStreamNonBlocking));
      CUBLAS_TRY(cublasCreate(&s->blas));
      CUBLAS_TRY(cublasSetStream(s->blas, s->compute));
      // Float32 GEMMs stay exact float32 unless the user opts into TF32.
      const char *tf32 = getenv("MOONLOAD_ALLOW_TF32");
      CUBLAS_TRY(cublasSetMathMode(s->blas, tf32 && tf32[0] == '1' ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
      s->ready = true;
    }
  }
  *out = s;
  return ML_OK;
}

// --- caching allocator -------------------------------------------------------------------

// Sizes are rounded to classes so that blocks of nearby sizes are interchangeable: 2 MiB granules
// from 1 MiB up (the driver's own page), below that eight classes per power of two (at most 1/8
// more than asked), and 512 B granules under 4 KiB. A tensor that grows a little each step (a
// cache built with cat) then reuses the block it had for several steps, instead of leaving a block of every
// size it passed through in the cache; weights of one shape always land in the same class.
static size_t round_size(size_t n) {
  if (n == 0) n = 1;
  if (n >= ((size_t)1 << 20)) return (n + (2u << 20) - 1) & ~(size_t)((2u << 20) - 1);
  if (n <= 4096) return (n + 511) & ~(size_t)511;
  size_t p = (size_t)1 << (63 - __builtin_clzll((unsigned long long)(n - 1)));   // p < n <= 2p
  size_t step = p / 8;
  return (n + step - 1) / step * step;
}

struct DevicePool {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<void *>> free_blocks;   // rounded size -> cached blocks
  size_t cached_bytes = 0;
};
static DevicePool g_pools[ML_CUDA_MAX_DEVICES];

static void release_cached(int device) {
  DevicePool &pool = g_pools[device];
  for (auto &kv : pool.free_blocks)
    for (void *p : kv.second) cudaFree(p);
  pool.free_blocks.clear();
  pool.cached_bytes = 0;
}

static ml_status out_of_memory(int device, size_t size, cudaError_t e) {
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  return ml_fail(ML_ENOMEM, "cuda:%d: out of memory allocating %zu bytes (%zu of %zu bytes free): %s", device, size,
                 free_b, total_b, cudaGetErrorString(e));
}

// MOONLOAD_CUDA_NO_CACHING=1: exact sizes, freed at once (as PyTorch's
// PYTORCH_NO_CUDA_MEMORY_CACHING), so memory checkers see every overrun; slow.
static bool no_caching(void) {
  static int v = -1;
  if (v < 0) {
    const char *e = getenv("MOONLOAD_CUDA_NO_CACHING");
    v = e && e[0] == '1';
  }
  return v == 1;
}

// cudaMalloc, and when the driver is out of memory: hand the cache back to it, then ask the core
// for memory it can give back (the uploads the hook runtime streamed ahead), trying once more
// after each. A caller that can do without (may_wait false) only gets what is free now, so it
// never stalls the device or empties the cache.
static cudaError_t device_malloc(int device, DeviceState *st, size_t size, bool may_wait, void **p) {
  cudaError_t e = cudaMalloc(p, size);
  for (int attempt = 0; may_wait && e == cudaErrorMemoryAllocation && attempt < 2; attempt++) {
    cudaGetLastError();
    if (attempt == 1 && ml_cuda_reclaim(device) == 0) break;
    cudaStreamSynchronize(st->compute);
    {
      std::lock_guard<std::mutex> lock(g_pools[device].mutex);
      release_cached(device);
    }
    e = cudaMalloc(p, size);
  }
  if (e != cudaSuccess) cudaGetLastError();
  return e;
}

static ml_status pool_alloc_impl(int device, size_t nbytes, bool may_wait, void **out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(device, &st));
  size_t size = no_caching() ? (nbytes ? nbytes : 1) : round_size(nbytes);
  if (!no_caching()) {
    DevicePool &pool = g_pools[device];
    std::lock_guard<std::mutex> lock(pool.mutex);
    auto it = pool.free_blocks.find(size);
    if (it != pool.free_blocks.end() && !it->second.empty()) {
      *out = it->second.back();
      it->second.pop_back();
      pool.cached_bytes -= size;
      return ML_OK;
    }
  }
  void *p = NULL;
  cudaError_t e = device_malloc(device, st, size, may_wait, &p);
  if (e != cudaSuccess) return may_wait ? out_of_memory(device, size, e) : ML_ENOMEM;
  *out = p;
  return ML_OK;
}

static ml_status pool_alloc(int device, size_t nbytes, void **out) { return pool_alloc_impl(device, nbytes, true, out); }
static ml_status pool_alloc_if_free(int device, size_t nbytes, void **out) {
  return pool_alloc_impl(device, nbytes, false, out);
}

static void pool_free(int device, void *p, size_t nbytes) {
  if (!p || device < 0 || device >= ML_CUDA_MAX_DEVICES) return;
  if (no_caching()) {
    cudaSetDevice(device);
    cudaFree(p);   // waits for the queued work that may still use p
    return;
  }
  // Kernels reading p may still be queued on the compute stream; reuse is ordered on that same
  // stream, so caching the block without a sync is safe.
  DevicePool &pool = g_pools[device];
  std::lock_guard<std::mutex> lock(pool.mutex);
  size_t size = round_size(nbytes);
  pool.free_blocks[size].push_back(p);
  pool.cached_bytes += size;
}

static size_t cached_bytes(int device) {
  std::lock_guard<std::mutex> lock(g_pools[device].mutex);
  return g_pools[device].cached_bytes;
}

// cudaFree waits for the device's queued work, so no kernel still uses a block given back.
static ml_status empty_cache(int device) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(device, &st));
  std::lock_guard<std::mutex> lock(g_pools[device].mutex);
  release_cached(device);
  return ML_OK;
}

ml_status ml_cuda_scratch(int device, size_t nbytes, void **out) { return pool_alloc(device, nbytes, out); }
void ml_cuda_scratch_free(int device, void *p, size_t nbytes) { pool_free(device, p, nbytes); }

static ml_status alloc_pinned(size_t nbytes, void **out) {
  CUDA_TRY(cudaHostAlloc(out, nbytes ? nbytes : 1, cudaHostAllocPortable));
  return ML_OK;
}

static void free_pinned(void *p) { if (p) cudaFreeHost(p); }

static ml_status host_register(void *p, size_t nbytes, bool read_only) {
  CUDA_TRY(cudaHostRegister(p, nbytes, cudaHostRegisterPortable | (read_only ? cudaHostRegisterReadOnly : 0)));
  return ML_OK;
}

static void host_unregister(void *p) { if (p) cudaHostUnregister(p); }

// --- copies --------------------------------------------------------------------------------

static cudaMemcpyKind kind_of(int kind) {
  return kind == 0 ? cudaMemcpyHostToDevice : kind == 1 ? cudaMemcpyDeviceToHost : cudaMemcpyDeviceToDevice;
}

static ml_status copy_sync(int device, void *dst, const void *src, size_t nbytes, int kind) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(device, &st));
  if (nbytes == 0) return ML_OK;
  CUDA_TRY(cudaMemcpyAsync(dst, src, nbytes, kind_of(kind), st->compute));
  CUDA_TRY(cudaStreamSynchronize(st->compute));
  return ML_OK;
}

static ml_status copy_async(int device, void *dst, const void *src, size_t nbytes, int kind) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(device, &st));
  if (nbytes) CUDA_TRY(cudaMemcpyAsync(dst, src, nbytes, kind_of(kind), st->copy));
  return ML_OK;
}

static ml_status event_record(int device, bool on_copy_stream, void **event_out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(device, &st));
  cudaEvent_t ev;
  CUDA_TRY(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  cudaError_t e = cudaEventRecord(ev, on_copy_stream ? st->copy : st->compute);
  if (e != cudaSuccess) {
    cudaEventDestroy(ev);
    return ml_fail(ML_EIO, "cudaEventRecord failed: %s", cudaGetErrorString(e));
  }
  *event_out = (void *)ev;
  return ML_OK;
}

static ml_status event_wait(int device, bool on_copy_stream, void *event) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(device, &st));
  CUDA_TRY(cudaStreamWaitEvent(on_copy_stream ? st->copy : st->compute, (cudaEvent_t)event, 0));
  return ML_OK;
}

static ml_status event_sync(void *event) {
  CUDA_TRY(cudaEventSynchronize((cudaEvent_t)event));
  return ML_OK;
}

// Not ready is no error, but CUDA records it as the last one: cleared, or the next launch check
// would report it.
static ml_status event_query(void *event, bool *done) {
  cudaError_t e = cudaEventQuery((cudaEvent_t)event);
  *done = e == cudaSuccess;
  if (e == cudaErrorNotReady) {
    cudaGetLastError();
    return ML_OK;
  }
  if (e != cudaSuccess) return ml_fail(ML_EIO, "cudaEventQuery failed: %s", cudaGetErrorString(e));
  return ML_OK;
}

static void event_free(void *event) { if (event) cudaEventDestroy((cudaEvent_t)event); }

static ml_status synchronize(int device) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(device, &st));
  CUDA_TRY(cudaStreamSynchronize(st->compute));
  CUDA_TRY(cudaStreamSynchronize(st->copy));
  return ML_OK;
}

static ml_status mem_info(int device, size_t *free_bytes, size_t *total_bytes) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(device, &st));
  CUDA_TRY(cudaMemGetInfo(free_bytes, total_bytes));
  // Blocks cached by the allocator are free as far as moonload's planner is concerned.
  std::lock_guard<std::mutex> lock(g_pools[device].mutex);
  *free_bytes += g_pools[device].cached_bytes;
  return ML_OK;
}

static ml_status properties(int device, ml_cuda_props *out) {
  cudaDeviceProp p;
  CUDA_TRY(cudaGetDeviceProperties(&p, device));
  memset(out, 0, sizeof *out);
  snprintf(out->name, sizeof out->name, "%s", p.name);
  out->total_memory = (int64_t)p.totalGlobalMem;
  out->major = p.major;
  out->minor = p.minor;
  out->multi_processor_count = p.multiProcessorCount;
  return ML_OK;
}

// --- descriptors ---------------------------------------------------------------------------

TensorDesc ml_cuda_desc(const ml_tensor *t) {
  TensorDesc d;
  d.data = ml_tensor_data(t);
  d.dtype = (int)ml_tensor_dtype(t);
  d.ndim = ml_tensor_ndim(t);
  const int64_t *sh = ml_tensor_shape(t), *st = ml_tensor_strides(t);
  for (int i = 0; i < d.ndim; i++) { d.shape[i] = sh[i]; d.strides[i] = st[i]; }
  return d;
}

TensorDesc ml_cuda_desc_broadcast(const ml_tensor *t, int ndim, const int64_t *shape) {
  TensorDesc d;
  d.data = ml_tensor_data(t);
  d.dtype = (int)ml_tensor_dtype(t);
  d.ndim = ndim;
  int tn = ml_tensor_ndim(t), lead = ndim - tn;
  const int64_t *sh = ml_tensor_shape(t), *st = ml_tensor_strides(t);
  for (int i = 0; i < ndim; i++) {
    int j = i - lead;
    d.shape[i] = shape[i];
    d.strides[i] = (j < 0 || (sh[j] == 1 && shape[i] != 1)) ? 0 : st[j];
  }
  return d;
}

int ml_cuda_device_of(const ml_tensor *t) { return ml_tensor_device(t).index; }

bool ml_cuda_is_contiguous(const TensorDesc &d) {
  int64_t expect = 1;
  for (int i = d.ndim - 1; i >= 0; i--) {
    if (d.shape[i] == 1) continue;
    if (d.strides[i] != expect) return false;
    expect *= d.shape[i];
  }
  return true;
}

int64_t ml_cuda_numel(const TensorDesc &d) {
  int64_t n = 1;
  for (int i = 0; i < d.ndim; i++) n *= d.shape[i];
  return n;
}

// --- the table -------------------------------------------------------------------------------

static ml_cuda_api g_api;

extern "C" __attribute__((visibility("default"))) const ml_cuda_api *ml_cuda_backend(char *err, size_t n) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    snprintf(err, n, "CUDA is not available: %s (no NVIDIA driver or GPU on this machine?)", cudaGetErrorString(e));
    return NULL;
  }
  g_api.version = ML_CUDA_API_VERSION;
  g_api.device_count = device_count;
  g_api.alloc = pool_alloc;
  g_api.alloc_if_free = pool_alloc_if_free;
  g_api.free = pool_free;
  g_api.alloc_pinned = alloc_pinned;
  g_api.free_pinned = free_pinned;
  g_api.host_register = host_register;
  g_api.host_unregister = host_unregister;
  g_api.memcpy = copy_sync;
  g_api.mem_info = mem_info;
  g_api.properties = properties;
  g_api.unary = ml_cuda_unary;
  g_api.binary = ml_cuda_binary;
  g_api.copy_strided = ml_cuda_copy_strided;
  g_api.binary_scalar = ml_cuda_binary_scalar;
  g_api.fill = ml_cuda_fill;
  g_api.reduce = ml_cuda_reduce;
  g_api.softmax = ml_cuda_softmax;
  g_api.matmul = ml_cuda_matmul;
  g_api.linear = ml_cuda_linear;
  g_api.embedding = ml_cuda_embedding;
  g_api.layer_norm = ml_cuda_layer_norm;
  g_api.rms_norm = ml_cuda_rms_norm;
  g_api.sdpa = ml_cuda_sdpa;
  g_api.where = ml_cuda_where;
  g_api.copy_async = copy_async;
  g_api.event_record = event_record;
  g_api.event_wait = event_wait;
  g_api.event_sync = event_sync;
  g_api.event_free = event_free;
  g_api.event_query = event_query;
  g_api.synchronize = synchronize;
  g_api.triangle = ml_cuda_triangle;
  g_api.gather = ml_cuda_gather;
  g_api.index_select = ml_cuda_index_select;
  g_api.cumsum = ml_cuda_cumsum;
  g_api.rotary_embedding = ml_cuda_rotary_embedding;
  g_api.random_fill = ml_cuda_random_fill;
  g_api.topk = ml_cuda_topk;
  g_api.q8_linear = ml_cuda_q8_linear;
  g_api.quantize_q8_into = ml_cuda_quantize_q8_into;
  g_api.dequantize_q8 = ml_cuda_dequantize_q8;
  g_api.sdpa_q8 = ml_cuda_sdpa_q8;
  g_api.quantize_q4 = ml_cuda_quantize_q4;
  g_api.q4_linear = ml_cuda_q4_linear;
  g_api.dequantize_q4 = ml_cuda_dequantize_q4;
  g_api.dequantize_fp8_blocks = ml_cuda_dequantize_fp8_blocks;
  g_api.dequantize_mxfp4 = ml_cuda_dequantize_mxfp4;
  g_api.gated_delta_rule = ml_cuda_gated_delta_rule;
  g_api.ssm_scan = ml_cuda_ssm_scan;
  g_api.cached_bytes = cached_bytes;
  g_api.empty_cache = empty_cache;
  return &g_api;
}
