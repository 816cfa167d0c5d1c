/* philox.h: the random numbers of moonload, shared by cpu/random.c and cuda/random.cu so that a
 * fill on either device gives the same values for a seed.
 *
 * Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) is a
 * counter-based generator: block c of a draw is philox(key = seed, counter = offset + c), a pure
 * function. Element i of a fill takes its value from block base + i / per (per = 4 for float
 * uniforms, 2 for double uniforms and for normals) and its words there, so the value of an
 * element depends only on the seed, the fill's first counter and i. */
#ifndef ML_PHILOX_H
#define ML_PHILOX_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define ML_PHILOX_FN __host__ __device__ static inline
#else
#define ML_PHILOX_FN static inline
#endif

#define ML_PHILOX_M0 0xD2511F53u
#define ML_PHILOX_M1 0xCD9E8D57u
#define ML_PHILOX_W0 0x9E3779B9u
#define ML_PHILOX_W1 0xBB67AE85u

typedef struct { uint32_t v[4]; } ml_philox_block;

typedef enum { ML_FILL_UNIFORM, ML_FILL_NORMAL } ml_fill_kind;

ML_PHILOX_FN ml_philox_block ml_philox(uint64_t key, uint64_t counter) {
  uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
  for (int r = 0; r < 10; r++) {
    uint64_t p0 = (uint64_t)ML_PHILOX_M0 * c0, p1 = (uint64_t)ML_PHILOX_M1 * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n1 = (uint32_t)p1;
    uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1, n3 = (uint32_t)p0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += ML_PHILOX_W0; k1 += ML_PHILOX_W1;
  }
  ml_philox_block b = {{c0, c1, c2, c3}};
  return b;
}

/* Uniform in [0, 1) with 24 random bits (float32 precision) / 53 bits from two words. */
ML_PHILOX_FN double ml_u24(uint32_t w) { return (double)(w >> 8) * (1.0 / 16777216.0); }
ML_PHILOX_FN double ml_u53(uint32_t hi, uint32_t lo) {
  return (double)(((uint64_t)hi << 21) ^ (lo >> 11)) * (1.0 / 9007199254740992.0);
}

/* Elements per counter block of a fill. */
ML_PHILOX_FN int64_t ml_fill_per_block(ml_fill_kind kind, bool wide) { return kind == ML_FILL_NORMAL || wide ? 2 : 4; }

/* Value of element i of a fill, from its block b. Uniform: a block gives 4 float draws (24 bits
   each) or 2 double draws (53 bits each), low + (high - low) * u. Normal: a block gives one
   Box-Muller pair (u1, u2 from 53 bits each) -> 2 normals, mean + std * z. */
ML_PHILOX_FN double ml_fill_value(const ml_philox_block *b, ml_fill_kind kind, double a, double c, bool wide,
                                  int64_t i) {
  if (kind == ML_FILL_UNIFORM) {
    double u = wide ? ml_u53(b->v[(i % 2) * 2], b->v[(i % 2) * 2 + 1]) : ml_u24(b->v[i % 4]);
    return a + (c - a) * u;
  }
  double u1 = 1.0 - ml_u53(b->v[0], b->v[1]);          /* (0, 1]: the log stays finite */
  double u2 = ml_u53(b->v[2], b->v[3]);
  double r = sqrt(-2.0 * log(u1)), th = 2.0 * 3.14159265358979323846 * u2;
  return a + c * ((i % 2) ? r * sin(th) : r * cos(th));
}

#endif /* ML_PHILOX_H */
