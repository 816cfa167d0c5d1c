// blas.cu: matmul, linear and scaled dot-product attention on CUDA through cuBLAS.
// Row-major moonload matrices are handed to column-major cuBLAS as their transposes
// (C = A B  <=>  C^T = B^T A^T), so no operand is copied when its last or second-to-last
// stride is 1; other layouts and mixed dtypes go through one contiguous scratch copy.
// float32 runs without TF32 unless MOONLOAD_ALLOW_TF32=1; float16/bfloat16 accumulate in float32.
#include "common.cuh"

#include <climits>
#include <math.h>

static cudaDataType_t cuda_type(int dtype) {
  switch (dtype) {
  case ML_FLOAT16: return CUDA_R_16F;
  case ML_BFLOAT16: return CUDA_R_16BF;
  case ML_FLOAT64: return CUDA_R_64F;
  default: return CUDA_R_32F;
  }
}

static cublasComputeType_t compute_type(int dtype) {
  return dtype == ML_FLOAT64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
}

// A scratch tensor: `t` owns a reference released by the caller.
static ml_status scratch_copy(const ml_tensor *src, int ndim, const int64_t *shape, ml_dtype dt, ml_tensor **out) {
  ml_tensor *t;
  ML_TRY(ml_tensor_empty(dt, ndim, shape, ml_tensor_device(src), &t));
  ml_status s = ml_cuda_copy_strided(t, src);
  if (s) { ml_tensor_release(t); return s; }
  *out = t;
  return ML_OK;
}

// One GEMM operand as cuBLAS sees it: a batch of matrices with a leading dimension, a batch
// stride, and whether the stored layout is the transpose of the logical row-major matrix.
struct Operand {
  const void *data;
  int dtype;
  bool transposed;      // stored column-major (logical row-major matrix has stride 1 down rows)
  int64_t ld, batch_stride;
  ml_tensor *scratch;   // owned copy, or NULL
};

// Fits t (viewed at batch shape + (rows, cols)) to one strided batch; copies when it cannot.
static ml_status make_operand(const ml_tensor *t, int nb, const int64_t *batch, int64_t rows, int64_t cols, int dtype,
                              Operand *op) {
  int64_t full[ML_MAX_DIMS + 2];
  for (int i = 0; i < nb; i++) full[i] = batch[i];
  full[nb] = rows; full[nb + 1] = cols;
  op->scratch = NULL;
  TensorDesc d = ml_cuda_desc_broadcast(t, nb + 2, full);
  int64_t sr = d.strides[nb], sc = d.strides[nb + 1];
  bool ok = d.dtype == dtype;
  if (ok) {
    if (sc == 1 || cols == 1) { op->transposed = false; op->ld = rows == 1 ? (cols > 0 ? cols : 1) : sr; }
    else if (sr == 1 || rows == 1) { op->transposed = true; op->ld = cols == 1 ? (rows > 0 ? rows : 1) : sc; }
    else ok = false;
    if (ok && op->ld < (op->transposed ? rows : cols)) ok = false;
  }
  // The batch must be one stride: all batch dims zero-strided, or laid out as one run.
  int64_t bstride = 0;
  if (ok) {
    int64_t expect = -1;
    bool all_zero = true;
    for (int i = nb - 1; i >= 0; i--) {
      if (batch[i] == 1) continue;
      if (d.strides[i] != 0) all_zero = false;
    }
    if (!all_zero) {
      for (int i = nb - 1; i >= 0; i--) {
        if (batch[i] == 1) continue;
        if (expect < 0) { bstride = d.strides[i]; expect = d.strides[i] * batch[i]; }
        else if (d.strides[i] != expect) { ok = false; break; }
        else expect *= batch[i];
      }
    }
  }
  if (!ok) {
    ML_TRY(scratch_copy(t, nb + 2, full, (ml_dtype)dtype, &op->scratch));
    op->data = ml_tensor_data(op->scratch);
    op->transposed = false;
    op->ld = cols > 0 ? cols : 1;
    op->batch_stride = rows * cols;
    op->dtype = dtype;
    return ML_OK;
  }
  op->data = d.data;
  op->dtype = dtype;
  op->batch_stride = bstride;
  return ML_OK;
}

// out (batch, M, N) row-major with leading dimension ldc and batch stride stride_c
// = A (batch, M, K) @ B (batch, K, N), alpha/beta scaled.
static ml_status gemm_batched_into(DeviceState *st, const Operand &A, const Operand &B, void *out, int out_dtype,
                                   int64_t ldc, int64_t stride_c, int64_t batch, int64_t M, int64_t N, int64_t K,
                                   double alpha, double beta) {
  if (M > INT_MAX || N > INT_MAX || K > INT_MAX || batch > INT_MAX || ldc > INT_MAX)
    return ml_fail(ML_EINVAL, "matmul: dimensions too large for cuBLAS (M=%lld N=%lld K=%lld)", (long long)M,
                   (long long)N, (long long)K);
  float af = (float)alpha, bf = (float)beta;
  const void *pa = out_dtype == ML_FLOAT64 ? (const void *)&alpha : (const void *)&af;
  const void *pb = out_dtype == ML_FLOAT64 ? (const void *)&beta : (const void *)&bf;
  // Column-major: C^T (N x M) = op(B^T) (N x K) * op(A^T) (K x M).
  cublasOperation_t opb = B.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasOperation_t opa = A.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_TRY(cublasGemmStridedBatchedEx(st->blas, opb, opa, (int)N, (int)M, (int)K, pa,
                                        B.data, cuda_type(B.dtype), (int)B.ld, B.batch_stride,
                                        A.data, cuda_type(A.dtype), (int)A.ld, A.batch_stride, pb,
                                        out, cuda_type(out_dtype), (int)ldc, stride_c, (int)batch,
                                        compute_type(out_dtype), CUBLAS_GEMM_DEFAULT));
  return ML_OK;
}

// out (batch, M, N) contiguous.
static ml_status gemm_batched(DeviceState *st, const Operand &A, const Operand &B, void *out, int out_dtype,
                              int64_t batch, int64_t M, int64_t N, int64_t K, double alpha, double beta) {
  return gemm_batched_into(st, A, B, out, out_dtype, N, M * N, batch, M, N, K, alpha, beta);
}

static void release_operand(Operand &op) { ml_tensor_release(op.scratch); op.scratch = NULL; }

// --- matmul --------------------------------------------------------------------------------

ml_status ml_cuda_matmul(const ml_tensor *a, const ml_tensor *b, ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(out), &st));
  int dt = ml_tensor_dtype(out);
  if (!(dt == ML_FLOAT32 || dt == ML_FLOAT16 || dt == ML_BFLOAT16 || dt == ML_FLOAT64))
    return ml_fail(ML_EUNSUPPORTED, "matmul: %s is not supported on CUDA (use a floating dtype)",
                   ml_dtype_name((ml_dtype)dt));
  int na = ml_tensor_ndim(a), nb = ml_tensor_ndim(b);
  const int64_t *sa = ml_tensor_shape(a), *sb = ml_tensor_shape(b);
  int64_t M = na >= 2 ? sa[na - 2] : 1, K = sa[na - 1], N = nb >= 2 ? sb[nb - 1] : 1;
  // Batch shape = out's leading dims (the public function has broadcast and checked them).
  int no = ml_tensor_ndim(out);
  const int64_t *so = ml_tensor_shape(out);
  int nbatch = no - (na >= 2 ? 1 : 0) - (nb >= 2 ? 1 : 0);
  int64_t batch = 1;
  for (int i = 0; i < nbatch; i++) batch *= so[i];
  if (batch * M * N == 0) return ML_OK;
  if (K == 0) return ml_cuda_fill(out, 0);
  // 1-D operands: a (K) is a row (1, K); b (K) is a column (K, 1).
  ml_tensor *av = (ml_tensor *)a, *bv = (ml_tensor *)b;
  bool own_a = false, own_b = false;
  if (na == 1) { ML_TRY(ml_tensor_unsqueeze(a, 0, &av)); own_a = true; }
  if (nb == 1) {
    ml_status s = ml_tensor_unsqueeze(b, 1, &bv);
    if (s) { if (own_a) ml_tensor_release(av); return s; }
    own_b = true;
  }
  Operand A = {0}, B = {0};
  ml_status s = make_operand(av, nbatch, so, M, K, dt, &A);
  if (!s) s = make_operand(bv, nbatch, so, K, N, dt, &B);
  if (!s) s = gemm_batched(st, A, B, ml_tensor_data(out), dt, batch, M, N, K, 1.0, 0.0);
  release_operand(A);
  release_operand(B);
  if (own_a) ml_tensor_release(av);
  if (own_b) ml_tensor_release(bv);
  return s;
}

// --- linear --------------------------------------------------------------------------------

ml_status ml_cuda_linear(const ml_tensor *x, const ml_tensor *w, const ml_tensor *b, ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(out), &st));
  int dt = ml_tensor_dtype(out);
  if (!(dt == ML_FLOAT32 || dt == ML_FLOAT16 || dt == ML_BFLOAT16 || dt == ML_FLOAT64))
    return ml_fail(ML_EUNSUPPORTED, "linear: %s is not supported on CUDA (use a floating dtype)",
                   ml_dtype_name((ml_dtype)dt));
  const int64_t *sw = ml_tensor_shape(w);
  int64_t N = sw[0], K = sw[1];
  int64_t M = ml_tensor_numel(out) / (N > 0 ? N : 1);
  if (M * N == 0) return ML_OK;
  // x as an (M, K) matrix: contiguous rows, else one scratch copy.
  ml_tensor *xm = NULL;
  int64_t shape2[2] = {M, K};
  ml_status s = ml_tensor_is_contiguous(x) ? ml_tensor_view(x, 2, shape2, &xm) : ML_EINVAL;
  if (s) ML_TRY(ml_tensor_reshape(x, 2, shape2, &xm));
  Operand X = {0}, W = {0};
  s = make_operand(xm, 0, NULL, M, K, dt, &X);
  // W^T (K, N) as a logical matrix: the transpose view of w (N, K).
  ml_tensor *wt = NULL;
  if (!s) s = ml_tensor_transpose(w, 0, 1, &wt);
  if (!s) s = make_operand(wt, 0, NULL, K, N, dt, &W);
  double beta = 0.0;
  if (!s && b) { s = ml_cuda_copy_strided(out, b); beta = 1.0; }   // bias rows, accumulated into
  if (!s) s = K == 0 ? (b ? ML_OK : ml_cuda_fill(out, 0))
                     : gemm_batched(st, X, W, ml_tensor_data(out), dt, 1, M, N, K, 1.0, beta);
  release_operand(X);
  release_operand(W);
  ml_tensor_release(wt);
  ml_tensor_release(xm);
  return s;
}

// --- attention -----------------------------------------------------------------------------

// Attention runs over blocks of query rows so its scores buffer (batch x rows x keys, in float32)
// stays within this many bytes: a long prompt does not need L x S scores at once (an 8k-token
// prompt of 32 heads would want 8 GiB). MOONLOAD_CUDA_ATTN_SCRATCH (bytes) changes the cap.
static int64_t attn_scratch_bytes(void) {
  const char *e = getenv("MOONLOAD_CUDA_ATTN_SCRATCH");   // read per call: cheap next to a GEMM
  long long v = e && *e ? atoll(e) : 0;
  return v > 0 ? (int64_t)v : (int64_t)256 << 20;
}

// A block of `rows` = batch x lc score rows of S_eff keys (row-major, contiguous) becomes
// probabilities in place, in T (float; double for float64 inputs). Rows r0.. of the R query rows
// of each batch: query position (r0 + row % lc) % L (R = G x L when G query heads share one
// key/value head, stacked). The mask is broadcast over the full (batch, heads, L, S), whose
// flattened row is batch x R + that row. With sinks (H > 0: one logit per query head, the heads
// being the last batch dim), the row's head's sink joins the softmax without a value.
template <typename T>
__global__ void attn_softmax_kernel(T *scores, int64_t rows, int64_t lc, int64_t r0, int64_t R, int64_t L,
                                    int64_t S_eff, int64_t S, TensorDesc mask, int mask_kind, bool causal,
                                    TensorDesc sinks, int64_t H) {
  __shared__ T sh[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    T *r = scores + row * S_eff;
    int64_t stacked = r0 + row % lc, l = stacked % L, full_row = row / lc * R + stacked;
    T m = -INFINITY, sink = -INFINITY;
    if (H > 0) sink = load_as<T>(sinks.data, sinks.dtype, desc_offset(sinks, full_row / L % H));
    for (int64_t j = threadIdx.x; j < S_eff; j += blockDim.x) {
      T v = r[j];
      if (causal && j > l) v = -INFINITY;
      if (mask_kind == 1 && load_as<int>(mask.data, mask.dtype, desc_offset(mask, full_row * S + j)) == 0) v = -INFINITY;
      if (mask_kind == 2) v += load_as<T>(mask.data, mask.dtype, desc_offset(mask, full_row * S + j));
      r[j] = v;
      m = max_of(m, v);
    }
    m = block_max<T>(m, sh);
    if (m == -INFINITY) {   // every key masked: zeros, as PyTorch's scaled_dot_product_attention
      for (int64_t j = threadIdx.x; j < S_eff; j += blockDim.x) r[j] = 0;
      continue;
    }
    m = max_of(m, sink);
    T s = 0;
    for (int64_t j = threadIdx.x; j < S_eff; j += blockDim.x) { T e = exp_of(r[j] - m); r[j] = e; s += e; }
    s = block_sum<T>(s, sh);
    if (H > 0) s += exp_of(sink - m);
    for (int64_t j = threadIdx.x; j < S_eff; j += blockDim.x) r[j] /= s;
  }
}

// The operand advanced to its logical row `row` (rows keep their leading dimension and batch stride).
static Operand operand_from_row(const Operand &op, int64_t row) {
  Operand o = op;
  int64_t elems = op.transposed ? row : row * op.ld;
  o.data = (const char *)op.data + elems * (int64_t)ml_dtype_size((ml_dtype)op.dtype);
  o.scratch = NULL;
  return o;
}

// A contiguous (d0, d1, d2) view over the start of buffer t's storage.
static ml_status block_view(const ml_tensor *t, int64_t d0, int64_t d1, int64_t d2, ml_tensor **out) {
  int64_t shape[3] = {d0, d1, d2}, strides[3] = {d1 * d2, d2, 1};
  return ml_tensor_as_strided(t, 3, shape, strides, 0, out);
}

// Grouped-query attention without repeating key/value heads: q (..., Hk*G, L, E) is seen as
// (..., Hk, G*L, E), the G query heads of one key/value head stacked as rows (a view when head
// stride = L x row stride, else a copy of q, far smaller than G copies of k and v at long S),
// so each key/value head serves one GEMM. The output (..., Hq, L, Ev) is contiguous, hence the
// same bytes as (..., Hk, G*L, Ev). Returns the view in *qv (owned) and the batch shape in bs.
static ml_status stack_query_groups(const ml_tensor *q, int nbatch, const int64_t *so, int64_t G, int64_t L,
                                    ml_tensor **qv, int64_t *bs) {
  ml_tensor *qc = NULL;
  int nq = ml_tensor_ndim(q);
  const int64_t *sh = ml_tensor_shape(q), *stq = ml_tensor_strides(q);
  if (!(L == 1 || stq[nq - 3] == L * stq[nq - 2])) {
    ML_TRY(ml_tensor_contiguous(q, &qc));
    q = qc;
    stq = ml_tensor_strides(q);
  }
  int64_t shape[ML_MAX_DIMS], strides[ML_MAX_DIMS];
  for (int i = 0; i < nq; i++) { shape[i] = sh[i]; strides[i] = stq[i]; }
  shape[nq - 3] = sh[nq - 3] / G;
  strides[nq - 3] = stq[nq - 3] * G;
  shape[nq - 2] = G * L;
  strides[nq - 2] = L == 1 ? stq[nq - 3] : stq[nq - 2];
  ml_status s = ml_tensor_as_strided(q, nq, shape, strides, ml_tensor_offset(q), qv);
  ml_tensor_release(qc);
  for (int i = 0; i < nbatch; i++) bs[i] = so[i];
  bs[nbatch - 1] = so[nbatch - 1] / G;
  return s;
}

ml_status ml_cuda_sdpa(const ml_tensor *q, const ml_tensor *k, const ml_tensor *v, const ml_tensor *mask,
                       const ml_tensor *sinks, bool is_causal, double scale, ml_tensor *out) {
  int dev = ml_cuda_device_of(out);
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(dev, &st));
  int nq = ml_tensor_ndim(q), nk = ml_tensor_ndim(k);
  const int64_t *sq = ml_tensor_shape(q), *sk = ml_tensor_shape(k), *sv = ml_tensor_shape(v);
  int64_t L = sq[nq - 2], E = sq[nq - 1], S = sk[nk - 2], Ev = sv[ml_tensor_ndim(v) - 1];
  // Batch shape = out's leading dims; k and v broadcast to it, or group its heads (dim -3).
  int no = ml_tensor_ndim(out);
  const int64_t *so = ml_tensor_shape(out);
  int nbatch = no - 2;
  int64_t B = 1;
  for (int i = 0; i < nbatch; i++) B *= so[i];
  if (B * L * Ev == 0) return ML_OK;
  if (S == 0) return ml_cuda_fill(out, 0.0);   // no keys: every row is fully masked
  if (scale <= 0) scale = 1.0 / sqrt((double)E);
  int64_t hk = nk >= 3 ? sk[nk - 3] : 1, G = 1;
  if (nbatch >= 1 && nq >= 3 && hk > 1 && hk != so[nbatch - 1] && so[nbatch - 1] % hk == 0) G = so[nbatch - 1] / hk;
  int64_t bs[ML_MAX_DIMS];                 // the GEMMs' batch shape: out's, heads divided by G
  ml_tensor *qv = NULL;
  if (G > 1) ML_TRY(stack_query_groups(q, nbatch, so, G, L, &qv, bs));
  else for (int i = 0; i < nbatch; i++) bs[i] = so[i];
  int64_t Bg = B / G, R = G * L;           // GEMM batch count, and query rows per batch
  int dt = ml_tensor_dtype(out);
  // Scores in float32 whatever the inputs (softmax wants the range), float64 for float64.
  bool wide = dt == ML_FLOAT64;
  int sdt = wide ? ML_FLOAT64 : ML_FLOAT32;
  int64_t Lc = attn_scratch_bytes() / (Bg * S * (int64_t)ml_dtype_size((ml_dtype)sdt));
  Lc = Lc < 1 ? 1 : Lc > R ? R : Lc;
  int64_t sshape[3] = {Bg, Lc, S};
  ml_tensor *scores = NULL, *probs = NULL, *kt = NULL;
  Operand Q = {0}, Kt = {0}, V = {0};
  ml_status s = ml_tensor_empty((ml_dtype)sdt, 3, sshape, ml_tensor_device(out), &scores);
  if (!s && dt != sdt) s = ml_tensor_empty((ml_dtype)dt, 3, sshape, ml_tensor_device(out), &probs);
  if (!s) s = make_operand(qv ? qv : q, nbatch, bs, R, E, dt, &Q);
  if (!s) s = ml_tensor_transpose(k, -2, -1, &kt);
  if (!s) s = make_operand(kt, nbatch, bs, E, S, dt, &Kt);
  if (!s) s = make_operand(v, nbatch, bs, S, Ev, dt, &V);
  // Without a mask the kernel gets the scores' own descriptor: a device pointer it never reads.
  TensorDesc md = {0};
  int kind = !mask ? 0 : ml_tensor_dtype(mask) == ML_BOOL ? 1 : 2;
  if (!s) {
    int64_t full[ML_MAX_DIMS + 2];
    for (int i = 0; i < nbatch; i++) full[i] = so[i];
    full[nbatch] = L; full[nbatch + 1] = S;
    md = mask ? ml_cuda_desc_broadcast(mask, nbatch + 2, full) : ml_cuda_desc(scores);
  }
  TensorDesc sd = sinks ? ml_cuda_desc(sinks) : md;
  int64_t H = sinks ? so[nbatch - 1] : 0;   // (checked by the caller: sinks (H,), nbatch >= 1)
  for (int64_t r0 = 0; !s && r0 < R; r0 += Lc) {
    int64_t lc = R - r0 < Lc ? R - r0 : Lc;
    // Causal: key j > l is masked for every row of the block, so keys past its last row are
    // skipped (all keys up to L when the block spans two stacked heads).
    int64_t last_l = r0 / L == (r0 + lc - 1) / L ? (r0 + lc - 1) % L : L - 1;
    int64_t S_eff = is_causal && last_l + 1 < S ? last_l + 1 : S;
    void *sc = ml_tensor_data(scores);
    // scores (Bg, lc, S_eff) = scale * Q[r0:r0+lc] @ Kt[:, :S_eff]
    s = gemm_batched(st, operand_from_row(Q, r0), Kt, sc, sdt, Bg, lc, S_eff, E, scale, 0.0);
    if (s) break;
    int64_t rows = Bg * lc;
    unsigned grid = (unsigned)(rows < 65535 * 16 ? rows : 65535 * 16);
    if (wide)
      attn_softmax_kernel<double><<<grid, 256, 0, st->compute>>>((double *)sc, rows, lc, r0, R, L, S_eff, S, md, kind,
                                                                 is_causal, sd, H);
    else
      attn_softmax_kernel<float><<<grid, 256, 0, st->compute>>>((float *)sc, rows, lc, r0, R, L, S_eff, S, md, kind,
                                                                is_causal, sd, H);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) { s = ml_fail(ML_EIO, "scaled_dot_product_attention: %s", cudaGetErrorString(e)); break; }
    // out rows r0..r0+lc = P @ V[:S_eff], P converted to out's dtype first for float16/bfloat16.
    Operand P = {0};
    P.data = sc; P.dtype = sdt; P.ld = S_eff; P.batch_stride = lc * S_eff;
    if (probs) {
      ml_tensor *from = NULL, *to = NULL;
      s = block_view(scores, Bg, lc, S_eff, &from);
      if (!s) s = block_view(probs, Bg, lc, S_eff, &to);
      if (!s) s = ml_cuda_copy_strided(to, from);
      ml_tensor_release(from);
      ml_tensor_release(to);
      if (s) break;
      P.data = ml_tensor_data(probs); P.dtype = dt;
    }
    char *o = (char *)ml_tensor_data(out) + r0 * Ev * (int64_t)ml_dtype_size((ml_dtype)dt);
    s = gemm_batched_into(st, P, V, o, dt, Ev, R * Ev, Bg, lc, Ev, S_eff, 1.0, 0.0);
  }
  release_operand(Q); release_operand(Kt); release_operand(V);
  ml_tensor_release(qv);
  ml_tensor_release(kt);
  ml_tensor_release(scores);
  ml_tensor_release(probs);
  return s;
}
