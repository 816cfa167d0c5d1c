/* matmul.c: GEMM on the cpu through OpenBLAS. ml_gemm takes strided operands of any dtype: those
   already in the compute dtype with a BLAS-compatible layout (row-major, or transposed: passed as
   CblasTrans, never copied) go straight to cblas_sgemm/dgemm; the rest (float16/bfloat16,
   integers, odd strides) are converted into float32/float64 scratch panel by panel. On top:
   ml_matmul (torch.matmul: dot, 1-D promotion, broadcast batches) and ml_linear (x @ w^T + b in
   one GEMM with the bias folded in as the beta=1 starting value). */
#include "cpu/gemm.h"

#include <cblas.h>
#include <limits.h>
#include <stdlib.h>

/* Converted operand panels hold about this many elements (4 MiB of float32). */
#define ML_GEMM_PANEL (1 << 20)

/* One thread pool: OpenBLAS runs single-threaded and ml_gemm splits products across
   ml_parallel_for's OpenMP threads itself. Two pools on the same cores (OpenBLAS's pthreads and
   OpenMP) busy-wait against each other between calls: GPT-2 decode ran 3.5x slower that way. */
static atomic_int blas_single;

void ml_blas_init(void) {
  if (!atomic_load_explicit(&blas_single, memory_order_relaxed)) {
    openblas_set_num_threads(1);
    atomic_store(&blas_single, 1);
  }
}

// --- packing ---------------------------------------------------------------------------------

/* dst (nlines, len), contiguous in ct <- line l, element e of src at src + l*ls + e*es elements. */
static void pack_lines(void *dst, ml_dtype ct, const void *src, ml_dtype sdt, int64_t nlines, int64_t len,
                       int64_t ls, int64_t es) {
  size_t ce = ml_dtype_size(ct), se = ml_dtype_size(sdt);
  uint8_t stage[256 * 8];
  for (int64_t l = 0; l < nlines; l++) {
    const uint8_t *s = (const uint8_t *)src + l * ls * (int64_t)se;
    uint8_t *d = (uint8_t *)dst + l * len * (int64_t)ce;
    if (es == 1) { ml_convert_fast(s, sdt, d, ct, len); continue; }
    for (int64_t b = 0; b < len; b += 256) {
      int64_t m = len - b < 256 ? len - b : 256;
      const uint8_t *sp = s + b * es * (int64_t)se;
      switch (se) {
      case 1: for (int64_t i = 0; i < m; i++) stage[i] = sp[i * es]; break;
      case 2: for (int64_t i = 0; i < m; i++) ((uint16_t *)stage)[i] = ((const uint16_t *)sp)[i * es]; break;
      case 4: for (int64_t i = 0; i < m; i++) ((uint32_t *)stage)[i] = ((const uint32_t *)sp)[i * es]; break;
      default: for (int64_t i = 0; i < m; i++) ((uint64_t *)stage)[i] = ((const uint64_t *)sp)[i * es]; break;
      }
      ml_convert_fast(stage, sdt, d + b * (int64_t)ce, ct, m);
    }
  }
}

/* Whether an (R, Cc) matrix with strides (rs, cs) is something BLAS reads in place: row-major
   (NoTrans, ld = rs) or column-major (Trans, ld = cs), ld >= the row length as BLAS demands. */
static bool blas_layout(int64_t R, int64_t Cc, int64_t rs, int64_t cs, CBLAS_TRANSPOSE *t, int64_t *ld) {
  int64_t rmin = Cc > 1 ? Cc : 1, cmin = R > 1 ? R : 1;
  if ((cs == 1 || Cc == 1) && (R == 1 || rs >= rmin)) {
    *t = CblasNoTrans; *ld = R == 1 ? rmin : rs;
  } else if ((rs == 1 || R == 1) && (Cc == 1 || cs >= cmin)) {
    *t = CblasTrans; *ld = Cc == 1 ? cmin : cs;
  } else return false;
  return *ld <= INT_MAX;
}

/* Packs the (R, Cc) matrix m into buf (ct), along whichever axis has the smaller stride; gives the
   BLAS transpose flag and leading dimension of the packed copy. */
static void pack_matrix(void *buf, ml_dtype ct, ml_mref m, int64_t R, int64_t Cc, CBLAS_TRANSPOSE *t, int64_t *ld) {
  if (m.cs <= m.rs) {
    pack_lines(buf, ct, m.p, m.dt, R, Cc, m.rs, m.cs);
    *t = CblasNoTrans; *ld = Cc > 1 ? Cc : 1;
  } else {
    pack_lines(buf, ct, m.p, m.dt, Cc, R, m.cs, m.rs);
    *t = CblasTrans; *ld = R > 1 ? R : 1;
  }
}

static void blas_gemm(ml_dtype ct, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t M, int64_t N, int64_t K,
                      double alpha, const void *a, int64_t lda, const void *b, int64_t ldb, double beta,
                      void *c, int64_t ldc);

/* y = alpha * op(A) x + beta * y, A row-major (rows, cols, lda). */
static void blas_gemv(ml_dtype ct, CBLAS_TRANSPOSE t, int64_t rows, int64_t cols, double alpha, const void *a,
                      int64_t lda, const void *x, int64_t incx, double beta, void *y, int64_t incy) {
  if (ct == ML_FLOAT64)
    cblas_dgemv(CblasRowMajor, t, (int)rows, (int)cols, alpha, a, (int)lda, x, (int)incx, beta, y, (int)incy);
  else
    cblas_sgemv(CblasRowMajor, t, (int)rows, (int)cols, (float)alpha, a, (int)lda, x, (int)incx, (float)beta, y,
                (int)incy);
}

/* One panel C (M, w) [ldc] = alpha * A @ B (+ C when beta = 1). A single row or column goes to
   gemv: OpenBLAS's gemm packs the whole of B even for M = 1 (several times slower at decode). */
static void blas_product(ml_dtype ct, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t M, int64_t w, int64_t K,
                         double alpha, const void *a, int64_t lda, const void *b, int64_t ldb, double beta,
                         void *c, int64_t ldc) {
  if (M == 1) {          /* c (w) = B^T a: a's elements are unit stride (NoTrans) or lda apart */
    int64_t inca = ta == CblasNoTrans ? 1 : lda;
    if (tb == CblasNoTrans) blas_gemv(ct, CblasTrans, K, w, alpha, b, ldb, a, inca, beta, c, 1);
    else blas_gemv(ct, CblasNoTrans, w, K, alpha, b, ldb, a, inca, beta, c, 1);
  } else if (w == 1) {   /* c (M) = A b, written down a column of stride ldc */
    int64_t incb = tb == CblasNoTrans ? ldb : 1;
    if (ta == CblasNoTrans) blas_gemv(ct, CblasNoTrans, M, K, alpha, a, lda, b, incb, beta, c, ldc);
    else blas_gemv(ct, CblasTrans, K, M, alpha, a, lda, b, incb, beta, c, ldc);
  } else {
    blas_gemm(ct, ta, tb, M, w, K, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

static void blas_gemm(ml_dtype ct, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t M, int64_t N, int64_t K,
                      double alpha, const void *a, int64_t lda, const void *b, int64_t ldb, double beta,
                      void *c, int64_t ldc) {
  if (ct == ML_FLOAT64)
    cblas_dgemm(CblasRowMajor, ta, tb, (int)M, (int)N, (int)K, alpha, a, (int)lda, b, (int)ldb, beta, c, (int)ldc);
  else
    cblas_sgemm(CblasRowMajor, ta, tb, (int)M, (int)N, (int)K, (float)alpha, a, (int)lda, b, (int)ldb,
                (float)beta, c, (int)ldc);
}

/* A product split across threads: blocks of ML_SPLIT columns of C (or rows, for a single column). */
#define ML_SPLIT 64
typedef struct {
  ml_dtype ct;
  CBLAS_TRANSPOSE ta, tb;
  int64_t M, w, K, lda, ldb, ldc;
  double alpha, beta;
  const uint8_t *a, *b;
  uint8_t *c;
  bool by_rows;
} product_job;

static void product_blocks(void *ctx, int64_t begin, int64_t end) {
  product_job *j = ctx;
  int64_t ce = (int64_t)ml_dtype_size(j->ct);
  if (j->by_rows) {
    int64_t m0 = begin * ML_SPLIT, m1 = end * ML_SPLIT < j->M ? end * ML_SPLIT : j->M;
    const uint8_t *a = j->a + (j->ta == CblasNoTrans ? m0 * j->lda : m0) * ce;
    blas_product(j->ct, j->ta, j->tb, m1 - m0, j->w, j->K, j->alpha, a, j->lda, j->b, j->ldb, j->beta,
                 j->c + m0 * j->ldc * ce, j->ldc);
  } else {
    int64_t n0 = begin * ML_SPLIT, n1 = end * ML_SPLIT < j->w ? end * ML_SPLIT : j->w;
    const uint8_t *b = j->b + (j->tb == CblasNoTrans ? n0 : n0 * j->ldb) * ce;
    blas_product(j->ct, j->ta, j->tb, j->M, n1 - n0, j->K, j->alpha, j->a, j->lda, b, j->ldb, j->beta,
                 j->c + n0 * ce, j->ldc);
  }
}

/* blas_product over the library's threads: columns split in blocks (rows when there is one
   column); inline when small or already inside a parallel region. */
static void parallel_product(ml_dtype ct, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t M, int64_t w, int64_t K,
                             double alpha, const void *a, int64_t lda, const void *b, int64_t ldb, double beta,
                             void *c, int64_t ldc) {
  product_job j = {ct, ta, tb, M, w, K, lda, ldb, ldc, alpha, beta, a, b, c, false};
  j.by_rows = w < 2 * ML_SPLIT && M > w;
  int64_t span = j.by_rows ? M : w, blocks = (span + ML_SPLIT - 1) / ML_SPLIT;
  int64_t cost = (j.by_rows ? w : M) * K * ML_SPLIT / 4 + 1;   /* multiply-adds per block / 4 */
  ml_parallel_for(blocks, cost, product_blocks, &j);
}

// --- the GEMM --------------------------------------------------------------------------------

/* The panels of one product: columns [p*nb, p*nb + w) of C, each converted (B, and C when its
   dtype is not ct) through this thread's scratch. */
typedef struct {
  ml_dtype ct, cdt;
  int64_t M, N, K, nb, lda, ldc, ldb;
  double alpha;
  CBLAS_TRANSPOSE ta, tb;
  const void *ap;
  ml_mref B;
  bool bdirect;
  const void *bias;
  uint8_t *C;
  atomic_int status;
} panel_job;

static void gemm_panels(void *ctx, int64_t begin, int64_t end) {
  panel_job *j = ctx;
  size_t ce = ml_dtype_size(j->ct), oe = ml_dtype_size(j->cdt);
  int64_t M = j->M, K = j->K, nb = j->nb;
  uint8_t *bbuf = NULL, *cbuf = NULL;
  if ((!j->bdirect && !(bbuf = ml_aligned_alloc((size_t)(nb * K) * ce))) ||
      (j->cdt != j->ct && !(cbuf = ml_aligned_alloc((size_t)(M * nb) * ce)))) {
    atomic_store(&j->status, ML_ENOMEM);
    goto done;
  }
  for (int64_t p = begin; p < end; p++) {
    int64_t n0 = p * nb, w = j->N - n0 < nb ? j->N - n0 : nb, ldb = j->ldb;
    CBLAS_TRANSPOSE tb = j->tb;
    const void *bp = (const uint8_t *)j->B.p + n0 * j->B.cs * (int64_t)ml_dtype_size(j->B.dt);
    if (!j->bdirect) {
      ml_mref panel = {bp, j->B.dt, j->B.rs, j->B.cs};
      pack_matrix(bbuf, j->ct, panel, K, w, &tb, &ldb);
      bp = bbuf;
    }
    uint8_t *cp = cbuf ? cbuf : j->C + n0 * (int64_t)oe;
    int64_t ldcc = cbuf ? w : j->ldc;
    double beta = 0.0;
    if (j->bias) {
      for (int64_t i = 0; i < M; i++)
        memcpy(cp + i * ldcc * (int64_t)ce, (const uint8_t *)j->bias + n0 * (int64_t)ce, (size_t)w * ce);
      beta = 1.0;
    } else if (K == 0 || M == 1 || w == 1) {
      /* zeros for K = 0; for gemv, whose beta = 0 may scale (NaN) garbage instead of storing 0 */
      for (int64_t i = 0; i < M; i++) memset(cp + i * ldcc * (int64_t)ce, 0, (size_t)w * ce);
    }
    if (K > 0) parallel_product(j->ct, j->ta, tb, M, w, K, j->alpha, j->ap, j->lda, bp, ldb, beta, cp, ldcc);
    if (cbuf)
      for (int64_t i = 0; i < M; i++)
        ml_convert_fast(cbuf + i * w * (int64_t)ce, j->ct, j->C + (i * j->ldc + n0) * (int64_t)oe, j->cdt, w);
  }
done:
  ml_aligned_free(bbuf);
  ml_aligned_free(cbuf);
}

ml_status ml_gemm(const char *fn, int64_t M, int64_t N, int64_t K, double alpha, ml_mref A, ml_mref B,
                  const void *bias, ml_dtype ct, void *C, ml_dtype cdt, int64_t ldc) {
  if (M <= 0 || N <= 0) return ML_OK;
  ml_blas_init();
  if (M > INT_MAX || N > INT_MAX || K > INT_MAX || ldc > INT_MAX)
    return ml_fail(ML_EINVAL, "%s: a %lld x %lld x %lld product is too large for BLAS", fn, (long long)M,
                   (long long)N, (long long)K);
  if (ml_few_rows_gemm_applies(M, K, ct, B)) return ml_few_rows_gemm(fn, M, N, K, alpha, A, B, bias, C, cdt, ldc);
  if (ml_bf16_gemm_applies(M, K, ct, A, B)) return ml_bf16_gemm(fn, M, N, K, alpha, A, B, bias, C, cdt, ldc);
  size_t ce = ml_dtype_size(ct);
  uint8_t *abuf = NULL;
  panel_job j = {.ct = ct, .cdt = cdt, .M = M, .N = N, .K = K, .ldc = ldc, .lda = 1, .ldb = 1, .alpha = alpha,
                 .ta = CblasNoTrans, .tb = CblasNoTrans, .ap = A.p, .B = B, .bias = bias, .C = C};
  if (K > 0 && !(A.dt == ct && blas_layout(M, K, A.rs, A.cs, &j.ta, &j.lda))) {
    if (!(abuf = ml_aligned_alloc((size_t)(M * K) * ce)))
      return ml_fail(ML_ENOMEM, "%s: out of memory for the conversion buffers of a %lld x %lld x %lld product",
                     fn, (long long)M, (long long)N, (long long)K);
    pack_matrix(abuf, ct, A, M, K, &j.ta, &j.lda);
    j.ap = abuf;
  }
  j.bdirect = K == 0 || (B.dt == ct && blas_layout(K, N, B.rs, B.cs, &j.tb, &j.ldb));
  j.nb = N;
  int64_t npanels = 1;
  if (!j.bdirect || cdt != ct) {
    /* Panels of about ML_GEMM_PANEL elements, and at least one per thread: the conversions then
       run on every thread too (each product inside a panel runs inline). */
    int64_t nb = ML_GEMM_PANEL / (K > 0 ? K : 1), nt = ml_get_num_threads(), per = (N + nt - 1) / nt;
    nb = nb > per ? per : nb;
    nb = nb < 16 ? 16 : nb > N ? N : nb;
    j.nb = nb;
    npanels = (N + nb - 1) / nb;
  }
  atomic_init(&j.status, ML_OK);
  ml_parallel_for(npanels, M * j.nb * K / 4 + j.nb * K + 1, gemm_panels, &j);
  ml_aligned_free(abuf);
  if (atomic_load(&j.status))
    return ml_fail(ML_ENOMEM, "%s: out of memory for the conversion buffers of a %lld x %lld x %lld product", fn,
                   (long long)M, (long long)N, (long long)K);
  return ML_OK;
}

// --- helpers for matmul / linear --------------------------------------------------------------

/* The compute dtype for a result dtype: float64 stays, other floats compute in float32, integers
   in float64 (exact for the integer range a product of int tensors sensibly reaches). */
static ml_dtype compute_dtype(ml_dtype pt) {
  return pt == ML_FLOAT64 || !ml_dtype_is_floating(pt) ? ML_FLOAT64 : ML_FLOAT32;
}

bool ml_fold_dims(int nd, const int64_t *shape, const int64_t *strides, int64_t *rows, int64_t *rs) {
  int64_t n = 1, inner_stride = -1, expect = 0;
  for (int i = nd - 1; i >= 0; i--) {
    n *= shape[i];
    if (shape[i] == 1) continue;
    if (inner_stride < 0) { inner_stride = strides[i]; expect = strides[i] * shape[i]; continue; }
    if (strides[i] != expect) return false;
    expect = strides[i] * shape[i];
  }
  *rows = n;
  *rs = inner_stride < 0 ? 0 : inner_stride;
  return true;
}

// --- matmul ------------------------------------------------------------------------------------

typedef struct {
  int nbd;                          /* batch dims */
  int64_t bshape[ML_MAX_DIMS], as[ML_MAX_DIMS], bs[ML_MAX_DIMS];
  ml_mref A, B;                     /* batch 0 */
  int64_t M, N, K;
  ml_dtype ct, cdt;
  uint8_t *out;
  atomic_int status;                /* first failure (its message is set on the failing thread) */
} matmul_job;

static void matmul_batches(void *ctx, int64_t begin, int64_t end) {
  matmul_job *j = ctx;
  size_t ae = ml_dtype_size(j->A.dt), be = ml_dtype_size(j->B.dt), oe = ml_dtype_size(j->cdt);
  for (int64_t i = begin; i < end; i++) {
    int64_t ao = 0, bo = 0, r = i;
    for (int d = j->nbd - 1; d >= 0; d--) {
      int64_t k = r % j->bshape[d];
      r /= j->bshape[d];
      ao += k * j->as[d];
      bo += k * j->bs[d];
    }
    ml_mref A = j->A, B = j->B;
    A.p = (const uint8_t *)A.p + ao * (int64_t)ae;
    B.p = (const uint8_t *)B.p + bo * (int64_t)be;
    ml_status st = ml_gemm("matmul", j->M, j->N, j->K, 1.0, A, B, NULL, j->ct,
                           j->out + i * j->M * j->N * (int64_t)oe, j->cdt, j->N);
    if (st) { int ok = ML_OK; atomic_compare_exchange_strong(&j->status, &ok, st); return; }
  }
}

ml_status ml_matmul(const ml_tensor *a, const ml_tensor *b, ml_tensor **out) {
  ml_blas_init();
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route("matmul", 2, (const ml_tensor *[]){a, b},
                     (const char *[]){"the first argument", "the second argument"}, &cu));
  if (cu && !cu->matmul) return ml_no_cuda_kernel("matmul", a);
  char sa[ML_SHAPE_BUF], sb[ML_SHAPE_BUF];
  if (a->ndim == 0 || b->ndim == 0)
    return ml_fail(ML_EINVAL, "matmul: both arguments need at least 1 dimension, got shapes %s and %s",
                   ml_shape_str(a->ndim, a->shape, sa, sizeof sa), ml_shape_str(b->ndim, b->shape, sb, sizeof sb));
  ml_dtype pt = ml_dtype_promote(a->dtype, b->dtype);
  if (pt == ML_BOOL)
    return ml_fail(ML_EINVAL, "matmul: bool tensors cannot be multiplied (got %s and %s)", ml_dtype_name(a->dtype),
                   ml_dtype_name(b->dtype));

  /* Logical (batch..., M, K) @ (batch..., K, N); a 1-D operand is a row (a) or a column (b). */
  int na = a->ndim, nb = b->ndim;
  int64_t M = na >= 2 ? a->shape[na - 2] : 1, K = a->shape[na - 1];
  int64_t Kb = nb >= 2 ? b->shape[nb - 2] : b->shape[0], N = nb >= 2 ? b->shape[nb - 1] : 1;
  if (K != Kb)
    return ml_fail(ML_EINVAL, "matmul: shapes %s and %s cannot be multiplied (%lld != %lld)",
                   ml_shape_str(na, a->shape, sa, sizeof sa), ml_shape_str(nb, b->shape, sb, sizeof sb),
                   (long long)K, (long long)Kb);
  int nba = na > 2 ? na - 2 : 0, nbb = nb > 2 ? nb - 2 : 0;
  matmul_job j = {0};
  if (ml_broadcast_shape("matmul", nba, a->shape, nbb, b->shape, &j.nbd, j.bshape))
    return ml_fail(ML_EINVAL, "matmul: the batch dims of shapes %s and %s cannot be broadcast",
                   ml_shape_str(na, a->shape, sa, sizeof sa), ml_shape_str(nb, b->shape, sb, sizeof sb));

  int64_t oshape[ML_MAX_DIMS];
  int nd = 0;
  for (int i = 0; i < j.nbd; i++) oshape[nd++] = j.bshape[i];
  if (na >= 2) oshape[nd++] = M;
  if (nb >= 2) oshape[nd++] = N;
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(pt, nd, oshape, a->storage->device, &o));
  if (cu) {
    ml_status st = cu->matmul(a, b, o);
    if (st) { ml_tensor_release(o); return st; }
    *out = o;
    return ML_OK;
  }

  j.A = (ml_mref){ml_tensor_data(a), a->dtype, na >= 2 ? a->strides[na - 2] : 0, a->strides[na - 1]};
  j.B = nb >= 2 ? (ml_mref){ml_tensor_data(b), b->dtype, b->strides[nb - 2], b->strides[nb - 1]}
                : (ml_mref){ml_tensor_data(b), b->dtype, b->strides[0], 0};
  j.M = M; j.N = N; j.K = K;
  j.ct = compute_dtype(pt);
  j.cdt = pt;
  j.out = ml_tensor_data(o);
  int64_t nbatch = ml_shape_numel(j.nbd, j.bshape);
  ml_status st = ML_OK;

  /* (batch..., M, K) @ (K, N) with foldable batch dims is one GEMM of (batch*M) rows. */
  int64_t rows, rs;
  if (nb <= 2 && na > 2 && ml_fold_dims(na - 1, a->shape, a->strides, &rows, &rs)) {
    j.A.rs = rs;
    st = ml_gemm("matmul", rows, N, K, 1.0, j.A, j.B, NULL, j.ct, j.out, pt, N);
  } else if (nbatch > 0) {
    /* Per-matrix strides of each operand over the broadcast batch shape (0 where broadcast). */
    for (int i = 0; i < j.nbd; i++) {
      int ia = i - (j.nbd - nba), ib = i - (j.nbd - nbb);
      j.as[i] = ia >= 0 && a->shape[ia] == j.bshape[i] ? a->strides[ia] : 0;
      j.bs[i] = ib >= 0 && b->shape[ib] == j.bshape[i] ? b->strides[ib] : 0;
    }
    atomic_init(&j.status, ML_OK);
    /* Many small products: threads over the batch (each product then runs inline). Sizes are
       small there, so the only failure a worker can meet is running out of memory. */
    if (nbatch >= 2 && M * N * K < (1 << 21) && ml_get_num_threads() > 1) {
      ml_parallel_for(nbatch, M * N * (K + 1), matmul_batches, &j);
      if ((st = atomic_load(&j.status)))
        st = ml_fail(st, "matmul: out of memory for the conversion buffers of %s @ %s",
                     ml_shape_str(na, a->shape, sa, sizeof sa), ml_shape_str(nb, b->shape, sb, sizeof sb));
    } else {
      matmul_batches(&j, 0, nbatch);
      st = atomic_load(&j.status);
    }
  }
  if (st) { ml_tensor_release(o); return st; }
  *out = o;
  return ML_OK;
}

// --- linear ------------------------------------------------------------------------------------

ml_status ml_fold_rows(const ml_tensor *x, const ml_tensor **xs, ml_tensor **xc, int64_t *rows, int64_t *rs) {
  *xs = x;
  *xc = NULL;
  if (ml_fold_dims(x->ndim - 1, x->shape, x->strides, rows, rs)) return ML_OK;
  ML_TRY(ml_tensor_contiguous(x, xc));
  *xs = *xc;
  ml_fold_dims(x->ndim - 1, (*xc)->shape, (*xc)->strides, rows, rs);
  return ML_OK;
}

ml_status ml_linear(const ml_tensor *x, const ml_tensor *w, const ml_tensor *b, ml_tensor **out) {
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route("linear", 3, (const ml_tensor *[]){x, w, b}, (const char *[]){"the input", "the weight", "the bias"},
                     &cu));
  if (cu && !cu->linear) return ml_no_cuda_kernel("linear", x);
  char sx[ML_SHAPE_BUF], sw[ML_SHAPE_BUF];
  if (w->ndim != 2)
    return ml_fail(ML_EINVAL, "linear: weight must be 2-D (out_features, in_features), got shape %s",
                   ml_shape_str(w->ndim, w->shape, sw, sizeof sw));
  int64_t N = w->shape[0], K = w->shape[1];
  if (x->ndim == 0 || x->shape[x->ndim - 1] != K)
    return ml_fail(ML_EINVAL, "linear: input of shape %s does not match weight of shape %s (in_features %lld)",
                   ml_shape_str(x->ndim, x->shape, sx, sizeof sx), ml_shape_str(2, w->shape, sw, sizeof sw),
                   (long long)K);
  if (b && (b->ndim != 1 || b->shape[0] != N))
    return ml_fail(ML_EINVAL, "linear: bias of shape %s does not match out_features %lld",
                   ml_shape_str(b->ndim, b->shape, sx, sizeof sx), (long long)N);
  ml_dtype pt = ml_dtype_promote(x->dtype, w->dtype);
  if (b) pt = ml_dtype_promote(pt, b->dtype);
  if (pt == ML_BOOL) return ml_fail(ML_EINVAL, "linear: bool tensors cannot be multiplied");
  ml_dtype ct = compute_dtype(pt);

  int64_t oshape[ML_MAX_DIMS];
  memcpy(oshape, x->shape, sizeof oshape);
  oshape[x->ndim - 1] = N;
  ml_tensor *o, *xc = NULL;
  ML_TRY(ml_tensor_empty(pt, x->ndim, oshape, x->storage->device, &o));
  if (cu) {
    ml_status st = cu->linear(x, w, b, o);
    if (st) { ml_tensor_release(o); return st; }
    *out = o;
    return ML_OK;
  }

  int64_t rows = 0, rs = 0;
  const ml_tensor *xs;
  ml_status fst = ml_fold_rows(x, &xs, &xc, &rows, &rs);
  if (fst) { ml_tensor_release(o); return fst; }
  void *bias = NULL;
  ml_status st = ML_OK;
  if (b && rows > 0) {
    if (!(bias = ml_aligned_alloc((size_t)N * ml_dtype_size(ct))))
      st = ml_fail(ML_ENOMEM, "linear: out of memory for a bias of %lld values", (long long)N);
    else pack_lines(bias, ct, ml_tensor_data(b), b->dtype, 1, N, 0, b->strides[0]);
  }
  if (!st) {
    ml_mref A = {ml_tensor_data(xs), xs->dtype, rs, xs->strides[xs->ndim - 1]};
    ml_mref B = {ml_tensor_data(w), w->dtype, w->strides[1], w->strides[0]};   /* w^T: (in, out) */
    st = ml_gemm("linear", rows, N, K, 1.0, A, B, bias, ct, ml_tensor_data(o), pt, N);
  }
  ml_aligned_free(bias);
  ml_tensor_release(xc);
  if (st) { ml_tensor_release(o); return st; }
  *out = o;
  return ML_OK;
}
