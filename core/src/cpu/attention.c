/* attention.c: scaled dot-product attention on the cpu, PyTorch semantics. Per (batch..., head)
   and block of query rows: scores = scale * q @ k^T (one GEMM), the mask and causal triangle
   applied while the fused softmax runs over each row, then out = p @ v (one GEMM). Work items
   (batch-head x query block) are spread over threads; the GEMMs inside run inline (one pool). Rows where every key is masked give zeros, as PyTorch's
   scaled_dot_product_attention does (its plain softmax would give NaN). Grouped-query attention:
   when q has Hq heads (dim -3) and k, v have Hk dividing Hq, query head h reads key head
   h / (Hq / Hk), like PyTorch's enable_gqa=True. */
#include "cpu/gemm.h"
#include "cpu/rows.h"

#include <stdlib.h>

#if defined(__AVX2__) && defined(__FMA__)
#define ML_KV8_SIMD 1
#endif

typedef struct {
  int nbd;                                   /* batch dims of the output */
  int64_t bshape[ML_MAX_DIMS];
  int64_t qs[ML_MAX_DIMS], ks[ML_MAX_DIMS], vs[ML_MAX_DIMS], ms[ML_MAX_DIMS + 2];
  int64_t group;                             /* query heads per key head (1: none) */
  const ml_tensor *q, *k, *v, *mask;
  const ml_tensor *sinks;                    /* a logit per query head joining each softmax, or NULL */
  const ml_tensor *ksc, *vsc;                /* int8 keys and values (ml_sdpa_q8): their scales */
  int64_t kss[ML_MAX_DIMS], vss[ML_MAX_DIMS], kblock, vblock;
  int64_t L, S, E, Ev, Lb, nchunks;
  double scale;
  bool causal;
  ml_dtype ct;
  uint8_t *out;
  atomic_int status;
} sdpa_job;

/* The softmax of a row of n scores with one more logit, the sink, that has no value: each
   probability of the plain softmax p_i = exp(y_i - m) / Z shrinks to exp(y_i) / (sum exp(y_j) +
   exp(sink)) = p_i / (1 + exp(sink - m) / Z), and 1 / Z is the probability of the row's largest
   score, so the plain softmax runs and one factor follows. */
static void softmax_row_sink_f32(float *y, int64_t n, double sink) {
  int64_t top = 0;
  for (int64_t i = 1; i < n; i++) if (y[i] > y[top]) top = i;
  float m = n ? y[top] : -INFINITY;
  ml_softmax_row_f32(y, y, n, false, true);
  if (m == -INFINITY) return;                   /* every key masked: zeros (the sink takes all) */
  float f = (float)(1.0 / (1.0 + exp(sink - (double)m) * (double)y[top]));
  for (int64_t i = 0; i < n; i++) y[i] *= f;
}

static void softmax_row_sink_f64(double *y, int64_t n, double sink) {
  int64_t top = 0;
  for (int64_t i = 1; i < n; i++) if (y[i] > y[top]) top = i;
  double m = n ? y[top] : -INFINITY;
  ml_softmax_row_f64(y, y, n, false, true);
  if (m == -INFINITY) return;
  double f = 1.0 / (1.0 + exp(sink - m) * y[top]);
  for (int64_t i = 0; i < n; i++) y[i] *= f;
}

/* Adds the mask row (bool: false -> -inf; float: added) to n scores. */
static void apply_mask_row(float *y, int64_t n, const ml_tensor *mask, const uint8_t *mp, int64_t s) {
  if (mask->dtype == ML_BOOL) {
    for (int64_t i = 0; i < n; i++) if (!mp[i * s]) y[i] = -INFINITY;
  } else if (mask->dtype == ML_FLOAT32 && s == 1) {
    const float *m = (const float *)mp;
    for (int64_t i = 0; i < n; i++) y[i] += m[i];
  } else {
    for (int64_t i = 0; i < n; i++) y[i] += (float)ml_load_f64(mp, mask->dtype, i * s);
  }
}

static void apply_mask_row_f64(double *y, int64_t n, const ml_tensor *mask, const uint8_t *mp, int64_t s) {
  for (int64_t i = 0; i < n; i++) {
    if (mask->dtype == ML_BOOL) { if (!mp[i * s]) y[i] = -INFINITY; }
    else y[i] += ml_load_f64(mp, mask->dtype, i * s);
  }
}

// --- int8 keys and values (ml_sdpa_q8): the dots and sums read the int8 bytes -------------------

/* sum_i q[i] * k[i] * ks[i / b] over E values (k contiguous, b a multiple of 8 on the SIMD path). */
static float dot_q8(const float *q, const int8_t *k, const float *ks, int64_t kss, int64_t E, int64_t b) {
#if ML_KV8_SIMD
  if (b % 8 == 0) {
    __m256 total = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < E; b0 += b) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = b0; i < b0 + b; i += 8) {
        __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(k + i))));
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), w, acc);
      }
      total = _mm256_fmadd_ps(acc, _mm256_set1_ps(ks[b0 / b * kss]), total);
    }
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
  }
#endif
  float total = 0;
  for (int64_t b0 = 0; b0 < E; b0 += b) {
    float d = 0;
    for (int64_t i = b0; i < b0 + b; i++) d += q[i] * (float)k[i];
    total += d * ks[b0 / b * kss];
  }
  return total;
}

/* acc[e] += p * v[e] * vs[e / b] over Ev values (v contiguous). */
static void axpy_q8(float *acc, float p, const int8_t *v, const float *vs, int64_t vss, int64_t Ev, int64_t b) {
#if ML_KV8_SIMD
  if (b % 8 == 0) {
    for (int64_t b0 = 0; b0 < Ev; b0 += b) {
      __m256 c = _mm256_set1_ps(p * vs[b0 / b * vss]);
      for (int64_t i = b0; i < b0 + b; i += 8) {
        __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(v + i))));
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(w, c, _mm256_loadu_ps(acc + i)));
      }
    }
    return;
  }
#endif
  for (int64_t b0 = 0; b0 < Ev; b0 += b) {
    float c = p * vs[b0 / b * vss];
    for (int64_t i = b0; i < b0 + b; i++) acc[i] += c * (float)v[i];
  }
}

/* Scores (lw, S) of a work item's query rows against int8 keys, whose last dim is contiguous (a
   cache's slots; checked by ml_sdpa_q8). */
static void sdpa_q8_rows(sdpa_job *j, int64_t qo, int64_t ko, int64_t kso, int64_t l0, int64_t lw, float *scores,
                         float *qrow) {
  const ml_tensor *q = j->q, *k = j->k;
  int nq = q->ndim, nk = k->ndim;
  size_t ie = ml_dtype_size(q->dtype);
  const int8_t *kd = (const int8_t *)ml_tensor_data(k) + ko;
  const float *ksd = (const float *)ml_tensor_data(j->ksc) + kso;
  int64_t ksr = j->ksc->strides[nk - 2], ksc = j->ksc->strides[nk - 1];
  for (int64_t row = 0; row < lw; row++) {
    ml_row_load(qrow, ML_FLOAT32, (const uint8_t *)ml_tensor_data(q) + (qo + (l0 + row) * q->strides[nq - 2]) * (int64_t)ie,
                q->dtype, j->E, q->strides[nq - 1]);
    float *y = scores + row * j->S;
    for (int64_t s = 0; s < j->S; s++)
      y[s] = (float)j->scale * dot_q8(qrow, kd + s * k->strides[nk - 2], ksd + s * ksr, ksc, j->E, j->kblock);
  }
}

/* out rows l0.. = p (lw, S) @ v for int8 v. */
static void sdpa_q8_out(sdpa_job *j, int64_t vo, int64_t vso, int64_t bh, int64_t l0, int64_t lw, const float *scores,
                        float *acc) {
  const ml_tensor *v = j->v;
  int nv = v->ndim;
  const int8_t *vd = (const int8_t *)ml_tensor_data(v) + vo;
  const float *vsd = (const float *)ml_tensor_data(j->vsc) + vso;
  int64_t vsr = j->vsc->strides[nv - 2], vsc = j->vsc->strides[nv - 1];
  size_t oe = ml_dtype_size(j->q->dtype);
  for (int64_t row = 0; row < lw; row++) {
    const float *p = scores + row * j->S;
    memset(acc, 0, (size_t)j->Ev * sizeof *acc);
    for (int64_t s = 0; s < j->S; s++)
      if (p[s] != 0) axpy_q8(acc, p[s], vd + s * v->strides[nv - 2], vsd + s * vsr, vsc, j->Ev, j->vblock);
    ml_convert_fast(acc, ML_FLOAT32, j->out + ((bh * j->L + l0 + row) * j->Ev) * (int64_t)oe, j->q->dtype, j->Ev);
  }
}

static void sdpa_items(void *ctx, int64_t begin, int64_t end) {
  sdpa_job *j = ctx;
  size_t ce = ml_dtype_size(j->ct), oe = ml_dtype_size(j->q->dtype);
  size_t ie = ml_dtype_size(j->q->dtype);
  uint8_t *scores = ml_aligned_alloc((size_t)(j->Lb * j->S) * ce);
  float *qrow = NULL, *acc = NULL;             /* int8 keys and values: a query row, an output row */
  if (j->ksc) {
    qrow = malloc((size_t)(j->E + 1) * sizeof *qrow);
    acc = malloc((size_t)(j->Ev + 1) * sizeof *acc);
  }
  if ((!scores && j->Lb * j->S > 0) || (j->ksc && (!qrow || !acc))) {
    ml_aligned_free(scores);
    free(qrow);
    free(acc);
    atomic_store(&j->status, ML_ENOMEM);
    return;
  }
  const ml_tensor *q = j->q, *k = j->k, *v = j->v, *mask = j->mask, *sinks = j->sinks;
  int nq = q->ndim, nk = k->ndim, nv = v->ndim;
  for (int64_t it = begin; it < end; it++) {
    int64_t bh = it / j->nchunks, l0 = (it % j->nchunks) * j->Lb;
    int64_t lw = j->L - l0 < j->Lb ? j->L - l0 : j->Lb;
    int64_t head = j->nbd ? bh % j->bshape[j->nbd - 1] : 0;
    int64_t qo = 0, ko = 0, vo = 0, mo = 0, kso = 0, vso = 0, r = bh;
    for (int d = j->nbd - 1; d >= 0; d--) {
      int64_t i = r % j->bshape[d], kv = d == j->nbd - 1 ? i / j->group : i;
      r /= j->bshape[d];
      qo += i * j->qs[d];
      ko += kv * j->ks[d];
      vo += kv * j->vs[d];
      mo += i * j->ms[d];
      kso += kv * j->kss[d];
      vso += kv * j->vss[d];
    }
    /* causal: no query of this block sees a key past its last row, so both products stop at
       S_seen keys (half the work of a whole prompt's attention) */
    int64_t S_seen = j->S;
    if (j->causal && !j->ksc && l0 + lw < j->S) S_seen = l0 + lw;
    if (j->ksc) sdpa_q8_rows(j, qo, ko, kso, l0, lw, (float *)scores, qrow);
    else {
      /* scores (lw, S_seen) = scale * q[l0:l0+lw] (lw, E) @ k^T (E, S_seen), rows S apart */
      ml_mref A = {(const uint8_t *)ml_tensor_data(q) + (qo + l0 * q->strides[nq - 2]) * (int64_t)ie, q->dtype,
                   q->strides[nq - 2], q->strides[nq - 1]};
      ml_mref B = {(const uint8_t *)ml_tensor_data(k) + ko * (int64_t)ie, k->dtype, k->strides[nk - 1],
                   k->strides[nk - 2]};
      ml_status st = ml_gemm("sdpa", lw, S_seen, j->E, j->scale, A, B, NULL, j->ct, scores, j->ct, j->S);
      if (st) { atomic_store(&j->status, st); break; }
    }
    for (int64_t row = 0; row < lw; row++) {
      int64_t l = l0 + row, n = S_seen;
      uint8_t *y = scores + row * j->S * (int64_t)ce;
      if (j->causal && n > l + 1) {         /* keys after the query: probability 0 */
        memset(y + (l + 1) * (int64_t)ce, 0, (size_t)(n - l - 1) * ce);
        n = l + 1;
      }
      if (mask) {
        const uint8_t *mp = (const uint8_t *)ml_tensor_data(mask) +
                            (mo + l * j->ms[j->nbd]) * (int64_t)ml_dtype_size(mask->dtype);
        if (j->ct == ML_FLOAT64) apply_mask_row_f64((double *)y, n, mask, mp, j->ms[j->nbd + 1]);
        else apply_mask_row((float *)y, n, mask, mp, j->ms[j->nbd + 1]);
      }
      if (sinks) {
        double sink = ml_load_f64(ml_tensor_data(sinks), sinks->dtype, head * sinks->strides[0]);
        if (j->ct == ML_FLOAT64) softmax_row_sink_f64((double *)y, n, sink);
        else softmax_row_sink_f32((float *)y, n, sink);
      } else if (j->ct == ML_FLOAT64) ml_softmax_row_f64((double *)y, (double *)y, n, false, true);
      else ml_softmax_row_f32((float *)y, (float *)y, n, false, true);
    }
    if (j->ksc) {
      sdpa_q8_out(j, vo, vso, bh, l0, lw, (const float *)scores, acc);
      continue;
    }
    /* out[l0:l0+lw] (lw, Ev) = p (lw, S_seen) @ v (S_seen, Ev) */
    ml_mref P = {scores, j->ct, j->S, 1};
    ml_mref V = {(const uint8_t *)ml_tensor_data(v) + vo * (int64_t)ie, v->dtype, v->strides[nv - 2],
                 v->strides[nv - 1]};
    ml_status st = ml_gemm("sdpa", lw, j->Ev, S_seen, 1.0, P, V, NULL, j->ct,
                 j->out + ((bh * j->L + l0) * j->Ev) * (int64_t)oe, q->dtype, j->Ev);
    if (st) { atomic_store(&j->status, st); break; }
  }
  ml_aligned_free(scores);
  free(qrow);
  free(acc);
}

/* t (..., H, S, E) -> (..., H * group, S, E), head h of the result being t's head h / group
   (a copy on t's device: an expanded view cannot fold the two head dims into one). */
/* int8 keys and values: int8 with a contiguous last dim, float32 scales (..., S, D / block) with
   their leading dims, a query of float32, float16 or bfloat16. */
static ml_status check_q8_kv(const char *fn, const ml_tensor *q, const ml_tensor *k, const ml_tensor *ksc,
                             const ml_tensor *v, const ml_tensor *vsc) {
  char a[ML_SHAPE_BUF], b[ML_SHAPE_BUF];
  if (!(q->dtype == ML_FLOAT32 || q->dtype == ML_FLOAT16 || q->dtype == ML_BFLOAT16))
    return ml_fail(ML_EINVAL, "%s: the query must be float32, float16 or bfloat16, got %s", fn, ml_dtype_name(q->dtype));
  const ml_tensor *vals[2] = {k, v}, *scs[2] = {ksc, vsc};
  for (int t = 0; t < 2; t++) {
    const ml_tensor *x = vals[t], *sc = scs[t];
    const char *what = t ? "value" : "key";
    bool ok = x->dtype == ML_INT8 && sc->dtype == ML_FLOAT32 && sc->ndim == x->ndim && x->strides[x->ndim - 1] == 1;
    for (int d = 0; ok && d < x->ndim - 1; d++) ok = x->shape[d] == sc->shape[d];
    int64_t D = x->shape[x->ndim - 1], nb = ok ? sc->shape[x->ndim - 1] : 0;
    if (!ok || nb <= 0 || D % nb != 0)
      return ml_fail(ML_EINVAL, "%s: %s %s %s with scales %s %s: expected int8 with a contiguous last dim and float32 "
                     "scales (..., S, D / block)", fn, what, ml_dtype_name(x->dtype),
                     ml_shape_str(x->ndim, x->shape, a, sizeof a), ml_dtype_name(sc->dtype),
                     ml_shape_str(sc->ndim, sc->shape, b, sizeof b));
  }
  return ML_OK;
}

/* ml_sdpa, and with ksc and vsc ml_sdpa_q8 (k and v int8 with those scales). */
static ml_status sdpa_run(const char *fn, const ml_tensor *q, const ml_tensor *k, const ml_tensor *ksc,
                          const ml_tensor *v, const ml_tensor *vsc, const ml_tensor *mask, const ml_tensor *sinks,
                          bool is_causal, double scale, ml_tensor **out) {
  ml_blas_init();
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route(fn, 7, (const ml_tensor *[]){q, k, v, mask, ksc, vsc, sinks},
                     (const char *[]){"query", "key", "value", "attn_mask", "key scales", "value scales", "sinks"}, &cu));
  if (cu && !cu->sdpa) return ml_no_cuda_kernel(fn, q);
  char a[ML_SHAPE_BUF], b[ML_SHAPE_BUF], c[ML_SHAPE_BUF];
  if (q->ndim < 2 || k->ndim < 2 || v->ndim < 2)
    return ml_fail(ML_EINVAL, "%s: query, key and value need at least 2 dims, got shapes %s, %s and %s", fn,
                   ml_shape_str(q->ndim, q->shape, a, sizeof a), ml_shape_str(k->ndim, k->shape, b, sizeof b),
                   ml_shape_str(v->ndim, v->shape, c, sizeof c));
  if (ksc) ML_TRY(check_q8_kv(fn, q, k, ksc, v, vsc));
  else if (q->dtype != k->dtype || q->dtype != v->dtype)
    return ml_fail(ML_EINVAL, "%s: query, key and value must have the same dtype, got %s, %s and %s", fn,
                   ml_dtype_name(q->dtype), ml_dtype_name(k->dtype), ml_dtype_name(v->dtype));
  if (!ml_dtype_is_floating(q->dtype))
    return ml_fail(ML_EINVAL, "%s: expected floating-point query, key and value, got %s", fn, ml_dtype_name(q->dtype));
  int nq = q->ndim, nk = k->ndim, nv = v->ndim;
  sdpa_job j = {.q = q, .k = k, .v = v, .mask = mask, .sinks = sinks, .causal = is_causal, .group = 1, .ksc = ksc,
                .vsc = vsc};
  if (ksc) {
    j.kblock = k->shape[nk - 1] / ksc->shape[nk - 1];
    j.vblock = v->shape[nv - 1] / vsc->shape[nv - 1];
  }
  j.L = q->shape[nq - 2]; j.E = q->shape[nq - 1];
  j.S = k->shape[nk - 2]; j.Ev = v->shape[nv - 1];
  if (k->shape[nk - 1] != j.E)
    return ml_fail(ML_EINVAL, "%s: query of shape %s and key of shape %s have different embedding sizes (%lld != %lld)", fn,
                   ml_shape_str(nq, q->shape, a, sizeof a), ml_shape_str(nk, k->shape, b, sizeof b),
                   (long long)j.E, (long long)k->shape[nk - 1]);
  if (v->shape[nv - 2] != j.S)
    return ml_fail(ML_EINVAL, "%s: key of shape %s and value of shape %s have different sequence lengths (%lld != %lld)", fn,
                   ml_shape_str(nk, k->shape, a, sizeof a), ml_shape_str(nv, v->shape, b, sizeof b),
                   (long long)j.S, (long long)v->shape[nv - 2]);
  if (mask && mask->dtype != ML_BOOL && !ml_dtype_is_floating(mask->dtype))
    return ml_fail(ML_EINVAL, "%s: attn_mask must be bool or floating point, got %s", fn, ml_dtype_name(mask->dtype));

  /* Batch dims: q's, k's and v's broadcast, with k/v heads (dim -3) grouped under q's. */
  int64_t kb[ML_MAX_DIMS], vb[ML_MAX_DIMS], t[ML_MAX_DIMS];
  int nqb = nq - 2, nkb = nk - 2, nvb = nv - 2, nt = 0;
  memcpy(kb, k->shape, sizeof kb);
  memcpy(vb, v->shape, sizeof vb);
  if (nqb >= 1 && nkb >= 1 && nvb >= 1) {
    int64_t hq = q->shape[nqb - 1], hk = kb[nkb - 1];
    if (hk > 1 && hk != hq && hq % hk == 0 && vb[nvb - 1] == hk) {
      j.group = hq / hk;
      kb[nkb - 1] = hq;
      vb[nvb - 1] = hq;
    }
  }
  ML_TRY(ml_broadcast_shape(fn, nqb, q->shape, nkb, kb, &nt, t));
  ML_TRY(ml_broadcast_shape(fn, nt, t, nvb, vb, &j.nbd, j.bshape));
  for (int i = 0; i < j.nbd; i++) {
    int iq = i - (j.nbd - nqb), ik = i - (j.nbd - nkb), iv = i - (j.nbd - nvb);
    bool last = i == j.nbd - 1 && j.group > 1;
    j.qs[i] = iq >= 0 && q->shape[iq] == j.bshape[i] ? q->strides[iq] : 0;
    j.ks[i] = ik >= 0 && (k->shape[ik] == j.bshape[i] || last) ? k->strides[ik] : 0;
    j.vs[i] = iv >= 0 && (v->shape[iv] == j.bshape[i] || last) ? v->strides[iv] : 0;
    if (ksc) {                                  /* (the scales' leading dims are k's and v's) */
      j.kss[i] = j.ks[i] ? ksc->strides[ik] : 0;
      j.vss[i] = j.vs[i] ? vsc->strides[iv] : 0;
    }
  }
  if (sinks && (sinks->ndim != 1 || j.nbd == 0 || sinks->shape[0] != j.bshape[j.nbd - 1] ||
                !ml_dtype_is_floating(sinks->dtype)))
    return ml_fail(ML_EINVAL, "%s: sinks %s of shape %s: expected one floating-point logit per query head (%lld)", fn,
                   ml_dtype_name(sinks->dtype), ml_shape_str(sinks->ndim, sinks->shape, a, sizeof a),
                   (long long)(j.nbd ? j.bshape[j.nbd - 1] : 0));
  int64_t target[ML_MAX_DIMS + 2];
  memcpy(target, j.bshape, (size_t)j.nbd * sizeof *target);
  target[j.nbd] = j.L;
  target[j.nbd + 1] = j.S;
  if (j.nbd + 2 > ML_MAX_DIMS)
    return ml_fail(ML_EINVAL, "%s: %d batch dims are too many (at most %d)", fn, j.nbd, ML_MAX_DIMS - 2);
  if (mask) {
    int64_t ms[ML_MAX_DIMS];
    int nm;
    ml_status st = ml_broadcast_shape(fn, mask->ndim, mask->shape, j.nbd + 2, target, &nm, ms);
    if (st || nm != j.nbd + 2 || memcmp(ms, target, (size_t)nm * sizeof *ms) != 0)
      return ml_fail(ML_EINVAL, "%s: attn_mask of shape %s cannot be broadcast to the scores' shape %s", fn,
                     ml_shape_str(mask->ndim, mask->shape, a, sizeof a), ml_shape_str(j.nbd + 2, target, b, sizeof b));
    ml_broadcast_strides(mask, j.nbd + 2, target, j.ms);
  }
  j.scale = scale > 0 ? scale : 1.0 / sqrt((double)j.E);
  j.ct = q->dtype == ML_FLOAT64 ? ML_FLOAT64 : ML_FLOAT32;

  int64_t oshape[ML_MAX_DIMS];
  memcpy(oshape, j.bshape, (size_t)j.nbd * sizeof *oshape);
  oshape[j.nbd] = j.L;
  oshape[j.nbd + 1] = j.Ev;
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(q->dtype, j.nbd + 2, oshape, q->storage->device, &o));
  if (cu && ksc && cu->sdpa_q8 && j.E <= ML_CUDA_Q8_ATTN_MAX_E) {
    ml_status st = cu->sdpa_q8(q, k, ksc, v, vsc, mask, sinks, is_causal, j.scale, o);
    if (st) { ml_tensor_release(o); return st; }
    *out = o;
    return ML_OK;
  }
  if (cu) {
    /* int8 keys and values with a wider head: dequantized into scratch on the GPU first */
    ml_tensor *kf = NULL, *vf = NULL;
    ml_status st = ML_OK;
    if (ksc) {
      st = ml_dequantize_q8(k, ksc, q->dtype, &kf);
      if (!st) st = ml_dequantize_q8(v, vsc, q->dtype, &vf);
    }
    if (!st) st = cu->sdpa(q, kf ? kf : k, vf ? vf : v, mask, sinks, is_causal, j.scale, o);   /* grouped heads included */
    ml_tensor_release(kf);
    ml_tensor_release(vf);
    if (st) { ml_tensor_release(o); return st; }
    *out = o;
    return ML_OK;
  }
  j.out = ml_tensor_data(o);
  int64_t nbh = ml_shape_numel(j.nbd, j.bshape);
  if (ml_tensor_numel(o) == 0) { *out = o; return ML_OK; }

  /* Query blocks keep the scores buffer near 1 MiB, and give every thread work when there are
     fewer batch-heads than threads. */
  int nthreads = ml_get_num_threads();
  int64_t S1 = j.S > 0 ? j.S : 1;
  j.Lb = (1 << 18) / S1;
  j.Lb = j.Lb < 1 ? 1 : j.Lb > j.L ? j.L : j.Lb;
  j.nchunks = (j.L + j.Lb - 1) / j.Lb;
  if (nbh * j.nchunks < 2 * nthreads && j.L > 1) {
    int64_t want = (2 * nthreads + nbh - 1) / nbh;
    if (want > j.nchunks) {
      j.Lb = (j.L + want - 1) / want;
      j.nchunks = (j.L + j.Lb - 1) / j.Lb;
    }
  }
  int64_t items = nbh * j.nchunks, cost = j.Lb * S1 * (j.E + j.Ev + 8);
  atomic_init(&j.status, ML_OK);
  ml_status st = ML_OK;
  if (items >= 2 && nthreads > 1 && items * cost >= (1 << 16)) {
    ml_parallel_for(items, cost, sdpa_items, &j);
    if ((st = atomic_load(&j.status)))
      st = ml_fail(st, "%s: out of memory for the scores of %lld x %lld", fn, (long long)j.Lb, (long long)j.S);
  } else {
    sdpa_items(&j, 0, items);
    if ((st = atomic_load(&j.status)) == ML_ENOMEM)
      st = ml_fail(st, "%s: out of memory for the scores of %lld x %lld", fn, (long long)j.Lb, (long long)j.S);
  }
  if (st) { ml_tensor_release(o); return st; }
  *out = o;
  return ML_OK;
}

ml_status ml_sdpa(const ml_tensor *q, const ml_tensor *k, const ml_tensor *v, const ml_tensor *mask,
                  const ml_tensor *sinks, bool is_causal, double scale, ml_tensor **out) {
  return sdpa_run("sdpa", q, k, NULL, v, NULL, mask, sinks, is_causal, scale, out);
}

ml_status ml_sdpa_q8(const ml_tensor *q, const ml_tensor *k, const ml_tensor *k_scales, const ml_tensor *v,
                     const ml_tensor *v_scales, const ml_tensor *mask, const ml_tensor *sinks, bool is_causal,
                     double scale, ml_tensor **out) {
  if (!k_scales || !v_scales) return ml_fail(ML_EINVAL, "sdpa_q8: the key and value scales are required");
  return sdpa_run("sdpa_q8", q, k, k_scales, v, v_scales, mask, sinks, is_causal, scale, out);
}
