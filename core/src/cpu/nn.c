/* nn.c: the row-wise neural-network kernels on the cpu: softmax / log-softmax along any dim,
   layer_norm and rms_norm over the last nnorm dims, and embedding lookups. Rows are spread over
   threads with ml_parallel_for; each row is computed in float32 (float64 for float64 tensors) in
   place in the output, or in a per-thread buffer when it needs a dtype conversion or a gather. */
/* The row loops below select between computed values (exp's clamps, masked lanes); GCC only
   if-converts, and so vectorises, them when FP exceptions are not treated as side effects.
   moonload never reads the FP exception flags. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "cpu/gemm.h"
#include "cpu/rows.h"

#include <stdlib.h>

// --- row movement ------------------------------------------------------------------------------

void ml_row_load(void *dst, ml_dtype dt, const void *src, ml_dtype sdt, int64_t n, int64_t s) {
  if (s == 1) { ml_convert_fast(src, sdt, dst, dt, n); return; }
  size_t de = ml_dtype_size(dt), se = ml_dtype_size(sdt);
  uint8_t stage[256 * 8];
  for (int64_t b = 0; b < n; b += 256) {
    int64_t m = n - b < 256 ? n - b : 256;
    const uint8_t *sp = (const uint8_t *)src + b * s * (int64_t)se;
    for (int64_t i = 0; i < m; i++) memcpy(stage + i * (int64_t)se, sp + i * s * (int64_t)se, se);
    ml_convert(stage, sdt, (uint8_t *)dst + b * (int64_t)de, dt, m);
  }
}

void ml_row_store(const void *src, ml_dtype dt, void *dst, ml_dtype ddt, int64_t n, int64_t s) {
  if (s == 1) { ml_convert_fast(src, dt, dst, ddt, n); return; }
  size_t se = ml_dtype_size(dt), de = ml_dtype_size(ddt);
  uint8_t stage[256 * 8];
  for (int64_t b = 0; b < n; b += 256) {
    int64_t m = n - b < 256 ? n - b : 256;
    ml_convert((const uint8_t *)src + b * (int64_t)se, dt, stage, ddt, m);
    uint8_t *dp = (uint8_t *)dst + b * s * (int64_t)de;
    for (int64_t i = 0; i < m; i++) memcpy(dp + i * s * (int64_t)de, stage + i * (int64_t)de, de);
  }
}

/* The outer dims of a row-wise op: row r starts at element offset xo in the input, oo in the output. */
typedef struct {
  int nd;
  int64_t shape[ML_MAX_DIMS], xs[ML_MAX_DIMS], os[ML_MAX_DIMS];
} row_map;

static void row_offsets(const row_map *m, int64_t r, int64_t *xo, int64_t *oo) {
  int64_t a = 0, b = 0;
  for (int d = m->nd - 1; d >= 0; d--) {
    int64_t k = r % m->shape[d];
    r /= m->shape[d];
    a += k * m->xs[d];
    b += k * m->os[d];
  }
  *xo = a;
  *oo = b;
}

static ml_status check_floating(const char *fn, const ml_tensor *t, const char *what) {
  if (!ml_dtype_is_floating(t->dtype))
    return ml_fail(ML_EINVAL, "%s: expected a floating-point %s, got %s", fn, what, ml_dtype_name(t->dtype));
  return ML_OK;
}

// --- softmax -----------------------------------------------------------------------------------

/* Max, exp-and-sum and scale passes; the row sits in L1 after the first. omp simd lets the
   max/sum reductions vectorise without -ffast-math. */
void ml_softmax_row_f32(const float *x, float *y, int64_t n, bool log, bool zero_masked) {
  if (n <= 0) return;
  float m = -INFINITY, s = 0.0f;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
  if (m == -INFINITY && zero_masked) { memset(y, 0, (size_t)n * sizeof *y); return; }
  if (log) {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += ml_expf_fast(x[i] - m);
    float shift = m + logf(s);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] = x[i] - shift;
    return;
  }
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) { float e = ml_expf_fast(x[i] - m); y[i] = e; s += e; }
  float inv = 1.0f / s;
#pragma omp simd
  for (int64_t i = 0; i < n; i++) y[i] *= inv;
}

void ml_softmax_row_f64(const double *x, double *y, int64_t n, bool take_log, bool zero_masked) {
  if (n <= 0) return;
  double m = -INFINITY, s = 0.0;
  for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
  if (m == -INFINITY && zero_masked) { memset(y, 0, (size_t)n * sizeof *y); return; }
  if (take_log) {
    for (int64_t i = 0; i < n; i++) s += exp(x[i] - m);
    double shift = m + log(s);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] - shift;
    return;
  }
  for (int64_t i = 0; i < n; i++) { y[i] = exp(x[i] - m); s += y[i]; }
  for (int64_t i = 0; i < n; i++) y[i] /= s;
}

typedef struct {
  row_map rm;
  const uint8_t *x;
  uint8_t *o;
  ml_dtype dt, ct;
  int64_t n, xstride, ostride;
  bool log;
  atomic_int status;
} softmax_job;

/* Rows read straight from the input and written straight into the output when both are unit
   stride in the compute dtype; otherwise through a per-thread row buffer. */
static void softmax_rows(void *ctx, int64_t begin, int64_t end) {
  softmax_job *j = ctx;
  size_t es = ml_dtype_size(j->dt);
  bool direct_in = j->dt == j->ct && j->xstride == 1, direct_out = j->dt == j->ct && j->ostride == 1;
  uint8_t *buf = NULL;
  if (!(direct_in && direct_out) && !(buf = malloc((size_t)j->n * ml_dtype_size(j->ct)))) {
    atomic_store(&j->status, ML_ENOMEM);
    return;
  }
  for (int64_t r = begin; r < end; r++) {
    int64_t xo, oo;
    row_offsets(&j->rm, r, &xo, &oo);
    const uint8_t *xp = j->x + xo * (int64_t)es;
    uint8_t *op = j->o + oo * (int64_t)es;
    const void *src = xp;
    void *dst = direct_out ? (void *)op : buf;
    if (!direct_in) { ml_row_load(buf, j->ct, xp, j->dt, j->n, j->xstride); src = buf; }
    if (j->ct == ML_FLOAT64) ml_softmax_row_f64(src, dst, j->n, j->log, false);
    else ml_softmax_row_f32(src, dst, j->n, j->log, false);
    if (!direct_out) ml_row_store(buf, j->ct, op, j->dt, j->n, j->ostride);
  }
  free(buf);
}

ml_status ml_softmax(const ml_tensor *x, int dim, bool log, ml_tensor **out) {
  const char *fn = log ? "log_softmax" : "softmax";
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route(fn, 1, &x, (const char *[]){"input"}, &cu));
  if (cu && !cu->softmax) return ml_no_cuda_kernel(fn, x);
  ML_TRY(check_floating(fn, x, "input"));
  int d = 0;
  ML_TRY(ml_norm_dim(fn, dim, x->ndim, &d));
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(x->dtype, x->ndim, x->shape, x->storage->device, &o));
  if (cu) {
    ml_status st = cu->softmax(x, d, log, o);
    if (st) { ml_tensor_release(o); return st; }
    *out = o;
    return ML_OK;
  }
  int64_t numel = ml_tensor_numel(x);
  if (numel == 0) { *out = o; return ML_OK; }

  softmax_job j = {.x = ml_tensor_data(x), .o = ml_tensor_data(o), .dt = x->dtype, .log = log};
  j.ct = x->dtype == ML_FLOAT64 ? ML_FLOAT64 : ML_FLOAT32;
  /* Rows run along d; the outer dims are all the others, in order. */
  for (int i = 0; i < x->ndim; i++) {
    if (i == d) continue;
    j.rm.shape[j.rm.nd] = x->shape[i];
    j.rm.xs[j.rm.nd] = x->strides[i];
    j.rm.os[j.rm.nd] = o->strides[i];
    j.rm.nd++;
  }
  j.n = x->ndim ? x->shape[d] : 1;
  j.xstride = x->ndim ? x->strides[d] : 1;
  j.ostride = x->ndim ? o->strides[d] : 1;
  atomic_init(&j.status, ML_OK);
  ml_parallel_for(numel / j.n, j.n * 8, softmax_rows, &j);
  if (atomic_load(&j.status)) {
    ml_tensor_release(o);
    return ml_fail(ML_ENOMEM, "%s: out of memory for a row buffer of %lld elements", fn, (long long)j.n);
  }
  *out = o;
  return ML_OK;
}

// --- layer_norm / rms_norm ---------------------------------------------------------------------

/* One row of n values x normalised into y (which may be x): layer norm (centre, scale by 1/std)
   or RMS norm (scale by 1/rms), then the optional weight and bias. Two-pass mean and variance. */
#define ML_DEFINE_NORM_ROW(T, SFX, SQRT)                                                                \
  static void norm_row_##SFX(const T *x, T *y, int64_t n, const T *w, const T *b, double eps, bool rms) { \
    T mean = 0, var = 0;                                                                                  \
    if (!rms) {                                                                                           \
      _Pragma("omp simd reduction(+ : mean)")                                                            \
      for (int64_t i = 0; i < n; i++) mean += x[i];                                                       \
      mean /= (T)n;                                                                                       \
    }                                                                                                     \
    _Pragma("omp simd reduction(+ : var)")                                                               \
    for (int64_t i = 0; i < n; i++) { T c = x[i] - mean; var += c * c; }                                  \
    T inv = (T)1 / SQRT(var / (T)n + (T)eps);                                                             \
    if (w && b) {                                                                                         \
      _Pragma("omp simd")                                                                                 \
      for (int64_t i = 0; i < n; i++) y[i] = (x[i] - mean) * inv * w[i] + b[i];                          \
    } else if (w) {                                                                                       \
      _Pragma("omp simd")                                                                                 \
      for (int64_t i = 0; i < n; i++) y[i] = (x[i] - mean) * inv * w[i];                                 \
    } else if (b) {                                                                                       \
      _Pragma("omp simd")                                                                                 \
      for (int64_t i = 0; i < n; i++) y[i] = (x[i] - mean) * inv + b[i];                                 \
    } else {                                                                                              \
      _Pragma("omp simd")                                                                                 \
      for (int64_t i = 0; i < n; i++) y[i] = (x[i] - mean) * inv;                                        \
    }                                                                                                     \
  }
ML_DEFINE_NORM_ROW(float, f32, sqrtf)
ML_DEFINE_NORM_ROW(double, f64, sqrt)

typedef struct {
  row_map rm;
  const uint8_t *x;
  uint8_t *o;
  ml_dtype dt, ct;
  int64_t n, xstride;
  const void *w, *b;       /* n values in ct, or NULL */
  double eps;
  bool rms;
  atomic_int status;
} norm_job;

static void norm_rows(void *ctx, int64_t begin, int64_t end) {
  norm_job *j = ctx;
  size_t es = ml_dtype_size(j->dt);
  bool same = j->dt == j->ct;   /* the output row is contiguous: written in place when same */
  bool direct_in = same && j->xstride == 1;
  uint8_t *buf = NULL;
  if (!direct_in && !(buf = malloc((size_t)j->n * ml_dtype_size(j->ct)))) {
    atomic_store(&j->status, ML_ENOMEM);
    return;
  }
  for (int64_t r = begin; r < end; r++) {
    int64_t xo, oo;
    row_offsets(&j->rm, r, &xo, &oo);
    const uint8_t *xp = j->x + xo * (int64_t)es;
    uint8_t *op = j->o + oo * (int64_t)es;
    const void *src = xp;
    if (!direct_in) { ml_row_load(buf, j->ct, xp, j->dt, j->n, j->xstride); src = buf; }
    void *dst = same ? (void *)op : buf;
    if (j->ct == ML_FLOAT64) norm_row_f64(src, dst, j->n, j->w, j->b, j->eps, j->rms);
    else norm_row_f32(src, dst, j->n, j->w, j->b, j->eps, j->rms);
    if (!same) ml_convert_fast(buf, j->ct, op, j->dt, j->n);
  }
  free(buf);
}

/* A weight/bias must have the normalized shape and a floating dtype. */
static ml_status check_norm_param(const char *fn, const char *what, const ml_tensor *t, const ml_tensor *x, int nnorm) {
  const int64_t *ns = x->shape + x->ndim - nnorm;
  if (t->ndim != nnorm || memcmp(t->shape, ns, (size_t)nnorm * sizeof *ns) != 0) {
    char a[ML_SHAPE_BUF], b[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "%s: %s of shape %s does not match the normalized shape %s", fn, what,
                   ml_shape_str(t->ndim, t->shape, a, sizeof a), ml_shape_str(nnorm, ns, b, sizeof b));
  }
  return check_floating(fn, t, what);
}

/* A weight/bias as a contiguous tensor in ct (retains t when it is one). */
static ml_status norm_param(const ml_tensor *t, ml_dtype ct, ml_tensor **out) {
  ml_tensor *c;
  ML_TRY(ml_tensor_to(t, ml_cpu(), ct, &c));
  ml_status st = ml_tensor_contiguous(c, out);
  ml_tensor_release(c);
  return st;
}

static ml_status norm(const char *fn, const ml_tensor *x, int nnorm, const ml_tensor *w, const ml_tensor *b,
                      double eps, bool rms, ml_tensor **out) {
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route(fn, 3, (const ml_tensor *[]){x, w, b}, (const char *[]){"input", "weight", "bias"}, &cu));
  if (cu && !(rms ? (void *)cu->rms_norm : (void *)cu->layer_norm)) return ml_no_cuda_kernel(fn, x);
  ML_TRY(check_floating(fn, x, "input"));
  if (nnorm < 1 || nnorm > x->ndim) {
    char a[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "%s: cannot normalise over the last %d dims of a tensor of shape %s", fn, nnorm,
                   ml_shape_str(x->ndim, x->shape, a, sizeof a));
  }
  norm_job j = {.dt = x->dtype, .eps = eps, .rms = rms};
  j.ct = x->dtype == ML_FLOAT64 ? ML_FLOAT64 : ML_FLOAT32;
  ml_tensor *wc = NULL, *bc = NULL, *xc = NULL, *o = NULL;
  ml_status st = ML_OK;
  if (w) ML_TRY(check_norm_param(fn, "weight", w, x, nnorm));
  if (b) ML_TRY(check_norm_param(fn, "bias", b, x, nnorm));
  if ((st = ml_tensor_empty(x->dtype, x->ndim, x->shape, x->storage->device, &o))) goto done;
  if (cu) {
    st = rms ? cu->rms_norm(x, nnorm, w, eps, o) : cu->layer_norm(x, nnorm, w, b, eps, o);
    goto done;
  }
  if (w && (st = norm_param(w, j.ct, &wc))) goto done;
  if (b && (st = norm_param(b, j.ct, &bc))) goto done;
  int64_t numel = ml_tensor_numel(x);
  if (numel == 0) goto done;

  /* The normalized dims must fold into one strided row; otherwise work on a contiguous copy. */
  int lead = x->ndim - nnorm;
  const ml_tensor *xs = x;
  int64_t n, stride;
  if (!ml_fold_dims(nnorm, x->shape + lead, x->strides + lead, &n, &stride)) {
    if ((st = ml_tensor_contiguous(x, &xc))) goto done;
    xs = xc;
    ml_fold_dims(nnorm, xs->shape + lead, xs->strides + lead, &n, &stride);
  }
  j.x = ml_tensor_data(xs);
  j.o = ml_tensor_data(o);
  j.n = n;
  j.xstride = stride;
  j.w = wc ? ml_tensor_data(wc) : NULL;
  j.b = bc ? ml_tensor_data(bc) : NULL;
  j.rm.nd = lead;
  for (int i = 0; i < lead; i++) {
    j.rm.shape[i] = xs->shape[i];
    j.rm.xs[i] = xs->strides[i];
    j.rm.os[i] = o->strides[i];
  }
  atomic_init(&j.status, ML_OK);
  ml_parallel_for(numel / n, n * 6, norm_rows, &j);
  if (atomic_load(&j.status))
    st = ml_fail(ML_ENOMEM, "%s: out of memory for a row buffer of %lld elements", fn, (long long)n);
done:
  ml_tensor_release(wc);
  ml_tensor_release(bc);
  ml_tensor_release(xc);
  if (st) { ml_tensor_release(o); return st; }
  *out = o;
  return ML_OK;
}

ml_status ml_layer_norm(const ml_tensor *x, int nnorm, const ml_tensor *w, const ml_tensor *b, double eps,
                        ml_tensor **out) {
  return norm("layer_norm", x, nnorm, w, b, eps, false, out);
}

ml_status ml_rms_norm(const ml_tensor *x, int nnorm, const ml_tensor *w, double eps, ml_tensor **out) {
  return norm("rms_norm", x, nnorm, w, NULL, eps, true, out);
}

// --- embedding ---------------------------------------------------------------------------------

typedef struct {
  const int64_t *ids;
  const uint8_t *w;
  uint8_t *o;
  size_t es;
  int64_t d, rs, cs;
} embed_job;

static void embed_rows(void *ctx, int64_t begin, int64_t end) {
  embed_job *j = ctx;
  for (int64_t i = begin; i < end; i++) {
    const uint8_t *src = j->w + j->ids[i] * j->rs * (int64_t)j->es;
    uint8_t *dst = j->o + i * j->d * (int64_t)j->es;
    if (j->cs == 1) memcpy(dst, src, (size_t)j->d * j->es);
    else for (int64_t k = 0; k < j->d; k++) memcpy(dst + k * (int64_t)j->es, src + k * j->cs * (int64_t)j->es, j->es);
  }
}

ml_status ml_embedding(const ml_tensor *ids, const ml_tensor *weight, ml_tensor **out) {
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route("embedding", 2, (const ml_tensor *[]){ids, weight}, (const char *[]){"ids", "weight"}, &cu));
  if (cu && !cu->embedding) return ml_no_cuda_kernel("embedding", ids);
  if (ml_dtype_is_floating(ids->dtype) || ids->dtype == ML_BOOL)
    return ml_fail(ML_EINVAL, "embedding: ids must be an integer tensor, got %s", ml_dtype_name(ids->dtype));
  if (weight->ndim != 2) {
    char a[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "embedding: weight must be 2-D (num_embeddings, embedding_dim), got shape %s",
                   ml_shape_str(weight->ndim, weight->shape, a, sizeof a));
  }
  if (ids->ndim + 1 > ML_MAX_DIMS)
    return ml_fail(ML_EINVAL, "embedding: ids with %d dims give more than %d output dims", ids->ndim, ML_MAX_DIMS);
  int64_t n = ml_tensor_numel(ids), rows = weight->shape[0];
  int64_t oshape[ML_MAX_DIMS];
  memcpy(oshape, ids->shape, (size_t)ids->ndim * sizeof *oshape);
  oshape[ids->ndim] = weight->shape[1];
  ml_tensor *o;
  ml_status st;
  if (cu) {   /* the kernel checks the ids on the device */
    ML_TRY(ml_tensor_empty(weight->dtype, ids->ndim + 1, oshape, weight->storage->device, &o));
    if ((st = cu->embedding(ids, weight, o))) { ml_tensor_release(o); return st; }
    *out = o;
    return ML_OK;
  }
  ml_tensor *idc;
  ML_TRY(ml_tensor_to(ids, ml_cpu(), ML_INT64, &idc));
  ml_tensor *idcc;
  st = ml_tensor_contiguous(idc, &idcc);
  ml_tensor_release(idc);
  if (st) return st;
  const int64_t *idv = ml_tensor_data(idcc);
  for (int64_t i = 0; i < n; i++)   /* every id checked before anything is written */
    if (idv[i] < 0 || idv[i] >= rows) {
      int64_t bad = idv[i];
      ml_tensor_release(idcc);
      return ml_fail(ML_EINVAL, "embedding: id %lld is out of range for a table of %lld rows (ids are 0-based)",
                     (long long)bad, (long long)rows);
    }
  if ((st = ml_tensor_empty(weight->dtype, ids->ndim + 1, oshape, ml_cpu(), &o))) { ml_tensor_release(idcc); return st; }
  embed_job j = {idv, ml_tensor_data(weight), ml_tensor_data(o), ml_dtype_size(weight->dtype), weight->shape[1],
                 weight->strides[0], weight->strides[1]};
  if (j.d > 0) ml_parallel_for(n, j.d, embed_rows, &j);
  ml_tensor_release(idcc);
  *out = o;
  return ML_OK;
}
