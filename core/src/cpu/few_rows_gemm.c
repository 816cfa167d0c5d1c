/* few_rows_gemm.c: products of a few rows of A (decoding, a handful of beams or prompts:
   M <= 16) with a B whose columns are contiguous along K, which is what a linear layer's weight
   is (float32, float16 or bfloat16). Each output is a float32 dot product of an A row with a B
   column (halves converted in registers), so the weights stream from memory once, at memory
   speed. The BLAS instead packs the whole of B into panels first, for any M > 1: 4x slower at 2
   to 16 float32 rows, and for halves the conversion into float32 panels costs as much again
   (2.2x the decode speed of a bfloat16 layer). Rows go four at a time through a column, which
   stays in L1 between the groups. When both operands are bfloat16 and the CPU has AVX512-BF16,
   the pairs are multiplied by vdpbf16ps instead, four rows by four columns at a time: sixteen
   independent sums, where one column at a time left a single row's two sums waiting on the
   instruction's latency (a 262144 x 1536 head: 11.8 ms against 20.2; PyTorch 16.1). Widened
   halves take 16 at a time on an AVX-512 CPU (a float16 65536 x 1536 layer at 4 rows: 5.9 ms
   against 10.2 with AVX2).
   Columns are spread over the threads. */
#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "cpu/rows.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ML_FEW_SIMD 1
#endif

/* GROUP rows share each load of a column (4 rows x 2 accumulators fill half the AVX2
   registers); up to MAX_ROWS rows in all. */
enum { FEW_GROUP = 4, FEW_MAX_ROWS = 16, FEW_COLS = 64 };

typedef struct {
  int64_t M, N, K, ldc;
  double alpha;
  const float *a;              /* M x K float32, contiguous (or NULL with a16) */
  const uint16_t *a16;         /* M x K bfloat16, contiguous: both operands bfloat16, AVX512-BF16 */
  const uint8_t *b;            /* column n at b + n * bcs elements of bdt, K contiguous */
  int64_t bcs;
  ml_dtype bdt;
  const float *bias;           /* N float32, or NULL */
  uint8_t *c;
  ml_dtype cdt;
} few_job;

#if ML_FEW_SIMD
static inline __m256 load8(const uint8_t *col, int64_t k, ml_dtype dt) {
  if (dt == ML_FLOAT32) return _mm256_loadu_ps((const float *)col + k);
  __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)col + k));
  if (dt == ML_BFLOAT16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

#endif

static inline float b_at(const uint8_t *col, int64_t k, ml_dtype dt) {
  if (dt == ML_FLOAT32) return ((const float *)col)[k];
  uint16_t h = ((const uint16_t *)col)[k];
  return dt == ML_BFLOAT16 ? ml_bf16_to_f32(h) : ml_f16_to_f32(h);
}

/* out[c][m] = sum_k a[m][k] * col_c[k] for the rows m of a (row stride K), G <= FEW_GROUP of
   them, and NC <= 2 columns: one pass over the columns, each load of a row feeding NC products.
   Inlined for each constant G, NC and dtype (column_dots), so that the loops over rows and
   columns unroll and the G x NC accumulators stay in registers. */
static inline __attribute__((always_inline)) void column_dots_g(const few_job *j, const float *a, const int64_t G,
                                                                const int NC, const ml_dtype dt,
                                                                const uint8_t *const *cols, float (*out)[FEW_MAX_ROWS]) {
  int64_t K = j->K, k = 0;
#if ML_FEW_SIMD
  __m256 acc[FEW_GROUP][4];
  for (int64_t m = 0; m < G; m++)
    for (int c = 0; c < NC; c++) acc[m][c] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 w[4];
    for (int c = 0; c < NC; c++) w[c] = load8(cols[c], k, dt);
    for (int64_t m = 0; m < G; m++) {
      __m256 x = _mm256_loadu_ps(a + m * K + k);
      for (int c = 0; c < NC; c++) acc[m][c] = _mm256_fmadd_ps(x, w[c], acc[m][c]);
    }
  }
  for (int c = 0; c < NC; c++)
    for (int64_t m = 0; m < G; m++) out[c][m] = ml_hsum256(acc[m][c]);
#else
  for (int c = 0; c < NC; c++)
    for (int64_t m = 0; m < G; m++) out[c][m] = 0;
#endif
  for (; k < K; k++)
    for (int c = 0; c < NC; c++) {
      float w = b_at(cols[c], k, dt);
      for (int64_t m = 0; m < G; m++) out[c][m] += a[m * K + k] * w;
    }
}

/* column_dots_g for each constant row count, column count and weight dtype */
#define FEW_DOTS_FOR(NC, DT)                                                                               \
  switch (G) {                                                                                             \
  case 1: column_dots_g(j, a, 1, NC, DT, cols, out); return;                                               \
  case 2: column_dots_g(j, a, 2, NC, DT, cols, out); return;                                               \
  case 3: column_dots_g(j, a, 3, NC, DT, cols, out); return;                                               \
  default: column_dots_g(j, a, FEW_GROUP, NC, DT, cols, out); return;                                      \
  }

static void column_dots(const few_job *j, const float *a, int64_t G, int nc, const uint8_t *const *cols,
                        float (*out)[FEW_MAX_ROWS]) {
  if (nc == 4) {                          /* (one or two rows only: the sums fill the AVX2 registers) */
    if (j->bdt == ML_FLOAT32) FEW_DOTS_FOR(4, ML_FLOAT32)
    if (j->bdt == ML_BFLOAT16) FEW_DOTS_FOR(4, ML_BFLOAT16)
    FEW_DOTS_FOR(4, ML_FLOAT16)
  }
  if (nc == 2) {
    if (j->bdt == ML_FLOAT32) FEW_DOTS_FOR(2, ML_FLOAT32)
    if (j->bdt == ML_BFLOAT16) FEW_DOTS_FOR(2, ML_BFLOAT16)
    FEW_DOTS_FOR(2, ML_FLOAT16)
  }
  if (j->bdt == ML_FLOAT32) FEW_DOTS_FOR(1, ML_FLOAT32)
  if (j->bdt == ML_BFLOAT16) FEW_DOTS_FOR(1, ML_BFLOAT16)
  FEW_DOTS_FOR(1, ML_FLOAT16)
}

#if defined(__x86_64__) && defined(__GNUC__)
/* column_dots_g on an AVX-512 CPU (ml_avx512) for half weights: 16 widened a load, 32 registers
   for the G x NC sums (2 or 4 columns) and the widened columns. */
__attribute__((target("avx512f,avx512bw"), always_inline))
static inline __m512 load16(const uint8_t *col, int64_t k, const ml_dtype dt) {
  if (dt == ML_FLOAT32) return _mm512_loadu_ps((const float *)col + k);
  __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)col + k));
  if (dt == ML_BFLOAT16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

__attribute__((target("avx512f,avx512bw"), always_inline))
static inline void column_dots_512_g(const few_job *j, const float *a, const int64_t G, const int NC, const ml_dtype dt,
                                     const uint8_t *const *cols, float (*out)[FEW_MAX_ROWS]) {
  int64_t K = j->K, k = 0;
  __m512 acc[FEW_GROUP][4];
  for (int64_t m = 0; m < G; m++)
    for (int c = 0; c < NC; c++) acc[m][c] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    __m512 w[4];
    for (int c = 0; c < NC; c++) w[c] = load16(cols[c], k, dt);
    for (int64_t m = 0; m < G; m++) {
      __m512 x = _mm512_loadu_ps(a + m * K + k);
      for (int c = 0; c < NC; c++) acc[m][c] = _mm512_fmadd_ps(x, w[c], acc[m][c]);
    }
  }
  for (int c = 0; c < NC; c++)
    for (int64_t m = 0; m < G; m++) out[c][m] = _mm512_reduce_add_ps(acc[m][c]);
  for (; k < K; k++)
    for (int c = 0; c < NC; c++) {
      float w = b_at(cols[c], k, dt);
      for (int64_t m = 0; m < G; m++) out[c][m] += a[m * K + k] * w;
    }
}

#define FEW_DOTS_512_FOR(NC, DT)                                                                           \
  switch (G) {                                                                                             \
  case 1: column_dots_512_g(j, a, 1, NC, DT, cols, out); return;                                           \
  case 2: column_dots_512_g(j, a, 2, NC, DT, cols, out); return;                                           \
  case 3: column_dots_512_g(j, a, 3, NC, DT, cols, out); return;                                           \
  default: column_dots_512_g(j, a, FEW_GROUP, NC, DT, cols, out); return;                                  \
  }

__attribute__((target("avx512f,avx512bw")))
static void column_dots_512(const few_job *j, const float *a, int64_t G, int nc, const uint8_t *const *cols,
                            float (*out)[FEW_MAX_ROWS]) {
  if (nc == 4) {
    if (j->bdt == ML_FLOAT32) FEW_DOTS_512_FOR(4, ML_FLOAT32)
    if (j->bdt == ML_BFLOAT16) FEW_DOTS_512_FOR(4, ML_BFLOAT16)
    FEW_DOTS_512_FOR(4, ML_FLOAT16)
  }
  if (nc == 2) {
    if (j->bdt == ML_FLOAT32) FEW_DOTS_512_FOR(2, ML_FLOAT32)
    if (j->bdt == ML_BFLOAT16) FEW_DOTS_512_FOR(2, ML_BFLOAT16)
    FEW_DOTS_512_FOR(2, ML_FLOAT16)
  }
  if (j->bdt == ML_FLOAT32) FEW_DOTS_512_FOR(1, ML_FLOAT32)
  if (j->bdt == ML_BFLOAT16) FEW_DOTS_512_FOR(1, ML_BFLOAT16)
  FEW_DOTS_512_FOR(1, ML_FLOAT16)
}
#define ML_HAVE_FEW_512 1

/* Both operands bfloat16 on an AVX512-BF16 CPU: 32 products per instruction, exact, summed in
   float32 (as PyTorch); two sums per row break the dependency chain at one row. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void column_dots_bf16(const few_job *j, const uint16_t *a, int64_t G, const uint16_t *col, float *out) {
  int64_t K = j->K, k = 0;
  __m512 acc[FEW_GROUP][2];
  for (int64_t m = 0; m < G; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (; k + 64 <= K; k += 64) {
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(col + k), b1 = (__m512bh)_mm512_loadu_si512(col + k + 32);
    for (int64_t m = 0; m < G; m++) {
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_loadu_si512(a + m * K + k), b0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)_mm512_loadu_si512(a + m * K + k + 32), b1);
    }
  }
  for (; k < K; k += 32) {                /* masked: nothing past the column is read */
    __mmask32 mask = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1);
    __m512bh b = (__m512bh)_mm512_maskz_loadu_epi16(mask, col + k);
    for (int64_t m = 0; m < G; m++)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_maskz_loadu_epi16(mask, a + m * K + k), b);
  }
  for (int64_t m = 0; m < G; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

/* G <= 4 bfloat16 rows against 4 columns (decoding steps: one row, or a few beams or prompts):
   each 32-value piece of a column, loaded once, meets the G rows, and the G x 4 sums are
   independent chains, so the dot-product unit is never waiting on the last one; the columns,
   neighbours in memory, stream as one. Inlined for each constant G. */
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline))
static inline void column_dots_bf16_x4_g(const few_job *j, const uint16_t *a, const int64_t G, const uint16_t *col,
                                         int64_t cs, float (*out)[FEW_MAX_ROWS]) {
  int64_t K = j->K, k = 0;
  __m512 acc[FEW_GROUP][4];
  for (int64_t m = 0; m < G; m++)
    for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    __m512bh w[4];
    for (int c = 0; c < 4; c++) w[c] = (__m512bh)_mm512_loadu_si512(col + c * cs + k);
    for (int64_t m = 0; m < G; m++) {
      __m512bh x = (__m512bh)_mm512_loadu_si512(a + m * K + k);
      for (int c = 0; c < 4; c++) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], x, w[c]);
    }
  }
  if (k < K) {                            /* masked: nothing past a column is read */
    __mmask32 mask = (__mmask32)((1u << (K - k)) - 1);
    __m512bh w[4];
    for (int c = 0; c < 4; c++) w[c] = (__m512bh)_mm512_maskz_loadu_epi16(mask, col + c * cs + k);
    for (int64_t m = 0; m < G; m++) {
      __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(mask, a + m * K + k);
      for (int c = 0; c < 4; c++) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], x, w[c]);
    }
  }
  for (int c = 0; c < 4; c++)
    for (int64_t m = 0; m < G; m++) out[c][m] = _mm512_reduce_add_ps(acc[m][c]);
}

__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void column_dots_bf16_x4(const few_job *j, const uint16_t *a, int64_t G, const uint16_t *col, int64_t cs,
                                float (*out)[FEW_MAX_ROWS]) {
  switch (G) {
  case 1: column_dots_bf16_x4_g(j, a, 1, col, cs, out); return;
  case 2: column_dots_bf16_x4_g(j, a, 2, col, cs, out); return;
  case 3: column_dots_bf16_x4_g(j, a, 3, col, cs, out); return;
  default: column_dots_bf16_x4_g(j, a, FEW_GROUP, col, cs, out); return;
  }
}
#define ML_HAVE_BF16_DOTS 1
#endif

static void few_columns(void *ctx, int64_t begin, int64_t end) {
  const few_job *j = ctx;
#if ML_HAVE_FEW_512
  /* (float32 weights need no widening and gain little: they keep the AVX2 sums, whose order the
     cached decoding steps are checked against) */
  const bool avx512 = j->bdt != ML_FLOAT32 && ml_avx512();
#else
  const bool avx512 = false;
#endif
  float acc[FEW_MAX_ROWS][FEW_COLS], dots[4][FEW_MAX_ROWS];
  size_t oe = ml_dtype_size(j->cdt), be = ml_dtype_size(j->bdt);
  for (int64_t blk = begin; blk < end; blk++) {
    int64_t n0 = blk * FEW_COLS, w = j->N - n0 < FEW_COLS ? j->N - n0 : FEW_COLS;
    int64_t i = 0;
#if ML_HAVE_BF16_DOTS
    if (j->a16)                           /* four columns at a time, then the last one to three below */
      for (; i + 4 <= w; i += 4) {
        float d[4][FEW_MAX_ROWS];
        const uint16_t *col = (const uint16_t *)j->b + (n0 + i) * j->bcs;
        for (int64_t m0 = 0; m0 < j->M; m0 += FEW_GROUP) {
          float part[4][FEW_MAX_ROWS];
          int64_t G = j->M - m0 < FEW_GROUP ? j->M - m0 : FEW_GROUP;
          column_dots_bf16_x4(j, j->a16 + m0 * j->K, G, col, j->bcs, part);
          for (int c = 0; c < 4; c++)
            for (int64_t m = 0; m < G; m++) d[c][m0 + m] = part[c][m];
        }
        for (int c = 0; c < 4; c++) {
          float add = j->bias ? j->bias[n0 + i + c] : 0.0f;
          for (int64_t m = 0; m < j->M; m++) acc[m][i + c] = (float)(j->alpha * d[c][m]) + add;
        }
      }
#endif
    /* columns two at a time, four for one or two rows (four rows too with AVX-512's 32
       registers): independent sums enough to cover the FMA's latency */
    for (int nc; i < w; i += nc) {
      nc = (j->M <= 2 || avx512) && w - i >= 4 ? 4 : w - i >= 2 ? 2 : 1;
      const uint8_t *cols[4];
      for (int c = 0; c < nc; c++) cols[c] = j->b + (n0 + i + c) * j->bcs * (int64_t)be;
      for (int64_t m0 = 0; m0 < j->M; m0 += FEW_GROUP) {
        int64_t G = j->M - m0 < FEW_GROUP ? j->M - m0 : FEW_GROUP;
#if ML_HAVE_BF16_DOTS
        if (j->a16) {
          for (int c = 0; c < nc; c++)
            column_dots_bf16(j, j->a16 + m0 * j->K, G, (const uint16_t *)cols[c], dots[c] + m0);
          continue;
        }
#endif
        float part[4][FEW_MAX_ROWS];
#if ML_HAVE_FEW_512
        if (avx512) column_dots_512(j, j->a + m0 * j->K, G, nc, cols, part); else
#endif
        column_dots(j, j->a + m0 * j->K, G, nc, cols, part);
        for (int c = 0; c < nc; c++)
          for (int64_t m = 0; m < G; m++) dots[c][m0 + m] = part[c][m];
      }
      for (int c = 0; c < nc; c++) {
        float add = j->bias ? j->bias[n0 + i + c] : 0.0f;
        for (int64_t m = 0; m < j->M; m++) acc[m][i + c] = (float)(j->alpha * dots[c][m]) + add;
      }
    }
    for (int64_t m = 0; m < j->M; m++)
      ml_convert_fast(acc[m], ML_FLOAT32, j->c + (m * j->ldc + n0) * (int64_t)oe, j->cdt, w);
  }
}

/* float32 weights from 2 rows (the BLAS gemv already streams them for one), halves from 1. */
bool ml_few_rows_gemm_applies(int64_t M, int64_t K, ml_dtype ct, ml_mref B) {
  int64_t least = B.dt == ML_FLOAT32 ? 2 : 1;
  return M >= least && M <= FEW_MAX_ROWS && K > 0 && ct == ML_FLOAT32 &&
         (B.dt == ML_FLOAT32 || B.dt == ML_FLOAT16 || B.dt == ML_BFLOAT16) && B.rs == 1;
}

ml_status ml_few_rows_gemm(const char *fn, int64_t M, int64_t N, int64_t K, double alpha, ml_mref A, ml_mref B,
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
  few_job j = {M, N, K, ldc, alpha, dots16 ? NULL : (const float *)a, dots16 ? (const uint16_t *)a : NULL,
               B.p, B.cs, B.dt, bias, C, cdt};
  ml_parallel_for((N + FEW_COLS - 1) / FEW_COLS, FEW_COLS * M * K / 4 + 1, few_columns, &j);
  free(a);
  return ML_OK;
}
