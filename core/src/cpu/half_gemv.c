/* half_gemv.c: products of a few rows of A (decoding: M <= 4) with a float16/bfloat16 B whose
   columns are contiguous along K, which is what a linear layer's weight is. Each output is a
   float32 dot product of an A row with a B column converted in registers, so the weights stream
   from memory once, at memory speed, instead of being converted into float32 panels that the
   BLAS gemv then reads again (2.2x the decode speed of a bfloat16 layer). When both operands are
   bfloat16 and the CPU has AVX512-BF16, the pairs are multiplied by vdpbf16ps instead. Columns
   are spread over the threads. */
#include "cpu/gemm.h"
#include "cpu/rows.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ML_HALF_SIMD 1
#endif

enum { HALF_MAX_ROWS = 4, HALF_COLS = 64 };

typedef struct {
  int64_t M, N, K, ldc;
  double alpha;
  const float *a;              /* M x K float32, contiguous (or NULL with a16) */
  const uint16_t *a16;         /* M x K bfloat16, contiguous: both operands bfloat16, AVX512-BF16 */
  const uint16_t *b;           /* column n at b + n * bcs, K contiguous halves */
  int64_t bcs;
  bool bf16;
  const float *bias;           /* N float32, or NULL */
  uint8_t *c;
  ml_dtype cdt;
} half_job;

#if ML_HALF_SIMD
static inline __m256 load8(const uint16_t *p, bool bf16) {
  __m128i h = _mm_loadu_si128((const __m128i *)p);
  if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

static inline float half_at(const uint16_t *p, bool bf16) { return bf16 ? ml_bf16_to_f32(*p) : ml_f16_to_f32(*p); }

/* out[m] = sum_k a[m][k] * col[k] for the M rows of A: one pass over the column. */
static void column_dots(const half_job *j, const uint16_t *col, float *out) {
  int64_t K = j->K, M = j->M, k = 0;
  const float *a = j->a;
#if ML_HALF_SIMD
  __m256 acc[HALF_MAX_ROWS][2];
  for (int64_t m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {          /* two accumulators per row hide the FMA latency */
    __m256 w0 = load8(col + k, j->bf16), w1 = load8(col + k + 8, j->bf16);
    for (int64_t m = 0; m < M; m++) {
      acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + m * K + k), w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(a + m * K + k + 8), w1, acc[m][1]);
    }
  }
  for (int64_t m = 0; m < M; m++) out[m] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
#else
  for (int64_t m = 0; m < M; m++) out[m] = 0;
#endif
  for (; k < K; k++) {
    float w = half_at(col + k, j->bf16);
    for (int64_t m = 0; m < M; m++) out[m] += a[m * K + k] * w;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
/* Both operands bfloat16 on an AVX512-BF16 CPU: 32 products per instruction, exact, summed in
   float32 (as PyTorch); two sums per row break the dependency chain at one row. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void column_dots_bf16(const half_job *j, const uint16_t *col, float *out) {
  int64_t K = j->K, M = j->M, k = 0;
  const uint16_t *a = j->a16;
  __m512 acc[HALF_MAX_ROWS][2];
  for (int64_t m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (; k + 64 <= K; k += 64) {
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(col + k), b1 = (__m512bh)_mm512_loadu_si512(col + k + 32);
    for (int64_t m = 0; m < M; m++) {
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_loadu_si512(a + m * K + k), b0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)_mm512_loadu_si512(a + m * K + k + 32), b1);
    }
  }
  for (; k < K; k += 32) {                /* masked: nothing past the column is read */
    __mmask32 mask = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1);
    __m512bh b = (__m512bh)_mm512_maskz_loadu_epi16(mask, col + k);
    for (int64_t m = 0; m < M; m++)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_maskz_loadu_epi16(mask, a + m * K + k), b);
  }
  for (int64_t m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}
#define ML_HAVE_BF16_DOTS 1
#endif

static void half_columns(void *ctx, int64_t begin, int64_t end) {
  const half_job *j = ctx;
  float acc[HALF_MAX_ROWS][HALF_COLS], dots[HALF_MAX_ROWS];
  size_t oe = ml_dtype_size(j->cdt);
  for (int64_t blk = begin; blk < end; blk++) {
    int64_t n0 = blk * HALF_COLS, w = j->N - n0 < HALF_COLS ? j->N - n0 : HALF_COLS;
    for (int64_t i = 0; i < w; i++) {
#if ML_HAVE_BF16_DOTS
      if (j->a16) column_dots_bf16(j, j->b + (n0 + i) * j->bcs, dots);
      else
#endif
      column_dots(j, j->b + (n0 + i) * j->bcs, dots);
      float add = j->bias ? j->bias[n0 + i] : 0.0f;
      for (int64_t m = 0; m < j->M; m++) acc[m][i] = (float)(j->alpha * dots[m]) + add;
    }
    for (int64_t m = 0; m < j->M; m++)
      ml_convert_fast(acc[m], ML_FLOAT32, j->c + (m * j->ldc + n0) * (int64_t)oe, j->cdt, w);
  }
}

bool ml_half_gemv_applies(int64_t M, int64_t K, ml_dtype ct, ml_mref B) {
  return M >= 1 && M <= HALF_MAX_ROWS && K > 0 && ct == ML_FLOAT32 &&
         (B.dt == ML_FLOAT16 || B.dt == ML_BFLOAT16) && B.rs == 1;
}

ml_status ml_half_gemv(const char *fn, int64_t M, int64_t N, int64_t K, double alpha, ml_mref A, ml_mref B,
                       const float *bias, void *C, ml_dtype cdt, int64_t ldc) {
  /* the input rows, contiguous: bfloat16 as they are when both operands are bfloat16 and the CPU
     multiplies bfloat16 pairs, else widened to float32 */
  bool dots16 = A.dt == ML_BFLOAT16 && B.dt == ML_BFLOAT16 && ml_bf16_gemm_available();
  size_t ae = ml_dtype_size(A.dt), rowsize = dots16 ? sizeof(uint16_t) : sizeof(float);
  uint8_t *a = malloc((size_t)(M * K) * rowsize);
  if (!a) return ml_fail(ML_ENOMEM, "%s: out of memory for a %lld x %lld copy of the input", fn, (long long)M,
                         (long long)K);
  for (int64_t m = 0; m < M; m++) {
    const uint8_t *row = (const uint8_t *)A.p + m * A.rs * (int64_t)ae;
    if (dots16 && A.cs == 1)
      memcpy(a + m * K * 2, row, (size_t)K * 2);
    else if (dots16)
      for (int64_t k = 0; k < K; k++) memcpy(a + (m * K + k) * 2, row + k * A.cs * 2, 2);
    else
      ml_row_load(a + m * K * (int64_t)rowsize, ML_FLOAT32, row, A.dt, K, A.cs);
  }
  half_job j = {M, N, K, ldc, alpha, dots16 ? NULL : (const float *)a, dots16 ? (const uint16_t *)a : NULL,
                B.p, B.cs, B.dt == ML_BFLOAT16, bias, C, cdt};
  ml_parallel_for((N + HALF_COLS - 1) / HALF_COLS, HALF_COLS * M * K / 4 + 1, half_columns, &j);
  free(a);
  return ML_OK;
}
