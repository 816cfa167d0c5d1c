// cudasim.h: a CPU emulation of the part of CUDA that moonload's backend uses, so the .cu files
// under core/src/cuda run, unchanged but for their launch syntax, on machines with no GPU.
//
// What is emulated, and how faithfully:
// - Kernels: every thread of a block is a fiber; __syncthreads and warp shuffles are barriers
//   between fibers, so block reductions run exactly as written. A barrier some threads never
//   reach, or a full-mask shuffle after lanes exited, is reported as the bug it would be.
//   Between barriers the threads run in index order, reversed, or shuffled
//   (MOONLOAD_CUDASIM_THREAD_ORDER), so a shared-memory handoff missing its barrier shows.
//   Blocks run one after another; __shared__ variables are per-stream statics.
// - Streams are worker threads that run their queue in order; events, cudaStreamWaitEvent and
//   the pageable/pinned copy rules follow the CUDA documentation, so a missing wait between the
//   copy and compute streams shows up as a wrong result (MOONLOAD_CUDASIM_JITTER_US delays
//   stream work at random to make such races likely).
// - Device memory is a registry of host allocations filled with 0xFF (NaN) bytes: launches,
//   copies and GEMMs check that every pointer and every strided descriptor stays inside one
//   allocation of the right kind, and a budget (MOONLOAD_CUDASIM_MEM_MB) makes cudaMalloc fail.
// - cuBLAS GemmStridedBatchedEx is a reference loop with cuBLAS's argument checks.
// Not emulated: timing, warp-level implicit synchronisation, memory consistency subtleties.
// A violation prints "cudasim: ..." and aborts: on a GPU it would be an illegal address or a
// hang, never a clean error.
//
// Settings (environment): MOONLOAD_CUDASIM_DEVICES (1), MOONLOAD_CUDASIM_MEM_MB per device
// (4096), MOONLOAD_CUDASIM_JITTER_US (0: a random delay up to this before each stream operation),
// MOONLOAD_CUDASIM_COPY_DELAY_US (0: every queued copy held back this long),
// MOONLOAD_CUDASIM_THREAD_ORDER (forward | reverse | random). `make test-cuda-sim` uses 2 devices,
// 1024 MB, 200 us, 2000 us and random. The library is loaded through MOONLOAD_CUDA_LIB.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "moonload.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static thread_local
#define __launch_bounds__(...)

struct uint3 { unsigned x, y, z; };
struct alignas(16) int4 { int x, y, z, w; };   // (16-byte vector loads)
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

// --- runtime API ---------------------------------------------------------------------------

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorHostMemoryAlreadyRegistered = 712,
  cudaErrorHostMemoryNotRegistered = 713,
};

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

struct CUstream_st;
struct CUevent_st;
typedef CUstream_st *cudaStream_t;
typedef CUevent_st *cudaEvent_t;

#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaEventDefault 0x00
#define cudaEventDisableTiming 0x02
#define cudaHostAllocDefault 0x00
#define cudaHostAllocPortable 0x01
#define cudaHostRegisterDefault 0x00
#define cudaHostRegisterPortable 0x01
#define cudaHostRegisterReadOnly 0x08

cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorString(cudaError_t e);
const char *cudaGetErrorName(cudaError_t e);
cudaError_t cudaMalloc(void **p, size_t n);
cudaError_t cudaFree(void *p);
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags);
cudaError_t cudaFreeHost(void *p);
// Host memory page-locked where it lies: an overlap with anything registered or allocated fails, as
// CUDA's does; copies from it are ordered on their stream as from pinned memory.
cudaError_t cudaHostRegister(void *p, size_t n, unsigned flags);
cudaError_t cudaHostUnregister(void *p);
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes);
// The fields moonload reads; an emulated device says it is "cudasim", compute capability 9.0.
struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  int major, minor;
  int multiProcessorCount;
};
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind kind, cudaStream_t s = 0);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = 0);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
// cudaErrorNotReady (recorded as the last error, which callers must clear) until the work before
// the newest record is done.
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventDestroy(cudaEvent_t e);

// --- device side ---------------------------------------------------------------------------

namespace cudasim {

struct ThreadCtx {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern thread_local ThreadCtx *tls_ctx;   // the fiber running now

void syncthreads();
// Every live lane of the calling warp deposits `in`; each then reads lane src_lane's value
// (its own when src_lane lies outside the warp).
void warp_exchange(const void *in, void *out, size_t n, int src_lane, unsigned mask);
int lane_id();

// Enqueues body (run once per thread) as a grid on stream s; checks the launch configuration.
void launch_grid(const char *kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                 std::function<void()> body);
// Aborts unless [p, p + n) lies inside one device allocation.
void check_device_range(const char *kernel, int arg, const void *p, size_t n);

}  // namespace cudasim

#define threadIdx (cudasim::tls_ctx->thread_idx)
#define blockIdx (cudasim::tls_ctx->block_idx)
#define blockDim (cudasim::tls_ctx->block_dim)
#define gridDim (cudasim::tls_ctx->grid_dim)

inline void __syncthreads() { cudasim::syncthreads(); }

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  int lane = cudasim::lane_id(), seg = lane - lane % width, src = lane + (int)delta;
  T out;
  cudasim::warp_exchange(&v, &out, sizeof v, src < seg + width ? src : lane, mask);
  return out;
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  int lane = cudasim::lane_id(), seg = lane - lane % width, src = lane - (int)delta;
  T out;
  cudasim::warp_exchange(&v, &out, sizeof v, src >= seg ? src : lane, mask);
  return out;
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  int lane = cudasim::lane_id(), seg = lane - lane % width, src = lane ^ lane_mask;
  T out;
  cudasim::warp_exchange(&v, &out, sizeof v, src >= seg && src < seg + width ? src : lane, mask);
  return out;
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  int lane = cudasim::lane_id(), seg = lane - lane % width;
  T out;
  cudasim::warp_exchange(&v, &out, sizeof v, seg + src_lane % width, mask);
  return out;
}

// Blocks of one grid run one at a time on one thread, so plain read-modify-write is atomic.
inline unsigned long long atomicCAS(unsigned long long *p, unsigned long long cmp, unsigned long long v) {
  unsigned long long old = *p;
  if (old == cmp) *p = v;
  return old;
}
inline int atomicCAS(int *p, int cmp, int v) { int old = *p; if (old == cmp) *p = v; return old; }
template <typename T> T atomicAdd(T *p, T v) { T old = *p; *p = old + v; return old; }
template <typename T> T atomicMax(T *p, T v) { T old = *p; if (v > old) *p = v; return old; }
template <typename T> T atomicMin(T *p, T v) { T old = *p; if (v < old) *p = v; return old; }

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <typename T> T __ldg(const T *p) { return *p; }

// --- launches ------------------------------------------------------------------------------
// tests/cudasim/launch.pl rewrites `kernel<<<grid, block[, smem[, stream]]>>>(args)` into
// `cudasim::launch(kernel, "kernel", grid, block[, smem[, stream]])(args)`.

namespace cudasim {

// A strided tensor descriptor: anything with data, dtype, ndim, shape[] and strides[].
template <class T, class = void> struct is_desc : std::false_type {};
template <class T>
struct is_desc<T, std::void_t<decltype(std::declval<T &>().data), decltype(std::declval<T &>().dtype),
                              decltype(std::declval<T &>().ndim), decltype(std::declval<T &>().shape[0]),
                              decltype(std::declval<T &>().strides[0])>> : std::true_type {};

// Pointers and descriptors handed to a kernel must address device memory.
template <class T> void check_arg(const char *kernel, int i, const T &v) {
  if constexpr (std::is_pointer_v<T>) {
    if (v) check_device_range(kernel, i, (const void *)v, 1);
  } else if constexpr (is_desc<T>::value) {
    int64_t lo = 0, hi = 0;
    for (int d = 0; d < v.ndim; d++) {
      if (v.shape[d] == 0) return;
      int64_t span = (v.shape[d] - 1) * v.strides[d];
      if (span < 0) lo += span; else hi += span;
    }
    size_t es = ml_dtype_size((ml_dtype)v.dtype);
    check_device_range(kernel, i, (const char *)v.data + lo * (int64_t)es, (size_t)(hi - lo + 1) * es);
  }
}

template <class... P> struct Launcher {
  void (*kernel)(P...);
  const char *name;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;

  template <class... A> void operator()(A &&...a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel argument count");
    auto args = std::make_shared<std::tuple<std::decay_t<P>...>>(std::forward<A>(a)...);
    int i = 0;
    std::apply([&](const auto &...v) { (check_arg(name, i++, v), ...); }, *args);
    auto k = kernel;
    launch_grid(name, grid, block, smem, stream, [k, args] { std::apply(k, *args); });
  }
};

template <class... P>
Launcher<P...> launch(void (*k)(P...), const char *name, dim3 grid, dim3 block, size_t smem = 0,
                      cudaStream_t s = 0) {
  return Launcher<P...>{k, name, grid, block, smem, s};
}

}  // namespace cudasim
