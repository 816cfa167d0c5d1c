// q8.cu: int8 weights on CUDA, in the layout of cpu/q8.c (int8 (out, in), a float32 scale per
// block of 32 along in). quantize_q8 gives the CPU's bytes exactly (the same float operations,
// one warp a block). q8_linear: up to kGemvRows rows (decoding) read each weight byte once, a warp
// per output column in 16-byte loads, so a step moves a quarter of float32's bytes and half of
// bfloat16's; more rows widen the weight to the output dtype once and go through cuBLAS (linear),
// where the GEMM and not the weight bytes bounds the time. That widened copy is scratch for the
// one call. quantize_q8_into and dequantize_q8 do the same rounding for rows of any tensor, into
// strided slots (the int8 key-value cache).
#include "common.cuh"

#include <math.h>

static const int kBlock = 32;       // values per scale (QuantizedLinear.BLOCK)
static const int kThreads = 256;    // 8 warps: 8 quantization blocks, or 8 output columns
static const int kGemvRows = 8;

// --- quantize: a warp per block of 32 ----------------------------------------------------------

__global__ void quantize_kernel(TensorDesc w, signed char *q, float *scales, int64_t nblocks, int64_t nb) {
  int lane = threadIdx.x & 31;
  int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t blk = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5); blk < nblocks; blk += warps) {
    int64_t n = blk / nb, k = blk % nb * kBlock + lane;
    float v = load_as<float>(w.data, w.dtype, n * w.strides[0] + k * w.strides[1]);
    float amax = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    float inv = amax > 0 ? 127.0f / amax : 0.0f;     // the CPU's operations, so the same bytes
    q[n * w.shape[1] + k] = (signed char)(int)rintf(v * inv);
    if (lane == 0) scales[blk] = amax / 127.0f;
  }
}

ml_status ml_cuda_quantize_q8(const ml_tensor *w, ml_tensor *q, ml_tensor *scales) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(q), &st));
  TensorDesc wd = ml_cuda_desc(w);
  int64_t nb = wd.shape[1] / kBlock, nblocks = wd.shape[0] * nb;
  if (nblocks == 0) return ML_OK;
  unsigned grid = ml_cuda_blocks(nblocks, kThreads / 32);
  quantize_kernel<<<grid, kThreads, 0, st->compute>>>(wd, (signed char *)ml_tensor_data(q),
                                                      (float *)ml_tensor_data(scales), nblocks, nb);
  LAUNCH_CHECK();
  return ML_OK;
}

// --- few rows: a warp per output column -----------------------------------------------------------

// Sixteen weight bytes from p (16-aligned when Aligned: one vector load).
template <bool Aligned>
__device__ __forceinline__ void load16(const signed char *p, float *w) {
  if (Aligned) {
    int4 v = *(const int4 *)p;
    int words[4] = {v.x, v.y, v.z, v.w};
    for (int j = 0; j < 4; j++)
      for (int i = 0; i < 4; i++) w[4 * j + i] = (float)(signed char)(words[j] >> (8 * i));
  } else {
    for (int i = 0; i < 16; i++) w[i] = (float)p[i];
  }
}

// out[m][n] = sum_k x[m][k] q[n][k] scales[n][k/32] + bias[n] for M <= kGemvRows rows of x
// (contiguous, M x K). Each lane takes 16 consecutive bytes (half a block) of a 512-byte stretch
// of the column: a warp has 512 bytes in flight per step, which the memory bound needs.
template <bool Aligned>
__global__ void q8_gemv_kernel(const void *x, int xdt, const signed char *q, const float *scales, TensorDesc bias,
                               bool has_bias, void *out, int odt, int M, int64_t N, int64_t K) {
  int lane = threadIdx.x & 31;
  int64_t n = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= N) return;
  const signed char *col = q + n * K;
  const float *sc = scales + n * (K / kBlock);
  float acc[kGemvRows];
#pragma unroll
  for (int m = 0; m < kGemvRows; m++) acc[m] = 0.0f;
  for (int64_t k = 16 * lane; k < K; k += 512) {      // (K is a multiple of 32: a chunk is in or out)
    float w[16];
    load16<Aligned>(col + k, w);
    float s = sc[k / kBlock];
#pragma unroll
    for (int m = 0; m < kGemvRows; m++) {
      if (m < M) {             // (a guard, not a break: unrolled, acc stays in registers)
        int64_t i = m * K + k;
        float d = 0.0f;
#pragma unroll
        for (int j = 0; j < 16; j++) d += load_as<float>(x, xdt, i + j) * w[j];
        acc[m] += d * s;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kGemvRows; m++) {
    if (m < M) {
      float v = acc[m];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
      if (lane == 0) {
        if (has_bias) v += load_as<float>(bias.data, bias.dtype, n * bias.strides[0]);
        store_as<float>(out, odt, m * N + n, v);
      }
    }
  }
}

// --- more rows: the weight widened once, then cuBLAS ------------------------------------------------

__global__ void dequantize_kernel(const signed char *q, const float *scales, void *w, int wdt, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    store_as<float>(w, wdt, i, (float)q[i] * scales[i / kBlock]);
}

ml_status ml_cuda_q8_linear(const ml_tensor *x, const ml_tensor *q, const ml_tensor *scales, const ml_tensor *b,
                            ml_tensor *out) {
  DeviceState *st;
  int dev = ml_cuda_device_of(out);
  ML_TRY(ml_cuda_device_state(dev, &st));
  const int64_t *sq = ml_tensor_shape(q);
  int64_t N = sq[0], K = sq[1];
  int64_t M = ml_tensor_numel(out) / (N > 0 ? N : 1);
  if (M * N == 0) return ML_OK;
  int odt = ml_tensor_dtype(out);
  const signed char *qd = (const signed char *)ml_tensor_data(q);
  const float *sd = (const float *)ml_tensor_data(scales);
  if (M > kGemvRows) {
    ml_tensor *w;
    ML_TRY(ml_tensor_empty((ml_dtype)odt, 2, sq, ml_tensor_device(q), &w));
    int64_t n = N * K;
    if (n > 0) dequantize_kernel<<<ml_cuda_blocks(n, kThreads), kThreads, 0, st->compute>>>(qd, sd, ml_tensor_data(w), odt, n);
    cudaError_t e = cudaGetLastError();
    ml_status s = e == cudaSuccess ? ml_cuda_linear(x, w, b, out)
                                   : ml_fail(ML_EIO, "q8_linear: CUDA error: %s", cudaGetErrorString(e));
    ml_tensor_release(w);      // (the caching allocator reuses it once the stream is past the GEMM)
    return s;
  }
  // x as a contiguous (M, K) matrix: a view when it is one, else one scratch copy.
  ml_tensor *xm;
  int64_t shape2[2] = {M, K};
  ML_TRY(ml_tensor_reshape(x, 2, shape2, &xm));
  ml_tensor *xc = NULL;
  if (!ml_tensor_is_contiguous(xm)) {
    ml_status s = ml_tensor_contiguous(xm, &xc);
    ml_tensor_release(xm);
    ML_TRY(s);
    xm = xc;
  }
  TensorDesc bd = ml_cuda_desc(b ? b : scales);   // (a real tensor even without a bias: has_bias says)
  unsigned grid = (unsigned)((N + kThreads / 32 - 1) / (kThreads / 32));
  bool aligned = ((uintptr_t)qd & 15) == 0;
  if (aligned)
    q8_gemv_kernel<true><<<grid, kThreads, 0, st->compute>>>(ml_tensor_data(xm), ml_tensor_dtype(xm), qd, sd, bd, b != NULL,
                                                              ml_tensor_data(out), odt, (int)M, N, K);
  else
    q8_gemv_kernel<false><<<grid, kThreads, 0, st->compute>>>(ml_tensor_data(xm), ml_tensor_dtype(xm), qd, sd, bd, b != NULL,
                                                               ml_tensor_data(out), odt, (int)M, N, K);
  cudaError_t e = cudaGetLastError();
  ml_tensor_release(xm);
  if (e != cudaSuccess) return ml_fail(ML_EIO, "q8_linear: CUDA error: %s", cudaGetErrorString(e));
  return ML_OK;
}

// --- rows of any tensor, blocks of any width (the key-value cache) --------------------------------

// A thread per block of `block` values of x (strided, any floating dtype) into q and scales.
__global__ void quantize_into_kernel(TensorDesc x, TensorDesc q, TensorDesc s, int64_t nblocks, int64_t block) {
  for (int64_t blk = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; blk < nblocks;
       blk += (int64_t)gridDim.x * blockDim.x) {
    int64_t first = blk * block;            // linear index of its first value in x's shape
    float amax = 0.0f;
    for (int64_t i = 0; i < block; i++) amax = fmaxf(amax, fabsf(load_as<float>(x.data, x.dtype, desc_offset(x, first + i))));
    float inv = amax > 0 ? 127.0f / amax : 0.0f;     // the CPU's operations, so the same bytes
    for (int64_t i = 0; i < block; i++) {
      float v = load_as<float>(x.data, x.dtype, desc_offset(x, first + i));
      ((signed char *)q.data)[desc_offset(q, first + i)] = (signed char)(int)rintf(v * inv);
    }
    ((float *)s.data)[desc_offset(s, blk)] = amax / 127.0f;
  }
}

ml_status ml_cuda_quantize_q8_into(const ml_tensor *x, ml_tensor *q, ml_tensor *scales) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(q), &st));
  TensorDesc xd = ml_cuda_desc(x), qd = ml_cuda_desc(q), sd = ml_cuda_desc(scales);
  int64_t nblocks = ml_cuda_numel(sd), block = nblocks ? ml_cuda_numel(qd) / nblocks : 0;
  if (nblocks == 0) return ML_OK;
  quantize_into_kernel<<<ml_cuda_blocks(nblocks, kThreads), kThreads, 0, st->compute>>>(xd, qd, sd, nblocks, block);
  LAUNCH_CHECK();
  return ML_OK;
}

__global__ void dequantize_rows_kernel(TensorDesc q, TensorDesc s, void *out, int odt, int64_t n, int64_t block) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float v = (float)((const signed char *)q.data)[desc_offset(q, i)] * ((const float *)s.data)[desc_offset(s, i / block)];
    store_as<float>(out, odt, i, v);
  }
}

ml_status ml_cuda_dequantize_q8(const ml_tensor *q, const ml_tensor *scales, ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(out), &st));
  TensorDesc qd = ml_cuda_desc(q), sd = ml_cuda_desc(scales);
  int64_t n = ml_cuda_numel(qd), nblocks = ml_cuda_numel(sd);
  if (n == 0) return ML_OK;
  dequantize_rows_kernel<<<ml_cuda_blocks(n, kThreads), kThreads, 0, st->compute>>>(qd, sd, ml_tensor_data(out),
                                                                                     ml_tensor_dtype(out), n, n / nblocks);
  LAUNCH_CHECK();
  return ML_OK;
}
