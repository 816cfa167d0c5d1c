/* random.c: the library's random number generator and the ops that draw from it (uniform_,
   normal_, multinomial).
 *
 * The generator is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
 * SC'11), a counter-based generator: block c of a draw is philox(key = seed, counter = offset + c),
 * a pure function. Each fill reserves a range of counters (atomically, so concurrent fills never
 * overlap) and element i of the fill always uses the same counter and word, whichever thread
 * computes it. Results depend only on the seed and the sequence of draws, never on threads. */
#include "kernels.h"

#include <stdlib.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

/* The initial seed when ml_manual_seed was never called (PyTorch's default_rng_seed_val). */
#define ML_DEFAULT_SEED 67280421310721ull

static _Atomic uint64_t rng_seed = ML_DEFAULT_SEED;
static _Atomic uint64_t rng_offset = 0;      /* next unused 128-bit counter block */

typedef struct { uint32_t v[4]; } philox_block;

static philox_block philox(uint64_t key, uint64_t counter) {
  uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
  for (int r = 0; r < 10; r++) {
    uint64_t p0 = (uint64_t)PHILOX_M0 * c0, p1 = (uint64_t)PHILOX_M1 * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n1 = (uint32_t)p1;
    uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1, n3 = (uint32_t)p0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += PHILOX_W0; k1 += PHILOX_W1;
  }
  philox_block b = {{c0, c1, c2, c3}};
  return b;
}

void ml_manual_seed(uint64_t seed) {
  atomic_store(&rng_seed, seed);
  atomic_store(&rng_offset, 0);
}

/* Reserves nblocks counter blocks; returns the first. */
static uint64_t rng_reserve(uint64_t nblocks, uint64_t *seed) {
  *seed = atomic_load(&rng_seed);
  return atomic_fetch_add(&rng_offset, nblocks);
}

/* Uniform in [0, 1) with 24 random bits (float32 precision) / 53 bits from two words. */
static inline double u24(uint32_t w) { return (double)(w >> 8) * (1.0 / 16777216.0); }
static inline double u53(uint32_t hi, uint32_t lo) {
  return (double)(((uint64_t)hi << 21) ^ (lo >> 11)) * (1.0 / 9007199254740992.0);
}

// --- fills -------------------------------------------------------------------------------------

typedef enum { FILL_UNIFORM, FILL_NORMAL } fill_kind;

typedef struct {
  fill_kind kind;
  double a, b;            /* low/high or mean/std */
  uint64_t seed, base;    /* key and first counter block */
  bool wide;              /* float64: 2 words per uniform */
  bool contiguous;
  ml_tensor *t;
  int64_t strides[ML_MAX_DIMS];
} fill_job;

/* Values of elements [first, first + n) of the fill. Uniform: a block of 4 words gives 4 float
   draws (24 bits each) or 2 double draws (53 bits each). Normal: a block gives one Box-Muller
   pair (u1 from 53 bits, u2 from 53 bits) -> 2 normals. */
static void fill_values(const fill_job *j, int64_t first, int64_t n, double *out) {
  int64_t per = j->kind == FILL_NORMAL || j->wide ? 2 : 4;
  uint64_t cached = UINT64_MAX;
  philox_block b = {{0, 0, 0, 0}};
  for (int64_t k = 0; k < n; k++) {
    int64_t i = first + k;
    uint64_t ctr = j->base + (uint64_t)(i / per);
    if (ctr != cached) { b = philox(j->seed, ctr); cached = ctr; }
    if (j->kind == FILL_UNIFORM) {
      double u = j->wide ? u53(b.v[(i % 2) * 2], b.v[(i % 2) * 2 + 1]) : u24(b.v[i % 4]);
      out[k] = j->a + (j->b - j->a) * u;
    } else {
      double u1 = 1.0 - u53(b.v[0], b.v[1]);          /* (0, 1]: the log stays finite */
      double u2 = u53(b.v[2], b.v[3]);
      double r = sqrt(-2.0 * log(u1)), th = 2.0 * M_PI * u2;
      out[k] = j->a + j->b * ((i % 2) ? r * sin(th) : r * cos(th));
    }
  }
}

static void fill_range(void *ctx, int64_t begin, int64_t end) {
  const fill_job *j = ctx;
  ml_tensor *t = j->t;
  double buf[ML_BLOCK];
  uint8_t *td = ml_tensor_data(t);
  /* element i of the fill is element i of t in row-major order */
  for (int64_t s = begin; s < end; s += ML_BLOCK) {
    int64_t n = end - s < ML_BLOCK ? end - s : ML_BLOCK;
    fill_values(j, s, n, buf);
    if (j->contiguous) { ml_store_f64_row(buf, ml_byte_at(td, t->dtype, s), t->dtype, 1, n); continue; }
    for (int64_t k = 0; k < n; k++) {
      int64_t off = 0, r = s + k;
      for (int d = t->ndim - 1; d >= 0; d--) { off += (r % t->shape[d]) * j->strides[d]; r /= t->shape[d]; }
      ml_store_f64(td, t->dtype, off, buf[k]);
    }
  }
}

static ml_status fill(const char *fn, ml_tensor *t, fill_kind kind, double a, double b) {
  if (!t) return ml_fail(ML_EINVAL, "%s: tensor is NULL", fn);
  if (t->storage->device.type == ML_DEVICE_META) return ML_OK;      /* no bytes to fill */
  if (!ml_dtype_is_floating(t->dtype))
    return ml_fail(ML_EINVAL, "%s: expected a floating point tensor, got %s", fn, ml_dtype_name(t->dtype));
  if (kind == FILL_UNIFORM && !(a <= b))
    return ml_fail(ML_EINVAL, "%s: expected low <= high, got low %g and high %g", fn, a, b);
  if (kind == FILL_NORMAL && !(b >= 0)) return ml_fail(ML_EINVAL, "%s: expected std >= 0, got %g", fn, b);
  const ml_tensor *ct = t;
  ML_TRY(ml_cpu_gate(fn, 1, &ct));
  int64_t n = ml_tensor_numel(t);
  fill_job j = {kind, a, b, 0, 0, t->dtype == ML_FLOAT64 && kind == FILL_UNIFORM, false, t, {0}};
  memcpy(j.strides, t->strides, sizeof j.strides);
  j.contiguous = ml_tensor_is_contiguous(t);
  uint64_t per_block = j.wide || kind == FILL_NORMAL ? 2 : 4;
  j.base = rng_reserve(((uint64_t)n + per_block - 1) / per_block, &j.seed);
  ml_parallel_for(n, 16, fill_range, &j);
  return ML_OK;
}

ml_status ml_uniform_(ml_tensor *t, double low, double high) { return fill("uniform_", t, FILL_UNIFORM, low, high); }

ml_status ml_normal_(ml_tensor *t, double mean, double std) { return fill("normal_", t, FILL_NORMAL, mean, std); }

// --- multinomial --------------------------------------------------------------------------------

ml_status ml_multinomial(const ml_tensor *probs, ml_tensor **out) {
  ML_TRY(ml_cpu_gate("multinomial", 1, &probs));
  if (probs->ndim < 1)
    return ml_fail(ML_EINVAL, "multinomial: probabilities must have at least 1 dimension, got a 0-d tensor");
  int64_t n = probs->shape[probs->ndim - 1];
  if (n == 0) {
    char b[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "multinomial: no categories to draw from (shape %s)",
                   ml_shape_str(probs->ndim, probs->shape, b, sizeof b));
  }
  ml_tensor *c;
  ML_TRY(ml_tensor_to(probs, ml_cpu(), ML_FLOAT64, &c));
  ml_tensor *cc;
  ml_status st = ml_tensor_contiguous(c, &cc);
  ml_tensor_release(c);
  if (st) return st;
  int64_t rows = ml_tensor_numel(cc) / n;
  const double *w = ml_tensor_data(cc);
  for (int64_t r = 0; r < rows; r++) {
    double total = 0;
    for (int64_t i = 0; i < n; i++) {
      double v = w[r * n + i];
      if (!(v >= 0) || isinf(v)) {
        ml_tensor_release(cc);
        return ml_fail(ML_EINVAL, "multinomial: weights must be finite and non-negative, row %lld has %g at %lld",
                       (long long)r, v, (long long)i);
      }
      total += v;
    }
    if (!(total > 0)) {
      ml_tensor_release(cc);
      return ml_fail(ML_EINVAL, "multinomial: row %lld has weights summing to 0", (long long)r);
    }
  }
  ml_tensor *o;
  st = ml_tensor_empty(ML_INT64, probs->ndim - 1, probs->shape, ml_cpu(), &o);
  if (st) { ml_tensor_release(cc); return st; }
  int64_t *od = ml_tensor_data(o);
  uint64_t seed, base = rng_reserve((uint64_t)(rows + 1) / 2, &seed);
  for (int64_t r = 0; r < rows; r++) {
    philox_block b = philox(seed, base + (uint64_t)(r / 2));
    int wi = (int)(r % 2) * 2;
    double total = 0;
    for (int64_t i = 0; i < n; i++) total += w[r * n + i];
    double u = u53(b.v[wi], b.v[wi + 1]) * total, acc = 0;
    int64_t pick = -1;
    for (int64_t i = 0; i < n; i++) {
      double v = w[r * n + i];
      if (v <= 0) continue;
      acc += v;
      pick = i;                      /* the last positive weight catches rounding at the top */
      if (u < acc) break;
    }
    od[r] = pick;
  }
  ml_tensor_release(cc);
  *out = o;
  return ML_OK;
}
