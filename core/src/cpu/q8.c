/* q8.c: int8 weights for linear layers, with a float32 scale per block of 32 values along
   in_features (the layout of llama.cpp's Q8_0, scales kept in float32). ml_quantize_q8 makes them
   from a float weight (scale = max |w| / 127 over the block, values rounded to nearest);
   ml_q8_linear multiplies. Decoding and small batches (up to 16 rows, 8 at a time over columns
   still in the cache) read each weight byte once and widen it in registers: a quarter of
   float32's bytes, half of bfloat16's. More rows widen panels of output
   columns into float32 (bfloat16 for a bfloat16 input on an AVX512-BF16 CPU) and go through the
   GEMM. ml_quantize_q8_into and ml_dequantize_q8 round rows of any tensor the same way, in blocks
   of any width along the last dim, into strided slots (the int8 key-value cache). int4 weights
   (ml_quantize_q4, ml_q4_linear, ml_dequantize_q4; llama.cpp's Q4_0 layout, see moonload.h) go
   through the same column and panel code with 16 bytes a block instead of 32. With
   ml_set_quantized_activations(8) the input rows are rounded to int8 instead and meet the weights
   in integer products: cpu/q8_dot.c for up to 8 rows, cpu/q8_gemm.c for more. Tensors on a GPU
   go to the CUDA backend (cuda/q8.cu), which keeps these layouts. */
#include "cpu/gemm.h"
#include "cpu/q8_dot.h"
#include "cpu/rows.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define ML_Q8_SIMD 1
#endif

enum { Q8_BLOCK = ML_Q8_DOT_BLOCK, Q8_MAX_ROWS = ML_Q8_DOT_MAX_ROWS, Q8_COLS = 64, Q8_PANEL = 256 };
/* Rows up to which the column dots beat the panel GEMM (float activations) or the int8 GEMM. */
enum { Q8_DOT_ROWS_FLOAT = 16, Q8_DOT_ROWS_INT8 = 8 };

// --- quantize -------------------------------------------------------------------------------------

ml_status ml_quantize_q8(const ml_tensor *w, ml_tensor **q, ml_tensor **scales) {
  char sw[ML_SHAPE_BUF];
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route("quantize_q8", 1, (const ml_tensor *[]){w}, (const char *[]){"the weight"}, &cu));
  if (w->ndim != 2 || !ml_dtype_is_floating(w->dtype))
    return ml_fail(ML_EINVAL, "quantize_q8: expected a 2-D floating weight (out_features, in_features), got %s %s",
                   ml_dtype_name(w->dtype), ml_shape_str(w->ndim, w->shape, sw, sizeof sw));
  int64_t N = w->shape[0], K = w->shape[1];
  if (K % Q8_BLOCK != 0)
    return ml_fail(ML_EINVAL, "quantize_q8: in_features %lld is not a multiple of %d (the block size)", (long long)K,
                   Q8_BLOCK);
  int64_t sshape[2] = {N, K / Q8_BLOCK};
  ML_TRY(ml_tensor_empty(ML_INT8, 2, w->shape, w->storage->device, q));
  ml_status st = ml_tensor_empty(ML_FLOAT32, 2, sshape, w->storage->device, scales);
  if (!st) st = ml_quantize_q8_into(w, *q, *scales);     /* rows of blocks of 32: the same rounding */
  if (st) {
    ml_tensor_release(*q);
    ml_tensor_release(*scales);
    *q = *scales = NULL;
  }
  return st;
}

/* One int4 block of 32 values into 16 bytes: the scale makes the largest-magnitude value -8
   (Q4_0's trick: one more level than a symmetric -7..7), the others round to nearest and clamp
   to -8..7. cuda/q8.cu does the same float operations. */
static inline float quantize_block_q4(const float *x, uint8_t *q) {
  float amax = 0, vmax = -INFINITY;
  for (int i = 0; i < Q8_BLOCK; i++) {
    amax = fmaxf(amax, fabsf(x[i]));
    vmax = fmaxf(vmax, x[i]);
  }
  float d = (vmax == amax ? amax : -amax) / -8.0f;
  float inv = d != 0 ? 1.0f / d : 0.0f;
  for (int j = 0; j < Q8_BLOCK / 2; j++) {
    float lo = fminf(fmaxf(rintf(x[j] * inv), -8.0f), 7.0f), hi = fminf(fmaxf(rintf(x[j + 16] * inv), -8.0f), 7.0f);
    q[j] = (uint8_t)((int)lo + 8) | (uint8_t)(((int)hi + 8) << 4);
  }
  return d;
}

typedef struct {
  const ml_tensor *w;
  uint8_t *q;
  float *scales;
  int64_t K;
} q4_quantize_job;

static void quantize_q4_rows(void *ctx, int64_t begin, int64_t end) {
  const q4_quantize_job *j = ctx;
  float row[ML_BLOCK];
  size_t we = ml_dtype_size(j->w->dtype);
  int64_t K = j->K, nb = K / Q8_BLOCK;
  for (int64_t n = begin; n < end; n++) {
    const uint8_t *wr = (const uint8_t *)ml_tensor_data(j->w) + n * j->w->strides[0] * (int64_t)we;
    for (int64_t k0 = 0; k0 < K; k0 += ML_BLOCK) {
      int64_t len = K - k0 < ML_BLOCK ? K - k0 : ML_BLOCK;
      ml_row_load(row, ML_FLOAT32, wr + k0 * j->w->strides[1] * (int64_t)we, j->w->dtype, len, j->w->strides[1]);
      for (int64_t i = 0; i < len; i += Q8_BLOCK)
        j->scales[n * nb + (k0 + i) / Q8_BLOCK] = quantize_block_q4(row + i, j->q + (n * K + k0 + i) / 2);
    }
  }
}

ml_status ml_quantize_q4(const ml_tensor *w, ml_tensor **q, ml_tensor **scales) {
  char sw[ML_SHAPE_BUF];
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route("quantize_q4", 1, (const ml_tensor *[]){w}, (const char *[]){"the weight"}, &cu));
  if (cu && !cu->quantize_q4) return ml_no_cuda_kernel("quantize_q4", w);
  if (w->ndim != 2 || !ml_dtype_is_floating(w->dtype))
    return ml_fail(ML_EINVAL, "quantize_q4: expected a 2-D floating weight (out_features, in_features), got %s %s",
                   ml_dtype_name(w->dtype), ml_shape_str(w->ndim, w->shape, sw, sizeof sw));
  int64_t N = w->shape[0], K = w->shape[1];
  if (K % Q8_BLOCK != 0)
    return ml_fail(ML_EINVAL, "quantize_q4: in_features %lld is not a multiple of %d (the block size)", (long long)K,
                   Q8_BLOCK);
  int64_t qshape[2] = {N, K / 2}, sshape[2] = {N, K / Q8_BLOCK};
  ML_TRY(ml_tensor_empty(ML_UINT8, 2, qshape, w->storage->device, q));
  ml_status st = ml_tensor_empty(ML_FLOAT32, 2, sshape, w->storage->device, scales);
  if (st) {
    ml_tensor_release(*q);
    *q = NULL;
    return st;
  }
  if (cu) st = cu->quantize_q4(w, *q, *scales);
  else {
    q4_quantize_job j = {w, ml_tensor_data(*q), ml_tensor_data(*scales), K};
    ml_parallel_for(N, K * 4, quantize_q4_rows, &j);
  }
  if (st) {
    ml_tensor_release(*q);
    ml_tensor_release(*scales);
    *q = *scales = NULL;
  }
  return st;
}

// --- few rows: weights widened in registers ------------------------------------------------------

static int activation_bits = 0;   /* ml_set_quantized_activations */

ml_status ml_set_quantized_activations(int bits) {
  if (bits != 0 && bits != 8)
    return ml_fail(ML_EINVAL, "set_quantized_activations: bits must be 0 (float32 activations) or 8 (int8), got %d", bits);
  activation_bits = bits;
  return ML_OK;
}

int ml_get_quantized_activations(void) { return activation_bits; }

typedef struct {
  int64_t M, N, K;
  const float *a;              /* M x K float32, contiguous */
  const ml_q8_rows *a8;        /* the same rows rounded to int8, or NULL (float activations) */
  const uint8_t *q;            /* N x K int8, or N x K/2 packed int4 (bits 4) */
  const float *scales;         /* N x K/32 */
  const float *bias;           /* N, or NULL */
  uint8_t *c;                  /* M x N in cdt, row stride ldc */
  ml_dtype cdt;
  int64_t ldc;
  int bits;                    /* 8 or 4 */
} q8_job;

/* Value i (0..31) of a block of bits-wide weights at p, as stored (int4: nibble - 8). */
static inline int block_value(const uint8_t *p, int bits, int i) {
  if (bits == 8) return (int8_t)p[i];
  return i < 16 ? (p[i] & 15) - 8 : (p[i - 16] >> 4) - 8;
}

#if ML_Q8_SIMD
/* A block's 32 weights as four vectors of 8 floats (values 0-7, 8-15, 16-23, 24-31). */
static inline void block_load_256(const uint8_t *p, int bits, __m256 w[4]) {
  if (bits == 8) {
    for (int i = 0; i < 4; i++)
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * i))));
    return;
  }
  __m128i v = _mm_loadu_si128((const __m128i *)p), mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
  __m128i lo = _mm_sub_epi8(_mm_and_si128(v, mask), eight);                       /* values 0-15 */
  __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), eight);    /* values 16-31 */
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}
#endif

/* out[m] = sum_k a[m][k] * w[k] for the M rows, w = column n dequantized block by block. */
static void q8_column_dots(const q8_job *j, int64_t n, float *out) {
  int64_t K = j->K, M = j->M, nb = K / Q8_BLOCK, bb = Q8_BLOCK * j->bits / 8;   /* bytes a block */
  const uint8_t *col = j->q + n * nb * bb;
  const float *sc = j->scales + n * nb;
#if ML_Q8_SIMD
  __m256 acc[Q8_MAX_ROWS];
  for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m256 w[4];
    block_load_256(col + b * bb, j->bits, w);
    __m256 s = _mm256_set1_ps(sc[b]);
    for (int64_t m = 0; m < M; m++) {
      const float *a = j->a + m * K + b * Q8_BLOCK;
      __m256 d = _mm256_mul_ps(_mm256_loadu_ps(a), w[0]);
      d = _mm256_fmadd_ps(_mm256_loadu_ps(a + 8), w[1], d);
      d = _mm256_fmadd_ps(_mm256_loadu_ps(a + 16), w[2], d);
      d = _mm256_fmadd_ps(_mm256_loadu_ps(a + 24), w[3], d);
      acc[m] = _mm256_fmadd_ps(d, s, acc[m]);
    }
  }
  for (int64_t m = 0; m < M; m++) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    out[m] = _mm_cvtss_f32(v);
  }
#else
  for (int64_t m = 0; m < M; m++) {
    float acc = 0;
    for (int64_t b = 0; b < nb; b++) {
      float d = 0;
      for (int i = 0; i < Q8_BLOCK; i++) d += j->a[m * K + b * Q8_BLOCK + i] * (float)block_value(col + b * bb, j->bits, i);
      acc += d * sc[b];
    }
    out[m] = acc;
  }
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
/* The same dots 16 lanes wide on AVX-512 CPUs: a block is two widenings and two FMAs a row. */
__attribute__((target("avx512f"), always_inline))
static inline void column_dots_512_rows(const q8_job *j, int64_t n, float *out, const int64_t M) {
  int64_t K = j->K, nb = K / Q8_BLOCK, bb = Q8_BLOCK * j->bits / 8;
  const uint8_t *col = j->q + n * nb * bb;
  const float *sc = j->scales + n * nb;
  __m512 acc[Q8_MAX_ROWS];
  for (int64_t m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t *p = col + b * bb;
    __m128i v0, v1;
    if (j->bits == 8) {
      v0 = _mm_loadu_si128((const __m128i *)p);
      v1 = _mm_loadu_si128((const __m128i *)(p + 16));
    } else {                   /* int4: low nibbles are values 0-15, high ones 16-31 */
      __m128i v = _mm_loadu_si128((const __m128i *)p), mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
      v0 = _mm_sub_epi8(_mm_and_si128(v, mask), eight);
      v1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), eight);
    }
    __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v0));
    __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v1));
    __m512 s = _mm512_set1_ps(sc[b]);
    for (int64_t m = 0; m < M; m++) {
      const float *a = j->a + m * K + b * Q8_BLOCK;
      __m512 d = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16), w1, _mm512_mul_ps(_mm512_loadu_ps(a), w0));
      acc[m] = _mm512_fmadd_ps(d, s, acc[m]);
    }
  }
  for (int64_t m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
}

/* With the row count a constant the accumulators stay in registers. */
__attribute__((target("avx512f")))
static void q8_column_dots_512(const q8_job *j, int64_t n, float *out) {
  switch (j->M) {
  case 1: column_dots_512_rows(j, n, out, 1); break;
  case 2: column_dots_512_rows(j, n, out, 2); break;
  case 3: column_dots_512_rows(j, n, out, 3); break;
  case 4: column_dots_512_rows(j, n, out, 4); break;
  case 5: column_dots_512_rows(j, n, out, 5); break;
  case 6: column_dots_512_rows(j, n, out, 6); break;
  case 7: column_dots_512_rows(j, n, out, 7); break;
  default: column_dots_512_rows(j, n, out, Q8_MAX_ROWS);
  }
}
#define ML_HAVE_Q8_512 1

#endif

/* Columns [n0, n0 + w) for the job's rows (at most Q8_MAX_ROWS). */
static void column_block(const q8_job *j, int64_t n0, int64_t w) {
  float acc[Q8_MAX_ROWS][Q8_COLS], dots[Q8_MAX_ROWS];
  size_t oe = ml_dtype_size(j->cdt);
  if (j->a8) {                   /* int8 activations: the integer dots of cpu/q8_dot.c */
    int64_t nb = j->K / Q8_BLOCK;
    ml_q8_dot_columns(j->a8, j->q + n0 * nb * (Q8_BLOCK * j->bits / 8), j->scales + n0 * nb, j->bits, w, &acc[0][0],
                      Q8_COLS);
    for (int64_t m = 0; m < j->M; m++)
      for (int64_t i = 0; i < w && j->bias; i++) acc[m][i] += j->bias[n0 + i];
  }
  for (int64_t i = 0; i < w && !j->a8; i++) {
#if ML_HAVE_Q8_512
    if (ml_avx512()) q8_column_dots_512(j, n0 + i, dots);
    else
#endif
    q8_column_dots(j, n0 + i, dots);
    float add = j->bias ? j->bias[n0 + i] : 0.0f;
    for (int64_t m = 0; m < j->M; m++) acc[m][i] = dots[m] + add;
  }
  for (int64_t m = 0; m < j->M; m++)
    ml_convert_fast(acc[m], ML_FLOAT32, j->c + (m * j->ldc + n0) * (int64_t)oe, j->cdt, w);
}

/* Blocks of Q8_COLS columns; each block's columns meet the rows Q8_MAX_ROWS at a time while they
   are still in the cache (a few dozen rows read the weights from memory once). */
static void q8_columns(void *ctx, int64_t begin, int64_t end) {
  const q8_job *j = ctx;
  int64_t nb = j->K / Q8_BLOCK;
  size_t oe = ml_dtype_size(j->cdt);
  for (int64_t blk = begin; blk < end; blk++) {
    int64_t n0 = blk * Q8_COLS, w = j->N - n0 < Q8_COLS ? j->N - n0 : Q8_COLS;
    for (int64_t m0 = 0; m0 < j->M; m0 += Q8_MAX_ROWS) {
      q8_job chunk = *j;
      ml_q8_rows rows8;
      chunk.M = j->M - m0 < Q8_MAX_ROWS ? j->M - m0 : Q8_MAX_ROWS;
      chunk.a = j->a + m0 * j->K;
      chunk.c = j->c + m0 * j->ldc * (int64_t)oe;
      if (j->a8) {
        rows8 = (ml_q8_rows){chunk.M, j->K, j->a8->values + m0 * j->K, j->a8->scales + m0 * nb};
        chunk.a8 = &rows8;
      }
      column_block(&chunk, n0, w);
    }
  }
}

// --- more rows: panels widened to float32, then the GEMM ------------------------------------------

typedef struct {
  const uint8_t *q;
  const float *scales;
  int64_t K, n0;
  void *panel;                 /* width x K, float32 or bfloat16 */
  bool bf16;
  int bits;
} widen_job;

static void widen_columns(void *ctx, int64_t begin, int64_t end) {
  const widen_job *j = ctx;
  int64_t nb = j->K / Q8_BLOCK, bb = Q8_BLOCK * j->bits / 8;
  float row[Q8_BLOCK];
  for (int64_t i = begin; i < end; i++) {
    const uint8_t *col = j->q + (j->n0 + i) * nb * bb;
    const float *sc = j->scales + (j->n0 + i) * nb;
    for (int64_t b = 0; b < nb; b++) {
      float *dst = j->bf16 ? row : (float *)j->panel + i * j->K + b * Q8_BLOCK;
      const uint8_t *p = col + b * bb;
      if (j->bits == 8)
        for (int k = 0; k < Q8_BLOCK; k++) dst[k] = (float)(int8_t)p[k] * sc[b];
      else
        for (int k = 0; k < Q8_BLOCK / 2; k++) {
          dst[k] = (float)((p[k] & 15) - 8) * sc[b];
          dst[k + 16] = (float)((p[k] >> 4) - 8) * sc[b];
        }
      if (j->bf16) ml_convert_fast(row, ML_FLOAT32, (uint16_t *)j->panel + i * j->K + b * Q8_BLOCK, ML_BFLOAT16, Q8_BLOCK);
    }
  }
}

/* ml_q8_linear and ml_q4_linear: bits 8 (int8 weight, N x K) or 4 (uint8, N x K/2, two values a byte). */
static ml_status quantized_linear(const char *fn, int bits, const ml_tensor *x, const ml_tensor *q,
                                  const ml_tensor *scales, const ml_tensor *b, ml_tensor **out) {
  char sx[ML_SHAPE_BUF], sq[ML_SHAPE_BUF];
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route(fn, 4, (const ml_tensor *[]){x, q, scales, b},
                     (const char *[]){"the input", "the weight", "the scales", "the bias"}, &cu));
  ml_status (*gpu)(const ml_tensor *, const ml_tensor *, const ml_tensor *, const ml_tensor *, ml_tensor *) =
      cu ? (bits == 8 ? cu->q8_linear : cu->q4_linear) : NULL;
  if (cu && !gpu) return ml_no_cuda_kernel(fn, x);
  ml_dtype qdt = bits == 8 ? ML_INT8 : ML_UINT8;
  if (q->ndim != 2 || q->dtype != qdt || !ml_tensor_is_contiguous(q))
    return ml_fail(ML_EINVAL, "%s: the weight must be a contiguous 2-D %s tensor%s, got %s %s", fn, ml_dtype_name(qdt),
                   bits == 8 ? "" : " (two int4 values a byte)", ml_dtype_name(q->dtype),
                   ml_shape_str(q->ndim, q->shape, sq, sizeof sq));
  int64_t N = q->shape[0], K = q->shape[1] * 8 / bits;
  if (K % Q8_BLOCK != 0 || scales->dtype != ML_FLOAT32 || scales->ndim != 2 || scales->shape[0] != N ||
      scales->shape[1] != K / Q8_BLOCK || !ml_tensor_is_contiguous(scales))
    return ml_fail(ML_EINVAL, "%s: scales of shape %s do not go with an int%d weight of shape %s (float32 [%lld, %lld])", fn,
                   ml_shape_str(scales->ndim, scales->shape, sx, sizeof sx), bits, ml_shape_str(2, q->shape, sq, sizeof sq),
                   (long long)N, (long long)(K / Q8_BLOCK));
  if (x->ndim == 0 || x->shape[x->ndim - 1] != K || !ml_dtype_is_floating(x->dtype))
    return ml_fail(ML_EINVAL, "%s: input %s %s does not match weight of shape %s (in_features %lld)", fn,
                   ml_dtype_name(x->dtype), ml_shape_str(x->ndim, x->shape, sx, sizeof sx),
                   ml_shape_str(2, q->shape, sq, sizeof sq), (long long)K);
  if (b && (b->ndim != 1 || b->shape[0] != N))
    return ml_fail(ML_EINVAL, "%s: bias of shape %s does not match out_features %lld", fn,
                   ml_shape_str(b->ndim, b->shape, sx, sizeof sx), (long long)N);

  ml_dtype cdt = x->dtype == ML_FLOAT64 ? ML_FLOAT32 : x->dtype;
  int64_t oshape[ML_MAX_DIMS];
  memcpy(oshape, x->shape, sizeof oshape);
  oshape[x->ndim - 1] = N;
  ml_tensor *o, *xc = NULL;
  ML_TRY(ml_tensor_empty(cdt, x->ndim, oshape, x->storage->device, &o));
  if (cu) {
    ml_status cst = gpu(x, q, scales, b, o);
    if (cst) { ml_tensor_release(o); return cst; }
    *out = o;
    return ML_OK;
  }
  int64_t rows = 0, rs = 0;
  const ml_tensor *xs;
  ml_status st = ml_fold_rows(x, &xs, &xc, &rows, &rs);
  if (st) { ml_tensor_release(o); return st; }
  float *bias = NULL, *a = NULL, *a8_scales = NULL;
  int8_t *a8_values = NULL;
  void *panel = NULL;
  if (rows == 0) goto done;
  if (b) {
    if (!(bias = malloc((size_t)N * sizeof(float)))) {
      st = ml_fail(ML_ENOMEM, "%s: out of memory for a bias of %lld values", fn, (long long)N);
      goto done;
    }
    ml_row_load(bias, ML_FLOAT32, ml_tensor_data(b), b->dtype, N, b->strides[0]);
  }
  size_t xe = ml_dtype_size(xs->dtype);
  /* a few dozen rows: the column dots, the weights read once (widening them into panels for a
     GEMM costs more until the rows pay for it; measured on 11008 x 4096) */
  if (rows <= (activation_bits == 8 ? Q8_DOT_ROWS_INT8 : Q8_DOT_ROWS_FLOAT)) {
    if (!(a = malloc((size_t)(rows * K) * sizeof(float)))) {
      st = ml_fail(ML_ENOMEM, "%s: out of memory for a %lld x %lld copy of the input", fn, (long long)rows, (long long)K);
      goto done;
    }
    for (int64_t m = 0; m < rows; m++)
      ml_row_load(a + m * K, ML_FLOAT32, (const uint8_t *)ml_tensor_data(xs) + m * rs * (int64_t)xe, xs->dtype, K,
                  xs->strides[xs->ndim - 1]);
    ml_q8_rows a8 = {rows, K, NULL, NULL};
    if (activation_bits == 8) {
      if (!(a8.values = a8_values = malloc((size_t)(rows * K))) ||
          !(a8.scales = a8_scales = malloc((size_t)(rows * K / Q8_BLOCK) * sizeof(float)))) {
        st = ml_fail(ML_ENOMEM, "%s: out of memory for %lld rows of int8 activations", fn, (long long)rows);
        goto done;
      }
      ml_q8_round_rows(a, rows, K, a8_values, a8_scales);
    }
    q8_job j = {rows, N, K, a, activation_bits == 8 ? &a8 : NULL, ml_tensor_data(q), ml_tensor_data(scales), bias,
                ml_tensor_data(o), cdt, N, bits};
    ml_parallel_for((N + Q8_COLS - 1) / Q8_COLS, Q8_COLS * rows * K / 4 + 1, q8_columns, &j);
    goto done;
  }
  /* a bfloat16 input on a CPU that multiplies bfloat16 pairs: the panels are widened to bfloat16
     (a second rounding of each weight, below its int8 step) for that GEMM, as a bfloat16 layer's */
  ml_mref A = {ml_tensor_data(xs), xs->dtype, rs, xs->strides[xs->ndim - 1]};
  if (activation_bits == 8) {     /* int8 activations: cpu/q8_gemm.c */
    st = ml_q8_gemm(fn, bits, rows, N, K, A, ml_tensor_data(q), ml_tensor_data(scales), bias, ml_tensor_data(o), cdt, N);
    goto done;
  }
  int64_t width = N < Q8_PANEL ? N : Q8_PANEL;
  bool bf16 = ml_bf16_gemm_applies(rows, K, ML_FLOAT32, A, (ml_mref){NULL, ML_BFLOAT16, 1, K});
  size_t pe = bf16 ? sizeof(uint16_t) : sizeof(float);
  if (!(panel = ml_aligned_alloc((size_t)(width * K) * pe))) {
    st = ml_fail(ML_ENOMEM, "%s: out of memory for a %lld x %lld panel", fn, (long long)width, (long long)K);
    goto done;
  }
  size_t oe = ml_dtype_size(cdt);
  for (int64_t n0 = 0; n0 < N && !st; n0 += width) {
    int64_t w = N - n0 < width ? N - n0 : width;
    widen_job wj = {ml_tensor_data(q), ml_tensor_data(scales), K, n0, panel, bf16, bits};
    ml_parallel_for(w, K, widen_columns, &wj);
    ml_mref B = {panel, bf16 ? ML_BFLOAT16 : ML_FLOAT32, 1, K};   /* (K, w): column i is panel row i */
    st = ml_gemm(fn, rows, w, K, 1.0, A, B, bias ? bias + n0 : NULL, ML_FLOAT32,
                 (uint8_t *)ml_tensor_data(o) + n0 * (int64_t)oe, cdt, N);
  }
done:
  free(bias);
  free(a);
  free(a8_values);
  free(a8_scales);
  ml_aligned_free(panel);
  ml_tensor_release(xc);
  if (st) { ml_tensor_release(o); return st; }
  *out = o;
  return ML_OK;
}

ml_status ml_q8_linear(const ml_tensor *x, const ml_tensor *q, const ml_tensor *scales, const ml_tensor *b,
                       ml_tensor **out) {
  return quantized_linear("q8_linear", 8, x, q, scales, b, out);
}

ml_status ml_q4_linear(const ml_tensor *x, const ml_tensor *q, const ml_tensor *scales, const ml_tensor *b,
                       ml_tensor **out) {
  return quantized_linear("q4_linear", 4, x, q, scales, b, out);
}

/* int4 weights back to floats: the panels' widening, into a new (N, K) tensor of dtype. */
ml_status ml_dequantize_q4(const ml_tensor *q, const ml_tensor *scales, ml_dtype dtype, ml_tensor **out) {
  char sq[ML_SHAPE_BUF], ss[ML_SHAPE_BUF];
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route("dequantize_q4", 2, (const ml_tensor *[]){q, scales},
                     (const char *[]){"the int4 values", "the scales"}, &cu));
  if (cu && !cu->dequantize_q4) return ml_no_cuda_kernel("dequantize_q4", q);
  if (!(dtype == ML_FLOAT32 || dtype == ML_FLOAT16 || dtype == ML_BFLOAT16))
    return ml_fail(ML_EINVAL, "dequantize_q4: the output dtype must be float32, float16 or bfloat16, got %s",
                   ml_dtype_name(dtype));
  bool ok = q->dtype == ML_UINT8 && q->ndim == 2 && ml_tensor_is_contiguous(q) && scales->dtype == ML_FLOAT32 &&
            scales->ndim == 2 && ml_tensor_is_contiguous(scales) && scales->shape[0] == q->shape[0] &&
            q->shape[1] * 2 == scales->shape[1] * Q8_BLOCK;
  if (!ok)
    return ml_fail(ML_EINVAL, "dequantize_q4: int4 values %s %s and scales %s %s do not go together (contiguous uint8 "
                   "(out, in / 2) and float32 (out, in / %d))", ml_dtype_name(q->dtype),
                   ml_shape_str(q->ndim, q->shape, sq, sizeof sq), ml_dtype_name(scales->dtype),
                   ml_shape_str(scales->ndim, scales->shape, ss, sizeof ss), Q8_BLOCK);
  int64_t N = q->shape[0], K = q->shape[1] * 2, shape[2] = {N, K};
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(dtype, 2, shape, q->storage->device, &o));
  ml_status st = ML_OK;
  if (cu) st = cu->dequantize_q4(q, scales, o);
  else if (dtype == ML_FLOAT32) {
    widen_job wj = {ml_tensor_data(q), ml_tensor_data(scales), K, 0, ml_tensor_data(o), false, 4};
    ml_parallel_for(N, K, widen_columns, &wj);
  } else {
    float *tmp = ml_aligned_alloc((size_t)(N * K) * sizeof(float));
    if (!tmp) st = ml_fail(ML_ENOMEM, "dequantize_q4: out of memory for %lld x %lld floats", (long long)N, (long long)K);
    else {
      widen_job wj = {ml_tensor_data(q), ml_tensor_data(scales), K, 0, tmp, false, 4};
      ml_parallel_for(N, K, widen_columns, &wj);
      ml_convert_fast(tmp, ML_FLOAT32, ml_tensor_data(o), dtype, N * K);
      ml_aligned_free(tmp);
    }
  }
  if (st) { ml_tensor_release(o); return st; }
  *out = o;
  return ML_OK;
}

// --- rows of any tensor, blocks of any width (the key-value cache) --------------------------------

/* Element offset of outer row r (the dims before the last) in t. */
static int64_t outer_row_offset(const ml_tensor *t, int64_t r) {
  int64_t off = 0;
  for (int d = t->ndim - 2; d >= 0; d--) {
    int64_t n = t->shape[d];
    off += (r % n) * t->strides[d];
    r /= n;
  }
  return off;
}

typedef struct {
  const ml_tensor *x, *q, *scales;
  ml_tensor *out;              /* dequantize: contiguous */
  int64_t D, block;
} rows_job;

static void quantize_rows_of(void *ctx, int64_t begin, int64_t end) {
  const rows_job *j = ctx;
  int64_t D = j->D, b = j->block;
  float row[ML_BLOCK];
  size_t xe = ml_dtype_size(j->x->dtype);
  int8_t *qd = ml_tensor_data(j->q);
  float *sd = ml_tensor_data(j->scales);
  int64_t xs = j->x->strides[j->x->ndim - 1], qs = j->q->strides[j->q->ndim - 1];
  int64_t ss = j->scales->strides[j->scales->ndim - 1];
  int64_t per = ML_BLOCK / b * b;                         /* whole blocks a row buffer holds */
  for (int64_t r = begin; r < end; r++) {
    const uint8_t *xr = (const uint8_t *)ml_tensor_data(j->x) + outer_row_offset(j->x, r) * (int64_t)xe;
    int8_t *qr = qd + outer_row_offset(j->q, r);
    float *sr = sd + outer_row_offset(j->scales, r);
    for (int64_t k0 = 0; k0 < D; k0 += per) {
      int64_t n = D - k0 < per ? D - k0 : per;
      ml_row_load(row, ML_FLOAT32, xr + k0 * xs * (int64_t)xe, j->x->dtype, n, xs);
      for (int64_t i = 0; i < n; i += b) sr[(k0 + i) / b * ss] = ml_q8_round_block(row + i, b, qr + (k0 + i) * qs, qs);
    }
  }
}

static void dequantize_rows_of(void *ctx, int64_t begin, int64_t end) {
  const rows_job *j = ctx;
  int64_t D = j->D, b = j->block;
  float row[ML_BLOCK];
  const int8_t *qd = ml_tensor_data(j->q);
  const float *sd = ml_tensor_data(j->scales);
  int64_t qs = j->q->strides[j->q->ndim - 1], ss = j->scales->strides[j->scales->ndim - 1];
  size_t oe = ml_dtype_size(j->out->dtype);
  int64_t per = ML_BLOCK / b * b;
  for (int64_t r = begin; r < end; r++) {
    const int8_t *qr = qd + outer_row_offset(j->q, r);
    const float *sr = sd + outer_row_offset(j->scales, r);
    for (int64_t k0 = 0; k0 < D; k0 += per) {
      int64_t n = D - k0 < per ? D - k0 : per;
      /* straight into a float32 output, else through the row buffer */
      float *dst = j->out->dtype == ML_FLOAT32 ? (float *)ml_tensor_data(j->out) + r * D + k0 : row;
      for (int64_t i = 0; i < n; i += b) {
        float sc = sr[(k0 + i) / b * ss];
        const int8_t *src = qr + (k0 + i) * qs;
        if (qs == 1) for (int64_t t = 0; t < b; t++) dst[i + t] = (float)src[t] * sc;
        else for (int64_t t = 0; t < b; t++) dst[i + t] = (float)src[t * qs] * sc;
      }
      if (dst == row)
        ml_convert_fast(row, ML_FLOAT32, (uint8_t *)ml_tensor_data(j->out) + (r * D + k0) * (int64_t)oe, j->out->dtype, n);
    }
  }
}

/* The shapes quantize_q8_into and dequantize_q8 share: q (..., D) int8, scales (..., D / block)
   float32 with the same leading dims; sets *block. */
static ml_status check_rows(const char *fn, const ml_tensor *q, const ml_tensor *scales, int64_t *block) {
  char sq[ML_SHAPE_BUF], ss[ML_SHAPE_BUF];
  bool ok = q->dtype == ML_INT8 && scales->dtype == ML_FLOAT32 && q->ndim >= 1 && q->ndim == scales->ndim;
  for (int d = 0; ok && d < q->ndim - 1; d++) ok = q->shape[d] == scales->shape[d];
  int64_t D = ok ? q->shape[q->ndim - 1] : 0, nb = ok ? scales->shape[q->ndim - 1] : 0;
  ok = ok && nb > 0 && D % nb == 0 && D / nb <= ML_BLOCK;
  if (!ok)
    return ml_fail(ML_EINVAL, "%s: int8 values %s %s and float32 scales %s %s do not go together (scales (..., D / block), "
                   "a block of at most %d dividing D)", fn, ml_dtype_name(q->dtype), ml_shape_str(q->ndim, q->shape, sq, sizeof sq),
                   ml_dtype_name(scales->dtype), ml_shape_str(scales->ndim, scales->shape, ss, sizeof ss), ML_BLOCK);
  *block = D / nb;
  return ML_OK;
}

ml_status ml_quantize_q8_into(const ml_tensor *x, ml_tensor *q, ml_tensor *scales) {
  char sx[ML_SHAPE_BUF], sq[ML_SHAPE_BUF];
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route("quantize_q8_into", 3, (const ml_tensor *[]){x, q, scales},
                     (const char *[]){"the input", "the int8 values", "the scales"}, &cu));
  if (cu && !cu->quantize_q8_into) return ml_no_cuda_kernel("quantize_q8_into", x);
  int64_t block;
  ML_TRY(check_rows("quantize_q8_into", q, scales, &block));
  bool same = x->ndim == q->ndim && ml_dtype_is_floating(x->dtype);
  for (int d = 0; same && d < x->ndim; d++) same = x->shape[d] == q->shape[d];
  if (!same)
    return ml_fail(ML_EINVAL, "quantize_q8_into: input %s %s does not fit int8 values of shape %s (a floating tensor of that shape)",
                   ml_dtype_name(x->dtype), ml_shape_str(x->ndim, x->shape, sx, sizeof sx),
                   ml_shape_str(q->ndim, q->shape, sq, sizeof sq));
  if (cu) return cu->quantize_q8_into(x, q, scales);
  int64_t D = x->shape[x->ndim - 1], rows = D ? ml_tensor_numel(x) / D : 0;
  rows_job j = {x, q, scales, NULL, D, block};
  ml_parallel_for(rows, D * 4, quantize_rows_of, &j);
  return ML_OK;
}

ml_status ml_dequantize_q8(const ml_tensor *q, const ml_tensor *scales, ml_dtype dtype, ml_tensor **out) {
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route("dequantize_q8", 2, (const ml_tensor *[]){q, scales},
                     (const char *[]){"the int8 values", "the scales"}, &cu));
  if (cu && !cu->dequantize_q8) return ml_no_cuda_kernel("dequantize_q8", q);
  if (!(dtype == ML_FLOAT32 || dtype == ML_FLOAT16 || dtype == ML_BFLOAT16))
    return ml_fail(ML_EINVAL, "dequantize_q8: the output dtype must be float32, float16 or bfloat16, got %s",
                   ml_dtype_name(dtype));
  int64_t block;
  ML_TRY(check_rows("dequantize_q8", q, scales, &block));
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(dtype, q->ndim, q->shape, q->storage->device, &o));
  ml_status st = ML_OK;
  if (cu) st = cu->dequantize_q8(q, scales, o);
  else {
    int64_t D = q->shape[q->ndim - 1], rows = D ? ml_tensor_numel(q) / D : 0;
    rows_job j = {NULL, q, scales, o, D, block};
    ml_parallel_for(rows, D * 2, dequantize_rows_of, &j);
  }
  if (st) { ml_tensor_release(o); return st; }
  *out = o;
  return ML_OK;
}
