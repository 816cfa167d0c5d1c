/* q8_dot.h: integer dot products of int8 activations with int8 or int4 weight columns
   (cpu/q8_dot.c), the decode path of ml_q8_linear and ml_q4_linear when
   ml_set_quantized_activations(8) is on. */
#ifndef ML_CPU_Q8_DOT_H
#define ML_CPU_Q8_DOT_H

#include "internal.h"

#include <math.h>

enum { ML_Q8_DOT_BLOCK = 32, ML_Q8_DOT_MAX_ROWS = 4 };

/* One block of b values: its scale (max |x| / 127) and the values rounded to nearest, every qs-th
   byte of q. The GPU kernels (cuda/q8.cu) do the same float operations, so both give the same bytes. */
static inline float ml_q8_round_block(const float *x, int64_t b, int8_t *q, int64_t qs) {
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

#endif /* ML_CPU_Q8_DOT_H */
