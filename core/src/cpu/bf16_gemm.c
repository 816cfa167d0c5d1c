/* bf16_gemm.c: bfloat16 x bfloat16 products on CPUs with AVX512-BF16 (Zen 4, Cooper Lake,
   Sapphire Rapids), the instruction PyTorch's bfloat16 linear layers use on the CPU: vdpbf16ps
   multiplies pairs of bfloat16 exactly and accumulates in float32, 32 products per instruction.
   Without it a bfloat16 product is widened to float32 panels for OpenBLAS's sgemm (half the
   speed); Debian's OpenBLAS has no bfloat16 GEMM. Chosen at run time (cpuid), so the build
   still targets x86-64-v3.

   Layout: B (K x N) is packed one panel of NR = 32 columns at a time, as K/2 rows of 32 pairs
   (B[2p][n], B[2p+1][n]): one 64-byte load per 16 columns. A rows are read in place, two
   consecutive K elements being one 32-bit broadcast. The kernel keeps MR = 6 rows x 32 columns
   of float32 sums in 12 registers. Subnormal bfloat16 inputs count as zero (the instruction's
   rule, as in PyTorch). */
#include "cpu/gemm.h"

#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ML_BF16_TARGET __attribute__((target("avx512f,avx512bf16")))
#define ML_HAVE_BF16_GEMM 1
#endif

enum { NR = 32, MR = 6 };

bool ml_bf16_gemm_available(void) {
#if ML_HAVE_BF16_GEMM
  static atomic_int have = -1;     /* attention's worker threads may ask first, together */
  int h = atomic_load_explicit(&have, memory_order_relaxed);
  if (h < 0) {
    const char *off = getenv("MOONLOAD_NO_AVX512BF16");   /* to compare with the widening path */
    h = !(off && *off && *off != '0') && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
    atomic_store_explicit(&have, h, memory_order_relaxed);
  }
  return h;
#else
  return false;
#endif
}

#if ML_HAVE_BF16_GEMM
typedef struct {
  int64_t M, N, K, lda, ldc;
  double alpha;
  const uint16_t *a;       /* row m at a + m * lda, K contiguous */
  ml_mref B;               /* bfloat16, any strides */
  const float *bias;       /* N, or NULL */
  uint8_t *c;
  ml_dtype cdt;
  atomic_int status;
} bf16_job;

/* Panel of columns [n0, n0 + w) (w <= NR) of B as Kp = ceil(K/2) rows of NR pairs, zero-padded. */
static void pack_panel(uint32_t *dst, ml_mref B, int64_t K, int64_t n0, int64_t w) {
  const uint16_t *b = B.p;
  int64_t Kp = (K + 1) / 2;
  if (B.rs == 1 && K % 2 == 0 && w == NR) {
    /* a linear layer's weight: each column is K contiguous values, i.e. Kp pairs as 32-bit words,
       so packing is a transpose of words */
    for (int64_t n = 0; n < NR; n++) {
      const uint16_t *col = b + (n0 + n) * B.cs;
      for (int64_t p = 0; p < Kp; p++) memcpy(dst + p * NR + n, col + 2 * p, sizeof(uint32_t));
    }
    return;
  }
  for (int64_t p = 0; p < Kp; p++) {
    uint32_t *row = dst + p * NR;
    for (int64_t n = 0; n < NR; n++) {
      uint32_t lo = 0, hi = 0;
      if (n < w) {
        lo = b[(2 * p) * B.rs + (n0 + n) * B.cs];
        if (2 * p + 1 < K) hi = b[(2 * p + 1) * B.rs + (n0 + n) * B.cs];
      }
      row[n] = lo | hi << 16;
    }
  }
}

/* Adds the full pairs of mr rows of A times the packed panel into c. Inlined into kernel twice:
   with mr = MR constant (the row loop unrolled, all sums in registers) and for the tail rows. */
ML_BF16_TARGET static inline __attribute__((always_inline)) void add_pairs(const uint32_t *const *arow, int mr,
                                                                         int64_t full, const uint32_t *bp,
                                                                         __m512 c[MR][2]) {
  for (int64_t p = 0; p < full; p++) {
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + p * NR), b1 = (__m512bh)_mm512_loadu_si512(bp + p * NR + 16);
    for (int r = 0; r < mr; r++) {
      uint32_t pair;
      memcpy(&pair, arow[r] + p, sizeof pair);
      __m512bh av = (__m512bh)_mm512_set1_epi32((int)pair);
      c[r][0] = _mm512_dpbf16_ps(c[r][0], av, b0);
      c[r][1] = _mm512_dpbf16_ps(c[r][1], av, b1);
    }
  }
}

/* mr (<= MR) rows of A times the packed panel -> acc rows of NR float32. */
ML_BF16_TARGET static void kernel(const uint16_t *a, int64_t lda, int64_t mr, int64_t K, const uint32_t *bp,
                                  float acc[MR][NR]) {
  __m512 c[MR][2];
  for (int r = 0; r < MR; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
  int64_t full = K / 2;
  const uint32_t *arow[MR];
  for (int r = 0; r < MR; r++) arow[r] = (const uint32_t *)(a + (r < mr ? r : 0) * lda);
  if (mr == MR) add_pairs(arow, MR, full, bp, c);
  else add_pairs(arow, (int)mr, full, bp, c);
  if (K % 2) {   /* the last element alone: its pair's other half is zero (never read past the row) */
    const uint32_t *brow = bp + full * NR;
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(brow), b1 = (__m512bh)_mm512_loadu_si512(brow + 16);
    for (int r = 0; r < mr; r++) {
      __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[r * lda + K - 1]);
      c[r][0] = _mm512_dpbf16_ps(c[r][0], av, b0);
      c[r][1] = _mm512_dpbf16_ps(c[r][1], av, b1);
    }
  }
  for (int r = 0; r < mr; r++) {
    _mm512_storeu_ps(acc[r], c[r][0]);
    _mm512_storeu_ps(acc[r] + 16, c[r][1]);
  }
}

/* Tasks are (panel, block of MB rows) pairs, panel-major: a product with few columns and many
   rows still spreads over the threads, and a thread packs a panel once for its run of blocks. */
enum { MB = 16 * MR };

static void bf16_panels(void *ctx, int64_t begin, int64_t end) {
  bf16_job *j = ctx;
  int64_t Kp = (j->K + 1) / 2, mblocks = (j->M + MB - 1) / MB, packed = -1;
  uint32_t *bp = ml_aligned_alloc((size_t)(Kp * NR) * sizeof *bp);
  if (!bp) { atomic_store(&j->status, ML_ENOMEM); return; }
  float acc[MR][NR];
  size_t oe = ml_dtype_size(j->cdt);
  for (int64_t task = begin; task < end; task++) {
    int64_t panel = task / mblocks, m_begin = task % mblocks * MB;
    int64_t m_end = j->M - m_begin < MB ? j->M : m_begin + MB;
    int64_t n0 = panel * NR, w = j->N - n0 < NR ? j->N - n0 : NR;
    if (panel != packed) pack_panel(bp, j->B, j->K, n0, w);
    packed = panel;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += MR) {
      int64_t mr = m_end - m0 < MR ? m_end - m0 : MR;
      kernel(j->a + m0 * j->lda, j->lda, mr, j->K, bp, acc);
      for (int64_t r = 0; r < mr; r++) {
        for (int64_t n = 0; n < w; n++)
          acc[r][n] = (float)(j->alpha * acc[r][n]) + (j->bias ? j->bias[n0 + n] : 0.0f);
        ml_convert_fast(acc[r], ML_FLOAT32, j->c + ((m0 + r) * j->ldc + n0) * (int64_t)oe, j->cdt, w);
      }
    }
  }
  ml_aligned_free(bp);
}
#endif

bool ml_bf16_gemm_applies(int64_t M, int64_t K, ml_dtype ct, ml_mref A, ml_mref B) {
  return M > 0 && K > 0 && ct == ML_FLOAT32 && A.dt == ML_BFLOAT16 && B.dt == ML_BFLOAT16 && A.cs == 1 &&
         ml_bf16_gemm_available();
}

ml_status ml_bf16_gemm(const char *fn, int64_t M, int64_t N, int64_t K, double alpha, ml_mref A, ml_mref B,
                       const float *bias, void *C, ml_dtype cdt, int64_t ldc) {
#if ML_HAVE_BF16_GEMM
  bf16_job j = {.M = M, .N = N, .K = K, .lda = A.rs, .ldc = ldc, .alpha = alpha, .a = A.p, .B = B, .bias = bias,
                .c = C, .cdt = cdt};
  atomic_init(&j.status, ML_OK);
  int64_t mblocks = (M + MB - 1) / MB, rows = M < MB ? M : MB;
  ml_parallel_for((N + NR - 1) / NR * mblocks, rows * K * NR / 8 + K * NR, bf16_panels, &j);
  if (atomic_load(&j.status))
    return ml_fail(ML_ENOMEM, "%s: out of memory for the packed panels of a %lld x %lld x %lld product", fn,
                   (long long)M, (long long)N, (long long)K);
  return ML_OK;
#else
  return ml_fail(ML_EUNSUPPORTED, "%s: no AVX512-BF16 kernel in this build", fn);
#endif
}
