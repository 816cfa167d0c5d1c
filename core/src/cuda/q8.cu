// q8.cu: int8 weights and the int8 key-value cache on CUDA, in the layout of cpu/q8.c (int8
// values, a float32 scale per block along the last dim). Quantizing (rows of any tensor, blocks of
// any width) gives the CPU's bytes exactly: the same float operations, a warp a block.
// q8_linear: up to kGemvRows rows (decoding) read each weight byte once, a block per four output
// columns in 16-byte loads, so a step moves a quarter of float32's bytes and half of bfloat16's; more rows
// widen the weight to the output dtype once (scratch for the call) and go through cuBLAS, where
// the GEMM and not the weight bytes bounds the time. sdpa_q8 attends over int8 keys and values.
// int4 weights (Q4_0's layout, moonload.h) go through the same kernels: quantize_q4 gives the
// CPU's bytes, q4_linear's lanes take a whole 16-byte block each.
#include "common.cuh"

#include <math.h>

static const int kBlock = 32;       // values per scale (QuantizedLinear.BLOCK)
static const int kThreads = 256;    // 8 warps: 8 quantization blocks, or a gemv block's split of K
static const int kGemvRows = 8;

// --- few rows: a block per four output columns -------------------------------------------------

static const int kGemvCols = 4;     // output columns per block: each x value loaded serves four

// Sixteen weight bytes from p (16-aligned when aligned: one vector load).
__device__ __forceinline__ int4 load16(const unsigned char *p, bool aligned) {
  if (aligned) return *(const int4 *)p;
  int w[4];
  for (int j = 0; j < 4; j++)
    w[j] = (int)((unsigned)p[4 * j] | (unsigned)p[4 * j + 1] << 8 | (unsigned)p[4 * j + 2] << 16 |
                 (unsigned)p[4 * j + 3] << 24);
  return int4{w[0], w[1], w[2], w[3]};
}

// Value j of sixteen weight bytes: int8 value j, or for int4 (byte i holds value i low and value
// i + 16 high, stored + 8) the j-th of 32.
template <int Bits>
__device__ __forceinline__ float weight_at(const int4 &v, int j) {
  const int words[4] = {v.x, v.y, v.z, v.w};
  if (Bits == 8) return (float)(signed char)(words[j >> 2] >> (8 * (j & 3)));
  int b = j & 15;
  unsigned byte = ((unsigned)words[b >> 2] >> (8 * (b & 3))) & 255u;
  return (float)((int)(j < 16 ? byte & 15u : byte >> 4) - 8);
}

__device__ __forceinline__ float x_float(float v) { return v; }
__device__ __forceinline__ float x_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float x_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// V activations from p as floats: 16-byte loads when p is 16-aligned, else one by one.
template <typename XT, int V>
__device__ __forceinline__ void load_x(const XT *p, bool aligned, float *xv) {
  if (aligned) {
    const int per = 16 / (int)sizeof(XT);
#pragma unroll
    for (int i = 0; i < V / per; i++) {
      union { int4 v; XT e[16 / sizeof(XT)]; } u;
      u.v = ((const int4 *)p)[i];
#pragma unroll
      for (int j = 0; j < per; j++) xv[i * per + j] = x_float(u.e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; j++) xv[j] = x_float(p[j]);
  }
}

// out[m][n] = sum_k x[m][k] w[n][k] scales[n][k/32] + bias[n] for M <= kGemvRows rows of x
// (contiguous M x K, of dtype XT). A block takes kGemvCols columns and its threads split K: each
// takes 16 bytes of every column (half an int8 block, a whole int4 one) per step, so a thread has
// 64 bytes of weights in flight and each activation it loads serves all four columns. The block's
// partial sums meet in shared memory.
template <int Bits, typename XT>
__global__ void __launch_bounds__(kThreads) q_gemv_kernel(const XT *x, bool x_aligned, const unsigned char *q,
                                                          bool q_aligned, const float *scales, TensorDesc bias,
                                                          bool has_bias, void *out, int odt, int M, int64_t N,
                                                          int64_t K) {
  const int V = 16 * 8 / Bits;          // values a thread's 16 bytes of a column hold
  const int64_t n0 = blockIdx.x * (int64_t)kGemvCols;
  const int ncols = N - n0 < kGemvCols ? (int)(N - n0) : kGemvCols;
  const int64_t col_bytes = K * Bits / 8, col_scales = K / kBlock;
  float acc[kGemvRows][kGemvCols];
#pragma unroll
  for (int m = 0; m < kGemvRows; m++)
#pragma unroll
    for (int c = 0; c < kGemvCols; c++) acc[m][c] = 0.0f;
  for (int64_t k = (int64_t)threadIdx.x * V; k < K; k += (int64_t)kThreads * V) {   // (K: a multiple of 32)
    int4 w[kGemvCols];
    float s[kGemvCols];
#pragma unroll
    for (int c = 0; c < kGemvCols; c++) {
      if (c < ncols) {
        w[c] = load16(q + (n0 + c) * col_bytes + k * Bits / 8, q_aligned);
        s[c] = scales[(n0 + c) * col_scales + k / kBlock];
      }
    }
#pragma unroll
    for (int m = 0; m < kGemvRows; m++) {
      if (m < M) {             // (a guard, not a break: unrolled, acc stays in registers)
        float xv[V];
        load_x<XT, V>(x + m * K + k, x_aligned, xv);
#pragma unroll
        for (int c = 0; c < kGemvCols; c++) {
          if (c < ncols) {
            float d = 0.0f;
#pragma unroll
            for (int j = 0; j < V; j++) d += xv[j] * weight_at<Bits>(w[c], j);
            acc[m][c] += d * s[c];
          }
        }
      }
    }
  }
  __shared__ float partial[kThreads / 32][kGemvRows * kGemvCols];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < kGemvRows; m++) {
#pragma unroll
    for (int c = 0; c < kGemvCols; c++) {
      if (m < M) {
        float v = acc[m][c];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) partial[warp][m * kGemvCols + c] = v;
      }
    }
  }
  __syncthreads();
  int t = threadIdx.x;
  if (t < M * kGemvCols && t % kGemvCols < ncols) {
    float v = 0.0f;
    for (int wi = 0; wi < kThreads / 32; wi++) v += partial[wi][t];
    int64_t n = n0 + t % kGemvCols;
    if (has_bias) v += load_as<float>(bias.data, bias.dtype, n * bias.strides[0]);
    store_as<float>(out, odt, (t / kGemvCols) * N + n, v);
  }
}

template <int Bits, typename XT>
static void launch_gemv(unsigned grid, cudaStream_t s, const void *x, bool x_aligned, const unsigned char *q,
                        bool q_aligned, const float *sd, TensorDesc bd, bool has_bias, void *out, int odt, int M,
                        int64_t N, int64_t K) {
  q_gemv_kernel<Bits, XT><<<grid, kThreads, 0, s>>>((const XT *)x, x_aligned, q, q_aligned, sd, bd, has_bias, out,
                                                      odt, M, N, K);
}

template <int Bits>
static void launch_gemv_for(int xdt, unsigned grid, cudaStream_t s, const void *x, bool x_aligned,
                            const unsigned char *q, bool q_aligned, const float *sd, TensorDesc bd, bool has_bias,
                            void *out, int odt, int M, int64_t N, int64_t K) {
  if (xdt == ML_BFLOAT16)
    launch_gemv<Bits, __nv_bfloat16>(grid, s, x, x_aligned, q, q_aligned, sd, bd, has_bias, out, odt, M, N, K);
  else if (xdt == ML_FLOAT16)
    launch_gemv<Bits, __half>(grid, s, x, x_aligned, q, q_aligned, sd, bd, has_bias, out, odt, M, N, K);
  else
    launch_gemv<Bits, float>(grid, s, x, x_aligned, q, q_aligned, sd, bd, has_bias, out, odt, M, N, K);
}

// q8_linear and q4_linear: the gemv above for few rows, else the weight widened once to the
// output dtype (dequantize_q8 / dequantize_q4 below) and cuBLAS.
static ml_status quantized_linear(const char *fn, int bits, const ml_tensor *x, const ml_tensor *q,
                                  const ml_tensor *scales, const ml_tensor *b, ml_tensor *out) {
  DeviceState *st;
  int dev = ml_cuda_device_of(out);
  ML_TRY(ml_cuda_device_state(dev, &st));
  const int64_t *sq = ml_tensor_shape(q);
  int64_t N = sq[0], K = sq[1] * 8 / bits;
  int64_t M = ml_tensor_numel(out) / (N > 0 ? N : 1);
  if (M * N == 0) return ML_OK;
  int odt = ml_tensor_dtype(out);
  const unsigned char *qd = (const unsigned char *)ml_tensor_data(q);
  const float *sd = (const float *)ml_tensor_data(scales);
  if (M > kGemvRows) {
    ml_tensor *w;
    int64_t wshape[2] = {N, K};
    ML_TRY(ml_tensor_empty((ml_dtype)odt, 2, wshape, ml_tensor_device(q), &w));
    ml_status s = bits == 8 ? ml_cuda_dequantize_q8(q, scales, w) : ml_cuda_dequantize_q4(q, scales, w);
    if (!s) s = ml_cuda_linear(x, w, b, out);
    ml_tensor_release(w);      // (the caching allocator reuses it once the stream is past the GEMM)
    return s;
  }
  // x as a contiguous (M, K) matrix of float32, float16 or bfloat16: a view when it is one, else
  // one scratch copy (widened to float32 for any other dtype).
  ml_tensor *xm;
  int64_t shape2[2] = {M, K};
  ML_TRY(ml_tensor_reshape(x, 2, shape2, &xm));
  int xdt = ml_tensor_dtype(xm);
  if (xdt != ML_FLOAT32 && xdt != ML_FLOAT16 && xdt != ML_BFLOAT16) {
    ml_tensor *xf;
    ml_status s = ml_tensor_to(xm, ml_tensor_device(xm), ML_FLOAT32, &xf);
    ml_tensor_release(xm);
    ML_TRY(s);
    xm = xf;
    xdt = ML_FLOAT32;
  }
  if (!ml_tensor_is_contiguous(xm)) {
    ml_tensor *xc;
    ml_status s = ml_tensor_contiguous(xm, &xc);
    ml_tensor_release(xm);
    ML_TRY(s);
    xm = xc;
  }
  TensorDesc bd = ml_cuda_desc(b ? b : scales);   // (a real tensor even without a bias: has_bias says)
  unsigned grid = (unsigned)((N + kGemvCols - 1) / kGemvCols);
  const void *xd = ml_tensor_data(xm);
  bool x_aligned = ((uintptr_t)xd & 15) == 0, q_aligned = ((uintptr_t)qd & 15) == 0;
  if (bits == 8)
    launch_gemv_for<8>(xdt, grid, st->compute, xd, x_aligned, qd, q_aligned, sd, bd, b != NULL, ml_tensor_data(out),
                       odt, (int)M, N, K);
  else
    launch_gemv_for<4>(xdt, grid, st->compute, xd, x_aligned, qd, q_aligned, sd, bd, b != NULL, ml_tensor_data(out),
                       odt, (int)M, N, K);
  cudaError_t e = cudaGetLastError();
  ml_tensor_release(xm);
  if (e != cudaSuccess) return ml_fail(ML_EIO, "%s: CUDA error: %s", fn, cudaGetErrorString(e));
  return ML_OK;
}

ml_status ml_cuda_q8_linear(const ml_tensor *x, const ml_tensor *q, const ml_tensor *scales, const ml_tensor *b,
                            ml_tensor *out) {
  return quantized_linear("q8_linear", 8, x, q, scales, b, out);
}

ml_status ml_cuda_q4_linear(const ml_tensor *x, const ml_tensor *q, const ml_tensor *scales, const ml_tensor *b,
                            ml_tensor *out) {
  return quantized_linear("q4_linear", 4, x, q, scales, b, out);
}

// --- int4 weights: quantizing and widening --------------------------------------------------------

// A warp per block of 32 values of w (N x K, any strides, any floating dtype): lane i holds value
// i; the block's largest |w| and largest w come through the shuffles; lanes 0-15 write a byte
// each (their value low, lane i + 16's high). The CPU's operations (cpu/q8.c), so its bytes.
__global__ void quantize_q4_kernel(TensorDesc w, unsigned char *q, float *scales, int64_t nblocks) {
  int lane = threadIdx.x & 31;
  int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t blk = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5); blk < nblocks; blk += warps) {
    float v = load_as<float>(w.data, w.dtype, desc_offset(w, blk * kBlock + lane));
    float amax = fabsf(v), vmax = v;
    for (int o = 16; o > 0; o >>= 1) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      vmax = fmaxf(vmax, __shfl_xor_sync(0xffffffffu, vmax, o));
    }
    float d = (vmax == amax ? amax : -amax) / -8.0f;
    float inv = d != 0 ? 1.0f / d : 0.0f;
    int nib = (int)fminf(fmaxf(rintf(v * inv), -8.0f), 7.0f) + 8;
    int hi = __shfl_down_sync(0xffffffffu, nib, 16);
    if (lane < 16) q[blk * (kBlock / 2) + lane] = (unsigned char)(nib | (hi << 4));
    if (lane == 0) scales[blk] = d;
  }
}

ml_status ml_cuda_quantize_q4(const ml_tensor *w, ml_tensor *q, ml_tensor *scales) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(q), &st));
  int64_t nblocks = ml_tensor_numel(scales);
  if (nblocks == 0) return ML_OK;
  quantize_q4_kernel<<<ml_cuda_blocks(nblocks, kThreads / 32), kThreads, 0, st->compute>>>(
      ml_cuda_desc(w), (unsigned char *)ml_tensor_data(q), (float *)ml_tensor_data(scales), nblocks);
  LAUNCH_CHECK();
  return ML_OK;
}

// Element i of the (N, K) weight from contiguous int4 values and scales, into out as odt.
__global__ void dequantize_q4_kernel(const unsigned char *q, const float *s, void *out, int odt, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t blk = i / kBlock;
    int j = (int)(i % kBlock);
    unsigned char b = q[blk * (kBlock / 2) + (j & 15)];
    int nib = j < 16 ? b & 15 : b >> 4;
    store_as<float>(out, odt, i, (float)(nib - 8) * s[blk]);
  }
}

ml_status ml_cuda_dequantize_q4(const ml_tensor *q, const ml_tensor *scales, ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(out), &st));
  int64_t n = ml_tensor_numel(out);
  if (n == 0) return ML_OK;
  dequantize_q4_kernel<<<ml_cuda_blocks(n, kThreads), kThreads, 0, st->compute>>>(
      (const unsigned char *)ml_tensor_data(q), (const float *)ml_tensor_data(scales), ml_tensor_data(out),
      ml_tensor_dtype(out), n);
  LAUNCH_CHECK();
  return ML_OK;
}

// --- rows of any tensor, blocks of any width (the key-value cache) --------------------------------

// A warp per block of `block` values of x (strided, any floating dtype) into q and scales: the
// lanes take every 32nd value, and the block's largest |x| comes through the shuffles.
__global__ void quantize_kernel(TensorDesc x, TensorDesc q, TensorDesc s, int64_t nblocks, int64_t block) {
  int lane = threadIdx.x & 31;
  int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t blk = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5); blk < nblocks; blk += warps) {
    int64_t first = blk * block;            // linear index of its first value in x's shape
    float amax = 0.0f;
    for (int64_t i = lane; i < block; i += 32)
      amax = fmaxf(amax, fabsf(load_as<float>(x.data, x.dtype, desc_offset(x, first + i))));
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    float inv = amax > 0 ? 127.0f / amax : 0.0f;     // the CPU's operations, so the same bytes
    for (int64_t i = lane; i < block; i += 32) {
      float v = load_as<float>(x.data, x.dtype, desc_offset(x, first + i));
      ((signed char *)q.data)[desc_offset(q, first + i)] = (signed char)(int)rintf(v * inv);
    }
    if (lane == 0) ((float *)s.data)[desc_offset(s, blk)] = amax / 127.0f;
  }
}

ml_status ml_cuda_quantize_q8_into(const ml_tensor *x, ml_tensor *q, ml_tensor *scales) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(q), &st));
  TensorDesc xd = ml_cuda_desc(x), qd = ml_cuda_desc(q), sd = ml_cuda_desc(scales);
  int64_t nblocks = ml_cuda_numel(sd), block = nblocks ? ml_cuda_numel(qd) / nblocks : 0;
  if (nblocks == 0) return ML_OK;
  quantize_kernel<<<ml_cuda_blocks(nblocks, kThreads / 32), kThreads, 0, st->compute>>>(xd, qd, sd, nblocks, block);
  LAUNCH_CHECK();
  return ML_OK;
}

// Element i of q times its block's scale, into out (contiguous) as odt; contiguous q and scales
// (a weight) skip the strided addressing.
__global__ void dequantize_kernel(TensorDesc q, TensorDesc s, bool contiguous, void *out, int odt, int64_t n,
                                  int64_t block) {
  const signed char *qd = (const signed char *)q.data;
  const float *sd = (const float *)s.data;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float v = contiguous ? (float)qd[i] * sd[i / block]
                         : (float)qd[desc_offset(q, i)] * sd[desc_offset(s, i / block)];
    store_as<float>(out, odt, i, v);
  }
}

ml_status ml_cuda_dequantize_q8(const ml_tensor *q, const ml_tensor *scales, ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(out), &st));
  TensorDesc qd = ml_cuda_desc(q), sd = ml_cuda_desc(scales);
  int64_t n = ml_cuda_numel(qd), nblocks = ml_cuda_numel(sd);
  if (n == 0) return ML_OK;
  bool contiguous = ml_cuda_is_contiguous(qd) && ml_cuda_is_contiguous(sd);
  dequantize_kernel<<<ml_cuda_blocks(n, kThreads), kThreads, 0, st->compute>>>(qd, sd, contiguous, ml_tensor_data(out),
                                                                               ml_tensor_dtype(out), n, n / nblocks);
  LAUNCH_CHECK();
  return ML_OK;
}

// --- FP8 weights with block scales (ml_dequantize_fp8_blocks) --------------------------------------

__global__ void dequantize_fp8_kernel(const unsigned char *w, int wdt, int64_t w_row, const float *s, int64_t s_row,
                                      int64_t s_col, int64_t I, int64_t block_o, int64_t block_i, void *out, int odt,
                                      int64_t n) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
    int64_t o = k / I, i = k % I;
    float v = fp8_to_float(w[o * w_row + i], wdt) * s[(o / block_o) * s_row + (i / block_i) * s_col];
    store_as<float>(out, odt, k, v);
  }
}

ml_status ml_cuda_dequantize_fp8_blocks(const ml_tensor *w, const ml_tensor *scale_inv, int64_t block_o,
                                        int64_t block_i, ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(out), &st));
  TensorDesc wd = ml_cuda_desc(w), sd = ml_cuda_desc(scale_inv);
  int64_t n = ml_cuda_numel(wd);
  if (n == 0) return ML_OK;
  dequantize_fp8_kernel<<<ml_cuda_blocks(n, kThreads), kThreads, 0, st->compute>>>(
      (const unsigned char *)wd.data, ml_tensor_dtype(w), wd.strides[0], (const float *)sd.data, sd.strides[0],
      sd.strides[1], wd.shape[1], block_o, block_i, ml_tensor_data(out), ml_tensor_dtype(out), n);
  LAUNCH_CHECK();
  return ML_OK;
}

// --- attention over int8 keys and values (decoding with an int8 cache) ----------------------------

// Where each batch-head (out's leading dims flattened) finds its rows: element offsets of q, k,
// v, their scales and out, with grouped key/value heads (dim -3) read by query head / group.
struct Q8Attn {
  int nbd;
  int64_t bshape[ML_MAX_DIMS];
  int64_t qs[ML_MAX_DIMS], ks[ML_MAX_DIMS], vs[ML_MAX_DIMS], kss[ML_MAX_DIMS], vss[ML_MAX_DIMS];
  int64_t q_row, q_col, k_row, v_row, ks_row, ks_col, vs_row, vs_col;   // strides of the last two dims
  int64_t group, L, S, E, Ev, kblock, vblock;
};

// One block per query row: scores over the S keys (a warp per key, lanes along E) into the row's
// scratch, the softmax there, then each thread sums its output columns over the keys. Rows r0..
// of the R = batch-heads x L rows.
__global__ void sdpa_q8_kernel(Q8Attn a, const void *q, int qdt, const signed char *k, const float *ks,
                               const signed char *v, const float *vs, TensorDesc mask, int mask_kind, bool causal,
                               TensorDesc sinks, bool has_sinks, float scale, float *scores, void *out, int odt,
                               int64_t r0, int64_t rows) {
  __shared__ float qrow[ML_CUDA_Q8_ATTN_MAX_E];
  __shared__ float red[32];
  for (int64_t row = r0 + blockIdx.x; row < r0 + rows; row += gridDim.x) {
    int64_t bh = row / a.L, l = row % a.L, r = bh;
    int64_t qo = 0, ko = 0, vo = 0, kso = 0, vso = 0;
    for (int d = a.nbd - 1; d >= 0; d--) {
      int64_t i = r % a.bshape[d], kv = d == a.nbd - 1 ? i / a.group : i;
      r /= a.bshape[d];
      qo += i * a.qs[d];
      ko += kv * a.ks[d];
      vo += kv * a.vs[d];
      kso += kv * a.kss[d];
      vso += kv * a.vss[d];
    }
    for (int64_t e = threadIdx.x; e < a.E; e += blockDim.x)
      qrow[e] = load_as<float>(q, qdt, qo + l * a.q_row + e * a.q_col);
    __syncthreads();
    float *y = scores + (row - r0) * a.S;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int64_t s = warp; s < a.S; s += nwarps) {
      const signed char *kr = k + ko + s * a.k_row;
      const float *kr_s = ks + kso + s * a.ks_row;
      float d = 0.0f;
      for (int64_t e = lane; e < a.E; e += 32) d += qrow[e] * (float)kr[e] * kr_s[e / a.kblock * a.ks_col];
      for (int o = 16; o > 0; o >>= 1) d += __shfl_down_sync(0xffffffffu, d, o);
      if (lane == 0) {
        float val = d * scale;
        if (causal && s > l) val = -INFINITY;
        int64_t mo = (bh * a.L + l) * a.S + s;
        if (mask_kind == 1 && load_as<int>(mask.data, mask.dtype, desc_offset(mask, mo)) == 0) val = -INFINITY;
        if (mask_kind == 2) val += load_as<float>(mask.data, mask.dtype, desc_offset(mask, mo));
        y[s] = val;
      }
    }
    __syncthreads();
    float m = -INFINITY;
    for (int64_t s = threadIdx.x; s < a.S; s += blockDim.x) m = fmaxf(m, y[s]);
    m = block_max<float>(m, red);
    // a sink (one logit per query head, the last batch dim) joins the softmax without a value
    float sink = has_sinks ? load_as<float>(sinks.data, sinks.dtype, desc_offset(sinks, bh % a.bshape[a.nbd - 1]))
                           : -INFINITY;
    float m_all = fmaxf(m, sink);
    float sum = 0.0f;
    if (m != -INFINITY)
      for (int64_t s = threadIdx.x; s < a.S; s += blockDim.x) { float p = __expf(y[s] - m_all); y[s] = p; sum += p; }
    sum = block_sum<float>(sum, red);
    if (has_sinks && m != -INFINITY) sum += __expf(sink - m_all);
    __syncthreads();                        // (every y[s] written before any thread reads them all)
    // every key masked: zeros, as PyTorch's scaled_dot_product_attention
    float inv = m == -INFINITY ? 0.0f : 1.0f / sum;
    for (int64_t e = threadIdx.x; e < a.Ev; e += blockDim.x) {
      float acc = 0.0f;
      if (inv != 0.0f)
        for (int64_t s = 0; s < a.S; s++) {
          float p = y[s];
          if (p != 0.0f) acc += p * (float)v[vo + s * a.v_row + e] * vs[vso + s * a.vs_row + e / a.vblock * a.vs_col];
        }
      store_as<float>(out, odt, row * a.Ev + e, acc * inv);
    }
    __syncthreads();                        // (qrow and y are reused by the block's next row)
  }
}

ml_status ml_cuda_sdpa_q8(const ml_tensor *q, const ml_tensor *k, const ml_tensor *k_scales, const ml_tensor *v,
                          const ml_tensor *v_scales, const ml_tensor *mask, const ml_tensor *sinks, bool is_causal,
                          double scale, ml_tensor *out) {
  int dev = ml_cuda_device_of(out);
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(dev, &st));
  int nq = ml_tensor_ndim(q), nk = ml_tensor_ndim(k), nv = ml_tensor_ndim(v), no = ml_tensor_ndim(out);
  const int64_t *sq = ml_tensor_shape(q), *sk = ml_tensor_shape(k), *sv = ml_tensor_shape(v), *so = ml_tensor_shape(out);
  const int64_t *tq = ml_tensor_strides(q), *tk = ml_tensor_strides(k), *tv = ml_tensor_strides(v);
  const int64_t *tks = ml_tensor_strides(k_scales), *tvs = ml_tensor_strides(v_scales);
  Q8Attn a = {};
  a.nbd = no - 2;
  a.L = sq[nq - 2]; a.E = sq[nq - 1]; a.S = sk[nk - 2]; a.Ev = sv[nv - 1];
  a.kblock = a.E / ml_tensor_shape(k_scales)[nk - 1];
  a.vblock = a.Ev / ml_tensor_shape(v_scales)[nv - 1];
  a.q_row = tq[nq - 2]; a.q_col = tq[nq - 1]; a.k_row = tk[nk - 2]; a.v_row = tv[nv - 2];
  a.ks_row = tks[nk - 2]; a.ks_col = tks[nk - 1]; a.vs_row = tvs[nv - 2]; a.vs_col = tvs[nv - 1];
  int64_t hk = nk >= 3 ? sk[nk - 3] : 1;
  a.group = a.nbd >= 1 && nq >= 3 && hk > 1 && hk != so[a.nbd - 1] && so[a.nbd - 1] % hk == 0 ? so[a.nbd - 1] / hk : 1;
  int64_t BH = 1;
  for (int i = 0; i < a.nbd; i++) {
    a.bshape[i] = so[i];
    BH *= so[i];
    int iq = i - (a.nbd - (nq - 2)), ik = i - (a.nbd - (nk - 2)), iv = i - (a.nbd - (nv - 2));
    bool last = i == a.nbd - 1 && a.group > 1;
    a.qs[i] = iq >= 0 && sq[iq] == so[i] ? tq[iq] : 0;
    a.ks[i] = ik >= 0 && (sk[ik] == so[i] || last) ? tk[ik] : 0;
    a.vs[i] = iv >= 0 && (sv[iv] == so[i] || last) ? tv[iv] : 0;
    a.kss[i] = a.ks[i] ? tks[ik] : 0;
    a.vss[i] = a.vs[i] ? tvs[iv] : 0;
  }
  int64_t R = BH * a.L;
  if (R * a.Ev == 0) return ML_OK;
  if (a.S == 0) return ml_cuda_fill(out, 0.0);
  // Scores of a chunk of rows in float32 scratch, at most the attention cap (blas.cu) at a time.
  int64_t cap = ((int64_t)256 << 20) / (a.S * 4);
  int64_t chunk = cap < 1 ? 1 : cap > R ? R : cap;
  void *scr;
  ML_TRY(ml_cuda_scratch(dev, (size_t)(chunk * a.S) * sizeof(float), &scr));
  TensorDesc md = ml_cuda_desc(k_scales);      // (a real tensor even without a mask: mask_kind says)
  int kind = !mask ? 0 : ml_tensor_dtype(mask) == ML_BOOL ? 1 : 2;
  if (mask) {
    int64_t full[ML_MAX_DIMS + 2];
    for (int i = 0; i < a.nbd; i++) full[i] = so[i];
    full[a.nbd] = a.L; full[a.nbd + 1] = a.S;
    md = ml_cuda_desc_broadcast(mask, a.nbd + 2, full);
  }
  cudaError_t e = cudaSuccess;
  for (int64_t r0 = 0; r0 < R && e == cudaSuccess; r0 += chunk) {
    int64_t rows = R - r0 < chunk ? R - r0 : chunk;
    unsigned grid = (unsigned)(rows < 65535 * 16 ? rows : 65535 * 16);
    sdpa_q8_kernel<<<grid, kThreads, 0, st->compute>>>(
        a, ml_tensor_data(q), ml_tensor_dtype(q), (const signed char *)ml_tensor_data(k),
        (const float *)ml_tensor_data(k_scales), (const signed char *)ml_tensor_data(v),
        (const float *)ml_tensor_data(v_scales), md, kind, is_causal, sinks ? ml_cuda_desc(sinks) : md, sinks != NULL,
        (float)scale, (float *)scr, ml_tensor_data(out),
        ml_tensor_dtype(out), r0, rows);
    e = cudaGetLastError();
  }
  ml_cuda_scratch_free(dev, scr, (size_t)(chunk * a.S) * sizeof(float));
  if (e != cudaSuccess) return ml_fail(ML_EIO, "sdpa_q8: CUDA error: %s", cudaGetErrorString(e));
  return ML_OK;
}
