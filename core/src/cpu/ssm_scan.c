/* ssm_scan.c: the selective state-space scan of Mamba layers, on the CPU (and routed to the CUDA
   backend). Each head h carries a float32 state S (P, N) through the sequence; for each token t,
   with B_t and C_t (N) of the group head h reads (h / (H / G)),
     S[p][n] = exp(dt_t[p] A[p][n]) S[p][n] + dt_t[p] x_t[p] B_t[n];   y_t[p] = S[p] . C_t + D[p] x_t[p].
   Mamba-2 (Bamba, Granite 4.0 hybrid, Nemotron-H) has one step and one decay rate per head: dt
   (B, T, H), A (H), D (H); that is transformers' mamba2_selective_state_update token after token
   (the chunked form it runs on prompts gives the same values up to rounding). Mamba-1 (Mamba,
   Falcon-Mamba, Jamba) has them per channel: one head of P = the mixer's width, dt (B, T, 1, P),
   A (1, P, N), D (1, P), as mamba_selective_scan. Rows of S never mix, so the work splits over
   (b, h, a block of rows). An item keeps its block transposed (N, rows) in a local buffer: the
   update and the sum over N then run along the rows, as vectors, with no horizontal reductions
   (32 rows by N = 128 is 16 KiB, which stays in L1 across the tokens). */
#include "kernels.h"

#include <stdlib.h>

/* Rows of S a work item keeps. */
#define ROWS 32

typedef struct {
  const ml_tensor *x, *dt, *A, *B, *C, *D;
  ml_tensor *out;
  float *state;                /* (Bt, H, P, N), contiguous */
  int64_t T, H, P, N, group, nrb;   /* group = H / G heads per group; nrb row blocks a head */
  bool dt_rows, A_rows, D_rows;     /* per row (Mamba-1) rather than per head */
  bool A_log;                       /* A holds log(-rate) */
  atomic_int status;
} scan_job;

/* One token on a block of n <= ROWS rows: St (N, ROWS) decays by da (n) and gains dx (n) times B
   (N); y (n) gets St^T C. Inlined with n = ROWS, the width is a constant and vectorizes. */
static inline __attribute__((always_inline)) void
scan_token_n(float *restrict St, int64_t N, int64_t n, const float *restrict da, const float *restrict dx,
             const float *restrict Bv, const float *restrict Cv, float *restrict y) {
  float acc[ROWS] = {0};
  for (int64_t s = 0; s < N; s++) {
    float *restrict col = St + s * ROWS;
    float b = Bv[s], c = Cv[s];
    for (int64_t r = 0; r < n; r++) {
      float v = col[r] * da[r] + dx[r] * b;
      col[r] = v;
      acc[r] += v * c;
    }
  }
  memcpy(y, acc, (size_t)n * sizeof *acc);
}

/* The same with a decay rate per entry: At (N, ROWS), the block's rates transposed, times the
   rows' steps dt (n). */
static inline __attribute__((always_inline)) void
scan_token_rates_n(float *restrict St, const float *restrict At, int64_t N, int64_t n, const float *restrict dt,
                   const float *restrict dx, const float *restrict Bv, const float *restrict Cv, float *restrict y) {
  float acc[ROWS] = {0};
  for (int64_t s = 0; s < N; s++) {
    float *restrict col = St + s * ROWS;
    const float *restrict rate = At + s * ROWS;
    float b = Bv[s], c = Cv[s];
    for (int64_t r = 0; r < n; r++) {
      float v = col[r] * expf(dt[r] * rate[r]) + dx[r] * b;
      col[r] = v;
      acc[r] += v * c;
    }
  }
  memcpy(y, acc, (size_t)n * sizeof *acc);
}

static void scan_token(float *St, const float *At, int64_t N, int64_t n, const float *dt, const float *da,
                       const float *dx, const float *Bv, const float *Cv, float *y) {
  if (At) {
    if (n == ROWS) scan_token_rates_n(St, At, N, ROWS, dt, dx, Bv, Cv, y);
    else scan_token_rates_n(St, At, N, n, dt, dx, Bv, Cv, y);
  } else {
    if (n == ROWS) scan_token_n(St, N, ROWS, da, dx, Bv, Cv, y);
    else scan_token_n(St, N, n, da, dx, Bv, Cv, y);
  }
}

static float load_at(const ml_tensor *t, int64_t off) {
  return (float)ml_load_f64(ml_tensor_data(t), t->dtype, off);
}

/* Rows r0 .. r0 + n - 1 of a per-row operand at element offset base (its last dim: rows) into dst. */
static void load_rows(const ml_tensor *t, int64_t base, int64_t n, float *dst) {
  int64_t st = t->strides[t->ndim - 1];
  for (int64_t r = 0; r < n; r++) dst[r] = load_at(t, base + r * st);
}

static void scan_items(void *ctx, int64_t begin, int64_t end) {
  scan_job *j = ctx;
  const ml_tensor *x = j->x, *dt = j->dt, *Bm = j->B, *Cm = j->C, *A = j->A, *D = j->D;
  ml_tensor *out = j->out;
  int64_t N = j->N, P = j->P;
  /* the block of S transposed, its decay rates transposed (Mamba-1), this token's B and C; per
     row: x, the step, the decay, dt * x, y and D */
  float *buf = malloc((size_t)(2 * N * ROWS + 2 * N + 6 * ROWS) * sizeof *buf);
  if (!buf) { atomic_store(&j->status, ML_ENOMEM); return; }
  float *St = buf, *At = St + N * ROWS, *bb = At + N * ROWS, *cb = bb + N, *xb = cb + N, *dtr = xb + ROWS,
        *da = dtr + ROWS, *dx = da + ROWS, *y = dx + ROWS, *Dr = y + ROWS;
  const void *xd = ml_tensor_data(x), *Bd = ml_tensor_data(Bm), *Cd = ml_tensor_data(Cm);
  void *od = ml_tensor_data(out);
  for (int64_t it = begin; it < end; it++) {
    int64_t bh = it / j->nrb, r0 = (it % j->nrb) * ROWS, n = P - r0 < ROWS ? P - r0 : ROWS;
    int64_t b = bh / j->H, h = bh % j->H, g = h / j->group;
    float *S = j->state + (bh * P + r0) * N;                         /* (n, N) rows N apart */
    for (int64_t r = 0; r < n; r++)
      for (int64_t s = 0; s < N; s++) St[s * ROWS + r] = S[r * N + s];
    float a = 0;
    if (j->A_rows) {                 /* each row's rates as float32 (in bb, free until the tokens), transposed */
      for (int64_t r = 0; r < n; r++) {
        int64_t off = h * A->strides[0] + (r0 + r) * A->strides[1];
        const float *row = ml_load_f32(ml_byte_at(ml_tensor_data(A), A->dtype, off), A->dtype, A->strides[2], N, bb);
        if (j->A_log) for (int64_t s = 0; s < N; s++) At[s * ROWS + r] = -expf(row[s]);
        else for (int64_t s = 0; s < N; s++) At[s * ROWS + r] = row[s];
      }
    } else {
      a = load_at(A, h * A->strides[0]);
      if (j->A_log) a = -expf(a);
    }
    for (int64_t r = 0; r < n; r++) Dr[r] = 0;
    if (D && j->D_rows) load_rows(D, h * D->strides[0] + r0 * D->strides[1], n, Dr);
    else if (D) for (int64_t r = 0; r < n; r++) Dr[r] = load_at(D, h * D->strides[0]);
    for (int64_t t = 0; t < j->T; t++) {
      int64_t doff = b * dt->strides[0] + t * dt->strides[1] + h * dt->strides[2];
      if (j->dt_rows) {
        load_rows(dt, doff + r0 * dt->strides[3], n, dtr);
      } else {
        float v = load_at(dt, doff);
        for (int64_t r = 0; r < n; r++) dtr[r] = v;
      }
      int64_t xoff = b * x->strides[0] + t * x->strides[1] + h * x->strides[2] + r0;
      const float *xr = ml_load_f32(ml_byte_at(xd, x->dtype, xoff), x->dtype, 1, n, xb);
      int64_t boff = b * Bm->strides[0] + t * Bm->strides[1] + g * Bm->strides[2];
      int64_t coff = b * Cm->strides[0] + t * Cm->strides[1] + g * Cm->strides[2];
      const float *Bv = ml_load_f32(ml_byte_at(Bd, Bm->dtype, boff), Bm->dtype, 1, N, bb);
      const float *Cv = ml_load_f32(ml_byte_at(Cd, Cm->dtype, coff), Cm->dtype, 1, N, cb);
      for (int64_t r = 0; r < n; r++) dx[r] = dtr[r] * xr[r];
      if (!j->A_rows) {
        float d0 = expf(dtr[0] * a);
        for (int64_t r = 0; r < n; r++) da[r] = j->dt_rows ? expf(dtr[r] * a) : d0;
      }
      scan_token(St, j->A_rows ? At : NULL, N, n, dtr, da, dx, Bv, Cv, y);
      for (int64_t r = 0; r < n; r++) y[r] += Dr[r] * xr[r];
      int64_t ooff = b * out->strides[0] + t * out->strides[1] + h * out->strides[2] + r0;
      ml_store_f32(y, ml_byte_at(od, out->dtype, ooff), out->dtype, 1, n);
    }
    for (int64_t r = 0; r < n; r++)
      for (int64_t s = 0; s < N; s++) S[r * N + s] = St[s * ROWS + r];
  }
  free(buf);
}

// --- the op ----------------------------------------------------------------------------------------

/* t has the shape of want's first n_head dims (an operand per head) or all its n_row dims (per row),
   or an error naming it and both layouts. */
static ml_status need_head_or_rows(const char *fn, const char *name, const ml_tensor *t, const int64_t *want,
                                   int n_head, int n_row, const char *head_layout, const char *row_layout) {
  bool ok = t->ndim == n_head || t->ndim == n_row;
  for (int d = 0; ok && d < t->ndim; d++) ok = t->shape[d] == want[d];
  if (ok) return ML_OK;
  char a[ML_SHAPE_BUF], b[ML_SHAPE_BUF], c[ML_SHAPE_BUF];
  return ml_fail(ML_EINVAL, "%s: %s must have shape %s %s or %s %s, got %s", fn, name,
                 ml_shape_str(n_head, want, a, sizeof a), head_layout, ml_shape_str(n_row, want, b, sizeof b), row_layout,
                 ml_shape_str(t->ndim, t->shape, c, sizeof c));
}

ml_status ml_ssm_scan(const ml_tensor *x, const ml_tensor *dt, const ml_tensor *A, const ml_tensor *B,
                      const ml_tensor *C, const ml_tensor *D, bool A_log, ml_tensor *state, ml_tensor *out) {
  const char *fn = "ssm_scan";
  const ml_tensor *ts[8] = {x, dt, A, B, C, D, state, out};
  const char *names[8] = {"x", "dt", "A", "B", "C", "D", "state", "out"};
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route(fn, 8, ts, names, &cu));
  for (int i = 0; i < 8; i++)
    if (!ts[i] && i != 5)
      return ml_fail(ML_EINVAL, "%s: %s is required (all but D are)", fn, names[i]);
  if (cu && !cu->ssm_scan) return ml_no_cuda_kernel(fn, x);
  for (int i = 0; i < 8; i++) {
    if (!ts[i]) continue;
    if (i == 6 ? state->dtype != ML_FLOAT32 : !ml_is_float3(ts[i]->dtype))
      return ml_fail(ML_EINVAL, "%s: %s must be %s, got %s", fn, names[i],
                     i == 6 ? "float32" : "float32, bfloat16 or float16", ml_dtype_name(ts[i]->dtype));
  }
  char a[ML_SHAPE_BUF];
  if (x->ndim != 4)
    return ml_fail(ML_EINVAL, "%s: x must be (B, T, H, P), got shape %s", fn, ml_shape_str(x->ndim, x->shape, a, sizeof a));
  int64_t Bt = x->shape[0], T = x->shape[1], H = x->shape[2], P = x->shape[3];
  if (B->ndim != 4 || B->shape[0] != Bt || B->shape[1] != T)
    return ml_fail(ML_EINVAL, "%s: B must be (B, T, G, N) with x's B = %lld and T = %lld, got shape %s", fn,
                   (long long)Bt, (long long)T, ml_shape_str(B->ndim, B->shape, a, sizeof a));
  int64_t G = B->shape[2], N = B->shape[3];
  if (G == 0 ? H != 0 : H % G != 0)
    return ml_fail(ML_EINVAL, "%s: the heads of x (H = %lld) must be a multiple of the groups of B and C (G = %lld)",
                   fn, (long long)H, (long long)G);
  ML_TRY(ml_need_shape(fn, "C", C, 4, B->shape, "(B, T, G, N), as B"));
  /* a step, a decay rate and a skip per head (Mamba-2) or per row (Mamba-1) */
  bool dt_rows = dt->ndim == 4, A_rows = A->ndim == 3, D_rows = D && D->ndim == 2;
  ML_TRY(need_head_or_rows(fn, "dt", dt, x->shape, 3, 4, "(B, T, H)", "(B, T, H, P)"));
  ML_TRY(need_head_or_rows(fn, "A", A, (int64_t[]){H, P, N}, 1, 3, "(H)", "(H, P, N)"));
  if (D) ML_TRY(need_head_or_rows(fn, "D", D, (int64_t[]){H, P}, 1, 2, "(H)", "(H, P)"));
  ML_TRY(ml_need_shape(fn, "state", state, 4, (int64_t[]){Bt, H, P, N}, "(B, H, P, N)"));
  if (!ml_tensor_is_contiguous(state)) return ml_fail(ML_EINVAL, "%s: state must be contiguous", fn);
  ML_TRY(ml_need_shape(fn, "out", out, 4, x->shape, "(B, T, H, P), as x"));
  ML_TRY(ml_need_unit_last(fn, "x", x));
  ML_TRY(ml_need_unit_last(fn, "B", B));
  ML_TRY(ml_need_unit_last(fn, "C", C));
  ML_TRY(ml_need_unit_last(fn, "out", out));
  if (Bt == 0 || T == 0 || H == 0 || P == 0) return ML_OK;
  if (cu) return cu->ssm_scan(x, dt, A, B, C, D, A_log, state, out);
  scan_job j = {.x = x, .dt = dt, .A = A, .B = B, .C = C, .D = D, .out = out, .state = ml_tensor_data(state),
                .T = T, .H = H, .P = P, .N = N, .group = H / G, .nrb = (P + ROWS - 1) / ROWS,
                .dt_rows = dt_rows, .A_rows = A_rows, .D_rows = D_rows, .A_log = A_log};
  atomic_init(&j.status, ML_OK);
  ml_parallel_for(Bt * H * j.nrb, 4 * T * (N + 1) * (P < ROWS ? P : ROWS), scan_items, &j);
  ml_status st = atomic_load(&j.status);
  if (st) return ml_fail(st, "%s: out of memory for a work buffer", fn);
  return ML_OK;
}
