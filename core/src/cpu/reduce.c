/* reduce.c: reductions on the CPU (sum mean max min prod argmax argmin over dims or all, max/min
   with indices along a dim, topk, cumsum) and the whole-tensor comparisons equal and allclose.
 *
 * Float reductions accumulate in double, so long float32 sums match PyTorch to ~1e-7 relative;
 * integer and bool sums and products are exact in int64 (wrapping on overflow, as PyTorch).
 * Three walks: row mode (each output reduces its own elements), column mode (outputs contiguous
 * in x, reduced elements strided: neighbouring outputs accumulate together) and chunked mode (one
 * output over a long run: fixed chunks merged in order). None depends on the thread count. Ties
 * in max/min/argmax/argmin keep the first index; NaN propagates and wins. */
#include "kernels.h"

#include <stdlib.h>

static const char *const reduce_names[ML_REDUCE_COUNT] = {"sum", "mean", "max", "min", "prod", "argmax", "argmin"};

// --- plan: which dims are kept and which reduced ---------------------------------------------

typedef struct {
  const ml_tensor *x;
  int nkeep, nred;
  int red_dims[ML_MAX_DIMS];            /* 0-based reduced dims of x, ascending */
  int64_t keep_shape[ML_MAX_DIMS], keep_strides[ML_MAX_DIMS];
  int64_t red_shape[ML_MAX_DIMS], red_strides[ML_MAX_DIMS];
  int64_t nout, nred_elems;
} reduce_plan;

/* Marks the reduced dims (ndims 0 = all) in red[], rejecting repeats; fills the plan and the
   output shape (with keepdim ones in place of reduced dims). */
static ml_status plan_dims(const char *fn, const ml_tensor *x, int ndims, const int *dims, bool keepdim,
                           reduce_plan *p, int *ond, int64_t *oshape) {
  bool red[ML_MAX_DIMS] = {0};
  if (ndims < 0 || ndims > ML_MAX_DIMS) return ml_fail(ML_EINVAL, "%s: invalid number of dims %d", fn, ndims);
  if (ndims > 0 && !dims) return ml_fail(ML_EINVAL, "%s: %d dims given but the dim list is NULL", fn, ndims);
  if (ndims == 0) for (int d = 0; d < x->ndim; d++) red[d] = true;
  for (int i = 0; i < ndims; i++) {
    int d = 0;
    ML_TRY(ml_norm_dim(fn, dims[i], x->ndim, &d));
    if (x->ndim == 0) continue;       /* dim 0 / -1 of a 0-d tensor reduces nothing */
    if (red[d]) {
      char b[ML_SHAPE_BUF];
      return ml_fail(ML_EINVAL, "%s: the same dim appears twice in the list of dims (input shape %s)", fn,
                     ml_shape_str(x->ndim, x->shape, b, sizeof b));
    }
    red[d] = true;
  }
  memset(p, 0, sizeof *p);
  p->x = x;
  *ond = 0;
  for (int d = 0; d < x->ndim; d++) {
    if (red[d]) {
      p->red_dims[p->nred] = d;
      p->red_shape[p->nred] = x->shape[d];
      p->red_strides[p->nred++] = x->strides[d];
      if (keepdim) oshape[(*ond)++] = 1;
    } else {
      p->keep_shape[p->nkeep] = x->shape[d];
      p->keep_strides[p->nkeep++] = x->strides[d];
      oshape[(*ond)++] = x->shape[d];
    }
  }
  p->nout = ml_shape_numel(p->nkeep, p->keep_shape);
  p->nred_elems = ml_shape_numel(p->nred, p->red_shape);
  return ML_OK;
}

/* Element offset in x of output element o (row-major over the kept dims). */
static int64_t plan_base(const reduce_plan *p, int64_t o) {
  int64_t off = 0;
  for (int d = p->nkeep - 1; d >= 0; d--) {
    off += (o % p->keep_shape[d]) * p->keep_strides[d];
    o /= p->keep_shape[d];
  }
  return off;
}

// --- the reduction kernel --------------------------------------------------------------------

typedef struct {
  const reduce_plan *p;
  ml_reduce_op op;
  bool int_calc;
  uint8_t *vals;          /* output values (NULL for argmax/argmin) */
  ml_dtype vdt;
  int64_t *idx;           /* output indices (NULL when not wanted) */
} reduce_job;

static inline bool better(double v, double best, bool is_max) {
  if (best != best) return false;                  /* a NaN already won: it propagates */
  if (v != v) return true;
  return is_max ? v > best : v < best;
}

/* Running state of one output's reduction. */
typedef struct { double d; int64_t i, best; bool first; } reduce_acc;

static void acc_init(reduce_acc *a, ml_reduce_op op) {
  a->d = op == ML_REDUCE_PROD ? 1.0 : 0.0;
  a->i = op == ML_REDUCE_PROD ? 1 : 0;
  a->best = 0;
  a->first = true;
}

/* Folds n elements (dtype of x, stride st from src), at positions pos.. of the reduction, into a. */
static void acc_span(const reduce_job *j, reduce_acc *a, const uint8_t *src, int64_t st, int64_t n, int64_t pos) {
  union { double d[ML_BLOCK]; int64_t i[ML_BLOCK]; } buf;
  ml_dtype dt = j->p->x->dtype;
  ml_reduce_op op = j->op;
  bool is_max = op == ML_REDUCE_MAX || op == ML_REDUCE_ARGMAX;
  for (int64_t s = 0; s < n; s += ML_BLOCK) {
    int64_t m = n - s < ML_BLOCK ? n - s : ML_BLOCK, p0 = pos + s;
    const uint8_t *b = ml_byte_at(src, dt, s * st);
    if (j->int_calc) {
      const int64_t *v = ml_load_i64(b, dt, st, m, buf.i);
      int64_t acc = a->i;
      if (op == ML_REDUCE_SUM) for (int64_t i = 0; i < m; i++) acc = (int64_t)((uint64_t)acc + (uint64_t)v[i]);
      else if (op == ML_REDUCE_PROD) for (int64_t i = 0; i < m; i++) acc = (int64_t)((uint64_t)acc * (uint64_t)v[i]);
      else
        for (int64_t i = 0; i < m; i++)
          if (a->first || (is_max ? v[i] > acc : v[i] < acc)) { acc = v[i]; a->best = p0 + i; a->first = false; }
      a->i = acc;
    } else {
      const double *v = ml_load_f64_row(b, dt, st, m, buf.d);
      if (op == ML_REDUCE_SUM || op == ML_REDUCE_MEAN) {
        double s0 = 0, s1 = 0;   /* two chains: fewer dependent adds, same double accuracy */
        int64_t i = 0;
        for (; i + 1 < m; i += 2) { s0 += v[i]; s1 += v[i + 1]; }
        if (i < m) s0 += v[i];
        a->d += s0 + s1;
      } else if (op == ML_REDUCE_PROD) for (int64_t i = 0; i < m; i++) a->d *= v[i];
      else
        for (int64_t i = 0; i < m; i++)
          if (a->first || better(v[i], a->d, is_max)) { a->d = v[i]; a->best = p0 + i; a->first = false; }
    }
  }
}

/* Folds a later partial b into a (partials combine in position order, so ties keep the first). */
static void acc_merge(const reduce_job *j, reduce_acc *a, const reduce_acc *b) {
  ml_reduce_op op = j->op;
  bool is_max = op == ML_REDUCE_MAX || op == ML_REDUCE_ARGMAX;
  if (op == ML_REDUCE_SUM || op == ML_REDUCE_MEAN) { a->d += b->d; a->i = (int64_t)((uint64_t)a->i + (uint64_t)b->i); }
  else if (op == ML_REDUCE_PROD) { a->d *= b->d; a->i = (int64_t)((uint64_t)a->i * (uint64_t)b->i); }
  else if (!b->first) {
    bool take = a->first || (j->int_calc ? (is_max ? b->i > a->i : b->i < a->i) : better(b->d, a->d, is_max));
    if (take) *a = *b;
  }
}

static void acc_store(const reduce_job *j, reduce_acc *a, int64_t o) {
  if (j->op == ML_REDUCE_MEAN) a->d /= (double)j->p->nred_elems;   /* 0 elements: 0/0 = NaN, as PyTorch */
  if (j->vals) {
    if (j->int_calc) ml_store_i64(&a->i, ml_byte_at(j->vals, j->vdt, o), j->vdt, 1, 1);
    else ml_store_f64(j->vals, j->vdt, o, a->d);
  }
  if (j->idx) j->idx[o] = a->best;
}

/* Row mode: each output walks its own reduced elements. */
static void reduce_outputs(void *ctx, int64_t begin, int64_t end) {
  const reduce_job *j = ctx;
  const reduce_plan *p = j->p;
  const ml_tensor *x = p->x;
  const uint8_t *xd = ml_tensor_data(x);
  const int64_t *rs[1] = {p->red_strides};
  for (int64_t o = begin; o < end; o++) {
    const uint8_t *base = ml_byte_at(xd, x->dtype, plan_base(p, o));
    ml_iter it;
    ml_iter_init(&it, p->nred, p->red_shape, 1, rs);
    reduce_acc a;
    acc_init(&a, j->op);
    int64_t pos = 0;
    while (ml_iter_next(&it)) {
      acc_span(j, &a, ml_byte_at(base, x->dtype, it.off[0]), it.inner_stride[0], it.inner, pos);
      pos += it.inner;
    }
    acc_store(j, &a, o);
  }
}

/* One output over one long strided run (a whole contiguous tensor): fixed chunks reduced in
   parallel, then merged in order. The chunking does not depend on the thread count. */
#define ML_REDUCE_CHUNK 65536

typedef struct { const reduce_job *j; const uint8_t *src; int64_t st, n; reduce_acc *parts; } chunk_job;

static void reduce_chunks(void *ctx, int64_t begin, int64_t end) {
  const chunk_job *c = ctx;
  for (int64_t k = begin; k < end; k++) {
    int64_t s = k * ML_REDUCE_CHUNK, m = c->n - s < ML_REDUCE_CHUNK ? c->n - s : ML_REDUCE_CHUNK;
    acc_init(&c->parts[k], c->j->op);
    acc_span(c->j, &c->parts[k], ml_byte_at(c->src, c->j->p->x->dtype, s * c->st), c->st, m, s);
  }
}

/* True when it ran (false: not one long run, or no memory for the partials: use row mode). */
static bool reduce_single_run(const reduce_job *j) {
  const reduce_plan *p = j->p;
  if (p->nout != 1 || p->nred_elems < 4 * ML_REDUCE_CHUNK) return false;
  const int64_t *rs[1] = {p->red_strides};
  ml_iter it;
  ml_iter_init(&it, p->nred, p->red_shape, 1, rs);
  if (it.rows_left != 1) return false;
  int64_t nchunks = (it.inner + ML_REDUCE_CHUNK - 1) / ML_REDUCE_CHUNK;
  reduce_acc *parts = malloc((size_t)nchunks * sizeof *parts);
  if (!parts) return false;
  const uint8_t *src = ml_byte_at(ml_tensor_data(p->x), p->x->dtype, plan_base(p, 0));
  chunk_job c = {j, src, it.inner_stride[0], it.inner, parts};
  ml_parallel_for(nchunks, ML_REDUCE_CHUNK, reduce_chunks, &c);
  reduce_acc a = parts[0];
  for (int64_t k = 1; k < nchunks; k++) acc_merge(j, &a, &parts[k]);
  free(parts);
  acc_store(j, &a, 0);
  return true;
}

/* Column mode, for reductions whose kept dims include x's contiguous last dim (a sum over the
   rows of a matrix, over the batch...): instead of walking each output's strided column, every
   reduced position adds a contiguous run of up to ML_BLOCK neighbouring outputs at once. Unit u
   is chunk u % nchunk of group u / nchunk, a group being the K outputs along the last kept dim.
   Each output still accumulates its elements in the same order, whichever thread runs it. */
static void reduce_columns(void *ctx, int64_t begin, int64_t end) {
  const reduce_job *j = ctx;
  const reduce_plan *p = j->p;
  const ml_tensor *x = p->x;
  const uint8_t *xd = ml_tensor_data(x);
  ml_reduce_op op = j->op;
  bool is_max = op == ML_REDUCE_MAX || op == ML_REDUCE_ARGMAX;
  bool sum = op == ML_REDUCE_SUM || op == ML_REDUCE_MEAN, prod = op == ML_REDUCE_PROD;
  int64_t K = p->keep_shape[p->nkeep - 1], ks = p->keep_strides[p->nkeep - 1];
  int64_t nchunk = (K + ML_BLOCK - 1) / ML_BLOCK;
  union { double d[ML_BLOCK]; int64_t i[ML_BLOCK]; } buf, acc;
  int64_t best[ML_BLOCK];
  const int64_t *rs[1] = {p->red_strides};
  for (int64_t u = begin; u < end; u++) {
    int64_t g = u / nchunk, c0 = (u % nchunk) * ML_BLOCK, n = K - c0 < ML_BLOCK ? K - c0 : ML_BLOCK;
    int64_t o0 = g * K + c0;                          /* first output of this unit */
    const uint8_t *base = ml_byte_at(xd, x->dtype, plan_base(p, o0));
    for (int64_t i = 0; i < n; i++) { acc.d[i] = prod ? 1.0 : 0.0; best[i] = 0; }
    if (j->int_calc) for (int64_t i = 0; i < n; i++) acc.i[i] = prod ? 1 : 0;
    ml_iter it;
    ml_iter_init(&it, p->nred, p->red_shape, 1, rs);
    int64_t pos = 0;
    while (ml_iter_next(&it)) {
      for (int64_t r = 0; r < it.inner; r++, pos++) {
        const uint8_t *src = ml_byte_at(base, x->dtype, it.off[0] + r * it.inner_stride[0]);
        if (j->int_calc) {
          const int64_t *v = ml_load_i64(src, x->dtype, ks, n, buf.i);
          if (sum) for (int64_t i = 0; i < n; i++) acc.i[i] = (int64_t)((uint64_t)acc.i[i] + (uint64_t)v[i]);
          else if (prod) for (int64_t i = 0; i < n; i++) acc.i[i] = (int64_t)((uint64_t)acc.i[i] * (uint64_t)v[i]);
          else
            for (int64_t i = 0; i < n; i++)
              if (pos == 0 || (is_max ? v[i] > acc.i[i] : v[i] < acc.i[i])) { acc.i[i] = v[i]; best[i] = pos; }
        } else {
          const double *v = ml_load_f64_row(src, x->dtype, ks, n, buf.d);
          if (sum) for (int64_t i = 0; i < n; i++) acc.d[i] += v[i];
          else if (prod) for (int64_t i = 0; i < n; i++) acc.d[i] *= v[i];
          else
            for (int64_t i = 0; i < n; i++)
              if (pos == 0 || better(v[i], acc.d[i], is_max)) { acc.d[i] = v[i]; best[i] = pos; }
        }
      }
    }
    for (int64_t i = 0; i < n; i++) {
      if (j->vals) {
        if (j->int_calc) ml_store_i64(&acc.i[i], ml_byte_at(j->vals, j->vdt, o0 + i), j->vdt, 1, 1);
        else ml_store_f64(j->vals, j->vdt, o0 + i, op == ML_REDUCE_MEAN ? acc.d[i] / (double)p->nred_elems : acc.d[i]);
      }
      if (j->idx) j->idx[o0 + i] = best[i];
    }
  }
}

/* Runs a reduction into fresh tensors; vals and/or idx may be NULL when not wanted. */
static ml_status reduce_run(const char *fn, ml_reduce_op op, const ml_tensor *x, int ndims, const int *dims,
                            bool keepdim, const ml_cuda_api *cu, ml_tensor **vals, ml_tensor **idx) {
  reduce_plan p;
  int ond = 0;
  int64_t oshape[ML_MAX_DIMS];
  ML_TRY(plan_dims(fn, x, ndims, dims, keepdim, &p, &ond, oshape));
  bool arg = op == ML_REDUCE_ARGMAX || op == ML_REDUCE_ARGMIN;
  bool extreme = arg || op == ML_REDUCE_MAX || op == ML_REDUCE_MIN;
  if (extreme && p.nred_elems == 0) {
    char b[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "%s: cannot reduce over zero elements (input shape %s has no identity for %s)", fn,
                   ml_shape_str(x->ndim, x->shape, b, sizeof b), fn);
  }
  ml_dtype xdt = x->dtype, vdt = xdt;
  bool floating = ml_dtype_is_floating(xdt);
  if (op == ML_REDUCE_MEAN && !floating)
    return ml_fail(ML_EINVAL, "mean: input dtype must be floating point, got %s (convert it first)", ml_dtype_name(xdt));
  if ((op == ML_REDUCE_SUM || op == ML_REDUCE_PROD) && !floating) vdt = ML_INT64;
  ml_tensor *v = NULL, *ix = NULL;
  ml_status st;
  ml_device dev = x->storage->device;
  if (cu && !cu->reduce) return ml_no_cuda_kernel(fn, x);
  if (vals && (st = ml_tensor_empty(vdt, ond, oshape, dev, &v))) return st;
  if (idx && (st = ml_tensor_empty(ML_INT64, ond, oshape, dev, &ix))) { ml_tensor_release(v); return st; }
  if (cu) {
    /* the table wants the reduced dims sorted (0 = all); out holds the kept dims in order */
    ml_reduce_op arg_op = op == ML_REDUCE_MIN || op == ML_REDUCE_ARGMIN ? ML_REDUCE_ARGMIN : ML_REDUCE_ARGMAX;
    st = v ? cu->reduce(op, x, p.nred, p.red_dims, v) : ML_OK;
    if (!st && ix) st = cu->reduce(arg_op, x, p.nred, p.red_dims, ix);
    if (st) { ml_tensor_release(v); ml_tensor_release(ix); return st; }
    if (vals) *vals = v;
    if (idx) *idx = ix;
    return ML_OK;
  }
  reduce_job j = {&p, op, !floating, v ? ml_tensor_data(v) : NULL, vdt, ix ? ml_tensor_data(ix) : NULL};
  /* Column mode when the outputs are contiguous in x and the reduced elements are not. */
  bool columns = p.nkeep > 0 && p.nred > 0 && p.keep_strides[p.nkeep - 1] == 1 && p.keep_shape[p.nkeep - 1] > 1;
  for (int k = 0; columns && k < p.nred; k++) columns = p.red_strides[k] != 1 || p.red_shape[k] == 1;
  if (columns && p.nout > 0) {
    int64_t K = p.keep_shape[p.nkeep - 1], nchunk = (K + ML_BLOCK - 1) / ML_BLOCK;
    ml_parallel_for(p.nout / K * nchunk, p.nred_elems * (K < ML_BLOCK ? K : ML_BLOCK) + 16, reduce_columns, &j);
  } else if (!reduce_single_run(&j)) {
    ml_parallel_for(p.nout, p.nred_elems + 16, reduce_outputs, &j);
  }
  if (vals) *vals = v;
  if (idx) *idx = ix;
  return ML_OK;
}

ml_status ml_reduce(ml_reduce_op op, const ml_tensor *x, int ndims, const int *dims, bool keepdim, ml_tensor **out) {
  if ((unsigned)op >= ML_REDUCE_COUNT) return ml_fail(ML_EINVAL, "reduce: invalid op %d", (int)op);
  const char *fn = reduce_names[op];
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device(fn, 1, &x, &cu));
  if ((op == ML_REDUCE_ARGMAX || op == ML_REDUCE_ARGMIN) && ndims > 1)
    return ml_fail(ML_EINVAL, "%s: expects one dim or all dims, got %d dims", fn, ndims);
  if (op == ML_REDUCE_ARGMAX || op == ML_REDUCE_ARGMIN) {
    if (ndims == 0 && keepdim && !cu) {
      /* argmax over all dims with keepdim: the flat index, shaped like x with every size 1 */
      ml_tensor *flat, *r;
      int64_t n = ml_tensor_numel(x);
      ML_TRY(ml_tensor_reshape(x, 1, &n, &flat));
      int d0 = 0;
      ml_status st = reduce_run(fn, op, flat, 1, &d0, false, NULL, NULL, &r);
      ml_tensor_release(flat);
      if (st) return st;
      int64_t ones[ML_MAX_DIMS];
      for (int d = 0; d < x->ndim; d++) ones[d] = 1;
      st = ml_tensor_view(r, x->ndim, ones, out);
      ml_tensor_release(r);
      return st;
    }
    return reduce_run(fn, op, x, ndims, dims, keepdim, cu, NULL, out);
  }
  return reduce_run(fn, op, x, ndims, dims, keepdim, cu, out, NULL);
}

ml_status ml_max_dim(const ml_tensor *x, int dim, bool keepdim, bool is_min, ml_tensor **values, ml_tensor **indices) {
  const char *fn = is_min ? "min" : "max";
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device(fn, 1, &x, &cu));
  return reduce_run(fn, is_min ? ML_REDUCE_MIN : ML_REDUCE_MAX, x, 1, &dim, keepdim, cu, values, indices);
}

// --- lines along one dim (topk, cumsum) --------------------------------------------------------

/* Offsets of line l (all dims but d, row-major) in a tensor with the given shape/strides. */
static int64_t line_offset(int ndim, const int64_t *shape, const int64_t *strides, int d, int64_t l) {
  int64_t off = 0;
  for (int k = ndim - 1; k >= 0; k--) {
    if (k == d) continue;
    off += (l % shape[k]) * strides[k];
    l /= shape[k];
  }
  return off;
}

// --- topk ----------------------------------------------------------------------------------------

typedef struct { long double key; int64_t idx; } topk_item;

/* NaN ranks above everything (as PyTorch's topk); ties keep the lower index first. */
static int topk_cmp_desc(const void *pa, const void *pb) {
  const topk_item *a = pa, *b = pb;
  bool na = a->key != a->key, nb = b->key != b->key;
  if (na != nb) return na ? -1 : 1;
  if (!na && a->key != b->key) return a->key > b->key ? -1 : 1;
  return a->idx < b->idx ? -1 : a->idx > b->idx;
}

static int topk_cmp_asc(const void *pa, const void *pb) {
  const topk_item *a = pa, *b = pb;
  bool na = a->key != a->key, nb = b->key != b->key;
  if (na != nb) return na ? 1 : -1;
  if (!na && a->key != b->key) return a->key < b->key ? -1 : 1;
  return a->idx < b->idx ? -1 : a->idx > b->idx;
}

static void swap_items(topk_item *items, int64_t a, int64_t b) {
  topk_item t = items[a]; items[a] = items[b]; items[b] = t;
}

/* Moves the k items that rank first under cmp (a total order: ties go by index) to items[0..k), in
   no particular order: quickselect, O(n) on average, with a median-of-three pivot so that sorted
   runs (keys masked to -inf come in index order) do not degrade it. */
static void partition_top(topk_item *items, int64_t n, int64_t k, int (*cmp)(const void *, const void *)) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (cmp(&items[mid], &items[lo]) < 0) swap_items(items, mid, lo);
    if (cmp(&items[hi], &items[lo]) < 0) swap_items(items, hi, lo);
    if (cmp(&items[mid], &items[hi]) < 0) swap_items(items, mid, hi);   /* items[hi]: the median */
    int64_t store = lo;
    for (int64_t i = lo; i < hi; i++)
      if (cmp(&items[i], &items[hi]) < 0) swap_items(items, i, store++);
    swap_items(items, store, hi);                                        /* store: its final rank */
    if (store == k - 1) return;
    if (store < k - 1) lo = store + 1; else hi = store - 1;
  }
}

/* Moves the k items that rank first under cmp to items[0..k), in rank order. Small k (the usual
   top-k sampling over a vocabulary) keeps a heap of the k best seen so far: O(n log k); larger k
   (DeepSeek Sparse Attention keeps 2048 of a long context's keys) partitions, then sorts the k. */
static void select_top(topk_item *items, int64_t n, int64_t k, int (*cmp)(const void *, const void *)) {
  if (k <= 0) return;
  if (k * 8 >= n || k > 64) {
    if (k < n) partition_top(items, n, k, cmp);
    qsort(items, (size_t)k, sizeof *items, cmp);
    return;
  }
  /* max-heap under cmp (root = the worst of the kept k) over items[0..k) */
  for (int64_t i = 1; i < k; i++) {
    for (int64_t c = i; c > 0;) {
      int64_t p = (c - 1) / 2;
      if (cmp(&items[p], &items[c]) >= 0) break;
      topk_item t = items[p]; items[p] = items[c]; items[c] = t;
      c = p;
    }
  }
  for (int64_t i = k; i < n; i++) {
    if (cmp(&items[i], &items[0]) >= 0) continue;   /* not better than the worst kept */
    items[0] = items[i];
    for (int64_t p = 0;;) {
      int64_t l = 2 * p + 1, r = l + 1, w = p;
      if (l < k && cmp(&items[l], &items[w]) > 0) w = l;
      if (r < k && cmp(&items[r], &items[w]) > 0) w = r;
      if (w == p) break;
      topk_item t = items[p]; items[p] = items[w]; items[w] = t;
      p = w;
    }
  }
  qsort(items, (size_t)k, sizeof *items, cmp);
}

typedef struct {
  const ml_tensor *x;
  int d;
  int64_t k;
  bool largest;
  ml_tensor *v, *ix;
  bool oom;
} topk_job;

static void topk_lines(void *ctx, int64_t begin, int64_t end) {
  topk_job *j = ctx;
  const ml_tensor *x = j->x;
  int64_t n = x->ndim ? x->shape[j->d] : 1, xs = x->ndim ? x->strides[j->d] : 0;
  int64_t vs = x->ndim ? j->v->strides[j->d] : 0;
  size_t es = ml_dtype_size(x->dtype);
  bool integer = !ml_dtype_is_floating(x->dtype);
  topk_item *items = malloc((size_t)(n > 0 ? n : 1) * sizeof *items);
  if (!items) { j->oom = true; return; }
  const uint8_t *xd = ml_tensor_data(x);
  uint8_t *vd = ml_tensor_data(j->v);
  int64_t *id = ml_tensor_data(j->ix);
  for (int64_t l = begin; l < end; l++) {
    int64_t xo = line_offset(x->ndim, x->shape, x->strides, j->d, l);
    int64_t oo = line_offset(x->ndim, j->v->shape, j->v->strides, j->d, l);
    for (int64_t i = 0; i < n; i++) {
      const uint8_t *e = xd + (size_t)(xo + i * xs) * es;
      int64_t iv;
      if (integer) { ml_load_i64(e, x->dtype, 1, 1, &iv); items[i].key = (long double)iv; }
      else items[i].key = ml_load_f64(e, x->dtype, 0);
      items[i].idx = i;
    }
    select_top(items, n, j->k, j->largest ? topk_cmp_desc : topk_cmp_asc);
    for (int64_t i = 0; i < j->k; i++) {
      /* copy the element's bytes: exact for every dtype */
      memcpy(vd + (size_t)(oo + i * vs) * es, xd + (size_t)(xo + items[i].idx * xs) * es, es);
      id[oo + i * vs] = items[i].idx;
    }
  }
  free(items);
}

ml_status ml_topk(const ml_tensor *x, int64_t k, int dim, bool largest, ml_tensor **values, ml_tensor **indices) {
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device("topk", 1, &x, &cu));
  int d = 0;
  ML_TRY(ml_norm_dim("topk", dim, x->ndim, &d));
  int64_t n = x->ndim ? x->shape[d] : 1;
  if (k < 0 || k > n) {
    char b[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "topk: k = %lld is out of range for a dimension of size %lld (input shape %s)",
                   (long long)k, (long long)n, ml_shape_str(x->ndim, x->shape, b, sizeof b));
  }
  int64_t oshape[ML_MAX_DIMS];
  memcpy(oshape, x->shape, sizeof oshape);
  if (x->ndim) oshape[d] = k;
  ml_tensor *v, *ix;
  ML_TRY(ml_tensor_empty(x->dtype, x->ndim, oshape, x->storage->device, &v));
  ml_status st = ml_tensor_empty(ML_INT64, x->ndim, oshape, x->storage->device, &ix);
  if (st) { ml_tensor_release(v); return st; }
  if (cu) {
    st = cu->topk(x, d, k, largest, v, ix);
    if (st) { ml_tensor_release(v); ml_tensor_release(ix); return st; }
    *values = v;
    *indices = ix;
    return ML_OK;
  }
  int64_t lines = n > 0 ? ml_tensor_numel(x) / n : 0;
  topk_job j = {x, d, k, largest, v, ix, false};
  if (k > 0) ml_parallel_for(lines, n * 8, topk_lines, &j);
  if (j.oom) {
    ml_tensor_release(v);
    ml_tensor_release(ix);
    return ml_fail(ML_ENOMEM, "topk: out of memory for a line of %lld elements", (long long)n);
  }
  *values = v;
  *indices = ix;
  return ML_OK;
}

// --- cumsum --------------------------------------------------------------------------------------

typedef struct { const ml_tensor *x; int d; ml_tensor *o; } cumsum_job;

static void cumsum_lines(void *ctx, int64_t begin, int64_t end) {
  const cumsum_job *j = ctx;
  const ml_tensor *x = j->x, *o = j->o;
  int64_t n = x->ndim ? x->shape[j->d] : 1, xs = x->ndim ? x->strides[j->d] : 0, os = x->ndim ? o->strides[j->d] : 0;
  bool integer = !ml_dtype_is_floating(x->dtype);
  const uint8_t *xd = ml_tensor_data(x);
  uint8_t *od = ml_tensor_data(o);
  union { double d[ML_BLOCK]; int64_t i[ML_BLOCK]; } buf;
  for (int64_t l = begin; l < end; l++) {
    int64_t xo = line_offset(x->ndim, x->shape, x->strides, j->d, l);
    int64_t oo = line_offset(x->ndim, o->shape, o->strides, j->d, l);
    double dacc = 0;
    int64_t iacc = 0;
    for (int64_t s = 0; s < n; s += ML_BLOCK) {
      int64_t m = n - s < ML_BLOCK ? n - s : ML_BLOCK;
      const uint8_t *src = ml_byte_at(xd, x->dtype, xo + s * xs);
      uint8_t *dst = ml_byte_at(od, o->dtype, oo + s * os);
      if (integer) {
        const int64_t *v = ml_load_i64(src, x->dtype, xs, m, buf.i);
        int64_t *w = (int64_t *)dst;     /* int64 output */
        for (int64_t i = 0; i < m; i++) { iacc = (int64_t)((uint64_t)iacc + (uint64_t)v[i]); w[i * os] = iacc; }
      } else {
        const double *v = ml_load_f64_row(src, x->dtype, xs, m, buf.d);
        double w[ML_BLOCK];
        for (int64_t i = 0; i < m; i++) { dacc += v[i]; w[i] = dacc; }
        ml_store_f64_row(w, dst, o->dtype, os, m);
      }
    }
  }
}

ml_status ml_cumsum(const ml_tensor *x, int dim, ml_tensor **out) {
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device("cumsum", 1, &x, &cu));
  int d = 0;
  ML_TRY(ml_norm_dim("cumsum", dim, x->ndim, &d));
  ml_dtype odt = ml_dtype_is_floating(x->dtype) ? x->dtype : ML_INT64;
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(odt, x->ndim, x->shape, x->storage->device, &o));
  if (cu) {
    ml_status st = cu->cumsum(x, d, o);
    if (st) { ml_tensor_release(o); return st; }
    *out = o;
    return ML_OK;
  }
  int64_t n = x->ndim ? x->shape[d] : 1;
  int64_t lines = n > 0 ? ml_tensor_numel(x) / n : 0;
  cumsum_job j = {x, d, o};
  ml_parallel_for(lines, n, cumsum_lines, &j);
  *out = o;
  return ML_OK;
}

// --- equal and allclose --------------------------------------------------------------------------

ml_status ml_equal(const ml_tensor *a, const ml_tensor *b, bool *out) {
  const ml_tensor *ts[2] = {a, b};
  ML_TRY(ml_cpu_gate("equal", 2, ts));
  *out = false;
  if (a->ndim != b->ndim || memcmp(a->shape, b->shape, (size_t)a->ndim * sizeof *a->shape) != 0) return ML_OK;
  bool integer = !ml_dtype_is_floating(a->dtype) && !ml_dtype_is_floating(b->dtype);
  const int64_t *st[2] = {a->strides, b->strides};
  ml_iter it;
  ml_iter_init(&it, a->ndim, a->shape, 2, st);
  const uint8_t *ad = ml_tensor_data(a), *bd = ml_tensor_data(b);
  union { double d[ML_BLOCK]; int64_t i[ML_BLOCK]; } ba, bb;
  while (ml_iter_next(&it)) {
    for (int64_t s = 0; s < it.inner; s += ML_BLOCK) {
      int64_t n = it.inner - s < ML_BLOCK ? it.inner - s : ML_BLOCK;
      const uint8_t *pa = ml_byte_at(ad, a->dtype, it.off[0] + s * it.inner_stride[0]);
      const uint8_t *pb = ml_byte_at(bd, b->dtype, it.off[1] + s * it.inner_stride[1]);
      if (integer) {
        const int64_t *va = ml_load_i64(pa, a->dtype, it.inner_stride[0], n, ba.i);
        const int64_t *vb = ml_load_i64(pb, b->dtype, it.inner_stride[1], n, bb.i);
        for (int64_t i = 0; i < n; i++) if (va[i] != vb[i]) return ML_OK;
      } else {
        const double *va = ml_load_f64_row(pa, a->dtype, it.inner_stride[0], n, ba.d);
        const double *vb = ml_load_f64_row(pb, b->dtype, it.inner_stride[1], n, bb.d);
        for (int64_t i = 0; i < n; i++) if (!(va[i] == vb[i])) return ML_OK;
      }
    }
  }
  *out = true;
  return ML_OK;
}

ml_status ml_allclose(const ml_tensor *a, const ml_tensor *b, double rtol, double atol, bool equal_nan, bool *out) {
  const ml_tensor *ts[2] = {a, b};
  ML_TRY(ml_cpu_gate("allclose", 2, ts));
  if (!(rtol >= 0) || !(atol >= 0))
    return ml_fail(ML_EINVAL, "allclose: rtol (%g) and atol (%g) must be non-negative", rtol, atol);
  int nd;
  int64_t shape[ML_MAX_DIMS], sa[ML_MAX_DIMS], sb[ML_MAX_DIMS];
  ML_TRY(ml_broadcast_shape("allclose", a->ndim, a->shape, b->ndim, b->shape, &nd, shape));
  ml_broadcast_strides(a, nd, shape, sa);
  ml_broadcast_strides(b, nd, shape, sb);
  *out = false;
  const int64_t *st[2] = {sa, sb};
  ml_iter it;
  ml_iter_init(&it, nd, shape, 2, st);
  const uint8_t *ad = ml_tensor_data(a), *bd = ml_tensor_data(b);
  double ba[ML_BLOCK], bb[ML_BLOCK];
  while (ml_iter_next(&it)) {
    for (int64_t s = 0; s < it.inner; s += ML_BLOCK) {
      int64_t n = it.inner - s < ML_BLOCK ? it.inner - s : ML_BLOCK;
      const double *va = ml_load_f64_row(ml_byte_at(ad, a->dtype, it.off[0] + s * it.inner_stride[0]), a->dtype,
                                         it.inner_stride[0], n, ba);
      const double *vb = ml_load_f64_row(ml_byte_at(bd, b->dtype, it.off[1] + s * it.inner_stride[1]), b->dtype,
                                         it.inner_stride[1], n, bb);
      for (int64_t i = 0; i < n; i++) {
        double x = va[i], y = vb[i];
        if (x == y) continue;                                  /* also equal infinities */
        if (x != x || y != y) { if (equal_nan && x != x && y != y) continue; return ML_OK; }
        if (isinf(x) || isinf(y)) return ML_OK;                /* unequal infinities are never close */
        if (!(fabs(x - y) <= atol + rtol * fabs(y))) return ML_OK;
      }
    }
  }
  *out = true;
  return ML_OK;
}
