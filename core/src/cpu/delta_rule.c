/* delta_rule.c: the gated delta rule, the linear-attention recurrence of Qwen3-Next's GatedDeltaNet
   layers, on the CPU (and routed to the CUDA backend). It is transformers'
   torch_recurrent_gated_delta_rule with use_qk_l2norm_in_kernel: each value head h carries a
   float32 state S (Dk, Dv) through the sequence, and for each token t, with q and k of key head
   h / (Hv / Hk) L2-normalized (x * rsqrt(sum x^2 + 1e-6)) and q scaled by Dk^-0.5,
     S *= exp(g_t);  delta = (v_t - k S) * beta_t;  S += k^T delta;  out_t = q S.
   The chunked form transformers runs on prompts gives the same values up to rounding (and is no
   more accurate in float32); this one token at a time form is what decoding needs, and costs two
   passes over S a token. Columns of S never mix (column j of k S reads column j only), so the work
   splits over (b, h, a block of columns): each block's slice of S stays in L1 across the tokens,
   and each item normalizes its token's q and k itself (Dk work beside the passes' Dk x 32). */
#include "kernels.h"

#include <stdlib.h>

/* Columns of S a work item keeps: Dk rows of 32 floats, 16 KiB at Dk = 128, fit L1. */
#define COLS 32

typedef struct {
  const ml_tensor *q, *k, *v, *g, *beta;
  ml_tensor *out;
  float *state;                /* (B, Hv, Dk, Dv), contiguous */
  int64_t T, Hv, Dk, Dv, group, ncb;   /* group = Hv / Hk value heads a key head; ncb column blocks */
  float scale;                 /* Dk^-0.5 */
  atomic_int status;
} dr_job;

/* x (n, last dim contiguous, any float dtype) L2-normalized times scale into dst, in float32. */
static void load_normalized(const ml_tensor *x, int64_t off, int64_t n, float scale, float *dst) {
  const float *src = ml_load_f32(ml_byte_at(ml_tensor_data(x), x->dtype, off), x->dtype, 1, n, dst);
  float ss = 0;
  for (int64_t i = 0; i < n; i++) ss += src[i] * src[i];
  float inv = 1.0f / sqrtf(ss + 1e-6f);
  for (int64_t i = 0; i < n; i++) dst[i] = src[i] * inv * scale;
}

/* The two passes over the rows of a column block of n <= COLS columns (S's rows ld apart), with
   the sums in a local array: inlined with n = COLS, the width is a constant and they stay in
   registers. Pass 1 decays S and reads kv = k S. */
static inline __attribute__((always_inline)) void
decay_and_read_n(float *restrict S, int64_t ld, int64_t Dk, int64_t n, float decay, const float *restrict k,
                 float *restrict kv) {
  float acc[COLS] = {0};
  for (int64_t i = 0; i < Dk; i++) {
    float *restrict row = S + i * ld;
    float ki = k[i];
    for (int64_t j = 0; j < n; j++) {
      float s = row[j] * decay;
      row[j] = s;
      acc[j] += s * ki;
    }
  }
  memcpy(kv, acc, (size_t)n * sizeof *acc);
}

/* Pass 2: S += k^T delta and o = q S. */
static inline __attribute__((always_inline)) void
update_and_query_n(float *restrict S, int64_t ld, int64_t Dk, int64_t n, const float *restrict k,
                   const float *restrict q, const float *restrict delta, float *restrict o) {
  float acc[COLS] = {0}, d[COLS];
  memcpy(d, delta, (size_t)n * sizeof *d);
  for (int64_t i = 0; i < Dk; i++) {
    float *restrict row = S + i * ld;
    float ki = k[i], qi = q[i];
    for (int64_t j = 0; j < n; j++) {
      float s = row[j] + ki * d[j];
      row[j] = s;
      acc[j] += s * qi;
    }
  }
  memcpy(o, acc, (size_t)n * sizeof *acc);
}

static void decay_and_read(float *S, int64_t ld, int64_t Dk, int64_t n, float decay, const float *k, float *kv) {
  if (n == COLS) decay_and_read_n(S, ld, Dk, COLS, decay, k, kv);
  else decay_and_read_n(S, ld, Dk, n, decay, k, kv);
}

static void update_and_query(float *S, int64_t ld, int64_t Dk, int64_t n, const float *k, const float *q,
                             const float *delta, float *o) {
  if (n == COLS) update_and_query_n(S, ld, Dk, COLS, k, q, delta, o);
  else update_and_query_n(S, ld, Dk, n, k, q, delta, o);
}

static void delta_rule_items(void *ctx, int64_t begin, int64_t end) {
  dr_job *j = ctx;
  const ml_tensor *q = j->q, *k = j->k, *v = j->v, *g = j->g, *beta = j->beta;
  ml_tensor *out = j->out;
  int64_t Dk = j->Dk, Dv = j->Dv;
  /* q, k (Dk) normalized; v, kv (then delta), o: a column block each */
  float *buf = malloc((size_t)(2 * Dk + 3 * COLS) * sizeof *buf);
  if (!buf) { atomic_store(&j->status, ML_ENOMEM); return; }
  float *qn = buf, *kn = qn + Dk, *vb = kn + Dk, *kv = vb + COLS, *o = kv + COLS;
  const void *gd = ml_tensor_data(g), *bd = ml_tensor_data(beta), *vd = ml_tensor_data(v);
  void *od = ml_tensor_data(out);
  for (int64_t it = begin; it < end; it++) {
    int64_t bh = it / j->ncb, c0 = (it % j->ncb) * COLS, n = Dv - c0 < COLS ? Dv - c0 : COLS;
    int64_t b = bh / j->Hv, h = bh % j->Hv, hk = h / j->group;
    float *S = j->state + bh * Dk * Dv + c0;
    for (int64_t t = 0; t < j->T; t++) {
      load_normalized(q, b * q->strides[0] + t * q->strides[1] + hk * q->strides[2], Dk, j->scale, qn);
      load_normalized(k, b * k->strides[0] + t * k->strides[1] + hk * k->strides[2], Dk, 1.0f, kn);
      float decay = expf((float)ml_load_f64(gd, g->dtype, b * g->strides[0] + t * g->strides[1] + h * g->strides[2]));
      float bt = (float)ml_load_f64(bd, beta->dtype, b * beta->strides[0] + t * beta->strides[1] + h * beta->strides[2]);
      int64_t voff = b * v->strides[0] + t * v->strides[1] + h * v->strides[2] + c0;
      const float *vr = ml_load_f32(ml_byte_at(vd, v->dtype, voff), v->dtype, 1, n, vb);
      decay_and_read(S, Dv, Dk, n, decay, kn, kv);
      for (int64_t c = 0; c < n; c++) kv[c] = (vr[c] - kv[c]) * bt;   /* kv becomes delta */
      update_and_query(S, Dv, Dk, n, kn, qn, kv, o);
      int64_t ooff = b * out->strides[0] + t * out->strides[1] + h * out->strides[2] + c0;
      ml_store_f32(o, ml_byte_at(od, out->dtype, ooff), out->dtype, 1, n);
    }
  }
  free(buf);
}

// --- the op ----------------------------------------------------------------------------------------

ml_status ml_gated_delta_rule(const ml_tensor *q, const ml_tensor *k, const ml_tensor *v, const ml_tensor *g,
                              const ml_tensor *beta, ml_tensor *state, ml_tensor *out) {
  const char *fn = "gated_delta_rule";
  const ml_tensor *ts[7] = {q, k, v, g, beta, state, out};
  const char *names[7] = {"q", "k", "v", "g", "beta", "state", "out"};
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route(fn, 7, ts, names, &cu));
  for (int i = 0; i < 7; i++)
    if (!ts[i]) return ml_fail(ML_EINVAL, "%s: %s is required (q, k, v, g, beta, state and out all are)", fn, names[i]);
  if (cu && !cu->gated_delta_rule) return ml_no_cuda_kernel(fn, q);
  for (int i = 0; i < 7; i++)
    if (i == 5 ? state->dtype != ML_FLOAT32 : !ml_is_float3(ts[i]->dtype))
      return ml_fail(ML_EINVAL, "%s: %s must be %s, got %s", fn, names[i],
                     i == 5 ? "float32" : "float32, bfloat16 or float16", ml_dtype_name(ts[i]->dtype));
  char a[ML_SHAPE_BUF];
  if (q->ndim != 4)
    return ml_fail(ML_EINVAL, "%s: q must be (B, T, Hk, Dk), got shape %s", fn, ml_shape_str(q->ndim, q->shape, a, sizeof a));
  int64_t B = q->shape[0], T = q->shape[1], Hk = q->shape[2], Dk = q->shape[3];
  ML_TRY(ml_need_shape(fn, "k", k, 4, q->shape, "(B, T, Hk, Dk), as q"));
  if (v->ndim != 4 || v->shape[0] != B || v->shape[1] != T)
    return ml_fail(ML_EINVAL, "%s: v must be (B, T, Hv, Dv) with q's B = %lld and T = %lld, got shape %s", fn,
                   (long long)B, (long long)T, ml_shape_str(v->ndim, v->shape, a, sizeof a));
  int64_t Hv = v->shape[2], Dv = v->shape[3];
  if (Hk == 0 ? Hv != 0 : Hv % Hk != 0)
    return ml_fail(ML_EINVAL, "%s: the value heads of v (Hv = %lld) must be a multiple of the key heads of q and k "
                   "(Hk = %lld)", fn, (long long)Hv, (long long)Hk);
  ML_TRY(ml_need_shape(fn, "g", g, 3, (int64_t[]){B, T, Hv}, "(B, T, Hv)"));
  ML_TRY(ml_need_shape(fn, "beta", beta, 3, (int64_t[]){B, T, Hv}, "(B, T, Hv)"));
  ML_TRY(ml_need_shape(fn, "state", state, 4, (int64_t[]){B, Hv, Dk, Dv}, "(B, Hv, Dk, Dv)"));
  if (!ml_tensor_is_contiguous(state)) return ml_fail(ML_EINVAL, "%s: state must be contiguous", fn);
  ML_TRY(ml_need_shape(fn, "out", out, 4, v->shape, "(B, T, Hv, Dv), as v"));
  ML_TRY(ml_need_unit_last(fn, "q", q));
  ML_TRY(ml_need_unit_last(fn, "k", k));
  ML_TRY(ml_need_unit_last(fn, "v", v));
  ML_TRY(ml_need_unit_last(fn, "out", out));
  if (B == 0 || T == 0 || Hv == 0 || Dv == 0) return ML_OK;
  if (Dk == 0) return ml_tensor_fill_(out, 0);     /* an empty state reads as zeros */
  if (cu) return cu->gated_delta_rule(q, k, v, g, beta, state, out);
  dr_job j = {.q = q, .k = k, .v = v, .g = g, .beta = beta, .out = out, .state = ml_tensor_data(state),
              .T = T, .Hv = Hv, .Dk = Dk, .Dv = Dv, .group = Hv / Hk, .ncb = (Dv + COLS - 1) / COLS,
              .scale = 1.0f / sqrtf((float)Dk)};
  atomic_init(&j.status, ML_OK);
  ml_parallel_for(B * Hv * j.ncb, 4 * T * (Dk + 1) * (Dv < COLS ? Dv : COLS), delta_rule_items, &j);
  ml_status st = atomic_load(&j.status);
  if (st) return ml_fail(st, "%s: out of memory for a work buffer", fn);
  return ML_OK;
}
