/* gemm.h: the one strided, mixed-dtype GEMM behind matmul, linear and attention (cpu/matmul.c). */
#ifndef ML_CPU_GEMM_H
#define ML_CPU_GEMM_H

#include "internal.h"
#include "cpu/kernels.h"

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX2__)
/* The sum of a vector's 8 floats. */
static inline float ml_hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

/* ml_convert with the float16 <-> float32 legs on F16C when the build targets it (x86-64-v3):
   exact both ways, round to nearest even, as ml_convert. Used on every packed GEMM panel. */
static inline void ml_convert_fast(const void *src, ml_dtype sdt, void *dst, ml_dtype ddt, int64_t n) {
#if defined(__F16C__)
  if (sdt == ML_FLOAT16 && ddt == ML_FLOAT32) {
    const uint16_t *s = src;
    float *d = dst;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    if (i < n) ml_convert(s + i, sdt, d + i, ddt, n - i);
    return;
  }
  if (sdt == ML_FLOAT32 && ddt == ML_FLOAT16) {
    const float *s = src;
    uint16_t *d = dst;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    if (i < n) ml_convert(s + i, sdt, d + i, ddt, n - i);
    return;
  }
#endif
  ml_convert(src, sdt, dst, ddt, n);
}

/* A logical matrix over typed memory: element (i, j) lives at p + (i*rs + j*cs) elements. */
typedef struct {
  const void *p;
  ml_dtype dt;
  int64_t rs, cs;
} ml_mref;

/* Products of up to 16 rows with a float32/float16/bfloat16 B that is contiguous along K
   (cpu/few_rows_gemm.c):
   C (M x N, cdt, row stride ldc) = alpha * A @ B (+ bias, float32), computed in float32. */
bool ml_few_rows_gemm_applies(int64_t M, int64_t K, ml_dtype ct, ml_mref B);
ml_status ml_few_rows_gemm(const char *fn, int64_t M, int64_t N, int64_t K, double alpha, ml_mref A, ml_mref B,
                       const float *bias, void *C, ml_dtype cdt, int64_t ldc);

/* bfloat16 x bfloat16 products on AVX512-BF16 CPUs (cpu/bf16_gemm.c), same contract; A must be
   contiguous along K. Available only where the CPU has the instruction. */
bool ml_bf16_gemm_available(void);
bool ml_bf16_gemm_applies(int64_t M, int64_t K, ml_dtype ct, ml_mref A, ml_mref B);
ml_status ml_bf16_gemm(const char *fn, int64_t M, int64_t N, int64_t K, double alpha, ml_mref A, ml_mref B,
                       const float *bias, void *C, ml_dtype cdt, int64_t ldc);

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

/* Makes OpenBLAS single-threaded (once); ml_gemm calls it, and ops that run GEMMs on worker
   threads call it first from the calling thread. */
void ml_blas_init(void);

/* Whether dims [0, nd) of a strided shape fold into one dim: *rows elements of stride *rs (dims of
   size 1 are ignored; *rs is 0 when every dim has size 1). */
bool ml_fold_dims(int nd, const int64_t *shape, const int64_t *strides, int64_t *rows, int64_t *rs);

/* x (..., K) as *rows rows of stride *rs: x itself in *xs when its leading dims fold, else a
   contiguous copy, also in *xc for the caller to release (NULL otherwise). */
ml_status ml_fold_rows(const ml_tensor *x, const ml_tensor **xs, ml_tensor **xc, int64_t *rows, int64_t *rs);

#endif /* ML_CPU_GEMM_H */
