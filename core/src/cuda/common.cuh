// common.cuh: shared pieces of the CUDA backend: checked calls, per-device state (compute and
// copy streams, cuBLAS handle), tensor descriptors passed to kernels by value, and dtype
// load/store between any moonload dtype and the compute types (float, double).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <stdint.h>
#include <climits>

#include "cuda_api.h"

#define ML_CUDA_MAX_DEVICES 16

// A failed CUDA call becomes an ml_fail naming the call, file and line.
#define CUDA_TRY(call)                                                                        \
  do {                                                                                        \
    cudaError_t e_ = (call);                                                                  \
    if (e_ != cudaSuccess)                                                                    \
      return ml_fail(e_ == cudaErrorMemoryAllocation ? ML_ENOMEM : ML_EIO, "%s failed: %s (%s:%d)", \
                     #call, cudaGetErrorString(e_), __FILE__, __LINE__);                       \
  } while (0)

#define CUBLAS_TRY(call)                                                                      \
  do {                                                                                        \
    cublasStatus_t s_ = (call);                                                               \
    if (s_ != CUBLAS_STATUS_SUCCESS)                                                          \
      return ml_fail(ML_EIO, "%s failed: cuBLAS status %d (%s:%d)", #call, (int)s_, __FILE__, __LINE__); \
  } while (0)

#define ML_TRY(expr) do { ml_status ml_try_s_ = (expr); if (ml_try_s_ != ML_OK) return ml_try_s_; } while (0)

// Status of the last kernel launch on this thread.
#define LAUNCH_CHECK() CUDA_TRY(cudaGetLastError())

struct DeviceState {
  bool ready;
  cudaStream_t compute;   // every kernel and synchronous copy runs here, in order
  cudaStream_t copy;      // weight prefetch (host->device) overlapping compute
  cublasHandle_t blas;
};

// Sets the current device and returns its state, creating streams and the cuBLAS handle once.
ml_status ml_cuda_device_state(int device, DeviceState **out);

// A tensor as kernels see it: data pointer of the first element, dtype, shape, element strides.
struct TensorDesc {
  void *data;
  int dtype;
  int ndim;
  int64_t shape[ML_MAX_DIMS];
  int64_t strides[ML_MAX_DIMS];
};

TensorDesc ml_cuda_desc(const ml_tensor *t);
// The same tensor viewed at shape (ndim, shape) with broadcast (zero) strides where it is 1.
TensorDesc ml_cuda_desc_broadcast(const ml_tensor *t, int ndim, const int64_t *shape);
int ml_cuda_device_of(const ml_tensor *t);
bool ml_cuda_is_contiguous(const TensorDesc &d);
int64_t ml_cuda_numel(const TensorDesc &d);

// Element offset of linear (row-major) index i of the shape in d, using d's strides.
__device__ __forceinline__ int64_t desc_offset(const TensorDesc &d, int64_t i) {
  int64_t off = 0;
  for (int k = d.ndim - 1; k >= 0; k--) {
    int64_t n = d.shape[k];
    off += (i % n) * d.strides[k];
    i /= n;
  }
  return off;
}

// FP8 (float8_e4m3fn and float8_e5m2) to and from float, as dtype.c does on the host: e4m3fn
// (bias 7, 3 mantissa bits) has no infinity, S.1111.111 is NaN and past 448 saturates; e5m2
// (bias 15, 2 mantissa bits) has IEEE infinities and NaNs.
__device__ __forceinline__ float fp8_to_float(unsigned char b, int dtype) {
  bool e5 = dtype == ML_FLOAT8_E5M2;
  int mbits = e5 ? 2 : 3, bias = e5 ? 15 : 7, emax = e5 ? 31 : 15;
  int exp = (b & 0x7f) >> mbits, man = b & ((1 << mbits) - 1);
  float v;
  if (e5 && exp == emax) v = man ? NAN : INFINITY;
  else if (!e5 && exp == emax && man == 7) v = NAN;
  else if (exp == 0) v = ldexpf((float)man, 1 - bias - mbits);
  else v = ldexpf(1.0f + (float)man / (1 << mbits), exp - bias);
  return (b & 0x80) ? -v : v;
}

__device__ __forceinline__ unsigned char float_to_fp8(float f, int dtype) {
  bool e5 = dtype == ML_FLOAT8_E5M2;
  int mbits = e5 ? 2 : 3, bias = e5 ? 15 : 7;
  unsigned char sign = signbit(f) ? 0x80 : 0, nan = 0x7f | sign;
  unsigned char overflow = e5 ? (unsigned char)(0x7c | sign) : (unsigned char)(0x7e | sign);
  float a = fabsf(f);
  if (a != a) return nan;
  if (isinf(a)) return overflow;
  if (a < ldexpf(1.0f, 1 - bias)) return sign | (unsigned char)rintf(ldexpf(a, bias - 1 + mbits));
  int e;
  float q = rintf(ldexpf(frexpf(a, &e), mbits + 1));
  if (q == (float)(2 << mbits)) { q = (float)(1 << mbits); e++; }
  int biased = e - 1 + bias, man = (int)q - (1 << mbits);
  if (e5 ? biased > 30 : (biased > 15 || (biased == 15 && man == 7))) return overflow;
  return sign | (unsigned char)(biased << mbits) | (unsigned char)man;
}

template <typename T>
__device__ __forceinline__ T load_as(const void *p, int dtype, int64_t i) {
  switch (dtype) {
  case ML_FLOAT32: return (T)((const float *)p)[i];
  case ML_FLOAT16: return (T)__half2float(((const __half *)p)[i]);
  case ML_BFLOAT16: return (T)__bfloat162float(((const __nv_bfloat16 *)p)[i]);
  case ML_FLOAT64: return (T)((const double *)p)[i];
  case ML_INT64: return (T)((const long long *)p)[i];
  case ML_INT32: return (T)((const int *)p)[i];
  case ML_INT16: return (T)((const short *)p)[i];
  case ML_INT8: return (T)((const signed char *)p)[i];
  case ML_UINT8: return (T)((const unsigned char *)p)[i];
  case ML_BOOL: return (T)(((const unsigned char *)p)[i] != 0);
  case ML_FLOAT8_E4M3FN: case ML_FLOAT8_E5M2: return (T)fp8_to_float(((const unsigned char *)p)[i], dtype);
  default: return (T)0;
  }
}

template <typename T>
__device__ __forceinline__ void store_as(void *p, int dtype, int64_t i, T v) {
  switch (dtype) {
  case ML_FLOAT32: ((float *)p)[i] = (float)v; break;
  case ML_FLOAT16: ((__half *)p)[i] = __float2half_rn((float)v); break;
  case ML_BFLOAT16: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn((float)v); break;
  case ML_FLOAT64: ((double *)p)[i] = (double)v; break;
  case ML_INT64: ((long long *)p)[i] = (v != v) ? 0 : (long long)v; break;
  case ML_INT32: ((int *)p)[i] = (v != v) ? 0 : (int)(long long)v; break;
  case ML_INT16: ((short *)p)[i] = (v != v) ? 0 : (short)(long long)v; break;
  case ML_INT8: ((signed char *)p)[i] = (v != v) ? 0 : (signed char)(long long)v; break;
  case ML_UINT8: ((unsigned char *)p)[i] = (v != v) ? 0 : (unsigned char)(long long)v; break;
  case ML_BOOL: ((unsigned char *)p)[i] = v != (T)0; break;
  case ML_FLOAT8_E4M3FN: case ML_FLOAT8_E5M2: ((unsigned char *)p)[i] = float_to_fp8((float)v, dtype); break;
  default: break;
  }
}

// Copies one element of es bytes (same dtype on both sides).
__device__ __forceinline__ void copy_elem(char *dst, const char *src, int es) {
  switch (es) {
  case 1: *dst = *src; break;
  case 2: *(short *)dst = *(const short *)src; break;
  case 4: *(int *)dst = *(const int *)src; break;
  default: *(long long *)dst = *(const long long *)src; break;
  }
}

// Overloads for kernels templated on their compute type (float, or double for float64).
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float exp_of(float x) { return __expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

// --- block reductions ----------------------------------------------------------------------

// Integer sums and products wrap on overflow, as PyTorch's int64 (unsigned arithmetic: no UB).
__device__ __forceinline__ double add_wrap(double a, double b) { return a + b; }
__device__ __forceinline__ float add_wrap(float a, float b) { return a + b; }
__device__ __forceinline__ long long add_wrap(long long a, long long b) {
  return (long long)((unsigned long long)a + (unsigned long long)b);
}
__device__ __forceinline__ double mul_wrap(double a, double b) { return a * b; }
__device__ __forceinline__ long long mul_wrap(long long a, long long b) {
  return (long long)((unsigned long long)a * (unsigned long long)b);
}

// Combines v over the block (warp shuffles, then one value per warp through shared[32]) with
// combine, whose identity fills the missing warps; every thread gets the result.
template <typename T, typename Combine>
__device__ T block_reduce(T v, T *shared, T identity, Combine combine) {
  for (int o = 16; o > 0; o >>= 1) v = combine(v, __shfl_down_sync(0xffffffffu, v, o));
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  int nwarps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < nwarps ? shared[threadIdx.x] : identity;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v = combine(v, __shfl_down_sync(0xffffffffu, v, o));
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  T r = shared[0];
  __syncthreads();
  return r;
}

template <typename T>
__device__ T block_sum(T v, T *shared) {
  return block_reduce(v, shared, (T)0, [](T a, T b) { return add_wrap(a, b); });
}

template <typename T>
__device__ T block_max(T v, T *shared) {
  return block_reduce(v, shared, (T)-INFINITY, [](T a, T b) { return max_of(a, b); });
}

// --- out-of-range indices (embedding, gather, index_select) ---------------------------------

// Records v as the first bad index (the flag starts at LLONG_MIN).
__device__ __forceinline__ void flag_bad(long long *bad, long long v) {
  atomicCAS((unsigned long long *)bad, (unsigned long long)LLONG_MIN, (unsigned long long)v);
}

// Scratch memory for one op on a device, from the caching allocator; freed with scratch_free.
ml_status ml_cuda_scratch(int device, size_t nbytes, void **out);
void ml_cuda_scratch_free(int device, void *p, size_t nbytes);

// Runs `launch` with a device flag for a bad index; *bad is LLONG_MIN when every index was good.
template <typename Launch>
inline ml_status with_bad_flag(int dev, DeviceState *st, const char *fn, long long *bad, Launch launch) {
  void *flag;
  ML_TRY(ml_cuda_scratch(dev, sizeof(long long), &flag));
  long long init = LLONG_MIN;
  *bad = LLONG_MIN;
  cudaError_t e = cudaMemcpyAsync(flag, &init, sizeof init, cudaMemcpyHostToDevice, st->compute);
  if (e == cudaSuccess) {
    launch((long long *)flag);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess) e = cudaMemcpyAsync(bad, flag, sizeof *bad, cudaMemcpyDeviceToHost, st->compute);
  if (e == cudaSuccess) e = cudaStreamSynchronize(st->compute);
  ml_cuda_scratch_free(dev, flag, sizeof(long long));
  if (e != cudaSuccess) return ml_fail(ML_EIO, "%s: CUDA error: %s", fn, cudaGetErrorString(e));
  return ML_OK;
}

// Launch geometry for n independent elements.
static inline unsigned ml_cuda_blocks(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  if (b > 65535LL * 32) b = 65535LL * 32;   // grid-stride loops cover the rest
  return (unsigned)(b > 0 ? b : 1);
}

// Whether an op on these dtypes computes in double (float64 or 64-bit integers involved).
static inline bool ml_cuda_wide(int dtype) { return dtype == ML_FLOAT64 || dtype == ML_INT64; }

// Entry points of the other .cu files, collected into the table by backend.cu.
ml_status ml_cuda_unary(ml_unary_op op, const ml_tensor *x, ml_tensor *out);
ml_status ml_cuda_binary(ml_binary_op op, const ml_tensor *a, const ml_tensor *b, ml_tensor *out);
ml_status ml_cuda_binary_scalar(ml_binary_op op, const ml_tensor *a, double s, bool scalar_first, ml_tensor *out);
ml_status ml_cuda_copy_strided(ml_tensor *dst, const ml_tensor *src);
ml_status ml_cuda_fill(ml_tensor *t, double value);
ml_status ml_cuda_where(const ml_tensor *cond, const ml_tensor *a, const ml_tensor *b, ml_tensor *out);
ml_status ml_cuda_reduce(ml_reduce_op op, const ml_tensor *x, int ndims, const int *dims, ml_tensor *out);
ml_status ml_cuda_softmax(const ml_tensor *x, int dim, bool log, ml_tensor *out);
ml_status ml_cuda_layer_norm(const ml_tensor *x, int nnorm, const ml_tensor *w, const ml_tensor *b, double eps, ml_tensor *out);
ml_status ml_cuda_rms_norm(const ml_tensor *x, int nnorm, const ml_tensor *w, double eps, ml_tensor *out);
ml_status ml_cuda_embedding(const ml_tensor *ids, const ml_tensor *weight, ml_tensor *out);
ml_status ml_cuda_matmul(const ml_tensor *a, const ml_tensor *b, ml_tensor *out);
ml_status ml_cuda_linear(const ml_tensor *x, const ml_tensor *w, const ml_tensor *b, ml_tensor *out);
ml_status ml_cuda_sdpa(const ml_tensor *q, const ml_tensor *k, const ml_tensor *v, const ml_tensor *mask,
                       const ml_tensor *sinks, bool is_causal, double scale, ml_tensor *out);
ml_status ml_cuda_triangle(const ml_tensor *x, int64_t k, bool upper, ml_tensor *out);
ml_status ml_cuda_gather(const ml_tensor *x, int dim, const ml_tensor *index, ml_tensor *out, int64_t *bad_index);
ml_status ml_cuda_index_select(const ml_tensor *x, int dim, const ml_tensor *index, ml_tensor *out,
                               int64_t *bad_index);
ml_status ml_cuda_cumsum(const ml_tensor *x, int dim, ml_tensor *out);
ml_status ml_cuda_rotary_embedding(const ml_tensor *x, const ml_tensor *cos, const ml_tensor *sin, ml_tensor *out);
ml_status ml_cuda_topk(const ml_tensor *x, int dim, int64_t k, bool largest, ml_tensor *values, ml_tensor *indices);
ml_status ml_cuda_q8_linear(const ml_tensor *x, const ml_tensor *q, const ml_tensor *scales, const ml_tensor *b,
                            ml_tensor *out);
ml_status ml_cuda_quantize_q8_into(const ml_tensor *x, ml_tensor *q, ml_tensor *scales);
ml_status ml_cuda_dequantize_q8(const ml_tensor *q, const ml_tensor *scales, ml_tensor *out);
ml_status ml_cuda_q4_linear(const ml_tensor *x, const ml_tensor *q, const ml_tensor *scales, const ml_tensor *b,
                            ml_tensor *out);
ml_status ml_cuda_quantize_q4(const ml_tensor *w, ml_tensor *q, ml_tensor *scales);
ml_status ml_cuda_dequantize_q4(const ml_tensor *q, const ml_tensor *scales, ml_tensor *out);
ml_status ml_cuda_dequantize_fp8_blocks(const ml_tensor *w, const ml_tensor *scale_inv, int64_t block_o,
                                        int64_t block_i, ml_tensor *out);
ml_status ml_cuda_dequantize_mxfp4(const ml_tensor *blocks, const ml_tensor *scales, bool ggml_order, ml_tensor *out);
ml_status ml_cuda_gated_delta_rule(const ml_tensor *q, const ml_tensor *k, const ml_tensor *v, const ml_tensor *g,
                                   const ml_tensor *beta, ml_tensor *state, ml_tensor *out);
ml_status ml_cuda_ssm_scan(const ml_tensor *x, const ml_tensor *dt, const ml_tensor *A, const ml_tensor *B,
                           const ml_tensor *C, const ml_tensor *D, bool A_log, ml_tensor *state, ml_tensor *out);
ml_status ml_cuda_sdpa_q8(const ml_tensor *q, const ml_tensor *k, const ml_tensor *k_scales, const ml_tensor *v,
                          const ml_tensor *v_scales, const ml_tensor *mask, const ml_tensor *sinks, bool is_causal,
                          double scale, ml_tensor *out);
ml_status ml_cuda_random_fill(ml_tensor *t, bool normal, double a, double b, uint64_t seed, uint64_t base);

