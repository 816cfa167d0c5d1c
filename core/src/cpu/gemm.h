/* gemm.h: the one strided, mixed-dtype GEMM behind matmul, linear and attention (cpu/matmul.c). */
#ifndef ML_CPU_GEMM_H
#define ML_CPU_GEMM_H

#include "internal.h"

/* A logical matrix over typed memory: element (i, j) lives at p + (i*rs + j*cs) elements. */
typedef struct {
  const void *p;
  ml_dtype dt;
  int64_t rs, cs;
} ml_mref;

/* C (M, N) = alpha * A (M, K) @ B (K, N) [+ bias (N) broadcast over rows].
 * ct is the compute dtype (ML_FLOAT32 or ML_FLOAT64): operands already in ct with a layout BLAS
 * accepts go to cblas_?gemm as they are (transposed ones as CblasTrans); others are converted
 * panel by panel into ct scratch. bias, when not NULL, holds N values in ct. C has rows of ldc
 * elements in cdt (unit column stride); results in another dtype are converted row by row.
 * OpenBLAS runs single-threaded; the product is split over ml_parallel_for's threads (inline
 * when called from inside a parallel region). A single row or column goes to gemv.
 * fn names the caller in errors (dimensions past BLAS's int, out of memory). */
ml_status ml_gemm(const char *fn, int64_t M, int64_t N, int64_t K, double alpha, ml_mref A, ml_mref B,
                  const void *bias, ml_dtype ct, void *C, ml_dtype cdt, int64_t ldc);

/* Fails unless t is on the cpu: meta (no data) is ML_EINVAL, cuda is ML_EUNSUPPORTED for now.
   what names the operand in the message ("the input", "the weight"). */
ml_status ml_check_cpu_op(const char *fn, const ml_tensor *t, const char *what);

/* Whether dims [0, nd) of a strided shape fold into one dim: *rows elements of stride *rs (dims of
   size 1 are ignored; *rs is 0 when every dim has size 1). */
bool ml_fold_dims(int nd, const int64_t *shape, const int64_t *strides, int64_t *rows, int64_t *rs);

#endif /* ML_CPU_GEMM_H */
