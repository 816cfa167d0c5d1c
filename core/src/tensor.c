/* tensor.c: tensor headers (dtype, shape, strides, offset over a refcounted storage) and every
   view that shares the storage: view, reshape, transpose, permute, narrow, select, unsqueeze,
   squeeze, expand, as_strided, view_dtype. */
#include "internal.h"

#include <stdlib.h>

int64_t ml_shape_numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  return n;
}

void ml_contiguous_strides(int ndim, const int64_t *shape, int64_t *strides) {
  int64_t s = 1;
  for (int i = ndim - 1; i >= 0; i--) { strides[i] = s; s *= shape[i] > 1 ? shape[i] : 1; }
}

ml_status ml_norm_dim(const char *fn, int dim, int ndim, int *out) {
  int n = ndim > 0 ? ndim : 1;   /* a 0-d tensor accepts dim 0 / -1, as in PyTorch */
  if (dim < -n || dim >= n)
    return ml_fail(ML_EINVAL, "%s: dimension %d is out of range for a %d-d tensor", fn, dim, ndim);
  *out = dim < 0 ? dim + n : dim;
  return ML_OK;
}

/* Checks shape values and that numel * elem size does not overflow. */
static ml_status check_shape(const char *fn, int ndim, const int64_t *shape, ml_dtype dt, int64_t *numel) {
  if (ndim < 0 || ndim > ML_MAX_DIMS)
    return ml_fail(ML_EINVAL, "%s: %d dimensions (at most %d are supported)", fn, ndim, ML_MAX_DIMS);
  if ((unsigned)dt >= ML_DTYPE_COUNT) return ml_fail(ML_EINVAL, "%s: invalid dtype %d", fn, (int)dt);
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0) {
      char b[ML_SHAPE_BUF];
      return ml_fail(ML_EINVAL, "%s: negative size in shape %s", fn, ml_shape_str(ndim, shape, b, sizeof b));
    }
    if (shape[i] && n > INT64_MAX / 16 / shape[i]) {
      char b[ML_SHAPE_BUF];
      return ml_fail(ML_EINVAL, "%s: shape %s is too large", fn, ml_shape_str(ndim, shape, b, sizeof b));
    }
    n *= shape[i];
  }
  *numel = n;
  return ML_OK;
}

ml_status ml_tensor_wrap(ml_storage *s, int64_t offset, ml_dtype dt, int ndim, const int64_t *shape,
                         const int64_t *strides, ml_tensor **out) {
  ml_tensor *t = malloc(sizeof *t);
  if (!t) return ml_fail(ML_ENOMEM, "out of memory for a tensor header");
  atomic_init(&t->refcount, 1);
  t->dtype = dt;
  t->ndim = ndim;
  t->offset = offset;
  if (ndim) memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
  if (strides) { if (ndim) memcpy(t->strides, strides, (size_t)ndim * sizeof *strides); }
  else ml_contiguous_strides(ndim, t->shape, t->strides);
  ml_storage_retain(s);
  t->storage = s;
  *out = t;
  return ML_OK;
}

static ml_status tensor_empty(ml_dtype dt, int ndim, const int64_t *shape, ml_device dev, bool if_free,
                              ml_tensor **out) {
  int64_t n;
  ML_TRY(check_shape("empty", ndim, shape, dt, &n));
  ml_storage *s;
  size_t nbytes = (size_t)n * ml_dtype_size(dt);
  ML_TRY(if_free ? ml_storage_new_if_free(dev, nbytes, &s) : ml_storage_new(dev, nbytes, &s));
  ml_status st = ml_tensor_wrap(s, 0, dt, ndim, shape, NULL, out);
  ml_storage_release(s);
  return st;
}

ml_status ml_tensor_empty(ml_dtype dt, int ndim, const int64_t *shape, ml_device dev, ml_tensor **out) {
  return tensor_empty(dt, ndim, shape, dev, false, out);
}

ml_status ml_tensor_empty_if_free(ml_dtype dt, int ndim, const int64_t *shape, ml_device dev, ml_tensor **out) {
  return tensor_empty(dt, ndim, shape, dev, true, out);
}

ml_status ml_tensor_from_storage(ml_storage *s, int64_t offset, ml_dtype dt, int ndim,
                                 const int64_t *shape, const int64_t *strides, ml_tensor **out) {
  if (!s) return ml_fail(ML_EINVAL, "ml_tensor_from_storage: storage is NULL");
  int64_t n;
  ML_TRY(check_shape("ml_tensor_from_storage", ndim, shape, dt, &n));
  if (offset < 0) return ml_fail(ML_EINVAL, "ml_tensor_from_storage: negative offset %lld", (long long)offset);
  int64_t st_local[ML_MAX_DIMS];
  if (!strides) { ml_contiguous_strides(ndim, shape, st_local); strides = st_local; }
  if (n > 0) {
    int64_t last = offset;   /* highest element index touched */
    for (int i = 0; i < ndim; i++) {
      if (strides[i] < 0) return ml_fail(ML_EINVAL, "ml_tensor_from_storage: negative stride");
      last += (shape[i] - 1) * strides[i];
    }
    size_t es = ml_dtype_size(dt);
    if ((uint64_t)(last + 1) > s->nbytes / es) {
      char b[ML_SHAPE_BUF];
      return ml_fail(ML_EINVAL, "ml_tensor_from_storage: a %s %s view at offset %lld needs %llu bytes, "
                     "storage has %zu", ml_dtype_name(dt), ml_shape_str(ndim, shape, b, sizeof b),
                     (long long)offset, (unsigned long long)(last + 1) * es, s->nbytes);
    }
  }
  return ml_tensor_wrap(s, offset, dt, ndim, shape, strides, out);
}

void ml_tensor_retain(ml_tensor *t) { if (t) atomic_fetch_add(&t->refcount, 1); }

void ml_tensor_release(ml_tensor *t) {
  if (!t || atomic_fetch_sub(&t->refcount, 1) != 1) return;
  ml_storage_release(t->storage);
  free(t);
}

int ml_tensor_ndim(const ml_tensor *t) { return t->ndim; }
const int64_t *ml_tensor_shape(const ml_tensor *t) { return t->shape; }
const int64_t *ml_tensor_strides(const ml_tensor *t) { return t->strides; }
int64_t ml_tensor_offset(const ml_tensor *t) { return t->offset; }
ml_dtype ml_tensor_dtype(const ml_tensor *t) { return t->dtype; }
ml_device ml_tensor_device(const ml_tensor *t) { return t->storage->device; }
int64_t ml_tensor_numel(const ml_tensor *t) { return ml_shape_numel(t->ndim, t->shape); }
ml_storage *ml_tensor_storage(const ml_tensor *t) { return t->storage; }

void *ml_tensor_data(const ml_tensor *t) {
  if (!t->storage->data) return NULL;
  return (uint8_t *)t->storage->data + t->offset * (int64_t)ml_dtype_size(t->dtype);
}

bool ml_tensor_is_contiguous(const ml_tensor *t) {
  int64_t expect = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] == 1) continue;
    if (t->shape[i] == 0) return true;
    if (t->strides[i] != expect) return false;
    expect *= t->shape[i];
  }
  return true;
}

ml_status ml_check_not_meta(const char *fn, const ml_tensor *t) {
  if (t->storage->device.type == ML_DEVICE_META)
    return ml_fail(ML_EINVAL, "%s: tensor is on the meta device and has no data", fn);
  return ML_OK;
}

ml_status ml_check_same_device(const char *fn, const ml_tensor *a, const ml_tensor *b) {
  if (!ml_device_equal(a->storage->device, b->storage->device))
    return ml_fail(ML_EINVAL, "%s: expected tensors on the same device, got %s and %s", fn,
                   ml_device_str(a->storage->device), ml_device_str(b->storage->device));
  return ML_OK;
}

// --- views ---------------------------------------------------------------------------------

/* Resolves one -1 in a requested shape against numel; fails naming fn. */
static ml_status infer_shape(const char *fn, const ml_tensor *t, int ndim, const int64_t *shape, int64_t *out) {
  if (ndim < 0 || ndim > ML_MAX_DIMS)
    return ml_fail(ML_EINVAL, "%s: %d dimensions (at most %d are supported)", fn, ndim, ML_MAX_DIMS);
  int infer = -1;
  int64_t known = 1, numel = ml_tensor_numel(t);
  for (int i = 0; i < ndim; i++) {
    if (shape[i] == -1) {
      if (infer >= 0) return ml_fail(ML_EINVAL, "%s: only one dimension can be -1", fn);
      infer = i;
    } else if (shape[i] < 0) {
      return ml_fail(ML_EINVAL, "%s: invalid size %lld", fn, (long long)shape[i]);
    } else known *= shape[i];
    out[i] = shape[i];
  }
  if (infer >= 0) {
    if (known == 0 || numel % known != 0) {
      char b[ML_SHAPE_BUF], c[ML_SHAPE_BUF];
      return ml_fail(ML_EINVAL, "%s: shape %s is invalid for a tensor of shape %s (%lld elements)", fn,
                     ml_shape_str(ndim, shape, b, sizeof b), ml_shape_str(t->ndim, t->shape, c, sizeof c),
                     (long long)numel);
    }
    out[infer] = numel / known;
    known *= out[infer];
  }
  if (known != numel) {
    char b[ML_SHAPE_BUF], c[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "%s: shape %s has %lld elements, tensor of shape %s has %lld", fn,
                   ml_shape_str(ndim, out, b, sizeof b), (long long)known,
                   ml_shape_str(t->ndim, t->shape, c, sizeof c), (long long)numel);
  }
  return ML_OK;
}

/* Strides for viewing t at new shape without copying, PyTorch's computeStride; false if impossible. */
static bool view_strides(const ml_tensor *t, int ndim, const int64_t *shape, int64_t *strides) {
  if (ml_tensor_numel(t) == 0 || t->ndim == 0) {
    ml_contiguous_strides(ndim, shape, strides);
    return true;
  }
  int view_d = ndim - 1;
  int64_t chunk_base_stride = t->strides[t->ndim - 1];
  int64_t tensor_numel = 1, view_numel = 1;
  for (int d = t->ndim - 1; d >= 0; d--) {
    tensor_numel *= t->shape[d];
    if (d == 0 || (t->shape[d - 1] != 1 && t->strides[d - 1] != tensor_numel * chunk_base_stride)) {
      while (view_d >= 0 && (view_numel < tensor_numel || shape[view_d] == 1)) {
        strides[view_d] = view_numel * chunk_base_stride;
        view_numel *= shape[view_d];
        view_d--;
      }
      if (view_numel != tensor_numel) return false;
      if (d > 0) { chunk_base_stride = t->strides[d - 1]; tensor_numel = 1; view_numel = 1; }
    }
  }
  return view_d == -1;
}

ml_status ml_tensor_view(const ml_tensor *t, int ndim, const int64_t *shape, ml_tensor **out) {
  int64_t sh[ML_MAX_DIMS], st[ML_MAX_DIMS];
  ML_TRY(infer_shape("view", t, ndim, shape, sh));
  if (!view_strides(t, ndim, sh, st)) {
    char b[ML_SHAPE_BUF], c[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "view: cannot view a non-contiguous tensor of shape %s as %s (use reshape)",
                   ml_shape_str(t->ndim, t->shape, c, sizeof c), ml_shape_str(ndim, sh, b, sizeof b));
  }
  return ml_tensor_wrap(t->storage, t->offset, t->dtype, ndim, sh, st, out);
}

ml_status ml_tensor_reshape(const ml_tensor *t, int ndim, const int64_t *shape, ml_tensor **out) {
  int64_t sh[ML_MAX_DIMS], st[ML_MAX_DIMS];
  ML_TRY(infer_shape("reshape", t, ndim, shape, sh));
  if (view_strides(t, ndim, sh, st)) return ml_tensor_wrap(t->storage, t->offset, t->dtype, ndim, sh, st, out);
  ml_tensor *c;
  ML_TRY(ml_tensor_contiguous(t, &c));
  ml_status s = ml_tensor_wrap(c->storage, c->offset, c->dtype, ndim, sh, NULL, out);
  ml_tensor_release(c);
  return s;
}

ml_status ml_tensor_transpose(const ml_tensor *t, int d0, int d1, ml_tensor **out) {
  int a = 0, b = 0;
  ML_TRY(ml_norm_dim("transpose", d0, t->ndim, &a));
  ML_TRY(ml_norm_dim("transpose", d1, t->ndim, &b));
  int64_t sh[ML_MAX_DIMS], st[ML_MAX_DIMS];
  memcpy(sh, t->shape, sizeof sh);
  memcpy(st, t->strides, sizeof st);
  if (t->ndim > 0) {
    int64_t x = sh[a]; sh[a] = sh[b]; sh[b] = x;
    x = st[a]; st[a] = st[b]; st[b] = x;
  }
  return ml_tensor_wrap(t->storage, t->offset, t->dtype, t->ndim, sh, st, out);
}

ml_status ml_tensor_permute(const ml_tensor *t, const int *dims, ml_tensor **out) {
  int64_t sh[ML_MAX_DIMS], st[ML_MAX_DIMS];
  bool seen[ML_MAX_DIMS] = {0};
  for (int i = 0; i < t->ndim; i++) {
    int d = 0;
    ML_TRY(ml_norm_dim("permute", dims[i], t->ndim, &d));
    if (seen[d]) return ml_fail(ML_EINVAL, "permute: dimension %d is repeated", d);
    seen[d] = true;
    sh[i] = t->shape[d];
    st[i] = t->strides[d];
  }
  return ml_tensor_wrap(t->storage, t->offset, t->dtype, t->ndim, sh, st, out);
}

ml_status ml_tensor_narrow(const ml_tensor *t, int dim, int64_t start, int64_t length, ml_tensor **out) {
  if (t->ndim == 0) return ml_fail(ML_EINVAL, "narrow: cannot narrow a 0-d tensor");
  int d = 0;
  ML_TRY(ml_norm_dim("narrow", dim, t->ndim, &d));
  if (start < 0) start += t->shape[d];
  if (start < 0 || length < 0 || start > t->shape[d] || length > t->shape[d] - start)
    return ml_fail(ML_EINVAL, "narrow: start %lld and length %lld are out of range for dimension %d of size %lld",
                   (long long)start, (long long)length, d, (long long)t->shape[d]);
  int64_t sh[ML_MAX_DIMS];
  memcpy(sh, t->shape, sizeof sh);
  sh[d] = length;
  return ml_tensor_wrap(t->storage, t->offset + start * t->strides[d], t->dtype, t->ndim, sh, t->strides, out);
}

ml_status ml_tensor_select(const ml_tensor *t, int dim, int64_t index, ml_tensor **out) {
  if (t->ndim == 0) return ml_fail(ML_EINVAL, "select: cannot select from a 0-d tensor");
  int d = 0;
  ML_TRY(ml_norm_dim("select", dim, t->ndim, &d));
  int64_t i = index < 0 ? index + t->shape[d] : index;
  if (i < 0 || i >= t->shape[d])
    return ml_fail(ML_EINVAL, "select: index %lld is out of range for dimension %d of size %lld",
                   (long long)index, d, (long long)t->shape[d]);
  int64_t sh[ML_MAX_DIMS], st[ML_MAX_DIMS];
  int n = 0;
  for (int k = 0; k < t->ndim; k++)
    if (k != d) { sh[n] = t->shape[k]; st[n] = t->strides[k]; n++; }
  return ml_tensor_wrap(t->storage, t->offset + i * t->strides[d], t->dtype, n, sh, st, out);
}

ml_status ml_tensor_unsqueeze(const ml_tensor *t, int dim, ml_tensor **out) {
  if (t->ndim >= ML_MAX_DIMS)
    return ml_fail(ML_EINVAL, "unsqueeze: a %d-d tensor cannot grow (at most %d dims)", t->ndim, ML_MAX_DIMS);
  int d = 0;
  ML_TRY(ml_norm_dim("unsqueeze", dim, t->ndim + 1, &d));
  int64_t sh[ML_MAX_DIMS], st[ML_MAX_DIMS];
  for (int k = 0, j = 0; k <= t->ndim; k++) {
    if (k == d) {
      sh[k] = 1;
      st[k] = d < t->ndim ? t->strides[d] * t->shape[d] : 1;
    } else { sh[k] = t->shape[j]; st[k] = t->strides[j]; j++; }
  }
  return ml_tensor_wrap(t->storage, t->offset, t->dtype, t->ndim + 1, sh, st, out);
}

ml_status ml_tensor_squeeze(const ml_tensor *t, int dim, ml_tensor **out) {
  int64_t sh[ML_MAX_DIMS], st[ML_MAX_DIMS];
  int n = 0, d = -1;
  if (dim != -1 || t->ndim == 0) {
    if (dim != -1) ML_TRY(ml_norm_dim("squeeze", dim, t->ndim, &d));
  }
  for (int k = 0; k < t->ndim; k++) {
    bool drop = t->shape[k] == 1 && (d < 0 || k == d);
    if (!drop) { sh[n] = t->shape[k]; st[n] = t->strides[k]; n++; }
  }
  return ml_tensor_wrap(t->storage, t->offset, t->dtype, n, sh, st, out);
}

ml_status ml_tensor_expand(const ml_tensor *t, int ndim, const int64_t *shape, ml_tensor **out) {
  if (ndim < t->ndim || ndim > ML_MAX_DIMS) {
    char b[ML_SHAPE_BUF], c[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "expand: cannot expand shape %s to %s",
                   ml_shape_str(t->ndim, t->shape, c, sizeof c), ml_shape_str(ndim, shape, b, sizeof b));
  }
  int64_t sh[ML_MAX_DIMS], st[ML_MAX_DIMS];
  int lead = ndim - t->ndim;
  for (int i = 0; i < ndim; i++) {
    int j = i - lead;
    int64_t want = shape[i];
    if (j < 0) {
      if (want < 0) return ml_fail(ML_EINVAL, "expand: -1 is not allowed in a new leading dimension");
      sh[i] = want; st[i] = 0;
    } else if (want == -1 || want == t->shape[j]) {
      sh[i] = t->shape[j]; st[i] = t->strides[j];
    } else if (t->shape[j] == 1 && want >= 0) {
      sh[i] = want; st[i] = 0;
    } else {
      char b[ML_SHAPE_BUF], c[ML_SHAPE_BUF];
      return ml_fail(ML_EINVAL, "expand: cannot expand shape %s to %s (dimension %d of size %lld is not 1)",
                     ml_shape_str(t->ndim, t->shape, c, sizeof c), ml_shape_str(ndim, shape, b, sizeof b), j,
                     (long long)t->shape[j]);
    }
  }
  return ml_tensor_wrap(t->storage, t->offset, t->dtype, ndim, sh, st, out);
}

ml_status ml_tensor_as_strided(const ml_tensor *t, int ndim, const int64_t *shape, const int64_t *strides,
                               int64_t offset, ml_tensor **out) {
  return ml_tensor_from_storage(t->storage, offset, t->dtype, ndim, shape, strides, out);
}

ml_status ml_tensor_view_dtype(const ml_tensor *t, ml_dtype dt, ml_tensor **out) {
  if ((unsigned)dt >= ML_DTYPE_COUNT) return ml_fail(ML_EINVAL, "view_dtype: invalid dtype %d", (int)dt);
  if (ml_dtype_size(dt) != ml_dtype_size(t->dtype))
    return ml_fail(ML_EINVAL, "view_dtype: %s and %s have different element sizes", ml_dtype_name(t->dtype),
                   ml_dtype_name(dt));
  return ml_tensor_wrap(t->storage, t->offset, dt, t->ndim, t->shape, t->strides, out);
}

// --- broadcasting --------------------------------------------------------------------------

ml_status ml_broadcast_shape(const char *fn, int nda, const int64_t *sa, int ndb, const int64_t *sb,
                             int *ndo, int64_t *so) {
  int n = nda > ndb ? nda : ndb;
  for (int i = 0; i < n; i++) {
    int ia = i - (n - nda), ib = i - (n - ndb);
    int64_t a = ia >= 0 ? sa[ia] : 1, b = ib >= 0 ? sb[ib] : 1;
    if (a == b || b == 1) so[i] = a;
    else if (a == 1) so[i] = b;
    else {
      char x[ML_SHAPE_BUF], y[ML_SHAPE_BUF];
      return ml_fail(ML_EINVAL, "%s: shapes %s and %s cannot be broadcast (dimension %d: %lld vs %lld)", fn,
                     ml_shape_str(nda, sa, x, sizeof x), ml_shape_str(ndb, sb, y, sizeof y), i, (long long)a,
                     (long long)b);
    }
  }
  *ndo = n;
  return ML_OK;
}

void ml_broadcast_strides(const ml_tensor *t, int ndo, const int64_t *so, int64_t *strides) {
  int lead = ndo - t->ndim;
  for (int i = 0; i < ndo; i++) {
    int j = i - lead;
    strides[i] = (j < 0 || (t->shape[j] == 1 && so[i] != 1)) ? 0 : t->strides[j];
  }
}

// --- strided iteration ---------------------------------------------------------------------

void ml_iter_init(ml_iter *it, int ndim, const int64_t *shape, int nops, const int64_t *const *strides) {
  memset(it, 0, sizeof *it);
  it->nops = nops;
  /* Drop size-1 dims and merge dims that are contiguous for every operand: fewer, longer rows. */
  int n = 0;
  for (int d = 0; d < ndim; d++) {
    if (shape[d] == 1) continue;
    bool merge = n > 0;
    for (int o = 0; o < nops && merge; o++)
      merge = it->strides[o][n - 1] == strides[o][d] * shape[d];
    if (merge) {
      it->shape[n - 1] *= shape[d];
      for (int o = 0; o < nops; o++) it->strides[o][n - 1] = strides[o][d];
    } else {
      it->shape[n] = shape[d];
      for (int o = 0; o < nops; o++) it->strides[o][n] = strides[o][d];
      n++;
    }
  }
  it->ndim = n;
  int64_t total = ml_shape_numel(ndim, shape);
  it->inner = n ? it->shape[n - 1] : 1;
  for (int o = 0; o < nops; o++) it->inner_stride[o] = n ? it->strides[o][n - 1] : 0;
  it->rows_left = total == 0 ? 0 : total / it->inner;
}

bool ml_iter_next(ml_iter *it) {
  if (it->rows_left <= 0) return false;
  it->rows_left--;
  if (!it->started) { it->started = true; return true; }
  /* Advance the outer index (all dims but the last) like an odometer. */
  for (int d = it->ndim - 2; d >= 0; d--) {
    it->idx[d]++;
    for (int o = 0; o < it->nops; o++) it->off[o] += it->strides[o][d];
    if (it->idx[d] < it->shape[d]) return true;
    for (int o = 0; o < it->nops; o++) it->off[o] -= it->strides[o][d] * it->shape[d];
    it->idx[d] = 0;
  }
  return true;
}
