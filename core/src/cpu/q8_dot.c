/* q8_dot.c: the decode path of quantized linears with int8 activations (llama.cpp's Q8_0 x Q8_0
   and Q8_0 x Q4_0 dots). Widening every weight to float32 costs more than reading it on a few
   cores (the float path of q8.c runs at about 0.7 of the memory's bandwidth for int8, less for
   int4); rounding the few activation rows to int8 once instead lets each block of 32 weights
   meet them in one integer multiply-add instruction. The block sums are exact integers: the
   AVX512-VNNI, AVX2 and plain C paths give the same sum per block, and differ only in the order
   of the float additions over blocks (the SIMD paths not at all). */
#include "cpu/q8_dot.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

enum { BLOCK = ML_Q8_DOT_BLOCK };

void ml_q8_round_rows(const float *x, int64_t M, int64_t K, int8_t *values, float *scales) {
  for (int64_t m = 0; m < M; m++)
    for (int64_t b = 0; b < K / BLOCK; b++)
      scales[m * (K / BLOCK) + b] = ml_q8_round_block(x + m * K + b * BLOCK, BLOCK, values + m * K + b * BLOCK, 1);
}

/* Weight value i (0..31) of a block as stored: int8, or int4 (nibble - 8; low nibbles 0-15). */
static inline int block_value(const uint8_t *p, int bits, int i) {
  if (bits == 8) return (int8_t)p[i];
  return i < 16 ? (p[i] & 15) - 8 : (p[i - 16] >> 4) - 8;
}

/* Columns i < n of the weight (each nb blocks of bb bytes, one after another). */
static void dot_columns_c(const ml_q8_rows *x, const uint8_t *columns, const float *scales, int bits, int64_t n,
                          float *out, int64_t ldo) {
  int64_t nb = x->K / BLOCK, bb = BLOCK * bits / 8;
  for (int64_t i = 0; i < n; i++)
    for (int64_t m = 0; m < x->M; m++) {
      const int8_t *xv = x->values + m * x->K;
      const float *xs = x->scales + m * nb;
      const uint8_t *col = columns + i * nb * bb;
      float acc = 0;
      for (int64_t b = 0; b < nb; b++) {
        int32_t d = 0;
        for (int j = 0; j < BLOCK; j++) d += (int32_t)xv[b * BLOCK + j] * block_value(col + b * bb, bits, j);
        acc += (float)d * (scales[i * nb + b] * xs[b]);
      }
      out[m * ldo + i] = acc;
    }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__GNUC__)
/* A block's 32 weights as signed bytes (int4: the low nibbles are values 0-15, the high ones 16-31). */
static inline __m256i load_block(const uint8_t *p, int bits) {
  if (bits == 8) return _mm256_loadu_si256((const __m256i *)p);
  __m128i v = _mm_loadu_si128((const __m128i *)p), mask = _mm_set1_epi8(15);
  __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
  return _mm256_sub_epi8(w, _mm256_set1_epi8(8));
}

static inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* Block b of one column against the ROWS rows, into accumulators acc[m][u]. The multiply-adds
   take unsigned times signed bytes: |w| times x with w's sign moved onto x (|-128| = 128 still
   fits an unsigned byte; activations stay within -127..127). Each int32 lane sums four adjacent
   products in both versions below, so their float sums agree to the bit. */
#define DOT_BLOCK(BLOCK_DOT, ROWS, u, b)                                                        \
  {                                                                                             \
    __m256i w = load_block(columns + (b) * bb, bits), wabs = _mm256_abs_epi8(w);                \
    __m256 ws = _mm256_set1_ps(scales[b]);                                                      \
    for (int m = 0; m < ROWS; m++) {                                                            \
      __m256i xv = _mm256_loadu_si256((const __m256i *)(x->values + m * x->K + (b) * BLOCK));   \
      __m256i d = BLOCK_DOT(wabs, _mm256_sign_epi8(xv, w));                                     \
      __m256 s = _mm256_mul_ps(ws, _mm256_broadcast_ss(x->scales + m * nb + (b)));              \
      acc[m][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[m][u]);                         \
    }                                                                                           \
  }

/* Each column in turn (one stream of weights for the prefetchers). ROWS is a constant, so that
   the accumulators stay in registers, and blocks go round UNROLL accumulators a row: with one
   chain of dependent FMAs a column would wait on the FMA's latency at every block. */
#define DOT_COLUMNS_BODY(BLOCK_DOT, ROWS, UNROLL)                                               \
  for (int64_t i = 0; i < n; i++, columns += nb * bb, scales += nb, out++) {                    \
    __m256 acc[ROWS][UNROLL];                                                                   \
    for (int m = 0; m < ROWS; m++)                                                              \
      for (int u = 0; u < UNROLL; u++) acc[m][u] = _mm256_setzero_ps();                         \
    int64_t b = 0;                                                                              \
    for (; b + UNROLL <= nb; b += UNROLL)                                                       \
      for (int u = 0; u < UNROLL; u++) DOT_BLOCK(BLOCK_DOT, ROWS, u, b + u)                     \
    for (; b < nb; b++) DOT_BLOCK(BLOCK_DOT, ROWS, 0, b)                                        \
    for (int m = 0; m < ROWS; m++) {                                                            \
      for (int u = 1; u < UNROLL; u++) acc[m][0] = _mm256_add_ps(acc[m][0], acc[m][u]);         \
      out[m * ldo] = sum_lanes(acc[m][0]);                                                      \
    }                                                                                           \
  }

/* Four chains a row for one row, two for two, one from three rows on (up to ML_Q8_DOT_MAX_ROWS,
   8: each count its own body, so that no row past the input is read). */
#define DOT_COLUMNS(BLOCK_DOT)                                                                  \
  int64_t nb = x->K / BLOCK, bb = BLOCK * bits / 8;                                             \
  switch (x->M) {                                                                               \
  case 1: DOT_COLUMNS_BODY(BLOCK_DOT, 1, 4) break;                                              \
  case 2: DOT_COLUMNS_BODY(BLOCK_DOT, 2, 2) break;                                              \
  case 3: DOT_COLUMNS_BODY(BLOCK_DOT, 3, 1) break;                                              \
  case 4: DOT_COLUMNS_BODY(BLOCK_DOT, 4, 1) break;                                              \
  case 5: DOT_COLUMNS_BODY(BLOCK_DOT, 5, 1) break;                                              \
  case 6: DOT_COLUMNS_BODY(BLOCK_DOT, 6, 1) break;                                              \
  case 7: DOT_COLUMNS_BODY(BLOCK_DOT, 7, 1) break;                                              \
  default: DOT_COLUMNS_BODY(BLOCK_DOT, ML_Q8_DOT_MAX_ROWS, 1) break;                            \
  }

static inline __m256i dot_avx2(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));   /* pairs fit int16: 2*128*127 */
}

static void dot_columns_avx2(const ml_q8_rows *x, const uint8_t *columns, const float *scales, int bits, int64_t n,
                             float *out, int64_t ldo) {
  DOT_COLUMNS(dot_avx2)
}

__attribute__((target("avx512f,avx512vl,avx512vnni")))
static inline __m256i dot_vnni(__m256i u, __m256i s) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}

__attribute__((target("avx512f,avx512vl,avx512vnni")))
static void dot_columns_vnni(const ml_q8_rows *x, const uint8_t *columns, const float *scales, int bits, int64_t n,
                             float *out, int64_t ldo) {
  DOT_COLUMNS(dot_vnni)
}

#endif

int ml_q8_dot_path(void) {
  static atomic_int path = -1;
  int p = atomic_load_explicit(&path, memory_order_relaxed);
  if (p < 0) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__GNUC__)
    const char *env = getenv("MOONLOAD_Q8_DOT");
    p = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") ? ML_Q8_DOT_VNNI : ML_Q8_DOT_AVX2;
    if (env && !strcmp(env, "avx2")) p = ML_Q8_DOT_AVX2;
    if (env && !strcmp(env, "c")) p = ML_Q8_DOT_C;
#else
    p = ML_Q8_DOT_C;
#endif
    atomic_store_explicit(&path, p, memory_order_relaxed);
  }
  return p;
}

void ml_q8_dot_columns(const ml_q8_rows *x, const uint8_t *columns, const float *scales, int bits, int64_t n,
                       float *out, int64_t ldo) {
  switch (ml_q8_dot_path()) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__GNUC__)
  case ML_Q8_DOT_VNNI: dot_columns_vnni(x, columns, scales, bits, n, out, ldo); break;
  case ML_Q8_DOT_AVX2: dot_columns_avx2(x, columns, scales, bits, n, out, ldo); break;
#endif
  default: dot_columns_c(x, columns, scales, bits, n, out, ldo);
  }
}
