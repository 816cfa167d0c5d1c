/* kernels.c: the helpers behind kernels.h: the device gate of every CPU op, iterator seeking, and
   the strided block loaders/storers between any dtype and the float/double/int64 compute types. */
#include "kernels.h"

#include <dlfcn.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

// --- library pinning ---------------------------------------------------------------------------

/* LuaJIT dlcloses ffi.load'ed libraries when its state closes (busted, any script's exit). That
   unmaps libgomp while its idle worker threads still run, which crashes the process on exit once
   any kernel went parallel. Marking this library RTLD_NODELETE keeps it (and libgomp) mapped. */
__attribute__((constructor)) static void ml_pin_library(void) {
  Dl_info info;
  if (dladdr((void *)ml_pin_library, &info) && info.dli_fname)
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

// --- device gate ----------------------------------------------------------------------------

/* Checks operands and picks the backend. With `what` (operand names), NULL operands are optional
   and messages name the operand ("linear: the weight is on the meta device ..."); without it,
   every operand is required and is named by position. */
bool ml_avx512(void) {
  static atomic_int have = -1;
  int h = atomic_load_explicit(&have, memory_order_relaxed);
  if (h < 0) {
    const char *off = getenv("MOONLOAD_NO_AVX512");
#if defined(__x86_64__) && defined(__GNUC__)
    h = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && !(off && strcmp(off, "1") == 0);
#else
    h = 0;
#endif
    atomic_store_explicit(&have, h, memory_order_relaxed);
  }
  return h;
}

ml_status ml_op_route(const char *fn, int n, const ml_tensor *const *ts, const char *const *what,
                      const ml_cuda_api **cu) {
  *cu = NULL;
  /* Named operands report a meta operand before a device mismatch (cpu + meta is "the weight is
     on the meta device"); positional ones the mismatch first. Specs pin both. */
  if (what) {
    for (int i = 0; i < n; i++)
      if (ts[i] && ts[i]->storage->device.type == ML_DEVICE_META)
        return ml_fail(ML_EINVAL, "%s: %s is on the meta device and has no data", fn, what[i]);
  }
  const ml_tensor *first = NULL;
  int fi = 0;
  for (int i = 0; i < n; i++) {
    if (!ts[i]) {
      if (what) continue;
      return ml_fail(ML_EINVAL, "%s: tensor argument %d is NULL", fn, i + 1);
    }
    if (!first) { first = ts[i]; fi = i; continue; }
    if (ml_device_equal(first->storage->device, ts[i]->storage->device)) continue;
    if (!what) return ml_check_same_device(fn, first, ts[i]);
    return ml_fail(ML_EINVAL, "%s: %s is on %s but %s is on %s", fn, what[fi], ml_device_str(first->storage->device),
                   what[i], ml_device_str(ts[i]->storage->device));
  }
  if (!what)
    for (int i = 0; i < n; i++) ML_TRY(ml_check_not_meta(fn, ts[i]));
  if (first && first->storage->device.type == ML_DEVICE_CUDA) {
    if (!(*cu = ml_cuda())) return ML_EUNSUPPORTED;   /* the loader's message says why */
  } else if (first && first->storage->device.type != ML_DEVICE_CPU) {
    return ml_fail(ML_EUNSUPPORTED, "%s: tensors on %s are not supported", fn, ml_device_str(first->storage->device));
  }
  return ML_OK;
}

ml_status ml_op_device(const char *fn, int n, const ml_tensor *const *ts, const ml_cuda_api **cu) {
  return ml_op_route(fn, n, ts, NULL, cu);
}

ml_status ml_no_cuda_kernel(const char *fn, const ml_tensor *t) {
  return ml_fail(ML_EUNSUPPORTED, "%s: no CUDA kernel for tensors on %s yet (move them to cpu first)", fn,
                 ml_device_str(t->storage->device));
}

ml_status ml_need_shape(const char *fn, const char *name, const ml_tensor *t, int n, const int64_t *want,
                        const char *layout) {
  bool ok = t->ndim == n;
  for (int d = 0; ok && d < n; d++) ok = t->shape[d] == want[d];
  if (ok) return ML_OK;
  char a[ML_SHAPE_BUF], b[ML_SHAPE_BUF];
  return ml_fail(ML_EINVAL, "%s: %s must have shape %s %s, got %s", fn, name, ml_shape_str(n, want, a, sizeof a),
                 layout, ml_shape_str(t->ndim, t->shape, b, sizeof b));
}

ml_status ml_need_unit_last(const char *fn, const char *name, const ml_tensor *t) {
  if (t->ndim == 0 || t->shape[t->ndim - 1] <= 1 || t->strides[t->ndim - 1] == 1) return ML_OK;
  return ml_fail(ML_EINVAL, "%s: the last dim of %s must have stride 1, got %lld (make it contiguous)", fn, name,
                 (long long)t->strides[t->ndim - 1]);
}

ml_status ml_cpu_gate(const char *fn, int n, const ml_tensor *const *ts) {
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device(fn, n, ts, &cu));
  if (cu) return ml_no_cuda_kernel(fn, ts[0]);
  return ML_OK;
}

// --- iteration ------------------------------------------------------------------------------

void ml_iter_seek(ml_iter *it, int64_t row) {
  /* On a fresh iterator: position at row - 1 as if it had been handed out, so that the next
     ml_iter_next returns row `row`. */
  if (row <= 0) return;
  int64_t total = it->rows_left, r = row - 1;
  for (int o = 0; o < it->nops; o++) it->off[o] = 0;
  for (int d = it->ndim - 2; d >= 0; d--) {
    it->idx[d] = r % it->shape[d];
    r /= it->shape[d];
    for (int o = 0; o < it->nops; o++) it->off[o] += it->idx[d] * it->strides[o][d];
  }
  it->started = true;
  it->rows_left = total - row;
}

// --- loaders -------------------------------------------------------------------------------

#define LOAD_LOOP(T, CT)                                                          \
  do {                                                                            \
    const T *q = (const T *)p;                                                    \
    if (s == 1) for (int64_t i = 0; i < n; i++) buf[i] = (CT)q[i];                \
    else for (int64_t i = 0; i < n; i++) buf[i] = (CT)q[i * s];                   \
  } while (0)

const float *ml_load_f32(const void *p, ml_dtype dt, int64_t s, int64_t n, float *buf) {
  if (dt == ML_FLOAT32 && s == 1) return p;
  if (s == 0) {
    float v = (float)ml_load_f64(p, dt, 0);
    for (int64_t i = 0; i < n; i++) buf[i] = v;
    return buf;
  }
  switch (dt) {
  case ML_FLOAT32: LOAD_LOOP(float, float); break;
  case ML_FLOAT16: {
    const uint16_t *q = p;
    int64_t i = 0;
#if defined(__F16C__)
    if (s == 1)   /* 8 at a time in hardware: exact, like the scalar converter */
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + i))));
#endif
    for (; i < n; i++) buf[i] = ml_f16_to_f32(q[i * s]);
    break;
  }
  case ML_BFLOAT16: {
    const uint16_t *q = p;
    for (int64_t i = 0; i < n; i++) buf[i] = ml_bf16_to_f32(q[i * s]);
    break;
  }
  case ML_FLOAT64: LOAD_LOOP(double, float); break;
  case ML_INT64: LOAD_LOOP(int64_t, float); break;
  case ML_INT32: LOAD_LOOP(int32_t, float); break;
  case ML_INT16: LOAD_LOOP(int16_t, float); break;
  case ML_INT8: LOAD_LOOP(int8_t, float); break;
  case ML_UINT8: LOAD_LOOP(uint8_t, float); break;
  case ML_BOOL: { const uint8_t *q = p; for (int64_t i = 0; i < n; i++) buf[i] = q[i * s] != 0; break; }
  default: break;
  }
  return buf;
}

const double *ml_load_f64_row(const void *p, ml_dtype dt, int64_t s, int64_t n, double *buf) {
  if (dt == ML_FLOAT64 && s == 1) return p;
  if (s == 0) {
    double v = ml_load_f64(p, dt, 0);
    for (int64_t i = 0; i < n; i++) buf[i] = v;
    return buf;
  }
  switch (dt) {
  case ML_FLOAT32: LOAD_LOOP(float, double); break;
  case ML_FLOAT64: LOAD_LOOP(double, double); break;
  case ML_INT64: LOAD_LOOP(int64_t, double); break;
  case ML_INT32: LOAD_LOOP(int32_t, double); break;
  case ML_FLOAT16: {
    const uint16_t *q = p;
    for (int64_t i = 0; i < n; i++) buf[i] = ml_f16_to_f32(q[i * s]);
    break;
  }
  case ML_BFLOAT16: {
    const uint16_t *q = p;
    for (int64_t i = 0; i < n; i++) buf[i] = ml_bf16_to_f32(q[i * s]);
    break;
  }
  default: for (int64_t i = 0; i < n; i++) buf[i] = ml_load_f64(p, dt, i * s); break;
  }
  return buf;
}

const int64_t *ml_load_i64(const void *p, ml_dtype dt, int64_t s, int64_t n, int64_t *buf) {
  if (dt == ML_INT64 && s == 1) return p;
  if (s == 0) {
    int64_t v = dt == ML_INT64 ? *(const int64_t *)p : (int64_t)ml_load_f64(p, dt, 0);
    for (int64_t i = 0; i < n; i++) buf[i] = v;
    return buf;
  }
  switch (dt) {
  case ML_INT64: LOAD_LOOP(int64_t, int64_t); break;
  case ML_INT32: LOAD_LOOP(int32_t, int64_t); break;
  case ML_INT16: LOAD_LOOP(int16_t, int64_t); break;
  case ML_INT8: LOAD_LOOP(int8_t, int64_t); break;
  case ML_UINT8: LOAD_LOOP(uint8_t, int64_t); break;
  case ML_BOOL: { const uint8_t *q = p; for (int64_t i = 0; i < n; i++) buf[i] = q[i * s] != 0; break; }
  default: {  /* floats: C truncation like a PyTorch cast, NaN -> 0 */
    for (int64_t i = 0; i < n; i++) {
      double v = ml_load_f64(p, dt, i * s);
      buf[i] = v != v ? 0 : v >= 9.2233720368547758e18 ? INT64_MAX : v <= -9.2233720368547758e18 ? INT64_MIN
                                                                                            : (int64_t)v;
    }
    break;
  }
  }
  return buf;
}

// --- storers -------------------------------------------------------------------------------

#define STORE_LOOP(T)                                                             \
  do {                                                                            \
    T *q = (T *)p;                                                                \
    if (s == 1) for (int64_t i = 0; i < n; i++) q[i] = (T)buf[i];                 \
    else for (int64_t i = 0; i < n; i++) q[i * s] = (T)buf[i];                    \
  } while (0)

void ml_store_f32(const float *buf, void *p, ml_dtype dt, int64_t s, int64_t n) {
  if (dt == ML_FLOAT32 && s == 1 && (const void *)buf == p) return;
  switch (dt) {
  case ML_FLOAT32: STORE_LOOP(float); break;
  case ML_FLOAT16: {
    uint16_t *q = p;
    int64_t i = 0;
#if defined(__F16C__)
    if (s == 1)   /* round to nearest even, NaN stays NaN: the same as ml_f32_to_f16 */
      for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(q + i), _mm256_cvtps_ph(_mm256_loadu_ps(buf + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) q[i * s] = ml_f32_to_f16(buf[i]);
    break;
  }
  case ML_BFLOAT16: { uint16_t *q = p; for (int64_t i = 0; i < n; i++) q[i * s] = ml_f32_to_bf16(buf[i]); break; }
  case ML_FLOAT64: STORE_LOOP(double); break;
  case ML_BOOL: { uint8_t *q = p; for (int64_t i = 0; i < n; i++) q[i * s] = buf[i] != 0; break; }
  default: for (int64_t i = 0; i < n; i++) ml_store_f64(p, dt, i * s, buf[i]); break;
  }
}

void ml_store_f64_row(const double *buf, void *p, ml_dtype dt, int64_t s, int64_t n) {
  if (dt == ML_FLOAT64 && s == 1 && (const void *)buf == p) return;
  switch (dt) {
  case ML_FLOAT64: STORE_LOOP(double); break;
  case ML_FLOAT32: STORE_LOOP(float); break;
  default: for (int64_t i = 0; i < n; i++) ml_store_f64(p, dt, i * s, buf[i]); break;
  }
}

void ml_store_i64(const int64_t *buf, void *p, ml_dtype dt, int64_t s, int64_t n) {
  if (dt == ML_INT64 && s == 1 && (const void *)buf == p) return;
  switch (dt) {
  case ML_INT64: STORE_LOOP(int64_t); break;
  case ML_INT32: STORE_LOOP(int32_t); break;
  case ML_INT16: STORE_LOOP(int16_t); break;
  case ML_INT8: STORE_LOOP(int8_t); break;
  case ML_UINT8: STORE_LOOP(uint8_t); break;
  case ML_BOOL: { uint8_t *q = p; for (int64_t i = 0; i < n; i++) q[i * s] = buf[i] != 0; break; }
  default: for (int64_t i = 0; i < n; i++) ml_store_f64(p, dt, i * s, (double)buf[i]); break;
  }
}

// --- block copy ----------------------------------------------------------------------------

void ml_copy_block(void *dst, const void *src, size_t esize, int ndim, const int64_t *shape,
                   const int64_t *strides) {
  int64_t cs[ML_MAX_DIMS];
  ml_contiguous_strides(ndim, shape, cs);
  const int64_t *st[2] = {cs, strides};
  ml_iter it;
  ml_iter_init(&it, ndim, shape, 2, st);
  uint8_t *d = dst;
  const uint8_t *s = src;
  int64_t es = (int64_t)esize;
  while (ml_iter_next(&it)) {
    uint8_t *dp = d + it.off[0] * es;
    const uint8_t *sp = s + it.off[1] * es;
    int64_t n = it.inner, ss = it.inner_stride[1];
    if (ss == 1) { memcpy(dp, sp, (size_t)(n * es)); continue; }
    switch (esize) {
    case 1: for (int64_t i = 0; i < n; i++) dp[i] = sp[i * ss]; break;
    case 2: for (int64_t i = 0; i < n; i++) ((uint16_t *)dp)[i] = ((const uint16_t *)sp)[i * ss]; break;
    case 4: for (int64_t i = 0; i < n; i++) ((uint32_t *)dp)[i] = ((const uint32_t *)sp)[i * ss]; break;
    default: for (int64_t i = 0; i < n; i++) ((uint64_t *)dp)[i] = ((const uint64_t *)sp)[i * ss]; break;
    }
  }
}
