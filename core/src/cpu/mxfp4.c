/* mxfp4.c: MXFP4 weights, the format of gpt-oss's experts (OCP microscaling FP4, as transformers'
   integrations/mxfp4.py reads it): blocks uint8 (..., O, G, 16) and scales uint8 (..., O, G).
   Each group of 32 values along a row shares a power of two, 2^(scale - 127) (e8m0), and each
   value is a 4-bit e2m1 float, two a byte: byte j's low nibble is value 2j, its high nibble
   value 2j + 1. At half a byte a weight, a decoding step should read the packed bytes, not a
   float copy four to eight times their size: ml_mxfp4_linear does that for a few rows, and
   ml_dequantize_mxfp4 expands them into the (..., O, G * 32) weight for the GEMM. Both read
   twice the e2m1 value (an integer, 0..12) times 2^(scale - 128): each factor is exact in
   float32 (2^-128 is a subnormal, 2^127 finite), so the value is the exact product rounded once,
   as transformers' (only products past float32's range round, to inf, at scales near 255). */
#include "internal.h"
#include "cuda_api.h"
#include "kernels.h"
#include "cpu/gemm.h"

#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ML_MXFP4_SIMD 1
#endif

/* Half the e8m0 scale, 2^(s - 128), from the bits: subnormal for s = 0 and 1, finite for 255
   (the whole 2^128 is not a float32). */
static inline float half_scale(uint8_t s) {
  uint32_t bits = s >= 2 ? (uint32_t)(s - 1) << 23 : 0x00200000u << s;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

#if !ML_MXFP4_SIMD
/* Twice the 16 e2m1 values (sign in the top bit of the nibble; transformers' FP4_VALUES). */
static const float fp4_twice_f[16] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 6.0f, 8.0f, 12.0f,
                                      -0.0f, -1.0f, -2.0f, -3.0f, -4.0f, -6.0f, -8.0f, -12.0f};
#else
/* Twice the e2m1 values as float16 bits have all-zero low bytes: these are the high ones (-0
   kept, as transformers' table has it). */
static const uint8_t fp4_twice_f16_high[16] = {0x00, 0x3c, 0x40, 0x42, 0x44, 0x46, 0x48, 0x4a,
                                               0x80, 0xbc, 0xc0, 0xc2, 0xc4, 0xc6, 0xc8, 0xca};
/* Twice the e2m1 values, as int8 (the scale takes the half back): one byte shuffle decodes 16. */
static const int8_t fp4_twice[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* A group's 16 bytes -> its 32 nibbles in element order: lo holds values 0..15, hi 16..31
   (llama.cpp's order has them so already: low nibbles first, then high ones). */
static inline void fp4_nibbles(const uint8_t *p, bool ggml_order, __m128i *lo, __m128i *hi) {
  const __m128i m4 = _mm_set1_epi8(0x0f);
  __m128i b = _mm_loadu_si128((const __m128i *)p);
  __m128i even = _mm_and_si128(b, m4), odd = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
  *lo = ggml_order ? even : _mm_unpacklo_epi8(even, odd);
  *hi = ggml_order ? odd : _mm_unpackhi_epi8(even, odd);
}
#endif

/* 32 values of one group, twice the e2m1 values times half (half the scale), into dst. */
static inline void fp4x32(const uint8_t *p, bool ggml_order, float half, float *dst) {
#if ML_MXFP4_SIMD
  __m128i lo, hi;
  fp4_nibbles(p, ggml_order, &lo, &hi);
  const __m128i lut = _mm_loadu_si128((const __m128i *)fp4_twice_f16_high), zero = _mm_setzero_si128();
  __m128i h0 = _mm_shuffle_epi8(lut, lo), h1 = _mm_shuffle_epi8(lut, hi);
  __m256 s = _mm256_set1_ps(half);
  _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_cvtph_ps(_mm_unpacklo_epi8(zero, h0)), s));
  _mm256_storeu_ps(dst + 8, _mm256_mul_ps(_mm256_cvtph_ps(_mm_unpackhi_epi8(zero, h0)), s));
  _mm256_storeu_ps(dst + 16, _mm256_mul_ps(_mm256_cvtph_ps(_mm_unpacklo_epi8(zero, h1)), s));
  _mm256_storeu_ps(dst + 24, _mm256_mul_ps(_mm256_cvtph_ps(_mm_unpackhi_epi8(zero, h1)), s));
#else
  for (int j = 0; j < 16; j++) {
    dst[ggml_order ? j : 2 * j] = fp4_twice_f[p[j] & 15] * half;
    dst[ggml_order ? j + 16 : 2 * j + 1] = fp4_twice_f[p[j] >> 4] * half;
  }
#endif
}

/* Element offset of row r of the leading dims (shape, strides: nlead of them). */
static int64_t lead_offset(int64_t r, int nlead, const int64_t *shape, const int64_t *strides) {
  int64_t off = 0;
  for (int d = nlead - 1; d >= 0; d--) {
    off += (r % shape[d]) * strides[d];
    r /= shape[d];
  }
  return off;
}

/* blocks and scales as the format wants them, or ML_EINVAL naming the one that is not. */
static ml_status check_operands(const char *fn, const ml_tensor *blocks, const ml_tensor *scales) {
  char sb[ML_SHAPE_BUF], ss[ML_SHAPE_BUF];
  if (blocks->dtype != ML_UINT8 || blocks->ndim < 3 || blocks->shape[blocks->ndim - 1] != 16)
    return ml_fail(ML_EINVAL, "%s: the blocks must be uint8 (..., O, G, 16), got %s %s", fn,
                   ml_dtype_name(blocks->dtype), ml_shape_str(blocks->ndim, blocks->shape, sb, sizeof sb));
  bool ok = scales->dtype == ML_UINT8 && scales->ndim == blocks->ndim - 1;
  for (int d = 0; ok && d < scales->ndim; d++) ok = scales->shape[d] == blocks->shape[d];
  if (!ok)
    return ml_fail(ML_EINVAL, "%s: the scales must be uint8 %s (the blocks' shape without the last dim), got %s %s",
                   fn, ml_shape_str(blocks->ndim - 1, blocks->shape, sb, sizeof sb), ml_dtype_name(scales->dtype),
                   ml_shape_str(scales->ndim, scales->shape, ss, sizeof ss));
  return ML_OK;
}

// --- dequantize ---------------------------------------------------------------------------------

typedef struct {
  const uint8_t *b, *s;        /* blocks (last dim contiguous), scales */
  int nlead;                   /* dims before G */
  const int64_t *shape, *b_str, *s_str;   /* of blocks, scales: the leading dims' */
  int64_t G, b_grp, s_grp;     /* groups a row and their strides */
  void *out;                   /* (rows, G * 32) of dtype, contiguous */
  ml_dtype dtype;
  bool ggml_order;
} mx_dequant_job;

enum { MX_CHUNK = 8 };         /* groups converted a time into another dtype */

static void dequantize_rows(void *arg, int64_t r0, int64_t r1) {
  const mx_dequant_job *j = arg;
  float buf[MX_CHUNK * 32];
  size_t oe = ml_dtype_size(j->dtype);
  for (int64_t r = r0; r < r1; r++) {
    const uint8_t *b = j->b + lead_offset(r, j->nlead, j->shape, j->b_str);
    const uint8_t *s = j->s + lead_offset(r, j->nlead, j->shape, j->s_str);
    char *o = (char *)j->out + r * j->G * 32 * (int64_t)oe;
    for (int64_t g0 = 0; g0 < j->G; g0 += MX_CHUNK) {
      int64_t n = j->G - g0 < MX_CHUNK ? j->G - g0 : MX_CHUNK;
      float *dst = j->dtype == ML_FLOAT32 ? (float *)o + g0 * 32 : buf;
      for (int64_t g = 0; g < n; g++)
        fp4x32(b + (g0 + g) * j->b_grp, j->ggml_order, half_scale(s[(g0 + g) * j->s_grp]), dst + g * 32);
      if (j->dtype != ML_FLOAT32) ml_convert_fast(buf, ML_FLOAT32, o + g0 * 32 * (int64_t)oe, j->dtype, n * 32);
    }
  }
}

ml_status ml_dequantize_mxfp4(const ml_tensor *blocks, const ml_tensor *scales, bool ggml_order, ml_dtype dtype,
                              ml_tensor **out) {
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route("dequantize_mxfp4", 2, (const ml_tensor *[]){blocks, scales},
                     (const char *[]){"the blocks", "the scales"}, &cu));
  if (cu && !cu->dequantize_mxfp4) return ml_no_cuda_kernel("dequantize_mxfp4", blocks);
  if (!(dtype == ML_FLOAT32 || dtype == ML_FLOAT16 || dtype == ML_BFLOAT16))
    return ml_fail(ML_EINVAL, "dequantize_mxfp4: the output dtype must be float32, float16 or bfloat16, got %s",
                   ml_dtype_name(dtype));
  ML_TRY(check_operands("dequantize_mxfp4", blocks, scales));
  int nd = blocks->ndim - 1;
  int64_t oshape[ML_MAX_DIMS];
  memcpy(oshape, blocks->shape, sizeof oshape);
  oshape[nd - 1] = blocks->shape[nd - 1] * 32;      /* (..., O, G * 32) */
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(dtype, nd, oshape, blocks->storage->device, &o));
  ml_status st = ML_OK;
  if (cu) st = cu->dequantize_mxfp4(blocks, scales, ggml_order, o);   /* (any strides) */
  else if (ml_tensor_numel(o) > 0) {
    ml_tensor *bc = NULL;                              /* 16 bytes a group in a row, else a copy */
    const ml_tensor *bt = blocks;
    if (blocks->strides[nd] != 1) {
      st = ml_tensor_contiguous(blocks, &bc);
      bt = bc;
    }
    if (!st) {
      int64_t G = blocks->shape[nd - 1], rows = ml_tensor_numel(o) / (G * 32);
      mx_dequant_job j = {ml_tensor_data(bt), ml_tensor_data(scales), nd - 1, bt->shape, bt->strides, scales->strides,
                          G, bt->strides[nd - 1], scales->strides[nd - 1], ml_tensor_data(o), dtype, ggml_order};
      ml_parallel_for(rows, G * 64, dequantize_rows, &j);
    }
    if (bc) ml_tensor_release(bc);
  }
  if (st) { ml_tensor_release(o); return st; }
  *out = o;
  return ML_OK;
}

/* --- mxfp4_linear: x W^T + b straight from the packed bytes, for a few rows ---------------------

   As fp8_linear (cpu/fp8.c): a decoding step reads each weight once, so the bytes it reads are
   the time it takes; expanding first would write and read 8 bytes a weight where the blocks
   hold half of one. Each group's 16 bytes become 32 floats in registers (nibbles split and put
   in element order, then one byte shuffle through twice the e2m1 values as int8, widened to
   floats), multiplied into up to MX_GROUP input rows; each group's sum is scaled once, by
   2^(scale - 128). Output columns are spread over the threads (cpu/few_rows.c). More rows than
   MX_MAX_ROWS (a prompt) expand the weight and go through the GEMM. */
enum { MX_GROUP = 4, MX_MAX_ROWS = ML_FEW_ROWS };

typedef struct {
  int64_t M, N, K, G;
  const float *x;              /* M x K float32, contiguous */
  const uint8_t *b;            /* row n, group g at b + n * b_row + g * b_grp: 16 bytes */
  int64_t b_row, b_grp;
  const uint8_t *s;            /* at s + n * s_row + g * s_grp */
  int64_t s_row, s_grp;
  bool ggml_order;
} mx_linear_job;

/* dots[m] = sum over k of x[m][k] * W[n][k] for R rows of x from x0, W's row n at br, sr. */
static void mx_row_dots(const mx_linear_job *j, const float *x0, int64_t R, const uint8_t *br, const uint8_t *sr,
                        float *dots) {
  int64_t K = j->K;
#if ML_MXFP4_SIMD
  const __m128i lut = _mm_loadu_si128((const __m128i *)fp4_twice);
  __m256 acc[MX_GROUP];
  for (int64_t m = 0; m < R; m++) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < j->G; g++) {
    __m128i lo, hi;
    fp4_nibbles(br + g * j->b_grp, j->ggml_order, &lo, &hi);
    lo = _mm_shuffle_epi8(lut, lo);
    hi = _mm_shuffle_epi8(lut, hi);
    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
    __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
    __m256 vs = _mm256_set1_ps(half_scale(sr[g * j->s_grp]));
    const float *xg = x0 + g * 32;
    for (int64_t m = 0; m < R; m++) {
      const float *xm = xg + m * K;
      __m256 p0 = _mm256_mul_ps(_mm256_loadu_ps(xm), w0), p1 = _mm256_mul_ps(_mm256_loadu_ps(xm + 8), w1);
      p0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 16), w2, p0);
      p1 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 24), w3, p1);
      acc[m] = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), vs, acc[m]);
    }
  }
  for (int64_t m = 0; m < R; m++) dots[m] = ml_hsum256(acc[m]);
#else
  for (int64_t m = 0; m < R; m++) dots[m] = 0;
  for (int64_t g = 0; g < j->G; g++) {
    const uint8_t *p = br + g * j->b_grp;
    float half = half_scale(sr[g * j->s_grp]);
    for (int64_t m = 0; m < R; m++) {
      const float *xm = x0 + m * K + g * 32;
      float part = 0;
      for (int q = 0; q < 16; q++) {
        int lo = j->ggml_order ? q : 2 * q, hi = j->ggml_order ? q + 16 : 2 * q + 1;
        part += xm[lo] * fp4_twice_f[p[q] & 15] + xm[hi] * fp4_twice_f[p[q] >> 4];
      }
      dots[m] += part * half;
    }
  }
#endif
}

/* dots[m] for every row m of x against the weight's row n (ml_few_rows_run's callback). */
static void mx_column_dots(const void *ctx, int64_t n, float *dots) {
  const mx_linear_job *j = ctx;
  for (int64_t m0 = 0; m0 < j->M; m0 += MX_GROUP) {
    int64_t R = j->M - m0 < MX_GROUP ? j->M - m0 : MX_GROUP;
    mx_row_dots(j, j->x + m0 * j->K, R, j->b + n * j->b_row, j->s + n * j->s_row, dots + m0);
  }
}

/* A prompt, or a GPU: the weight expanded into the input's dtype (the bias too), then the GEMM. */
static ml_status mxfp4_linear_gemm(const ml_tensor *x, const ml_tensor *blocks, const ml_tensor *scales,
                                   bool ggml_order, const ml_tensor *b, ml_tensor **out) {
  ml_tensor *w, *bc = NULL;                          /* (O, G * 32) */
  ML_TRY(ml_dequantize_mxfp4(blocks, scales, ggml_order, x->dtype, &w));
  ml_status st = ML_OK;
  if (b && b->dtype != x->dtype) st = ml_tensor_to(b, b->storage->device, x->dtype, &bc);
  if (!st) st = ml_linear(x, w, bc ? bc : b, out);
  ml_tensor_release(w);
  if (bc) ml_tensor_release(bc);
  return st;
}

ml_status ml_mxfp4_linear(const ml_tensor *x, const ml_tensor *blocks, const ml_tensor *scales, bool ggml_order,
                          const ml_tensor *b, ml_tensor **out) {
  char sx[ML_SHAPE_BUF], sw[ML_SHAPE_BUF];
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route("mxfp4_linear", 4, (const ml_tensor *[]){x, blocks, scales, b},
                     (const char *[]){"the input", "the blocks", "the scales", "the bias"}, &cu));
  if (!(x->dtype == ML_FLOAT32 || x->dtype == ML_FLOAT16 || x->dtype == ML_BFLOAT16))
    return ml_fail(ML_EINVAL, "mxfp4_linear: the input must be float32, float16 or bfloat16, got %s",
                   ml_dtype_name(x->dtype));
  if (blocks->ndim != 3)
    return ml_fail(ML_EINVAL, "mxfp4_linear: the blocks must be uint8 (O, G, 16), got %s %s",
                   ml_dtype_name(blocks->dtype), ml_shape_str(blocks->ndim, blocks->shape, sw, sizeof sw));
  ML_TRY(check_operands("mxfp4_linear", blocks, scales));
  int64_t N = blocks->shape[0], G = blocks->shape[1], K = G * 32;
  if (x->ndim == 0 || x->shape[x->ndim - 1] != K)
    return ml_fail(ML_EINVAL, "mxfp4_linear: input of shape %s does not match blocks of shape %s (in_features %lld)",
                   ml_shape_str(x->ndim, x->shape, sx, sizeof sx), ml_shape_str(3, blocks->shape, sw, sizeof sw),
                   (long long)K);
  if (b && (b->ndim != 1 || b->shape[0] != N || !ml_dtype_is_floating(b->dtype)))
    return ml_fail(ML_EINVAL, "mxfp4_linear: the bias must be floating (out_features = %lld), got %s %s", (long long)N,
                   ml_dtype_name(b->dtype), ml_shape_str(b->ndim, b->shape, sx, sizeof sx));
  int64_t M = K ? ml_tensor_numel(x) / K : 0;
  if (cu || M < 1 || M > MX_MAX_ROWS || blocks->strides[2] != 1)
    return mxfp4_linear_gemm(x, blocks, scales, ggml_order, b, out);

  float *xf, *bf;
  ml_tensor *o;
  ML_TRY(ml_few_rows_operands("mxfp4_linear", x, b, M, K, N, &xf, &bf, &o));
  mx_linear_job j = {M, N, K, G, xf, ml_tensor_data(blocks), blocks->strides[0], blocks->strides[1],
                     ml_tensor_data(scales), scales->strides[0], scales->strides[1], ggml_order};
  ml_few_rows_run(&(ml_few_rows_job){M, N, bf, ml_tensor_data(o), x->dtype, mx_column_dots, &j}, K * M);
  free(xf);
  *out = o;
  return ML_OK;
}
