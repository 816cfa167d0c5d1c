/* q8_dot.h: integer products of int8 activations with int8 or int4 weights, the paths of
   ml_q8_linear and ml_q4_linear when ml_set_quantized_activations(8) is on: dots of up to 8 rows
   with weight columns (cpu/q8_dot.c, decoding) and a GEMM for more rows (cpu/q8_gemm.c). */
#ifndef ML_CPU_Q8_DOT_H
#define ML_CPU_Q8_DOT_H

#include "cpu/gemm.h"

#include <math.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { ML_Q8_DOT_BLOCK = 32, ML_Q8_DOT_MAX_ROWS = 8 };

/* The instructions the dots use: the CPU's widest, or a narrower one named by MOONLOAD_Q8_DOT
   (avx2, c) to compare them. */
enum { ML_Q8_DOT_C, ML_Q8_DOT_AVX2, ML_Q8_DOT_VNNI };
int ml_q8_dot_path(void);

/* One block of b values: its scale (max |x| / 127) and the values rounded to nearest, every qs-th
   byte of q. The GPU kernels (cuda/q8.cu) do the same float operations, so both give the same bytes. */
static inline float ml_q8_round_block(const float *x, int64_t b, int8_t *q, int64_t qs) {
#if defined(__AVX2__)
  if (qs == 1 && b % 8 == 0) {   /* the same operations 8 at a time (libm's fmaxf is a call) */
    __m256 sign = _mm256_set1_ps(-0.0f), vmax = _mm256_setzero_ps();
    for (int64_t i = 0; i < b; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    __m256 inv = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
    for (int64_t i = 0; i < b; i += 8) {
      __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv));   /* half to even, as rintf */
      __m128i r16 = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storel_epi64((__m128i *)(q + i), _mm_packs_epi16(r16, r16));
    }
    return amax / 127.0f;
  }
#endif
  float amax = 0;
  for (int64_t i = 0; i < b; i++) amax = fmaxf(amax, fabsf(x[i]));
  float inv = amax > 0 ? 127.0f / amax : 0.0f;
  if (qs == 1)
    for (int64_t i = 0; i < b; i++) q[i] = (int8_t)rintf(x[i] * inv);   /* (rintf: half to even, vectorized) */
  else
    for (int64_t i = 0; i < b; i++) q[i * qs] = (int8_t)rintf(x[i] * inv);
  return amax / 127.0f;
}

/* M rows of K activations rounded to int8 in blocks of 32, as ml_quantize_q8 rounds weights. */
typedef struct {
  int64_t M, K;
  const int8_t *values;        /* M x K */
  const float *scales;         /* M x K / 32 */
} ml_q8_rows;

/* x (M x K floats, contiguous) -> values and scales (room for M x K and M x K / 32). */
void ml_q8_round_rows(const float *x, int64_t M, int64_t K, int8_t *values, float *scales);

/* out[m * ldo + i] = sum over blocks b of scale_x[m][b] * scale_w[i][b] * (integer dot of block b)
   for the n weight columns i of K values each, one after another at columns (int8, or packed
   int4 as in ml_quantize_q4 when bits is 4), with their K / 32 scales each at scales. The integer
   dots are exact, so every CPU gives the same sum per block. */
void ml_q8_dot_columns(const ml_q8_rows *x, const uint8_t *columns, const float *scales, int bits, int64_t n,
                       float *out, int64_t ldo);

/* C (M x N, cdt, row stride ldc) = A (M x K, any floating dtype and strides) rounded to int8 rows
   as above, times the int8 (bits 8) or packed int4 (bits 4) weight q (N x K) with its scales
   (N x K / 32), plus bias (N float32, or NULL). AVX512-VNNI, AVX2 or plain C as ml_q8_dot_path. */
ml_status ml_q8_gemm(const char *fn, int bits, int64_t M, int64_t N, int64_t K, ml_mref A, const uint8_t *q,
                     const float *scales, const float *bias, void *C, ml_dtype cdt, int64_t ldc);

#endif /* ML_CPU_Q8_DOT_H */
