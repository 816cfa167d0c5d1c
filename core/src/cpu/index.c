/* index.c: ops that move elements by index on the CPU: cat, gather, index_select, and arange.
   Index values are 0-based data (as in PyTorch); negative indices count from the end. */
#include "kernels.h"

// --- cat ---------------------------------------------------------------------------------------

/* PyTorch skips legacy empty 1-D tensors (shape [0]) in cat whatever the other shapes are. */
static bool cat_skippable(const ml_tensor *t) { return t->ndim == 1 && t->shape[0] == 0; }

ml_status ml_cat(int n, ml_tensor *const *tensors, int dim, ml_tensor **out) {
  if (n <= 0) return ml_fail(ML_EINVAL, "cat: expected a non-empty list of tensors");
  if (!tensors) return ml_fail(ML_EINVAL, "cat: tensor list is NULL");
  /* any one device: the parts are placed with ml_tensor_copy_, which has a CUDA path */
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device("cat", n, (const ml_tensor *const *)tensors, &cu));
  int ref = -1;
  ml_dtype dt = tensors[0]->dtype;
  for (int i = 0; i < n; i++) {
    if (i > 0) dt = ml_dtype_promote(dt, tensors[i]->dtype);
    if (ref < 0 && !cat_skippable(tensors[i])) ref = i;
  }
  if (ref < 0) ref = 0;   /* all empty 1-D: the result is one of them */
  const ml_tensor *r = tensors[ref];
  if (r->ndim == 0) return ml_fail(ML_EINVAL, "cat: zero-dimensional tensor (at position %d) cannot be concatenated", ref + 1);
  int d = 0;
  ML_TRY(ml_norm_dim("cat", dim, r->ndim, &d));
  int64_t shape[ML_MAX_DIMS];
  memcpy(shape, r->shape, sizeof shape);
  shape[d] = 0;
  for (int i = 0; i < n; i++) {
    const ml_tensor *t = tensors[i];
    if (cat_skippable(t) && (i != ref || r->ndim != 1)) continue;
    if (t->ndim == 0) return ml_fail(ML_EINVAL, "cat: zero-dimensional tensor (at position %d) cannot be concatenated", i + 1);
    if (t->ndim != r->ndim) {
      char a[ML_SHAPE_BUF], b[ML_SHAPE_BUF];
      return ml_fail(ML_EINVAL, "cat: tensors must have the same number of dimensions: tensor %d has shape %s, tensor %d has shape %s",
                     ref + 1, ml_shape_str(r->ndim, r->shape, a, sizeof a), i + 1, ml_shape_str(t->ndim, t->shape, b, sizeof b));
    }
    for (int k = 0; k < r->ndim; k++) {
      if (k != d && t->shape[k] != r->shape[k]) {
        char a[ML_SHAPE_BUF], b[ML_SHAPE_BUF];
        return ml_fail(ML_EINVAL, "cat: sizes must match except in the cat dimension: tensor %d has shape %s, tensor %d has shape %s",
                       ref + 1, ml_shape_str(r->ndim, r->shape, a, sizeof a), i + 1, ml_shape_str(t->ndim, t->shape, b, sizeof b));
      }
    }
    shape[d] += t->shape[d];
  }
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(dt, r->ndim, shape, r->storage->device, &o));
  int64_t at = 0;
  for (int i = 0; i < n; i++) {
    const ml_tensor *t = tensors[i];
    if (cat_skippable(t) && (i != ref || r->ndim != 1)) continue;
    if (t->shape[d] == 0) continue;
    ml_tensor *slot;
    ml_status st = ml_tensor_narrow(o, d, at, t->shape[d], &slot);
    if (!st) st = ml_tensor_copy_(slot, t);      /* converts dtype, any strides */
    ml_tensor_release(slot);
    if (st) { ml_tensor_release(o); return st; }
    at += t->shape[d];
  }
  *out = o;
  return ML_OK;
}

// --- index checks -----------------------------------------------------------------------------

static ml_status check_index_dtype(const char *fn, const ml_tensor *index) {
  if (ml_dtype_is_floating(index->dtype) || index->dtype == ML_BOOL)
    return ml_fail(ML_EINVAL, "%s: index must be an integer tensor, got %s", fn, ml_dtype_name(index->dtype));
  return ML_OK;
}

/* Copies one element of esize bytes. */
static inline void copy_elem(uint8_t *d, const uint8_t *s, size_t es) {
  switch (es) {
  case 1: *d = *s; break;
  case 2: memcpy(d, s, 2); break;
  case 4: memcpy(d, s, 4); break;
  default: memcpy(d, s, 8); break;
  }
}

/* The error for an index outside [-size, size) of input x. */
static ml_status bad_index(const char *fn, int64_t index, int64_t size, const ml_tensor *x) {
  char b[ML_SHAPE_BUF];
  return ml_fail(ML_EINVAL, "%s: index %lld is out of range for a dimension of size %lld (input shape %s)", fn,
                 (long long)index, (long long)size, ml_shape_str(x->ndim, x->shape, b, sizeof b));
}

// --- gather -------------------------------------------------------------------------------------

ml_status ml_gather(const ml_tensor *x, int dim, const ml_tensor *index, ml_tensor **out) {
  const ml_tensor *ts[2] = {x, index};
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device("gather", 2, ts, &cu));
  ML_TRY(check_index_dtype("gather", index));
  int d = 0;
  ML_TRY(ml_norm_dim("gather", dim, x->ndim, &d));
  int xnd = x->ndim ? x->ndim : 1, ind = index->ndim ? index->ndim : 1;
  if (xnd != ind) {
    char a[ML_SHAPE_BUF], b[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "gather: index (shape %s) must have as many dimensions as input (shape %s)",
                   ml_shape_str(index->ndim, index->shape, a, sizeof a), ml_shape_str(x->ndim, x->shape, b, sizeof b));
  }
  int64_t xshape[ML_MAX_DIMS], xstr[ML_MAX_DIMS], ishape[ML_MAX_DIMS], istr[ML_MAX_DIMS];
  for (int k = 0; k < xnd; k++) {
    xshape[k] = x->ndim ? x->shape[k] : 1; xstr[k] = x->ndim ? x->strides[k] : 0;
    ishape[k] = index->ndim ? index->shape[k] : 1; istr[k] = index->ndim ? index->strides[k] : 0;
    if (k != d && ishape[k] > xshape[k]) {
      char a[ML_SHAPE_BUF], b[ML_SHAPE_BUF];
      return ml_fail(ML_EINVAL, "gather: index shape %s is larger than input shape %s outside the gather dimension",
                     ml_shape_str(index->ndim, index->shape, a, sizeof a), ml_shape_str(x->ndim, x->shape, b, sizeof b));
    }
  }
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(x->dtype, index->ndim, index->shape, x->storage->device, &o));
  if (cu) {
    int64_t bad;
    ml_status st = cu->gather(x, d, index, o, &bad);
    if (!st && bad != INT64_MIN) st = bad_index("gather", bad, xshape[d], x);
    if (st) { ml_tensor_release(o); return st; }
    *out = o;
    return ML_OK;
  }
  int64_t ostr[ML_MAX_DIMS], xwalk[ML_MAX_DIMS];
  ml_contiguous_strides(xnd, ishape, ostr);
  memcpy(xwalk, xstr, sizeof xwalk);
  xwalk[d] = 0;                                     /* the index value picks the position along d */
  const int64_t *st[3] = {ostr, istr, xwalk};
  ml_iter it;
  ml_iter_init(&it, xnd, ishape, 3, st);
  size_t es = ml_dtype_size(x->dtype);
  uint8_t *od = ml_tensor_data(o);
  const uint8_t *xd = ml_tensor_data(x), *id = ml_tensor_data(index);
  int64_t size = xshape[d], buf[ML_BLOCK];
  while (ml_iter_next(&it)) {
    for (int64_t s = 0; s < it.inner; s += ML_BLOCK) {
      int64_t n = it.inner - s < ML_BLOCK ? it.inner - s : ML_BLOCK;
      const int64_t *iv = ml_load_i64(ml_byte_at(id, index->dtype, it.off[1] + s * it.inner_stride[1]), index->dtype,
                                      it.inner_stride[1], n, buf);
      for (int64_t i = 0; i < n; i++) {
        int64_t v = iv[i] < 0 ? iv[i] + size : iv[i];
        if (v < 0 || v >= size) {
          ml_tensor_release(o);
          return bad_index("gather", iv[i], size, x);
        }
        copy_elem(od + (size_t)(it.off[0] + (s + i) * it.inner_stride[0]) * es,
                  xd + (size_t)(it.off[2] + (s + i) * it.inner_stride[2] + v * xstr[d]) * es, es);
      }
    }
  }
  *out = o;
  return ML_OK;
}

// --- index_select --------------------------------------------------------------------------------

ml_status ml_index_select(const ml_tensor *x, int dim, const ml_tensor *index, ml_tensor **out) {
  const ml_tensor *ts[2] = {x, index};
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device("index_select", 2, ts, &cu));
  ML_TRY(check_index_dtype("index_select", index));
  if (index->ndim > 1) {
    char a[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "index_select: index must be 1-D, got shape %s", ml_shape_str(index->ndim, index->shape, a, sizeof a));
  }
  int d = 0;
  ML_TRY(ml_norm_dim("index_select", dim, x->ndim, &d));
  int64_t m = ml_tensor_numel(index), size = x->ndim ? x->shape[d] : 1;
  if (cu) {
    int64_t oshape[ML_MAX_DIMS], bad;
    memcpy(oshape, x->shape, sizeof oshape);
    if (x->ndim) oshape[d] = m;
    ml_tensor *o;
    ML_TRY(ml_tensor_empty(x->dtype, x->ndim, oshape, x->storage->device, &o));
    ml_status st = cu->index_select(x, d, index, o, &bad);
    if (!st && bad != INT64_MIN) st = bad_index("index_select", bad, size, x);
    if (st) { ml_tensor_release(o); return st; }
    *out = o;
    return ML_OK;
  }
  int64_t *iv = ml_aligned_alloc((size_t)(m > 0 ? m : 1) * sizeof *iv);
  if (!iv) return ml_fail(ML_ENOMEM, "index_select: out of memory for %lld indices", (long long)m);
  ml_load_i64(ml_tensor_data(index), index->dtype, index->ndim ? index->strides[0] : 0, m, iv);
  /* ml_load_i64 may hand back the source itself; copy out of it when it did */
  if (m > 0 && index->dtype == ML_INT64 && index->ndim && index->strides[0] == 1)
    memcpy(iv, ml_tensor_data(index), (size_t)m * sizeof *iv);
  for (int64_t i = 0; i < m; i++) {
    int64_t v = iv[i] < 0 ? iv[i] + size : iv[i];
    if (v < 0 || v >= size) {
      int64_t given = iv[i];
      ml_aligned_free(iv);
      return bad_index("index_select", given, size, x);
    }
    iv[i] = v;
  }
  int64_t oshape[ML_MAX_DIMS];
  memcpy(oshape, x->shape, sizeof oshape);
  if (x->ndim) oshape[d] = m;
  ml_tensor *o;
  ml_status st = ml_tensor_empty(x->dtype, x->ndim, oshape, ml_cpu(), &o);
  if (st) { ml_aligned_free(iv); return st; }
  /* out viewed as (outer, m, inner): each (outer, i) is a copy of x's block at (outer, iv[i]). */
  size_t es = ml_dtype_size(x->dtype);
  int64_t outer = 1;
  for (int k = 0; k < d; k++) outer *= x->shape[k];
  int nin = x->ndim ? x->ndim - d - 1 : 0;
  const int64_t *in_shape = x->shape + d + 1, *in_str = x->strides + d + 1;
  int64_t inner = ml_shape_numel(nin, in_shape);
  uint8_t *od = ml_tensor_data(o);
  const uint8_t *xd = ml_tensor_data(x);
  int64_t xdstride = x->ndim ? x->strides[d] : 0;
  for (int64_t a = 0; a < outer && inner > 0; a++) {
    int64_t base = 0, r = a;
    for (int k = d - 1; k >= 0; k--) { base += (r % x->shape[k]) * x->strides[k]; r /= x->shape[k]; }
    for (int64_t i = 0; i < m; i++)
      ml_copy_block(od + (size_t)((a * m + i) * inner) * es, xd + (size_t)(base + iv[i] * xdstride) * es, es, nin, in_shape,
                    in_str);
  }
  ml_aligned_free(iv);
  *out = o;
  return ML_OK;
}

// --- arange -------------------------------------------------------------------------------------

ml_status ml_arange(double start, double end, double step, ml_dtype dt, ml_tensor **out) {
  if ((unsigned)dt >= ML_DTYPE_COUNT) return ml_fail(ML_EINVAL, "arange: invalid dtype %d", (int)dt);
  if (!isfinite(start) || !isfinite(end))
    return ml_fail(ML_EINVAL, "arange: start (%g) and end (%g) must be finite", start, end);
  if (step == 0 || step != step) return ml_fail(ML_EINVAL, "arange: step must be nonzero, got %g", step);
  if ((step > 0 && end < start) || (step < 0 && end > start))
    return ml_fail(ML_EINVAL, "arange: upper bound and lower bound inconsistent with step sign (start %g, end %g, step %g)",
                   start, end, step);
  double count = ceil((end - start) / step);
  if (count > 1e15) return ml_fail(ML_EINVAL, "arange: %g elements is too many", count);
  int64_t n = (int64_t)count;
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(dt, 1, &n, ml_cpu(), &o));
  void *od = ml_tensor_data(o);
  double buf[ML_BLOCK];
  for (int64_t s = 0; s < n; s += ML_BLOCK) {
    int64_t m = n - s < ML_BLOCK ? n - s : ML_BLOCK;
    for (int64_t i = 0; i < m; i++) buf[i] = start + (double)(s + i) * step;
    ml_store_f64_row(buf, ml_byte_at(od, dt, s), dt, 1, m);
  }
  *out = o;
  return ML_OK;
}
