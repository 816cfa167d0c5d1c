/* fp8.c: FP8 weights with block scales, as DeepSeek-V3's checkpoints and transformers' "fp8"
   quant_method store them: an (O, I) float8 matrix and a float32 scale_inv per block_o x block_i
   tile (the last tiles may be partial). ml_dequantize_fp8_blocks expands them into a float
   matrix (16 values at a time through float16 bits, see fp8x16), rows split over the threads;
   ml_fp8_linear multiplies by them. */
#include "internal.h"
#include "cuda_api.h"
#include "kernels.h"
#include "cpu/gemm.h"

#include <stdlib.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ML_FP8_SIMD 1

/* 16 float8 bytes -> two vectors of 8 floats. e4m3fn: sign, then exponent and mantissa shifted
   into float16's places, which reads 2^-8 times the value (the bias differs by 8; subnormals
   land on float16's subnormals alike): the 256 is folded into the tile's scale. e5m2 is
   float16's upper byte. */
static inline void fp8x16(const uint8_t *p, bool e5, __m256 *lo, __m256 *hi) {
  __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
  __m256i h = e5 ? _mm256_slli_epi16(b, 8)
                 : _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7),
                                   _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8));
  *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

#endif

typedef struct {
  const uint8_t *w;
  const float *scale;
  void *out;
  ml_dtype dtype;              /* of out */
  const float *lut;
  int64_t I, block_o, block_i, scale_cols, w_row, s_row, s_col;   /* strides in elements */
  ml_dtype wdt;                /* of w */
} fp8_job;

static void dequantize_rows(void *arg, int64_t r0, int64_t r1) {
  const fp8_job *j = arg;
  float buf[256];
  for (int64_t o = r0; o < r1; o++) {
    const uint8_t *w = j->w + o * j->w_row;
    const float *s = j->scale + (o / j->block_o) * j->s_row;
    for (int64_t i0 = 0; i0 < j->I; i0 += 256) {
      int64_t n = j->I - i0 < 256 ? j->I - i0 : 256, i = 0;
      while (i < n) {                             /* a run of one tile's values */
        int64_t tile = (i0 + i) / j->block_i, end = (tile + 1) * j->block_i - i0;
        if (end > n) end = n;
        float sc = s[tile * j->s_col];
#if ML_FP8_SIMD
        __m256 vs = _mm256_set1_ps(j->wdt == ML_FLOAT8_E5M2 ? sc : sc * 256.0f);
        for (; i + 16 <= end; i += 16) {
          __m256 lo, hi;
          fp8x16(w + i0 + i, j->wdt == ML_FLOAT8_E5M2, &lo, &hi);
          _mm256_storeu_ps(buf + i, _mm256_mul_ps(lo, vs));
          _mm256_storeu_ps(buf + i + 8, _mm256_mul_ps(hi, vs));
        }
#endif
        for (; i < end; i++) buf[i] = j->lut[w[i0 + i]] * sc;
      }
      ml_convert_fast(buf, ML_FLOAT32, (char *)j->out + (o * j->I + i0) * (int64_t)ml_dtype_size(j->dtype), j->dtype, n);
    }
  }
}

ml_status ml_dequantize_fp8_blocks(const ml_tensor *w, const ml_tensor *scale_inv, int64_t block_o, int64_t block_i,
                                   ml_dtype dtype, ml_tensor **out) {
  char sw[ML_SHAPE_BUF], ss[ML_SHAPE_BUF];
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route("dequantize_fp8_blocks", 2, (const ml_tensor *[]){w, scale_inv},
                     (const char *[]){"the float8 weight", "the scales"}, &cu));
  if (cu && !cu->dequantize_fp8_blocks) return ml_no_cuda_kernel("dequantize_fp8_blocks", w);
  if (!(dtype == ML_FLOAT32 || dtype == ML_FLOAT16 || dtype == ML_BFLOAT16))
    return ml_fail(ML_EINVAL, "dequantize_fp8_blocks: the output dtype must be float32, float16 or bfloat16, got %s",
                   ml_dtype_name(dtype));
  if (block_o < 1 || block_i < 1)
    return ml_fail(ML_EINVAL, "dequantize_fp8_blocks: block sizes must be positive, got %lld x %lld",
                   (long long)block_o, (long long)block_i);
  bool ok = (w->dtype == ML_FLOAT8_E4M3FN || w->dtype == ML_FLOAT8_E5M2) && w->ndim == 2 &&
            scale_inv->dtype == ML_FLOAT32 && scale_inv->ndim == 2;
  ok = ok && scale_inv->shape[0] == (w->shape[0] + block_o - 1) / block_o &&
       scale_inv->shape[1] == (w->shape[1] + block_i - 1) / block_i;
  if (!ok)
    return ml_fail(ML_EINVAL, "dequantize_fp8_blocks: weight %s %s and scales %s %s do not go together (a float8 "
                   "(O, I) weight and float32 scales (ceil(O / %lld), ceil(I / %lld)))", ml_dtype_name(w->dtype),
                   ml_shape_str(w->ndim, w->shape, sw, sizeof sw), ml_dtype_name(scale_inv->dtype),
                   ml_shape_str(scale_inv->ndim, scale_inv->shape, ss, sizeof ss), (long long)block_o, (long long)block_i);
  if (w->strides[1] != 1 && w->shape[1] > 1)
    return ml_fail(ML_EINVAL, "dequantize_fp8_blocks: the weight's rows must be contiguous");
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(dtype, 2, w->shape, w->storage->device, &o));
  ml_status st = ML_OK;
  if (cu) st = cu->dequantize_fp8_blocks(w, scale_inv, block_o, block_i, o);
  else {
    fp8_job j = {ml_tensor_data(w), ml_tensor_data(scale_inv), ml_tensor_data(o), dtype, ml_fp8_table(w->dtype),
                 w->shape[1], block_o, block_i, scale_inv->shape[1], w->strides[0], scale_inv->strides[0],
                 scale_inv->strides[1], w->dtype};
    ml_parallel_for(w->shape[0], w->shape[1] * 2, dequantize_rows, &j);
  }
  if (st) { ml_tensor_release(o); return st; }
  *out = o;
  return ML_OK;
}

/* --- fp8_linear: x W^T + b straight from the float8 bytes, for a few rows --------------------

   A decoding step multiplies one (or a few) rows by each weight once: converting the weight to
   floats first writes and reads it again at 2-4 bytes a value, where the float8 bytes are one.
   Here each row of W goes through registers: 16 bytes become 16 floats (float8 -> float16 bits
   by shifts, then F16C), multiplied into up to FP8_GROUP input rows, a tile of block_i values at
   a time, each tile's sum scaled once. Output columns are spread over the threads
   (cpu/few_rows.c). More rows than FP8_MAX_ROWS (a prompt) expand the weight and go through the
   GEMM. */
enum { FP8_GROUP = 4, FP8_MAX_ROWS = ML_FEW_ROWS };

typedef struct {
  int64_t M, N, K, block_o, block_i;
  const float *x;              /* M x K float32, contiguous */
  const uint8_t *w;            /* row n at w + n * w_row */
  int64_t w_row;
  ml_dtype wdt;
  const float *scale;          /* tile (n / block_o, k / block_i) at scale + .. * s_row + .. * s_col */
  int64_t s_row, s_col;
  const float *lut;
} fp8_linear_job;

/* dots[m] = sum over k of x[m][k] * w_row[k] * its tile's scale, for G rows of x from x0. */
static void fp8_row_dots(const fp8_linear_job *j, const float *x0, int64_t G, const uint8_t *wr, const float *srow,
                         float *dots) {
  int64_t K = j->K, bi = j->block_i;
  bool e5 = j->wdt == ML_FLOAT8_E5M2;
  for (int64_t m = 0; m < G; m++) dots[m] = 0;
  for (int64_t t0 = 0, t = 0; t0 < K; t0 += bi, t++) {
    int64_t t1 = t0 + bi < K ? t0 + bi : K, k = t0;
    float part[FP8_GROUP] = {0};
#if ML_FP8_SIMD
    float simd_scale = e5 ? 1.0f : 256.0f;
    __m256 acc[FP8_GROUP][2];
    for (int64_t m = 0; m < G; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (; k + 16 <= t1; k += 16) {
      __m256 lo, hi;
      fp8x16(wr + k, e5, &lo, &hi);
      for (int64_t m = 0; m < G; m++) {
        acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + m * K + k), lo, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + m * K + k + 8), hi, acc[m][1]);
      }
    }
    for (int64_t m = 0; m < G; m++) part[m] = simd_scale * ml_hsum256(_mm256_add_ps(acc[m][0], acc[m][1]));
#endif
    for (; k < t1; k++) {
      float wv = j->lut[wr[k]];
      for (int64_t m = 0; m < G; m++) part[m] += x0[m * K + k] * wv;
    }
    float s = srow[t * j->s_col];
    for (int64_t m = 0; m < G; m++) dots[m] += part[m] * s;
  }
}

#if ML_FP8_SIMD
/* fp8_row_dots with 32 weights a step in AVX-512 registers (half the instructions a weight: the
   conversion, not memory, bounds a few rows). Same products, summed in another order. */
__attribute__((target("avx512f,avx512bw")))
static void fp8_row_dots_avx512(const fp8_linear_job *j, const float *x0, int64_t G, const uint8_t *wr,
                                const float *srow, float *dots) {
  int64_t K = j->K, bi = j->block_i;
  bool e5 = j->wdt == ML_FLOAT8_E5M2;
  float simd_scale = e5 ? 1.0f : 256.0f;
  const __m512i low7 = _mm512_set1_epi16(0x7f), sign = _mm512_set1_epi16(0x80);
  for (int64_t m = 0; m < G; m++) dots[m] = 0;
  for (int64_t t0 = 0, t = 0; t0 < K; t0 += bi, t++) {
    int64_t t1 = t0 + bi < K ? t0 + bi : K, k = t0;
    float part[FP8_GROUP] = {0};
    __m512 acc[FP8_GROUP][2];
    for (int64_t m = 0; m < G; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (; k + 32 <= t1; k += 32) {
      __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wr + k)));
      __m512i h = e5 ? _mm512_slli_epi16(b, 8)
                     : _mm512_or_si512(_mm512_slli_epi16(_mm512_and_si512(b, low7), 7),
                                       _mm512_slli_epi16(_mm512_and_si512(b, sign), 8));
      __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h)), hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
      for (int64_t m = 0; m < G; m++) {
        acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + m * K + k), lo, acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + m * K + k + 16), hi, acc[m][1]);
      }
    }
    for (int64_t m = 0; m < G; m++) part[m] = simd_scale * _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
    for (; k < t1; k++) {
      float wv = j->lut[wr[k]];
      for (int64_t m = 0; m < G; m++) part[m] += x0[m * K + k] * wv;
    }
    float s = srow[t * j->s_col];
    for (int64_t m = 0; m < G; m++) dots[m] += part[m] * s;
  }
}

#endif

/* dots[m] for every row m of x against the weight's row n (ml_few_rows_run's callback). */
static void fp8_column_dots(const void *ctx, int64_t n, float *dots) {
  const fp8_linear_job *j = ctx;
  const uint8_t *wr = j->w + n * j->w_row;
  const float *srow = j->scale + (n / j->block_o) * j->s_row;
  for (int64_t m0 = 0; m0 < j->M; m0 += FP8_GROUP) {
    int64_t G = j->M - m0 < FP8_GROUP ? j->M - m0 : FP8_GROUP;
#if ML_FP8_SIMD
    if (ml_avx512()) { fp8_row_dots_avx512(j, j->x + m0 * j->K, G, wr, srow, dots + m0); continue; }
#endif
    fp8_row_dots(j, j->x + m0 * j->K, G, wr, srow, dots + m0);
  }
}

ml_status ml_fp8_linear(const ml_tensor *x, const ml_tensor *w, const ml_tensor *scale_inv, int64_t block_o,
                        int64_t block_i, const ml_tensor *b, ml_tensor **out) {
  char sx[ML_SHAPE_BUF], sw[ML_SHAPE_BUF];
  const ml_cuda_api *cu;    /* (a GPU goes through the expansion and the GEMM, which route themselves) */
  ML_TRY(ml_op_route("fp8_linear", 4, (const ml_tensor *[]){x, w, scale_inv, b},
                     (const char *[]){"the input", "the float8 weight", "the scales", "the bias"}, &cu));
  if (!(x->dtype == ML_FLOAT32 || x->dtype == ML_FLOAT16 || x->dtype == ML_BFLOAT16))
    return ml_fail(ML_EINVAL, "fp8_linear: the input must be float32, float16 or bfloat16, got %s", ml_dtype_name(x->dtype));
  if (w->ndim != 2 || x->ndim == 0 || x->shape[x->ndim - 1] != w->shape[1])
    return ml_fail(ML_EINVAL, "fp8_linear: input of shape %s does not match weight of shape %s",
                   ml_shape_str(x->ndim, x->shape, sx, sizeof sx), ml_shape_str(w->ndim, w->shape, sw, sizeof sw));
  int64_t N = w->shape[0], K = w->shape[1], M = K ? ml_tensor_numel(x) / K : 0;
  bool fused = !cu && M >= 1 && M <= FP8_MAX_ROWS &&
               (w->dtype == ML_FLOAT8_E4M3FN || w->dtype == ML_FLOAT8_E5M2) && (w->strides[1] == 1 || K == 1) &&
               (!b || b->ndim == 1);
  if (!fused) {
    /* a prompt, or a GPU: the weight expanded into the input's dtype, then the GEMM */
    ml_tensor *wd;
    ML_TRY(ml_dequantize_fp8_blocks(w, scale_inv, block_o, block_i, x->dtype, &wd));
    ml_status st = ml_linear(x, wd, b, out);
    ml_tensor_release(wd);
    return st;
  }
  /* the checks of the expansion, on shapes only */
  bool ok = scale_inv->dtype == ML_FLOAT32 && scale_inv->ndim == 2 && block_o >= 1 && block_i >= 1 &&
            scale_inv->shape[0] == (N + block_o - 1) / block_o && scale_inv->shape[1] == (K + block_i - 1) / block_i;
  if (!ok) {
    ml_tensor *wd;
    ML_TRY(ml_dequantize_fp8_blocks(w, scale_inv, block_o, block_i, x->dtype, &wd));   /* names the fault */
    ml_tensor_release(wd);
    return ml_fail(ML_EINVAL, "fp8_linear: bad scales");
  }
  if (b && b->shape[0] != N)
    return ml_fail(ML_EINVAL, "fp8_linear: bias of shape %s does not match out_features %lld",
                   ml_shape_str(b->ndim, b->shape, sx, sizeof sx), (long long)N);
  float *xf, *bf;
  ml_tensor *o;
  ML_TRY(ml_few_rows_operands("fp8_linear", x, b, M, K, N, &xf, &bf, &o));
  fp8_linear_job j = {M, N, K, block_o, block_i, xf, ml_tensor_data(w), w->strides[0], w->dtype,
                      ml_tensor_data(scale_inv), scale_inv->strides[0], scale_inv->strides[1],
                      ml_fp8_table(w->dtype)};
  ml_few_rows_run(&(ml_few_rows_job){M, N, bf, ml_tensor_data(o), x->dtype, fp8_column_dots, &j}, K * M);
  free(xf);
  *out = o;
  return ML_OK;
}
