/* q8_gemm.c: many rows (a prompt) of int8 activations times int8 or int4 weights, when
   ml_set_quantized_activations(8) is on: the GEMM PyTorch's dynamic int8 quantization runs
   (fbgemm), with llama.cpp's blocks of 32 and their scales. Kernels for AVX512-VNNI, AVX2 and
   plain C, picked as cpu/q8_dot.c picks its dots.

   vpdpbusd multiplies unsigned by signed bytes, four a 32-bit lane: the activations are rounded
   to int8 in blocks of 32 (as ml_quantize_q8 rounds a weight) and stored plus 128, unsigned;
   dot(x + 128, w) = dot(x, w) + 128 * sum(w), so each column's block sums, times 128, are taken
   off once per block. The integer sums are exact; only their scaling to float rounds, in the same
   order in every kernel.

   Layout: the weight is packed one panel of NR = 32 columns at a time, per block of 32 along K
   as 8 groups of (32 columns x 4 bytes): one 64-byte load per 16 columns and 4 values of K,
   followed by the block's 32 column sums (x 128) and 32 scales. The VNNI kernel keeps MR = 4
   rows x 32 columns of int32 sums for the block being added and of float32 results, in 16
   registers. */
#include "cpu/gemm.h"
#include "cpu/q8_dot.h"
#include "cpu/rows.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

enum { NR = 32, MR = 4, BLOCK = ML_Q8_DOT_BLOCK, GROUPS = BLOCK / 4, MB = 16 * MR };

/* One packed block of a panel: GROUPS x NR x 4 weight bytes, then the column sums and scales. */
typedef struct {
  int8_t bytes[GROUPS][NR][4];
  int32_t sums[NR];            /* 128 * the sum of the block's 32 values, per column */
  float scales[NR];
} packed_block;

typedef struct {
  int64_t M, N, K, ldc;
  const uint8_t *xu;           /* M x K activations rounded to int8, plus 128 */
  const float *xs;             /* M x K / 32 their scales */
  const uint8_t *q;            /* N x K int8, or N x K / 2 packed int4 (bits 4) */
  const float *ws;             /* N x K / 32 */
  int bits;
  const float *bias;           /* N, or NULL */
  uint8_t *c;                  /* M x N in cdt, row stride ldc */
  ml_dtype cdt;
  atomic_int status;
} q8_gemm_job;

#if !defined(__AVX2__)
/* Block b of column n as 32 signed bytes in v; returns their sum. */
static inline int32_t column_block(const q8_gemm_job *j, int64_t n, int64_t b, int8_t v[BLOCK]) {
  int64_t nb = j->K / BLOCK, bb = BLOCK * j->bits / 8;
  const uint8_t *p = j->q + n * nb * bb + b * bb;
  if (j->bits == 8) memcpy(v, p, BLOCK);
  else
    for (int i = 0; i < BLOCK / 2; i++) {           /* low nibbles: values 0-15, high: 16-31 */
      v[i] = (int8_t)((p[i] & 15) - 8);
      v[i + BLOCK / 2] = (int8_t)((p[i] >> 4) - 8);
    }
  int32_t sum = 0;
  for (int i = 0; i < BLOCK; i++) sum += v[i];
  return sum;
}
#endif

#if defined(__AVX2__)
#include <immintrin.h>

/* Eight rows of eight 32-bit words, transposed in registers. */
static inline void transpose_8x8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; i++) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; h++) {              /* rows 0-3, then 4-7 */
    __m256i *tt = t + 4 * h, *uu = u + 4 * h;
    uu[0] = _mm256_unpacklo_epi64(tt[0], tt[2]);
    uu[1] = _mm256_unpackhi_epi64(tt[0], tt[2]);
    uu[2] = _mm256_unpacklo_epi64(tt[1], tt[3]);
    uu[3] = _mm256_unpackhi_epi64(tt[1], tt[3]);
  }
  for (int g = 0; g < 4; g++) {
    r[g] = _mm256_permute2x128_si256(u[g], u[g + 4], 0x20);
    r[g + 4] = _mm256_permute2x128_si256(u[g], u[g + 4], 0x31);
  }
}
#endif

/* Columns [n0, n0 + w) of the weight into K / 32 packed blocks; columns past w are zeros. Eight
   columns' blocks at a time are a transpose of 8 x 8 words (each word 4 values of K). */
static void pack_panel(packed_block *dst, const q8_gemm_job *j, int64_t n0, int64_t w) {
  int64_t nb = j->K / BLOCK;
  for (int64_t b = 0; b < nb; b++) {
    packed_block *pb = dst + b;
    for (int64_t n8 = 0; n8 < NR; n8 += 8) {
#if defined(__AVX2__)
      __m256i r[8];
      for (int64_t i = 0; i < 8; i++) {
        int64_t n = n8 + i;
        pb->scales[n] = n < w ? j->ws[(n0 + n) * nb + b] : 0.0f;
        if (n >= w) { r[i] = _mm256_setzero_si256(); pb->sums[n] = 0; continue; }
        int64_t bb = BLOCK * j->bits / 8;
        const uint8_t *p = j->q + (n0 + n) * nb * bb + b * bb;
        if (j->bits == 8) r[i] = _mm256_loadu_si256((const __m256i *)p);
        else {                                 /* low nibbles: values 0-15, high: 16-31 */
          __m128i v = _mm_loadu_si128((const __m128i *)p), mask = _mm_set1_epi8(15);
          r[i] = _mm256_sub_epi8(_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask)),
                                 _mm256_set1_epi8(8));
        }
        /* the sum: |w + 128| summed by groups of 8 bytes, less 32 * 128 */
        __m256i sad = _mm256_sad_epu8(_mm256_xor_si256(r[i], _mm256_set1_epi8((char)0x80)), _mm256_setzero_si256());
        __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(sad), _mm256_extracti128_si256(sad, 1));
        pb->sums[n] = 128 * ((int32_t)(_mm_cvtsi128_si64(s2) + _mm_extract_epi64(s2, 1)) - BLOCK * 128);
      }
      transpose_8x8(r);
      for (int g = 0; g < GROUPS; g++) _mm256_storeu_si256((__m256i *)pb->bytes[g][n8], r[g]);
#else
      for (int64_t n = n8; n < n8 + 8; n++) {
        int8_t v[BLOCK] = {0};
        pb->sums[n] = n < w ? 128 * column_block(j, n0 + n, b, v) : 0;
        pb->scales[n] = n < w ? j->ws[(n0 + n) * nb + b] : 0.0f;
        for (int g = 0; g < GROUPS; g++) memcpy(pb->bytes[g][n], v + 4 * g, 4);
      }
#endif
    }
  }
}

/* The kernels: MR rows from m0 (rows past the matrix repeat row m0; the caller stores only the
   real ones) times a packed panel -> acc. Each adds a block's exact integer sums, then scales
   them into acc in the same order, so the three give the same floats. */
typedef void (*kernel_fn)(const q8_gemm_job *j, int64_t m0, int64_t mr, const packed_block *panel, float acc[MR][NR]);

/* Row pointers of a kernel's MR rows: activations and their scales. */
static inline void kernel_rows(const q8_gemm_job *j, int64_t m0, int64_t mr, const uint8_t *arow[MR],
                               const float *srow[MR]) {
  for (int r = 0; r < MR; r++) {
    int64_t m = m0 + (r < mr ? r : 0);
    arow[r] = j->xu + m * j->K;
    srow[r] = j->xs + m * (j->K / BLOCK);
  }
}

static void kernel_c(const q8_gemm_job *j, int64_t m0, int64_t mr, const packed_block *panel, float acc[MR][NR]) {
  const uint8_t *arow[MR];
  const float *srow[MR];
  kernel_rows(j, m0, mr, arow, srow);
  memset(acc, 0, sizeof(float[MR][NR]));
  for (int64_t b = 0; b < j->K / BLOCK; b++)
    for (int r = 0; r < MR; r++)
      for (int n = 0; n < NR; n++) {
        int32_t d = 0;
        for (int g = 0; g < GROUPS; g++)
          for (int i = 0; i < 4; i++)
            d += (int32_t)(int8_t)(arow[r][b * BLOCK + 4 * g + i] ^ 0x80) * panel[b].bytes[g][n][i];
        acc[r][n] = fmaf((float)d, panel[b].scales[n] * srow[r][b], acc[r][n]);
      }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__GNUC__)
/* AVX2 has no unsigned-by-signed 32-bit dot: |w| times x with w's sign moved onto x, in pairs of
   16 bits (at most 2 * 128 * 127, no saturation), as cpu/q8_dot.c; eight columns at a time. */
static void kernel_avx2(const q8_gemm_job *j, int64_t m0, int64_t mr, const packed_block *panel, float acc[MR][NR]) {
  const uint8_t *arow[MR];
  const float *srow[MR];
  kernel_rows(j, m0, mr, arow, srow);
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
  for (int c = 0; c < NR; c += 8) {
    __m256 f[MR];
    for (int r = 0; r < MR; r++) f[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < j->K / BLOCK; b++) {
      const packed_block *pb = panel + b;
      __m256i ci[MR];
      for (int r = 0; r < MR; r++) ci[r] = _mm256_setzero_si256();
      for (int g = 0; g < GROUPS; g++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)pb->bytes[g][c]), wabs = _mm256_abs_epi8(w);
        for (int r = 0; r < MR; r++) {
          int32_t quad;
          memcpy(&quad, arow[r] + b * BLOCK + 4 * g, sizeof quad);
          __m256i x = _mm256_xor_si256(_mm256_set1_epi32(quad), flip);       /* back to signed */
          __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w)), ones);
          ci[r] = _mm256_add_epi32(ci[r], p);
        }
      }
      __m256 ws = _mm256_loadu_ps(pb->scales + c);
      for (int r = 0; r < MR; r++)
        f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ci[r]), _mm256_mul_ps(ws, _mm256_set1_ps(srow[r][b])), f[r]);
    }
    for (int r = 0; r < MR; r++) _mm256_storeu_ps(acc[r] + c, f[r]);
  }
}

/* AVX512-VNNI: unsigned activations (x + 128) by signed weights, 64 products an instruction; the
   column sums take the 128s off. */
__attribute__((target("avx512f,avx512vnni")))
static void kernel_vnni(const q8_gemm_job *j, int64_t m0, int64_t mr, const packed_block *panel, float acc[MR][NR]) {
  const uint8_t *arow[MR];
  const float *srow[MR];
  kernel_rows(j, m0, mr, arow, srow);
  __m512 f[MR][2];
  for (int r = 0; r < MR; r++) f[r][0] = f[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < j->K / BLOCK; b++) {
    const packed_block *pb = panel + b;
    __m512i c[MR][2];
    for (int r = 0; r < MR; r++) c[r][0] = c[r][1] = _mm512_setzero_si512();
    for (int g = 0; g < GROUPS; g++) {
      __m512i b0 = _mm512_loadu_si512(pb->bytes[g][0]), b1 = _mm512_loadu_si512(pb->bytes[g][16]);
      for (int r = 0; r < MR; r++) {
        int32_t quad;
        memcpy(&quad, arow[r] + b * BLOCK + 4 * g, sizeof quad);
        __m512i a = _mm512_set1_epi32(quad);
        c[r][0] = _mm512_dpbusd_epi32(c[r][0], a, b0);
        c[r][1] = _mm512_dpbusd_epi32(c[r][1], a, b1);
      }
    }
    __m512i s0 = _mm512_loadu_si512(pb->sums), s1 = _mm512_loadu_si512(pb->sums + 16);
    __m512 w0 = _mm512_loadu_ps(pb->scales), w1 = _mm512_loadu_ps(pb->scales + 16);
    for (int r = 0; r < MR; r++) {
      __m512 xs = _mm512_set1_ps(srow[r][b]);
      f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c[r][0], s0)), _mm512_mul_ps(w0, xs), f[r][0]);
      f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c[r][1], s1)), _mm512_mul_ps(w1, xs), f[r][1]);
    }
  }
  for (int r = 0; r < MR; r++) {
    _mm512_storeu_ps(acc[r], f[r][0]);
    _mm512_storeu_ps(acc[r] + 16, f[r][1]);
  }
}
#endif

/* Tasks are (panel, block of MB rows) pairs, panel-major, as in cpu/bf16_gemm.c: a thread packs
   a panel once for its run of row blocks. */
static void panels(void *ctx, int64_t begin, int64_t end) {
  q8_gemm_job *j = ctx;
  int64_t nb = j->K / BLOCK, mblocks = (j->M + MB - 1) / MB, packed = -1;
  packed_block *panel = ml_aligned_alloc((size_t)nb * sizeof *panel);
  if (!panel) { atomic_store(&j->status, ML_ENOMEM); return; }
  kernel_fn kernel = kernel_c;
#if defined(__AVX2__) && defined(__FMA__) && defined(__GNUC__)
  int path = ml_q8_dot_path();
  kernel = path == ML_Q8_DOT_VNNI ? kernel_vnni : path == ML_Q8_DOT_AVX2 ? kernel_avx2 : kernel_c;
#endif
  float acc[MR][NR];
  size_t oe = ml_dtype_size(j->cdt);
  for (int64_t task = begin; task < end; task++) {
    int64_t p = task / mblocks, m_begin = task % mblocks * MB;
    int64_t m_end = j->M - m_begin < MB ? j->M : m_begin + MB;
    int64_t n0 = p * NR, w = j->N - n0 < NR ? j->N - n0 : NR;
    if (p != packed) pack_panel(panel, j, n0, w);
    packed = p;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += MR) {
      int64_t mr = m_end - m0 < MR ? m_end - m0 : MR;
      kernel(j, m0, mr, panel, acc);
      for (int64_t r = 0; r < mr; r++) {
        if (j->bias)
          for (int64_t n = 0; n < w; n++) acc[r][n] += j->bias[n0 + n];
        ml_convert_fast(acc[r], ML_FLOAT32, j->c + ((m0 + r) * j->ldc + n0) * (int64_t)oe, j->cdt, w);
      }
    }
  }
  ml_aligned_free(panel);
}

typedef struct {
  ml_mref A;
  int64_t K;
  uint8_t *xu;
  float *xs;
  atomic_int status;
} round_job;

/* Rows of A (any floating dtype, any strides) to int8 blocks, stored plus 128. */
static void round_rows(void *ctx, int64_t begin, int64_t end) {
  round_job *j = ctx;
  int64_t K = j->K, nb = K / BLOCK;
  size_t ae = ml_dtype_size(j->A.dt);
  float *row = malloc((size_t)K * sizeof *row);
  if (!row) { atomic_store(&j->status, ML_ENOMEM); return; }
  for (int64_t m = begin; m < end; m++) {
    ml_row_load(row, ML_FLOAT32, (const uint8_t *)j->A.p + m * j->A.rs * (int64_t)ae, j->A.dt, K, j->A.cs);
    uint8_t *dst = j->xu + m * K;
    for (int64_t b = 0; b < nb; b++) j->xs[m * nb + b] = ml_q8_round_block(row + b * BLOCK, BLOCK, (int8_t *)dst + b * BLOCK, 1);
    for (int64_t k = 0; k < K; k++) dst[k] ^= 0x80;   /* + 128: int8 -> uint8 */
  }
  free(row);
}

ml_status ml_q8_gemm(const char *fn, int bits, int64_t M, int64_t N, int64_t K, ml_mref A, const uint8_t *q,
                     const float *scales, const float *bias, void *C, ml_dtype cdt, int64_t ldc) {
  uint8_t *xu = ml_aligned_alloc((size_t)(M * K));
  float *xs = ml_aligned_alloc((size_t)(M * (K / BLOCK)) * sizeof(float));
  if (!xu || !xs) {
    ml_aligned_free(xu);
    ml_aligned_free(xs);
    return ml_fail(ML_ENOMEM, "%s: out of memory for %lld x %lld int8 activations", fn, (long long)M, (long long)K);
  }
  round_job rj = {.A = A, .K = K, .xu = xu, .xs = xs};
  atomic_init(&rj.status, ML_OK);
  ml_parallel_for(M, K * 4, round_rows, &rj);
  if (atomic_load(&rj.status)) {
    ml_aligned_free(xu);
    ml_aligned_free(xs);
    return ml_fail(ML_ENOMEM, "%s: out of memory for a row of %lld activations", fn, (long long)K);
  }
  q8_gemm_job j = {.M = M, .N = N, .K = K, .ldc = ldc, .xu = xu, .xs = xs, .q = q, .ws = scales, .bits = bits,
                   .bias = bias, .c = C, .cdt = cdt};
  atomic_init(&j.status, ML_OK);
  int64_t mblocks = (M + MB - 1) / MB, rows = M < MB ? M : MB;
  ml_parallel_for((N + NR - 1) / NR * mblocks, rows * K * NR / 16 + K * NR, panels, &j);
  ml_aligned_free(xu);
  ml_aligned_free(xs);
  if (atomic_load(&j.status))
    return ml_fail(ML_ENOMEM, "%s: out of memory for the packed panels of a %lld x %lld x %lld product", fn,
                   (long long)M, (long long)N, (long long)K);
  return ML_OK;
}
