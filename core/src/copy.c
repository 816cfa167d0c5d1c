/* copy.c: moving bytes between tensors: copy_ (broadcast + dtype conversion, any devices),
   contiguous, clone, to, fill_, and bulk reads/writes for the Lua side (tolist, printing). */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>

// --- cpu strided copy ----------------------------------------------------------------------

typedef struct {
  uint8_t *dst; const uint8_t *src;
  ml_dtype ddt, sdt;
  int ndim; int64_t shape[ML_MAX_DIMS], dst_strides[ML_MAX_DIMS], src_strides[ML_MAX_DIMS];
} copy_job;

/* Copies one inner row of n elements with element strides ds / ss. */
static void copy_row(uint8_t *d, int64_t ds, ml_dtype ddt, const uint8_t *s, int64_t ss, ml_dtype sdt, int64_t n) {
  size_t de = ml_dtype_size(ddt), se = ml_dtype_size(sdt);
  if (ds == 1 && ss == 1) { ml_convert(s, sdt, d, ddt, n); return; }
  if (ddt == sdt) {
    switch (de) {
    case 1: for (int64_t i = 0; i < n; i++) d[i * ds] = s[i * ss]; return;
    case 2: for (int64_t i = 0; i < n; i++) ((uint16_t *)d)[i * ds] = ((const uint16_t *)s)[i * ss]; return;
    case 4: for (int64_t i = 0; i < n; i++) ((uint32_t *)d)[i * ds] = ((const uint32_t *)s)[i * ss]; return;
    default: for (int64_t i = 0; i < n; i++) ((uint64_t *)d)[i * ds] = ((const uint64_t *)s)[i * ss]; return;
    }
  }
  /* Strided with conversion: gather into a small buffer of the source dtype, convert, scatter. */
  uint8_t sbuf[512 * 8], dbuf[512 * 8];
  for (int64_t b = 0; b < n; b += 512) {
    int64_t m = n - b < 512 ? n - b : 512;
    const uint8_t *sp = s + b * ss * (int64_t)se;
    if (ss == 1) memcpy(sbuf, sp, (size_t)m * se);
    else for (int64_t i = 0; i < m; i++) memcpy(sbuf + i * se, sp + i * ss * (int64_t)se, se);
    uint8_t *dp = d + b * ds * (int64_t)de;
    if (ds == 1) { ml_convert(sbuf, sdt, dp, ddt, m); continue; }
    ml_convert(sbuf, sdt, dbuf, ddt, m);
    for (int64_t i = 0; i < m; i++) memcpy(dp + i * ds * (int64_t)de, dbuf + i * de, de);
  }
}

/* Rows [begin, end) of the job's outer iteration; each thread walks its own slice. */
static void copy_rows(void *ctx, int64_t begin, int64_t end) {
  copy_job *j = ctx;
  const int64_t *strides[2] = {j->dst_strides, j->src_strides};
  ml_iter it;
  ml_iter_init(&it, j->ndim, j->shape, 2, strides);
  size_t de = ml_dtype_size(j->ddt), se = ml_dtype_size(j->sdt);
  int64_t row = 0;
  while (row < end && ml_iter_next(&it)) {
    if (row++ < begin) continue;
    copy_row(j->dst + it.off[0] * (int64_t)de, it.inner_stride[0], j->ddt,
             j->src + it.off[1] * (int64_t)se, it.inner_stride[1], j->sdt, it.inner);
  }
}

static ml_status copy_cpu(ml_tensor *dst, const ml_tensor *src, const int64_t *src_strides) {
  copy_job j = {ml_tensor_data(dst), ml_tensor_data(src), dst->dtype, src->dtype, dst->ndim, {0}, {0}, {0}};
  memcpy(j.shape, dst->shape, sizeof j.shape);
  memcpy(j.dst_strides, dst->strides, sizeof j.dst_strides);
  memcpy(j.src_strides, src_strides, sizeof j.src_strides);
  int64_t numel = ml_tensor_numel(dst);
  if (numel == 0) return ML_OK;
  const int64_t *strides[2] = {j.dst_strides, j.src_strides};
  ml_iter probe;
  ml_iter_init(&probe, j.ndim, j.shape, 2, strides);
  int64_t rows = probe.rows_left;
  if (rows <= 1 || numel < (1 << 18)) { copy_rows(&j, 0, rows); return ML_OK; }
  ml_parallel_for(rows, probe.inner, copy_rows, &j);
  return ML_OK;
}

// --- public copies -------------------------------------------------------------------------

ml_status ml_tensor_copy_(ml_tensor *dst, const ml_tensor *src) {
  int64_t bs[ML_MAX_DIMS], bshape[ML_MAX_DIMS];
  int bnd;
  ML_TRY(ml_broadcast_shape("copy_", dst->ndim, dst->shape, src->ndim, src->shape, &bnd, bshape));
  if (bnd != dst->ndim || memcmp(bshape, dst->shape, (size_t)bnd * sizeof *bshape) != 0) {
    char a[ML_SHAPE_BUF], b[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "copy_: source of shape %s cannot be broadcast to destination shape %s",
                   ml_shape_str(src->ndim, src->shape, b, sizeof b), ml_shape_str(dst->ndim, dst->shape, a, sizeof a));
  }
  ml_device dd = dst->storage->device, sd = src->storage->device;
  if (dd.type == ML_DEVICE_META) return ML_OK;         /* nothing to write: no bytes */
  if (sd.type == ML_DEVICE_META)
    return ml_fail(ML_EINVAL, "copy_: cannot copy out of a meta tensor (it has no data)");
  ml_broadcast_strides(src, dst->ndim, dst->shape, bs);
  if (dd.type == ML_DEVICE_CPU && sd.type == ML_DEVICE_CPU) return copy_cpu(dst, src, bs);

  const ml_cuda_api *cu = ml_cuda();
  if (!cu) return ML_EUNSUPPORTED;
  if (ml_device_equal(dd, sd)) return cu->copy_strided(dst, src);
  /* Across devices: make the source contiguous in the destination dtype on its own device, then
     one bulk transfer into a contiguous destination (or a staging tensor when dst is strided). */
  ml_tensor *staged = NULL, *landing = NULL;
  ml_status st;
  if (ml_tensor_numel(src) != ml_tensor_numel(dst)) {
    ml_tensor *e;
    ML_TRY(ml_tensor_expand(src, dst->ndim, dst->shape, &e));
    st = ml_tensor_to(e, sd, dst->dtype, &staged);
    ml_tensor_release(e);
  } else st = ml_tensor_to(src, sd, dst->dtype, &staged);
  if (st) return st;
  if (!ml_tensor_is_contiguous(staged)) {
    ml_tensor *c;
    st = ml_tensor_contiguous(staged, &c);
    ml_tensor_release(staged);
    if (st) return st;
    staged = c;
  }
  if (ml_tensor_is_contiguous(dst)) landing = dst, ml_tensor_retain(dst);
  else if ((st = ml_tensor_empty(dst->dtype, dst->ndim, dst->shape, dd, &landing))) goto done;
  size_t nbytes = (size_t)ml_tensor_numel(dst) * ml_dtype_size(dst->dtype);
  int kind = sd.type == ML_DEVICE_CPU ? 0 : dd.type == ML_DEVICE_CPU ? 1 : 2;
  int dev = kind == 1 ? sd.index : dd.index;
  if (kind == 2) {
    /* The copy runs on the destination's stream: order it after the kernels still queued on the
       source device (they may be producing the source). */
    void *ev;
    st = cu->event_record(sd.index, false, &ev);
    if (!st) { st = cu->event_wait(dd.index, false, ev); cu->event_free(ev); }
    if (st) goto done;
  }
  st = cu->memcpy(dev, ml_tensor_data(landing), ml_tensor_data(staged), nbytes, kind);
  if (!st && landing != dst) st = ml_tensor_copy_(dst, landing);
done:
  ml_tensor_release(staged);
  ml_tensor_release(landing);
  return st;
}

ml_status ml_tensor_clone(const ml_tensor *t, ml_tensor **out) {
  ml_tensor *c;
  ML_TRY(ml_tensor_empty(t->dtype, t->ndim, t->shape, t->storage->device, &c));
  ml_status st = ml_tensor_copy_(c, t);
  if (st) { ml_tensor_release(c); return st; }
  *out = c;
  return ML_OK;
}

bool ml_tensor_is_pinned(const ml_tensor *t) { return t && ml_storage_is_pinned(t->storage); }

ml_status ml_tensor_pin_memory(const ml_tensor *t, ml_tensor **out) {
  if (!t) return ml_fail(ML_EINVAL, "pin_memory: tensor is NULL");
  if (t->storage->device.type != ML_DEVICE_CPU)
    return ml_fail(ML_EINVAL, "pin_memory: only cpu tensors can be pinned, this one is on %s",
                   ml_device_str(t->storage->device));
  if (ml_tensor_is_pinned(t)) {
    ml_tensor_retain((ml_tensor *)t);
    *out = (ml_tensor *)t;
    return ML_OK;
  }
  const ml_cuda_api *cu = ml_cuda();
  if (!cu) return ml_fail_context(ML_EUNSUPPORTED, "pin_memory");   /* (the loader's reason follows) */
  ml_storage *s;
  ML_TRY(ml_storage_new_pinned((size_t)ml_tensor_numel(t) * ml_dtype_size(t->dtype), &s));
  int64_t strides[ML_MAX_DIMS];
  ml_contiguous_strides(t->ndim, t->shape, strides);
  ml_tensor *o;
  ml_status st = ml_tensor_wrap(s, 0, t->dtype, t->ndim, t->shape, strides, &o);
  ml_storage_release(s);
  if (st) return st;
  st = ml_tensor_copy_(o, t);
  if (st) { ml_tensor_release(o); return st; }
  *out = o;
  return ML_OK;
}

ml_status ml_tensor_pin_memory_in_place(const ml_tensor *t, bool *pinned) {
  if (!t || !pinned) return ml_fail(ML_EINVAL, "pin_memory in place: tensor is NULL");
  if (t->storage->device.type != ML_DEVICE_CPU)
    return ml_fail(ML_EINVAL, "pin_memory in place: only cpu tensors can be pinned, this one is on %s",
                   ml_device_str(t->storage->device));
  return ml_storage_pin_in_place(t->storage, pinned);
}

ml_status ml_tensor_contiguous(const ml_tensor *t, ml_tensor **out) {
  if (ml_tensor_is_contiguous(t)) { ml_tensor_retain((ml_tensor *)t); *out = (ml_tensor *)t; return ML_OK; }
  return ml_tensor_clone(t, out);
}

ml_status ml_tensor_to(const ml_tensor *t, ml_device dev, ml_dtype dt, ml_tensor **out) {
  if ((unsigned)dt >= ML_DTYPE_COUNT) return ml_fail(ML_EINVAL, "to: invalid dtype %d", (int)dt);
  ml_device cur = t->storage->device;
  if (ml_device_equal(cur, dev) && dt == t->dtype) {
    ml_tensor_retain((ml_tensor *)t);
    *out = (ml_tensor *)t;
    return ML_OK;
  }
  if (cur.type == ML_DEVICE_META && dev.type != ML_DEVICE_META)
    return ml_fail(ML_EINVAL, "to: cannot move a meta tensor to %s: it has no data (load weights into it instead)",
                   ml_device_str(dev));
  ml_tensor *c;
  ML_TRY(ml_tensor_empty(dt, t->ndim, t->shape, dev, &c));
  ml_status st = ml_tensor_copy_(c, t);
  if (st) { ml_tensor_release(c); return st; }
  *out = c;
  return ML_OK;
}

ml_status ml_tensor_fill_(ml_tensor *t, double value) {
  if (t->storage->device.type == ML_DEVICE_META) return ML_OK;
  if (t->storage->device.type == ML_DEVICE_CUDA) {
    const ml_cuda_api *cu = ml_cuda();
    if (!cu) return ML_EUNSUPPORTED;
    return cu->fill(t, value);
  }
  ml_tensor *one;
  ML_TRY(ml_tensor_empty(t->dtype, 0, NULL, ml_cpu(), &one));
  ml_store_f64(ml_tensor_data(one), t->dtype, 0, value);
  ml_status st = ml_tensor_copy_(t, one);
  ml_tensor_release(one);
  return st;
}

/* Contiguous cpu copy of t in dtype dt (retained t itself when it already is one). */
static ml_status host_contiguous(const char *fn, const ml_tensor *t, ml_dtype dt, int64_t n, ml_tensor **out) {
  ML_TRY(ml_check_not_meta(fn, t));
  if (n != ml_tensor_numel(t))
    return ml_fail(ML_EINVAL, "%s: buffer holds %lld elements, tensor has %lld", fn, (long long)n,
                   (long long)ml_tensor_numel(t));
  ml_tensor *h;
  ML_TRY(ml_tensor_to(t, ml_cpu(), dt, &h));
  if (ml_tensor_is_contiguous(h)) { *out = h; return ML_OK; }
  ml_status st = ml_tensor_contiguous(h, out);
  ml_tensor_release(h);
  return st;
}

ml_status ml_tensor_read_f64(const ml_tensor *t, double *out, int64_t n) {
  ml_tensor *h;
  ML_TRY(host_contiguous("read_f64", t, ML_FLOAT64, n, &h));
  /* One canonical NaN: LuaJIT boxes values in NaN space, and a NaN with other payload bits
     (bfloat16 0xFFFF widened, say) would read back as a different Lua value. */
  const double *src = ml_tensor_data(h);
  for (int64_t i = 0; i < n; i++) out[i] = src[i] != src[i] ? NAN : src[i];
  ml_tensor_release(h);
  return ML_OK;
}

ml_status ml_tensor_read_i64(const ml_tensor *t, int64_t *out, int64_t n) {
  ml_tensor *h;
  ML_TRY(host_contiguous("read_i64", t, ML_INT64, n, &h));
  memcpy(out, ml_tensor_data(h), (size_t)n * sizeof *out);
  ml_tensor_release(h);
  return ML_OK;
}

ml_status ml_tensor_write_f64(ml_tensor *t, const double *src, int64_t n) {
  if (n != ml_tensor_numel(t))
    return ml_fail(ML_EINVAL, "write_f64: %lld values for a tensor of %lld elements", (long long)n,
                   (long long)ml_tensor_numel(t));
  ml_storage s = {0};
  atomic_init(&s.refcount, 1);
  s.device = ml_cpu();
  s.data = (void *)src;
  s.nbytes = (size_t)n * sizeof(double);
  static const ml_storage_backend borrowed = {"borrowed", NULL};
  s.backend = &borrowed;
  ml_tensor view = {0};
  atomic_init(&view.refcount, 1);
  view.dtype = ML_FLOAT64;
  view.ndim = t->ndim;
  memcpy(view.shape, t->shape, sizeof view.shape);
  ml_contiguous_strides(t->ndim, t->shape, view.strides);
  view.storage = &s;
  return ml_tensor_copy_(t, &view);
}
