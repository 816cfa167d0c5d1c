/* random.c: the library's random number generator and the ops that draw from it (uniform_,
   normal_, multinomial). The numbers come from philox.h (shared with the CUDA fills). Each fill
   reserves a range of counter blocks (atomically, so concurrent fills never overlap) and
   element i of the fill always uses the same counter and word, whichever thread or device
   computes it. Results depend only on the seed and the sequence of draws, never on threads. */
#include "kernels.h"
#include "philox.h"

#include <stdlib.h>

/* The initial seed when ml_manual_seed was never called (PyTorch's default_rng_seed_val). */
#define ML_DEFAULT_SEED 67280421310721ull

static _Atomic uint64_t rng_seed = ML_DEFAULT_SEED;
static _Atomic uint64_t rng_offset = 0;      /* next unused 128-bit counter block */

void ml_manual_seed(uint64_t seed) {
  atomic_store(&rng_seed, seed);
  atomic_store(&rng_offset, 0);
}

/* Reserves nblocks counter blocks; returns the first. */
static uint64_t rng_reserve(uint64_t nblocks, uint64_t *seed) {
  *seed = atomic_load(&rng_seed);
  return atomic_fetch_add(&rng_offset, nblocks);
}

// --- fills -------------------------------------------------------------------------------------

typedef struct {
  ml_fill_kind kind;
  double a, b;            /* low/high or mean/std */
  uint64_t seed, base;    /* key and first counter block */
  bool wide;              /* float64 uniforms: 2 words per draw */
  bool contiguous;
  ml_tensor *t;
  int64_t strides[ML_MAX_DIMS];
} fill_job;

/* Values of elements [first, first + n) of the fill (philox.h says which words each one uses). */
static void fill_values(const fill_job *j, int64_t first, int64_t n, double *out) {
  int64_t per = ml_fill_per_block(j->kind, j->wide);
  uint64_t cached = UINT64_MAX;
  ml_philox_block b = {{0, 0, 0, 0}};
  for (int64_t k = 0; k < n; k++) {
    int64_t i = first + k;
    uint64_t ctr = j->base + (uint64_t)(i / per);
    if (ctr != cached) { b = ml_philox(j->seed, ctr); cached = ctr; }
    out[k] = ml_fill_value(&b, j->kind, j->a, j->b, j->wide, i);
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

static ml_status fill(const char *fn, ml_tensor *t, ml_fill_kind kind, double a, double b) {
  if (!t) return ml_fail(ML_EINVAL, "%s: tensor is NULL", fn);
  if (t->storage->device.type == ML_DEVICE_META) return ML_OK;      /* no bytes to fill */
  if (!ml_dtype_is_floating(t->dtype))
    return ml_fail(ML_EINVAL, "%s: expected a floating point tensor, got %s", fn, ml_dtype_name(t->dtype));
  if (kind == ML_FILL_UNIFORM && !(a <= b))
    return ml_fail(ML_EINVAL, "%s: expected low <= high, got low %g and high %g", fn, a, b);
  if (kind == ML_FILL_NORMAL && !(b >= 0)) return ml_fail(ML_EINVAL, "%s: expected std >= 0, got %g", fn, b);
  const ml_tensor *ct = t;
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device(fn, 1, &ct, &cu));
  if (cu && !cu->random_fill) return ml_no_cuda_kernel(fn, t);
  int64_t n = ml_tensor_numel(t);
  fill_job j = {kind, a, b, 0, 0, t->dtype == ML_FLOAT64 && kind == ML_FILL_UNIFORM, false, t, {0}};
  memcpy(j.strides, t->strides, sizeof j.strides);
  j.contiguous = ml_tensor_is_contiguous(t);
  uint64_t per_block = (uint64_t)ml_fill_per_block(kind, j.wide);
  j.base = rng_reserve(((uint64_t)n + per_block - 1) / per_block, &j.seed);
  if (cu) return cu->random_fill(t, kind == ML_FILL_NORMAL, a, b, j.seed, j.base);
  ml_parallel_for(n, 16, fill_range, &j);
  return ML_OK;
}

ml_status ml_uniform_(ml_tensor *t, double low, double high) { return fill("uniform_", t, ML_FILL_UNIFORM, low, high); }

ml_status ml_normal_(ml_tensor *t, double mean, double std) { return fill("normal_", t, ML_FILL_NORMAL, mean, std); }

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
    ml_philox_block b = ml_philox(seed, base + (uint64_t)(r / 2));
    int wi = (int)(r % 2) * 2;
    double total = 0;
    for (int64_t i = 0; i < n; i++) total += w[r * n + i];
    double u = ml_u53(b.v[wi], b.v[wi + 1]) * total, acc = 0;
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
