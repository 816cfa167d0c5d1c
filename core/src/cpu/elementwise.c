/* elementwise.c: unary and binary math with broadcasting and PyTorch type promotion, tensor-scalar
   ops, where, masked_fill and tril/triu on the CPU.
 *
 * Every op runs the same engine: the output and its operands are walked row by row with ml_iter
 * (broadcast operands get stride 0), each row is cut into blocks of ML_BLOCK elements, each block
 * is loaded into a compute buffer (float for float32/float16/bfloat16, double for float64, int64
 * for integers and bool), computed, and stored into the output's dtype. Contiguous float32 data
 * is used in place, with no copy. Work units (a block of a row, or a tile of rows when an operand
 * is transposed) are split across threads; each unit is independent and computes the same values
 * wherever it runs, so results do not depend on the thread count. Small flat ops skip the
 * iterator. Ops on cuda tensors go to the CUDA backend's table when it has the entry. */
#include "kernels.h"

#include <stdlib.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

// --- type promotion -------------------------------------------------------------------------

static int dtype_category(ml_dtype dt) { return dt == ML_BOOL ? 0 : ml_dtype_is_floating(dt) ? 2 : 1; }

/* PyTorch's result_type for two tensors: a 0-d tensor only decides the dtype when it is of a
   higher category (bool < integer < float) than the dimensioned one. */
static ml_dtype promote_tensors(const ml_tensor *a, const ml_tensor *b) {
  bool za = a->ndim == 0, zb = b->ndim == 0;
  if (za == zb) return ml_dtype_promote(a->dtype, b->dtype);
  const ml_tensor *dim = za ? b : a, *zero = za ? a : b;
  if (dtype_category(zero->dtype) > dtype_category(dim->dtype)) {
    /* the 0-d operand's category wins; integers keep their size rules via promote */
    return dtype_category(zero->dtype) == 2 ? zero->dtype : ml_dtype_promote(dim->dtype, zero->dtype);
  }
  return dim->dtype;
}

/* A 0-d float64 tensor over caller stack memory, for scalars (never escapes the call). */
typedef struct { ml_storage s; ml_tensor t; double v; } scalar_tensor;

static const ml_tensor *scalar_init(scalar_tensor *st, double v) {
  static const ml_storage_backend borrowed = {"scalar", NULL};
  memset(st, 0, sizeof *st);
  st->v = v;
  atomic_init(&st->s.refcount, 1);
  st->s.device = ml_cpu();
  st->s.data = &st->v;
  st->s.nbytes = sizeof st->v;
  st->s.backend = &borrowed;
  atomic_init(&st->t.refcount, 1);
  st->t.dtype = ML_FLOAT64;
  st->t.ndim = 0;
  st->t.storage = &st->s;
  return &st->t;
}

// --- compute kernels -------------------------------------------------------------------------

/* glibc's libmvec (linked through libm.so) has 4/8/16-wide SSE/AVX2/AVX-512 versions of these
   float functions (within 1-2 ulp of the scalar ones). Declaring them `simd` lets GCC call them
   from the `omp simd` loops below; elsewhere the loops call the scalar functions. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
#define ML_VECMATH __attribute__((simd("notinbranch")))
float expf(float) ML_VECMATH;
float logf(float) ML_VECMATH;
float tanhf(float) ML_VECMATH;
float erff(float) ML_VECMATH;
float sinf(float) ML_VECMATH;
float cosf(float) ML_VECMATH;
float powf(float, float) ML_VECMATH;
#endif
#define ML_SIMD _Pragma("omp simd")

/* As PyTorch: exp(-x) overflowing to inf for very negative x gives the right limit 0 (no NaN),
   and the branch-free form vectorises. */
static inline float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

static inline double sigmoid_d(double x) {
  if (x >= 0) return 1.0 / (1.0 + exp(-x));
  double e = exp(x);
  return e / (1.0 + e);
}

#define ML_SQRT_2_OVER_PI 0.7978845608028654

/* sqrtf keeps a libm call for errno unless -fno-math-errno; AVX has the exact instruction. */
static void sqrt_f32(const float *x, float *y, int64_t n, bool recip) {
  int64_t i = 0;
#if defined(__AVX__)
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    __m256 r = _mm256_sqrt_ps(_mm256_loadu_ps(x + i));
    _mm256_storeu_ps(y + i, recip ? _mm256_div_ps(one, r) : r);
  }
#endif
  for (; i < n; i++) y[i] = recip ? 1.0f / sqrtf(x[i]) : sqrtf(x[i]);
}

static void unary_f32_run(ml_unary_op op, const float *x, float *y, int64_t n) {
  switch (op) {
  case ML_OP_NEG: for (int64_t i = 0; i < n; i++) y[i] = -x[i]; break;
  case ML_OP_ABS: for (int64_t i = 0; i < n; i++) y[i] = fabsf(x[i]); break;
  case ML_OP_SQRT: sqrt_f32(x, y, n, false); break;
  case ML_OP_RSQRT: sqrt_f32(x, y, n, true); break;
  case ML_OP_EXP: ML_SIMD for (int64_t i = 0; i < n; i++) y[i] = expf(x[i]); break;
  case ML_OP_LOG: ML_SIMD for (int64_t i = 0; i < n; i++) y[i] = logf(x[i]); break;
  case ML_OP_TANH: ML_SIMD for (int64_t i = 0; i < n; i++) y[i] = tanhf(x[i]); break;
  case ML_OP_SIGMOID: ML_SIMD for (int64_t i = 0; i < n; i++) y[i] = sigmoid_f(x[i]); break;
  case ML_OP_RELU: for (int64_t i = 0; i < n; i++) y[i] = x[i] < 0 ? 0.0f : x[i]; break;
  case ML_OP_GELU:
    ML_SIMD for (int64_t i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * (float)M_SQRT1_2));
    break;
  case ML_OP_GELU_TANH:
    ML_SIMD for (int64_t i = 0; i < n; i++) {
      float v = x[i];
      y[i] = 0.5f * v * (1.0f + tanhf((float)ML_SQRT_2_OVER_PI * (v + 0.044715f * v * v * v)));
    }
    break;
  case ML_OP_SILU: ML_SIMD for (int64_t i = 0; i < n; i++) y[i] = x[i] / (1.0f + expf(-x[i])); break;
  case ML_OP_SIN: ML_SIMD for (int64_t i = 0; i < n; i++) y[i] = sinf(x[i]); break;
  case ML_OP_COS: ML_SIMD for (int64_t i = 0; i < n; i++) y[i] = cosf(x[i]); break;
  case ML_OP_RECIPROCAL: for (int64_t i = 0; i < n; i++) y[i] = 1.0f / x[i]; break;
  case ML_OP_LOGICAL_NOT: for (int64_t i = 0; i < n; i++) y[i] = x[i] == 0; break;
  /* torch's: the input itself past a threshold of 20, where log1p(exp(x)) equals it in float */
  case ML_OP_SOFTPLUS: for (int64_t i = 0; i < n; i++) y[i] = x[i] > 20.0f ? x[i] : log1pf(expf(x[i])); break;
  default: break;
  }
}

/* Rows are cut into blocks at different places for different layouts; the vector and scalar
   libm functions may differ in the last bit. Running the tail through the vector loop too (padded
   to 8) makes every element's value independent of where the blocks fall. */
static void unary_f32(ml_unary_op op, const float *x, float *y, int64_t n) {
  int64_t m = n - n % 8;
  unary_f32_run(op, x, y, m);
  if (m < n) {
    float tx[8] = {0}, ty[8];
    memcpy(tx, x + m, (size_t)(n - m) * sizeof *tx);
    unary_f32_run(op, tx, ty, 8);
    memcpy(y + m, ty, (size_t)(n - m) * sizeof *ty);
  }
}

static void unary_f64(ml_unary_op op, const double *x, double *y, int64_t n) {
  switch (op) {
  case ML_OP_NEG: for (int64_t i = 0; i < n; i++) y[i] = -x[i]; break;
  case ML_OP_ABS: for (int64_t i = 0; i < n; i++) y[i] = fabs(x[i]); break;
  case ML_OP_SQRT: for (int64_t i = 0; i < n; i++) y[i] = sqrt(x[i]); break;
  case ML_OP_RSQRT: for (int64_t i = 0; i < n; i++) y[i] = 1.0 / sqrt(x[i]); break;
  case ML_OP_EXP: for (int64_t i = 0; i < n; i++) y[i] = exp(x[i]); break;
  case ML_OP_LOG: for (int64_t i = 0; i < n; i++) y[i] = log(x[i]); break;
  case ML_OP_TANH: for (int64_t i = 0; i < n; i++) y[i] = tanh(x[i]); break;
  case ML_OP_SIGMOID: for (int64_t i = 0; i < n; i++) y[i] = sigmoid_d(x[i]); break;
  case ML_OP_RELU: for (int64_t i = 0; i < n; i++) y[i] = x[i] < 0 ? 0.0 : x[i]; break;
  case ML_OP_GELU: for (int64_t i = 0; i < n; i++) y[i] = 0.5 * x[i] * (1.0 + erf(x[i] * M_SQRT1_2)); break;
  case ML_OP_GELU_TANH:
    for (int64_t i = 0; i < n; i++) {
      double v = x[i];
      y[i] = 0.5 * v * (1.0 + tanh(ML_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)));
    }
    break;
  case ML_OP_SILU: for (int64_t i = 0; i < n; i++) y[i] = x[i] / (1.0 + exp(-x[i])); break;
  case ML_OP_SIN: for (int64_t i = 0; i < n; i++) y[i] = sin(x[i]); break;
  case ML_OP_COS: for (int64_t i = 0; i < n; i++) y[i] = cos(x[i]); break;
  case ML_OP_RECIPROCAL: for (int64_t i = 0; i < n; i++) y[i] = 1.0 / x[i]; break;
  case ML_OP_LOGICAL_NOT: for (int64_t i = 0; i < n; i++) y[i] = x[i] == 0; break;
  case ML_OP_SOFTPLUS: for (int64_t i = 0; i < n; i++) y[i] = x[i] > 20.0 ? x[i] : log1p(exp(x[i])); break;
  default: break;
  }
}

/* Integer unary ops (the others promote integers to float32 before reaching here). Wrapping
   arithmetic through uint64_t, as two's complement hardware (and PyTorch) does. */
static void unary_i64(ml_unary_op op, const int64_t *x, int64_t *y, int64_t n) {
  switch (op) {
  case ML_OP_NEG: for (int64_t i = 0; i < n; i++) y[i] = (int64_t)(0u - (uint64_t)x[i]); break;
  case ML_OP_ABS: for (int64_t i = 0; i < n; i++) y[i] = x[i] < 0 ? (int64_t)(0u - (uint64_t)x[i]) : x[i]; break;
  case ML_OP_RELU: for (int64_t i = 0; i < n; i++) y[i] = x[i] < 0 ? 0 : x[i]; break;
  case ML_OP_LOGICAL_NOT: for (int64_t i = 0; i < n; i++) y[i] = x[i] == 0; break;
  default: break;
  }
}

#define BINARY_FLOAT_BODY(T, POW, NANV)                                                    \
  switch (op) {                                                                            \
  case ML_OP_ADD: for (int64_t i = 0; i < n; i++) y[i] = a[i] + b[i]; break;               \
  case ML_OP_SUB: for (int64_t i = 0; i < n; i++) y[i] = a[i] - b[i]; break;               \
  case ML_OP_MUL: for (int64_t i = 0; i < n; i++) y[i] = a[i] * b[i]; break;               \
  case ML_OP_DIV: for (int64_t i = 0; i < n; i++) y[i] = a[i] / b[i]; break;               \
  case ML_OP_POW: for (int64_t i = 0; i < n; i++) y[i] = POW(a[i], b[i]); break;           \
  case ML_OP_MAXIMUM:                                                                      \
    for (int64_t i = 0; i < n; i++)                                                        \
      y[i] = (a[i] != a[i] || b[i] != b[i]) ? NANV : a[i] > b[i] ? a[i] : b[i];            \
    break;                                                                                 \
  case ML_OP_MINIMUM:                                                                      \
    for (int64_t i = 0; i < n; i++)                                                        \
      y[i] = (a[i] != a[i] || b[i] != b[i]) ? NANV : a[i] < b[i] ? a[i] : b[i];            \
    break;                                                                                 \
  case ML_OP_EQ: for (int64_t i = 0; i < n; i++) y[i] = a[i] == b[i]; break;               \
  case ML_OP_NE: for (int64_t i = 0; i < n; i++) y[i] = a[i] != b[i]; break;               \
  case ML_OP_LT: for (int64_t i = 0; i < n; i++) y[i] = a[i] < b[i]; break;                \
  case ML_OP_LE: for (int64_t i = 0; i < n; i++) y[i] = a[i] <= b[i]; break;               \
  case ML_OP_GT: for (int64_t i = 0; i < n; i++) y[i] = a[i] > b[i]; break;                \
  case ML_OP_GE: for (int64_t i = 0; i < n; i++) y[i] = a[i] >= b[i]; break;               \
  case ML_OP_LOGICAL_AND: for (int64_t i = 0; i < n; i++) y[i] = a[i] != 0 && b[i] != 0; break; \
  case ML_OP_LOGICAL_OR: for (int64_t i = 0; i < n; i++) y[i] = a[i] != 0 || b[i] != 0; break;  \
  default: break;                                                                          \
  }

static void binary_f32(ml_binary_op op, const float *a, const float *b, float *y, int64_t n) {
  BINARY_FLOAT_BODY(float, powf, NAN)
}

static void binary_f64(ml_binary_op op, const double *a, const double *b, double *y, int64_t n) {
  BINARY_FLOAT_BODY(double, pow, (double)NAN)
}

/* Integer power by squaring; negative exponents give 1/base truncated (1, -1 or 0), as PyTorch. */
static int64_t powi(int64_t base, int64_t e) {
  if (e < 0) {
    if (base == 1) return 1;
    if (base == -1) return (e & 1) ? -1 : 1;
    return 0;
  }
  uint64_t r = 1, b = (uint64_t)base;
  while (e) {
    if (e & 1) r *= b;
    b *= b;
    e >>= 1;
  }
  return (int64_t)r;
}

static void binary_i64(ml_binary_op op, const int64_t *a, const int64_t *b, int64_t *y, int64_t n) {
  switch (op) {
  case ML_OP_ADD: for (int64_t i = 0; i < n; i++) y[i] = (int64_t)((uint64_t)a[i] + (uint64_t)b[i]); break;
  case ML_OP_SUB: for (int64_t i = 0; i < n; i++) y[i] = (int64_t)((uint64_t)a[i] - (uint64_t)b[i]); break;
  case ML_OP_MUL: for (int64_t i = 0; i < n; i++) y[i] = (int64_t)((uint64_t)a[i] * (uint64_t)b[i]); break;
  case ML_OP_POW: for (int64_t i = 0; i < n; i++) y[i] = powi(a[i], b[i]); break;
  case ML_OP_MAXIMUM: for (int64_t i = 0; i < n; i++) y[i] = a[i] > b[i] ? a[i] : b[i]; break;
  case ML_OP_MINIMUM: for (int64_t i = 0; i < n; i++) y[i] = a[i] < b[i] ? a[i] : b[i]; break;
  case ML_OP_EQ: for (int64_t i = 0; i < n; i++) y[i] = a[i] == b[i]; break;
  case ML_OP_NE: for (int64_t i = 0; i < n; i++) y[i] = a[i] != b[i]; break;
  case ML_OP_LT: for (int64_t i = 0; i < n; i++) y[i] = a[i] < b[i]; break;
  case ML_OP_LE: for (int64_t i = 0; i < n; i++) y[i] = a[i] <= b[i]; break;
  case ML_OP_GT: for (int64_t i = 0; i < n; i++) y[i] = a[i] > b[i]; break;
  case ML_OP_GE: for (int64_t i = 0; i < n; i++) y[i] = a[i] >= b[i]; break;
  case ML_OP_LOGICAL_AND: for (int64_t i = 0; i < n; i++) y[i] = a[i] != 0 && b[i] != 0; break;
  case ML_OP_LOGICAL_OR: for (int64_t i = 0; i < n; i++) y[i] = a[i] != 0 || b[i] != 0; break;
  default: break;   /* DIV never runs in int64: integer division gives float32 */
  }
}

// --- the engine ------------------------------------------------------------------------------

typedef enum { EW_UNARY, EW_BINARY, EW_WHERE } ew_kind;

/* Operand 0 is the output; for EW_WHERE operand 1 is the condition, 2 and 3 the values. */
typedef struct {
  ew_kind kind;
  int op;
  ml_calc calc;
  int nops;
  uint8_t *data[4];
  ml_dtype dt[4];
  int ndim;
  int64_t shape[ML_MAX_DIMS];
  int64_t strides[4][ML_MAX_DIMS];
  int64_t nblk;                       /* column blocks per inner row */
  int64_t tile_rows;                  /* rows per work unit: 1, or ML_TILE in tiled mode */
} ew_job;

static void ew_block(const ew_job *j, const int64_t *off, const int64_t *st, int64_t n) {
  union { float f[ML_BLOCK]; double d[ML_BLOCK]; int64_t i[ML_BLOCK]; } ya, yb, yo;
  void *p[4];
  for (int o = 0; o < j->nops; o++) p[o] = ml_byte_at(j->data[o], j->dt[o], off[o]);
  if (j->kind == EW_WHERE) {
    const uint8_t *c = p[1];
    int64_t cs = st[1];
    switch (j->calc) {
    case ML_CALC_F32: {
      const float *a = ml_load_f32(p[2], j->dt[2], st[2], n, ya.f), *b = ml_load_f32(p[3], j->dt[3], st[3], n, yb.f);
      for (int64_t i = 0; i < n; i++) yo.f[i] = c[i * cs] ? a[i] : b[i];
      ml_store_f32(yo.f, p[0], j->dt[0], st[0], n);
      break;
    }
    case ML_CALC_F64: {
      const double *a = ml_load_f64_row(p[2], j->dt[2], st[2], n, ya.d), *b = ml_load_f64_row(p[3], j->dt[3], st[3], n, yb.d);
      for (int64_t i = 0; i < n; i++) yo.d[i] = c[i * cs] ? a[i] : b[i];
      ml_store_f64_row(yo.d, p[0], j->dt[0], st[0], n);
      break;
    }
    default: {
      const int64_t *a = ml_load_i64(p[2], j->dt[2], st[2], n, ya.i), *b = ml_load_i64(p[3], j->dt[3], st[3], n, yb.i);
      for (int64_t i = 0; i < n; i++) yo.i[i] = c[i * cs] ? a[i] : b[i];
      ml_store_i64(yo.i, p[0], j->dt[0], st[0], n);
      break;
    }
    }
    return;
  }
  /* Write straight into the output when it is contiguous data of the compute type. */
  bool direct_f32 = j->dt[0] == ML_FLOAT32 && st[0] == 1 && j->calc == ML_CALC_F32;
  bool direct_f64 = j->dt[0] == ML_FLOAT64 && st[0] == 1 && j->calc == ML_CALC_F64;
  bool direct_i64 = j->dt[0] == ML_INT64 && st[0] == 1 && j->calc == ML_CALC_I64;
  switch (j->calc) {
  case ML_CALC_F32: {
    float *y = direct_f32 ? p[0] : yo.f;
    const float *a = ml_load_f32(p[1], j->dt[1], st[1], n, ya.f);
    if (j->kind == EW_UNARY) unary_f32(j->op, a, y, n);
    else binary_f32(j->op, a, ml_load_f32(p[2], j->dt[2], st[2], n, yb.f), y, n);
    if (!direct_f32) ml_store_f32(y, p[0], j->dt[0], st[0], n);
    break;
  }
  case ML_CALC_F64: {
    double *y = direct_f64 ? p[0] : yo.d;
    const double *a = ml_load_f64_row(p[1], j->dt[1], st[1], n, ya.d);
    if (j->kind == EW_UNARY) unary_f64(j->op, a, y, n);
    else binary_f64(j->op, a, ml_load_f64_row(p[2], j->dt[2], st[2], n, yb.d), y, n);
    if (!direct_f64) ml_store_f64_row(y, p[0], j->dt[0], st[0], n);
    break;
  }
  default: {
    int64_t *y = direct_i64 ? p[0] : yo.i;
    const int64_t *a = ml_load_i64(p[1], j->dt[1], st[1], n, ya.i);
    if (j->kind == EW_UNARY) unary_i64(j->op, a, y, n);
    else binary_i64(j->op, a, ml_load_i64(p[2], j->dt[2], st[2], n, yb.i), y, n);
    if (!direct_i64) ml_store_i64(y, p[0], j->dt[0], st[0], n);
    break;
  }
  }
}

/* Work units [begin, end). Row mode (tile_rows 1): unit u is block u % nblk (ML_BLOCK elements)
   of row u / nblk. Tiled mode, for operands that walk a row with a large stride (a transposed
   input): unit u is a tile of tile_rows consecutive rows by one block of ML_TILE columns, so the
   strided operand reads neighbouring elements of the same cache lines and pages within a tile. */
#define ML_TILE 64

static void ew_units(void *ctx, int64_t begin, int64_t end) {
  const ew_job *j = ctx;
  const int64_t *strides[4] = {j->strides[0], j->strides[1], j->strides[2], j->strides[3]};
  int64_t bw = j->tile_rows > 1 ? ML_TILE : ML_BLOCK;
  ml_iter it;
  ml_iter_init(&it, j->ndim, j->shape, j->nops, strides);
  int64_t total = it.rows_left, row = (begin / j->nblk) * j->tile_rows;
  ml_iter_seek(&it, row);
  if (!ml_iter_next(&it)) return;
  for (int64_t u = begin; u < end; u++) {
    int64_t r0 = (u / j->nblk) * j->tile_rows, blk = u % j->nblk;
    int64_t r1 = r0 + j->tile_rows < total ? r0 + j->tile_rows : total;
    if (row != r0) {                      /* tiles revisit their rows: reposition */
      ml_iter_init(&it, j->ndim, j->shape, j->nops, strides);
      ml_iter_seek(&it, r0);
      ml_iter_next(&it);
      row = r0;
    }
    int64_t start = blk * bw, n = it.inner - start < bw ? it.inner - start : bw;
    for (int64_t r = r0; r < r1; r++) {
      if (r > row) { ml_iter_next(&it); row = r; }
      int64_t off[4];
      for (int o = 0; o < j->nops; o++) off[o] = it.off[o] + start * it.inner_stride[o];
      ew_block(j, off, it.inner_stride, n);
    }
  }
}

/* Runs job j (data, dtypes, shape and strides filled in) over its output. */
static void ew_run(ew_job *j, int64_t cost) {
  int64_t numel = ml_shape_numel(j->ndim, j->shape);
  if (numel == 0) return;
  if (numel <= ML_BLOCK) {
    /* Small op (the per-token path): one block when every operand is laid out like the
       contiguous output or is a single broadcast value; no iterator at all. */
    int64_t off[4] = {0, 0, 0, 0}, st[4];
    bool flat = true;
    for (int o = 0; o < j->nops && flat; o++) {
      bool same = true, zero = true;
      int64_t expect = 1;
      for (int d = j->ndim - 1; d >= 0; d--) {
        if (j->shape[d] == 1) continue;
        if (j->strides[o][d] != expect) same = false;
        if (j->strides[o][d] != 0) zero = false;
        expect *= j->shape[d];
      }
      st[o] = same ? 1 : 0;
      flat = same || zero;
    }
    if (flat) { ew_block(j, off, st, numel); return; }
  }
  const int64_t *strides[4] = {j->strides[0], j->strides[1], j->strides[2], j->strides[3]};
  ml_iter probe;
  ml_iter_init(&probe, j->ndim, j->shape, j->nops, strides);
  bool strided = false;
  for (int o = 0; o < j->nops; o++) {
    int64_t st = probe.inner_stride[o];
    if (st > 16 || st < -16) strided = true;
  }
  j->tile_rows = strided && probe.ndim >= 2 && probe.inner > ML_TILE / 2 && probe.rows_left > 1 ? ML_TILE : 1;
  int64_t bw = j->tile_rows > 1 ? ML_TILE : ML_BLOCK;
  j->nblk = (probe.inner + bw - 1) / bw;
  int64_t groups = (probe.rows_left + j->tile_rows - 1) / j->tile_rows;
  int64_t per_unit = (probe.inner < bw ? probe.inner : bw) * j->tile_rows * cost;
  ml_parallel_for(groups * j->nblk, per_unit, ew_units, j);
}

static int64_t unary_cost(ml_unary_op op) {
  switch (op) {
  case ML_OP_NEG: case ML_OP_ABS: case ML_OP_RELU: case ML_OP_LOGICAL_NOT: return 1;
  default: return 8;
  }
}

// --- unary -----------------------------------------------------------------------------------

static const char *const unary_names[ML_OP_UNARY_COUNT] = {
  "neg", "abs", "sqrt", "rsqrt", "exp", "log", "tanh", "sigmoid", "relu", "gelu", "gelu_tanh", "silu",
  "sin", "cos", "reciprocal", "logical_not", "softplus",
};

static const char *const binary_names[ML_OP_BINARY_COUNT] = {
  "add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
  "logical_and", "logical_or",
};

static bool gives_bool(ml_binary_op op) {
  return op == ML_OP_EQ || op == ML_OP_NE || op == ML_OP_LT || op == ML_OP_LE || op == ML_OP_GT || op == ML_OP_GE ||
         op == ML_OP_LOGICAL_AND || op == ML_OP_LOGICAL_OR;
}

/* Returns from the calling op: allocates its output `o` (dt, nd, shape) on the device of the
   input t and runs `call` (a CUDA table entry writing o); entry NULL means no kernel for this op.
   The table's contract: inputs already validated here, output allocated contiguous here. */
#define ML_CUDA_RUN(fn, t, entry, dt, nd, shape, call, out)                          \
  do {                                                                               \
    if (!(entry)) return ml_no_cuda_kernel(fn, t);                                   \
    ml_tensor *o;                                                                    \
    ML_TRY(ml_tensor_empty(dt, nd, shape, (t)->storage->device, &o));                \
    ml_status st_ = (call);                                                          \
    if (st_) { ml_tensor_release(o); return st_; }                                   \
    *(out) = o;                                                                      \
    return ML_OK;                                                                    \
  } while (0)

ml_status ml_unary(ml_unary_op op, const ml_tensor *x, ml_tensor **out) {
  if ((unsigned)op >= ML_OP_UNARY_COUNT) return ml_fail(ML_EINVAL, "unary: invalid op %d", (int)op);
  const char *fn = unary_names[op];
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device(fn, 1, &x, &cu));
  ml_dtype xdt = x->dtype, odt;
  ml_calc calc;
  if (op == ML_OP_LOGICAL_NOT) { odt = ML_BOOL; calc = ml_calc_of(xdt); }
  else if (ml_dtype_is_floating(xdt)) { odt = xdt; calc = ml_calc_of(xdt); }
  else if (op == ML_OP_NEG && xdt == ML_BOOL)
    return ml_fail(ML_EINVAL, "neg: negation of a bool tensor is not supported (use logical_not)");
  else if (op == ML_OP_NEG || op == ML_OP_ABS || op == ML_OP_RELU) { odt = xdt; calc = ML_CALC_I64; }
  else { odt = ML_FLOAT32; calc = ML_CALC_F32; }   /* sqrt, exp, sigmoid... of integers: float32 */
  if (cu) {
    ML_CUDA_RUN(fn, x, cu->unary, odt, x->ndim, x->shape, cu->unary(op, x, o), out);
  }
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(odt, x->ndim, x->shape, ml_cpu(), &o));
  ew_job j = {.kind = EW_UNARY, .op = op, .calc = calc, .nops = 2, .ndim = x->ndim};
  j.data[0] = ml_tensor_data(o); j.dt[0] = odt;
  j.data[1] = ml_tensor_data(x); j.dt[1] = xdt;
  memcpy(j.shape, x->shape, sizeof j.shape);
  memcpy(j.strides[0], o->strides, sizeof j.strides[0]);
  memcpy(j.strides[1], x->strides, sizeof j.strides[1]);
  ew_run(&j, unary_cost(op));
  *out = o;
  return ML_OK;
}

// --- binary ----------------------------------------------------------------------------------

/* The core of ml_binary / ml_binary_scalar once the dtypes are decided (cpu). */
static ml_status binary_run(ml_binary_op op, const ml_tensor *a, const ml_tensor *b, ml_dtype odt, ml_calc calc,
                            int nd, const int64_t *shape, ml_tensor **out) {
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(odt, nd, shape, ml_cpu(), &o));
  ew_job j = {.kind = EW_BINARY, .op = op, .calc = calc, .nops = 3, .ndim = nd};
  j.data[0] = ml_tensor_data(o); j.dt[0] = odt;
  j.data[1] = ml_tensor_data(a); j.dt[1] = a->dtype;
  j.data[2] = ml_tensor_data(b); j.dt[2] = b->dtype;
  memcpy(j.shape, shape, (size_t)nd * sizeof *shape);
  memcpy(j.strides[0], o->strides, sizeof j.strides[0]);
  ml_broadcast_strides(a, nd, shape, j.strides[1]);
  ml_broadcast_strides(b, nd, shape, j.strides[2]);
  ew_run(&j, op == ML_OP_POW ? 8 : 1);
  *out = o;
  return ML_OK;
}

/* Output dtype and compute class of a binary op whose operands promote to p. */
static ml_status binary_types(ml_binary_op op, ml_dtype p, ml_dtype *odt, ml_calc *calc) {
  if (gives_bool(op)) { *odt = ML_BOOL; *calc = ml_calc_of(p); return ML_OK; }
  if (op == ML_OP_DIV && !ml_dtype_is_floating(p)) { *odt = ML_FLOAT32; *calc = ML_CALC_F32; return ML_OK; }
  if (op == ML_OP_SUB && p == ML_BOOL)
    return ml_fail(ML_EINVAL, "sub: subtraction of two bool tensors is not supported (use logical_xor or ne)");
  *odt = p;
  *calc = ml_calc_of(p);
  return ML_OK;
}

ml_status ml_binary(ml_binary_op op, const ml_tensor *a, const ml_tensor *b, ml_tensor **out) {
  if ((unsigned)op >= ML_OP_BINARY_COUNT) return ml_fail(ML_EINVAL, "binary: invalid op %d", (int)op);
  const char *fn = binary_names[op];
  const ml_tensor *ts[2] = {a, b};
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device(fn, 2, ts, &cu));
  ml_dtype odt = ML_FLOAT32;
  ml_calc calc = ML_CALC_F32;
  ML_TRY(binary_types(op, promote_tensors(a, b), &odt, &calc));
  int nd;
  int64_t shape[ML_MAX_DIMS];
  ML_TRY(ml_broadcast_shape(fn, a->ndim, a->shape, b->ndim, b->shape, &nd, shape));
  if (cu) {
    ML_CUDA_RUN(fn, a, cu->binary, odt, nd, shape, cu->binary(op, a, b, o), out);
  }
  return binary_run(op, a, b, odt, calc, nd, shape, out);
}

ml_status ml_binary_scalar(ml_binary_op op, const ml_tensor *a, double s, bool scalar_first, ml_tensor **out) {
  if ((unsigned)op >= ML_OP_BINARY_COUNT) return ml_fail(ML_EINVAL, "binary: invalid op %d", (int)op);
  const char *fn = binary_names[op];
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device(fn, 1, &a, &cu));
  bool integral = isfinite(s) && s == floor(s);
  ml_dtype adt = a->dtype, odt;
  ml_calc calc;
  if (ml_dtype_is_floating(adt)) { odt = adt; calc = ml_calc_of(adt); }
  else if (!integral || op == ML_OP_DIV) { odt = ML_FLOAT32; calc = ML_CALC_F32; }
  else {
    odt = adt == ML_BOOL ? ML_INT64 : adt;   /* bool tensor with an integer: int64, as PyTorch */
    calc = ML_CALC_I64;
    if (op == ML_OP_POW && !scalar_first && s < 0)
      return ml_fail(ML_EINVAL, "pow: integers to negative integer powers are not allowed (%s tensor to the power %g)",
                     ml_dtype_name(adt), s);
  }
  if (gives_bool(op)) odt = ML_BOOL;
  if (cu) {
    ML_CUDA_RUN(fn, a, cu->binary_scalar, odt, a->ndim, a->shape, cu->binary_scalar(op, a, s, scalar_first, o), out);
  }
  scalar_tensor st;
  const ml_tensor *sc = scalar_init(&st, s);
  return scalar_first ? binary_run(op, sc, a, odt, calc, a->ndim, a->shape, out)
                      : binary_run(op, a, sc, odt, calc, a->ndim, a->shape, out);
}

// --- where and masked_fill ---------------------------------------------------------------------

static ml_status where_run(const ml_tensor *cond, const ml_tensor *a, const ml_tensor *b, ml_dtype odt, int nd,
                           const int64_t *shape, ml_tensor **out) {
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(odt, nd, shape, ml_cpu(), &o));
  ew_job j = {.kind = EW_WHERE, .calc = ml_calc_of(odt), .nops = 4, .ndim = nd};
  const ml_tensor *ops[4] = {o, cond, a, b};
  for (int k = 0; k < 4; k++) {
    j.data[k] = ml_tensor_data(ops[k]);
    j.dt[k] = ops[k]->dtype;
    ml_broadcast_strides(ops[k], nd, shape, j.strides[k]);
  }
  memcpy(j.shape, shape, (size_t)nd * sizeof *shape);
  ew_run(&j, 1);
  *out = o;
  return ML_OK;
}

ml_status ml_where(const ml_tensor *cond, const ml_tensor *a, const ml_tensor *b, ml_tensor **out) {
  const ml_tensor *ts[3] = {cond, a, b};
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device("where", 3, ts, &cu));
  if (cond->dtype != ML_BOOL)
    return ml_fail(ML_EINVAL, "where: condition must be a bool tensor, got %s", ml_dtype_name(cond->dtype));
  int nd, nd2;
  int64_t s1[ML_MAX_DIMS], s2[ML_MAX_DIMS];
  ML_TRY(ml_broadcast_shape("where", a->ndim, a->shape, b->ndim, b->shape, &nd, s1));
  ML_TRY(ml_broadcast_shape("where", cond->ndim, cond->shape, nd, s1, &nd2, s2));
  ml_dtype odt = promote_tensors(a, b);
  if (cu) {
    ML_CUDA_RUN("where", a, cu->where, odt, nd2, s2, cu->where(cond, a, b, o), out);
  }
  return where_run(cond, a, b, odt, nd2, s2, out);
}

ml_status ml_masked_fill(const ml_tensor *x, const ml_tensor *mask, double value, ml_tensor **out) {
  const ml_tensor *ts[2] = {x, mask};
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device("masked_fill", 2, ts, &cu));
  if (mask->dtype != ML_BOOL)
    return ml_fail(ML_EINVAL, "masked_fill: mask must be a bool tensor, got %s", ml_dtype_name(mask->dtype));
  int nd;
  int64_t shape[ML_MAX_DIMS];
  ML_TRY(ml_broadcast_shape("masked_fill", x->ndim, x->shape, mask->ndim, mask->shape, &nd, shape));
  /* The value is cast to x's dtype first (an int tensor filled with 1.7 gets 1, as PyTorch). */
  double v = value;
  if (!ml_dtype_is_floating(x->dtype)) {
    int64_t iv;
    ml_load_i64(&value, ML_FLOAT64, 1, 1, &iv);
    v = x->dtype == ML_BOOL ? (double)(iv != 0 || value != 0) : (double)iv;
  }
  if (cu) {
    /* where(mask, value, x) with the value as a 0-d tensor of x's dtype on the device */
    if (!cu->where || !cu->fill) return ml_no_cuda_kernel("masked_fill", x);
    ml_tensor *sc;
    ML_TRY(ml_tensor_empty(x->dtype, 0, NULL, x->storage->device, &sc));
    ml_status st = cu->fill(sc, v);
    if (!st) st = ml_where(mask, sc, x, out);
    ml_tensor_release(sc);
    return st;
  }
  scalar_tensor st;
  const ml_tensor *sc = scalar_init(&st, v);
  return where_run(mask, sc, x, x->dtype, nd, shape, out);
}

// --- tril / triu -------------------------------------------------------------------------------

ml_status ml_triangle(const ml_tensor *x, int64_t k, bool upper, ml_tensor **out) {
  const char *fn = upper ? "triu" : "tril";
  const ml_cuda_api *cu;
  ML_TRY(ml_op_device(fn, 1, &x, &cu));
  if (x->ndim < 2)
    return ml_fail(ML_EINVAL, "%s: input must have at least 2 dimensions, got a %d-d tensor", fn, x->ndim);
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(x->dtype, x->ndim, x->shape, x->storage->device, &o));
  if (cu) {
    ml_status st = cu->triangle(x, k, upper, o);
    if (st) { ml_tensor_release(o); return st; }
    *out = o;
    return ML_OK;
  }
  ml_status st = ml_tensor_copy_(o, x);
  if (st) { ml_tensor_release(o); return st; }
  int64_t rows = x->shape[x->ndim - 2], cols = x->shape[x->ndim - 1];
  int64_t mats = rows > 0 && cols > 0 ? ml_tensor_numel(x) / (rows * cols) : 0;
  size_t es = ml_dtype_size(x->dtype);
  uint8_t *base = ml_tensor_data(o);
  for (int64_t m = 0; m < mats; m++) {
    for (int64_t i = 0; i < rows; i++) {
      uint8_t *row = base + (size_t)((m * rows + i) * cols) * es;
      /* zero columns [lo, hi): above the diagonal i + k for tril, below it for triu */
      int64_t lo, hi;
      if (upper) { lo = 0; hi = i + k; }
      else { lo = i + k + 1; hi = cols; }
      if (lo < 0) lo = 0;
      if (hi > cols) hi = cols;
      if (lo < hi) memset(row + (size_t)lo * es, 0, (size_t)(hi - lo) * es);
    }
  }
  *out = o;
  return ML_OK;
}
