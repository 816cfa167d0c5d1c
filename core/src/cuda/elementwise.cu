// elementwise.cu: unary, binary (with a scalar too), where, fill and strided copies on CUDA.
// One grid-stride kernel per family; operands are strided descriptors broadcast to the output's
// shape, loaded into the compute type and stored in the output's dtype: long long when every
// operand is an integer or bool (wrapping like the CPU), else double when float64 or int64 is
// involved, else float. A contiguous fast path skips the index arithmetic.
#include "common.cuh"

#include <math.h>
#include <type_traits>

static const int kThreads = 256;

// --- op tables -----------------------------------------------------------------------------

template <typename C>
__device__ __forceinline__ C apply_unary(int op, C x) {
  if constexpr (std::is_integral<C>::value) {
    switch (op) {   // the ops whose result stays an integer; the others give floating outputs
    case ML_OP_NEG: return (C)(0ULL - (unsigned long long)x);
    case ML_OP_ABS: return x < 0 ? (C)(0ULL - (unsigned long long)x) : x;
    case ML_OP_RELU: return x > 0 ? x : 0;
    case ML_OP_LOGICAL_NOT: return x == 0;
    default: return x;
    }
  } else {
    switch (op) {
    case ML_OP_NEG: return -x;
    case ML_OP_ABS: return x < (C)0 ? -x : x;
    case ML_OP_SQRT: return sqrt(x);
    case ML_OP_RSQRT: return (C)1 / sqrt(x);
    case ML_OP_EXP: return exp(x);
    case ML_OP_LOG: return log(x);
    case ML_OP_TANH: return tanh(x);
    case ML_OP_SIGMOID: return x >= (C)0 ? (C)1 / ((C)1 + exp(-x)) : exp(x) / ((C)1 + exp(x));
    case ML_OP_RELU: return (x > (C)0 || x != x) ? x : (C)0;   // NaN stays NaN, as in PyTorch
    case ML_OP_GELU: return (C)0.5 * x * ((C)1 + erf(x * (C)0.70710678118654752440));
    case ML_OP_GELU_TANH: {
      C inner = (C)0.79788456080286535588 * (x + (C)0.044715 * x * x * x);
      return (C)0.5 * x * ((C)1 + tanh(inner));
    }
    case ML_OP_SILU: return x >= (C)0 ? x / ((C)1 + exp(-x)) : x * exp(x) / ((C)1 + exp(x));
    case ML_OP_SIN: return sin(x);
    case ML_OP_COS: return cos(x);
    case ML_OP_RECIPROCAL: return (C)1 / x;
    case ML_OP_LOGICAL_NOT: return x == (C)0 ? (C)1 : (C)0;
    case ML_OP_SOFTPLUS: return x > (C)20 ? x : log1p(exp(x));   // torch's threshold
    default: return x;
    }
  }
}

// Integer power by squaring, wrapping; negative exponents as the CPU (only 1 and -1 survive).
__device__ __forceinline__ long long pow_int(long long base, long long e) {
  if (e < 0) return base == 1 ? 1 : base == -1 ? ((e & 1) ? -1 : 1) : 0;
  unsigned long long r = 1, b = (unsigned long long)base;
  while (e) {
    if (e & 1) r *= b;
    b *= b;
    e >>= 1;
  }
  return (long long)r;
}

template <typename C>
__device__ __forceinline__ C apply_binary(int op, C x, C y) {
  if constexpr (std::is_integral<C>::value) {
    typedef unsigned long long U;   // wrapping arithmetic, as on the CPU
    switch (op) {
    case ML_OP_ADD: return (C)((U)x + (U)y);
    case ML_OP_SUB: return (C)((U)x - (U)y);
    case ML_OP_MUL: return (C)((U)x * (U)y);
    case ML_OP_POW: return pow_int(x, y);
    case ML_OP_MAXIMUM: return x > y ? x : y;
    case ML_OP_MINIMUM: return x < y ? x : y;
    default: break;   // comparisons and logic below; DIV never runs on integers (it gives float32)
    }
  } else {
    switch (op) {
    case ML_OP_ADD: return x + y;
    case ML_OP_SUB: return x - y;
    case ML_OP_MUL: return x * y;
    case ML_OP_DIV: return x / y;
    case ML_OP_POW: return pow(x, y);
    case ML_OP_MAXIMUM: return (x != x || y != y) ? x + y : (x > y ? x : y);   // NaN propagates
    case ML_OP_MINIMUM: return (x != x || y != y) ? x + y : (x < y ? x : y);
    default: break;
    }
  }
  switch (op) {
  case ML_OP_EQ: return x == y;
  case ML_OP_NE: return x != y;
  case ML_OP_LT: return x < y;
  case ML_OP_LE: return x <= y;
  case ML_OP_GT: return x > y;
  case ML_OP_GE: return x >= y;
  case ML_OP_LOGICAL_AND: return (x != (C)0) && (y != (C)0);
  case ML_OP_LOGICAL_OR: return (x != (C)0) || (y != (C)0);
  default: return x;
  }
}

// --- kernels -------------------------------------------------------------------------------

template <typename C>
__global__ void unary_kernel(int op, TensorDesc x, TensorDesc o, int64_t n, bool contiguous) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t xi = contiguous ? i : desc_offset(x, i);
    store_as<C>(o.data, o.dtype, i, apply_unary<C>(op, load_as<C>(x.data, x.dtype, xi)));
  }
}

template <typename C>
__global__ void binary_kernel(int op, TensorDesc a, TensorDesc b, TensorDesc o, int64_t n, bool contiguous) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t ai = contiguous ? i : desc_offset(a, i), bi = contiguous ? i : desc_offset(b, i);
    C x = load_as<C>(a.data, a.dtype, ai), y = load_as<C>(b.data, b.dtype, bi);
    store_as<C>(o.data, o.dtype, i, apply_binary<C>(op, x, y));
  }
}

template <typename C>
__global__ void binary_scalar_kernel(int op, TensorDesc a, C s, bool scalar_first, TensorDesc o, int64_t n,
                                     bool contiguous) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    C x = load_as<C>(a.data, a.dtype, contiguous ? i : desc_offset(a, i));
    store_as<C>(o.data, o.dtype, i, scalar_first ? apply_binary<C>(op, s, x) : apply_binary<C>(op, x, s));
  }
}

template <typename C>
__global__ void where_kernel(TensorDesc c, TensorDesc a, TensorDesc b, TensorDesc o, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    bool take_a = load_as<int>(c.data, c.dtype, desc_offset(c, i)) != 0;
    C v = take_a ? load_as<C>(a.data, a.dtype, desc_offset(a, i)) : load_as<C>(b.data, b.dtype, desc_offset(b, i));
    store_as<C>(o.data, o.dtype, i, v);
  }
}

// dst[i] <- src[i] for the i-th element of dst's shape, both strided (src broadcast).
template <typename C>
__global__ void copy_kernel(TensorDesc d, TensorDesc s, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    store_as<C>(d.data, d.dtype, desc_offset(d, i), load_as<C>(s.data, s.dtype, desc_offset(s, i)));
}

template <typename C>
__global__ void fill_kernel(TensorDesc d, C v, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    store_as<C>(d.data, d.dtype, desc_offset(d, i), v);
}

// --- entry points --------------------------------------------------------------------------

enum Compute { COMPUTE_F32, COMPUTE_F64, COMPUTE_I64 };

static bool is_integral(int dt) { return !ml_dtype_is_floating((ml_dtype)dt); }

// I64 when every dtype is an integer or bool, else F64 when float64 or int64 is among them.
static Compute compute_of(int a, int b, int c) {
  if (is_integral(a) && is_integral(b) && is_integral(c)) return COMPUTE_I64;
  return ml_cuda_wide(a) || ml_cuda_wide(b) || ml_cuda_wide(c) ? COMPUTE_F64 : COMPUTE_F32;
}

// Launches KERNEL<compute type> over n elements on stream s.
#define LAUNCH_COMPUTE(compute, KERNEL, ...)                                                      \
  do {                                                                                          \
    unsigned grid_ = ml_cuda_blocks(n, kThreads);                                               \
    if ((compute) == COMPUTE_I64) KERNEL<long long><<<grid_, kThreads, 0, s>>>(__VA_ARGS__);    \
    else if ((compute) == COMPUTE_F64) KERNEL<double><<<grid_, kThreads, 0, s>>>(__VA_ARGS__);  \
    else KERNEL<float><<<grid_, kThreads, 0, s>>>(__VA_ARGS__);                                 \
  } while (0)

static ml_status stream_of(const ml_tensor *t, cudaStream_t *s) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(t), &st));
  *s = st->compute;
  return ML_OK;
}

ml_status ml_cuda_unary(ml_unary_op op, const ml_tensor *x, ml_tensor *out) {
  cudaStream_t s;
  ML_TRY(stream_of(out, &s));
  TensorDesc xd = ml_cuda_desc(x), od = ml_cuda_desc(out);
  int64_t n = ml_cuda_numel(od);
  if (n == 0) return ML_OK;
  bool contig = ml_cuda_is_contiguous(xd);
  LAUNCH_COMPUTE(compute_of(xd.dtype, od.dtype, od.dtype), unary_kernel, (int)op, xd, od, n, contig);
  LAUNCH_CHECK();
  return ML_OK;
}

ml_status ml_cuda_binary(ml_binary_op op, const ml_tensor *a, const ml_tensor *b, ml_tensor *out) {
  cudaStream_t s;
  ML_TRY(stream_of(out, &s));
  TensorDesc od = ml_cuda_desc(out);
  int64_t n = ml_cuda_numel(od);
  if (n == 0) return ML_OK;
  TensorDesc ad = ml_cuda_desc_broadcast(a, od.ndim, od.shape), bd = ml_cuda_desc_broadcast(b, od.ndim, od.shape);
  bool contig = ml_cuda_is_contiguous(ad) && ml_cuda_is_contiguous(bd);
  LAUNCH_COMPUTE(compute_of(ad.dtype, bd.dtype, od.dtype), binary_kernel, (int)op, ad, bd, od, n, contig);
  LAUNCH_CHECK();
  return ML_OK;
}

ml_status ml_cuda_binary_scalar(ml_binary_op op, const ml_tensor *a, double v, bool scalar_first, ml_tensor *out) {
  cudaStream_t s;
  ML_TRY(stream_of(out, &s));
  TensorDesc od = ml_cuda_desc(out), ad = ml_cuda_desc(a);
  int64_t n = ml_cuda_numel(od);
  if (n == 0) return ML_OK;
  bool contig = ml_cuda_is_contiguous(ad);
  // An integer tensor meets a whole-number scalar in integers (x < 2.5 must not truncate 2.5).
  bool whole = v == floor(v) && fabs(v) < 9.2e18;
  Compute c = compute_of(ad.dtype, whole ? ML_INT64 : ML_FLOAT64, od.dtype);
  LAUNCH_COMPUTE(c, binary_scalar_kernel, (int)op, ad, v, scalar_first, od, n, contig);
  LAUNCH_CHECK();
  return ML_OK;
}

ml_status ml_cuda_where(const ml_tensor *cond, const ml_tensor *a, const ml_tensor *b, ml_tensor *out) {
  cudaStream_t s;
  ML_TRY(stream_of(out, &s));
  TensorDesc od = ml_cuda_desc(out);
  int64_t n = ml_cuda_numel(od);
  if (n == 0) return ML_OK;
  TensorDesc cd = ml_cuda_desc_broadcast(cond, od.ndim, od.shape);
  TensorDesc ad = ml_cuda_desc_broadcast(a, od.ndim, od.shape), bd = ml_cuda_desc_broadcast(b, od.ndim, od.shape);
  LAUNCH_COMPUTE(compute_of(ad.dtype, bd.dtype, od.dtype), where_kernel, cd, ad, bd, od, n);
  LAUNCH_CHECK();
  return ML_OK;
}

ml_status ml_cuda_copy_strided(ml_tensor *dst, const ml_tensor *src) {
  cudaStream_t s;
  ML_TRY(stream_of(dst, &s));
  TensorDesc dd = ml_cuda_desc(dst);
  int64_t n = ml_cuda_numel(dd);
  if (n == 0) return ML_OK;
  TensorDesc sd = ml_cuda_desc_broadcast(src, dd.ndim, dd.shape);
  if (sd.dtype == dd.dtype && ml_cuda_is_contiguous(sd) && ml_cuda_is_contiguous(dd)) {
    size_t es = ml_dtype_size((ml_dtype)dd.dtype);
    CUDA_TRY(cudaMemcpyAsync(dd.data, sd.data, (size_t)n * es, cudaMemcpyDeviceToDevice, s));
    return ML_OK;
  }
  // Integers to integers go through long long, so every value (int64 beyond 2^53 too) survives.
  LAUNCH_COMPUTE(compute_of(sd.dtype, dd.dtype, dd.dtype), copy_kernel, dd, sd, n);
  LAUNCH_CHECK();
  return ML_OK;
}

ml_status ml_cuda_fill(ml_tensor *t, double value) {
  cudaStream_t s;
  ML_TRY(stream_of(t, &s));
  TensorDesc d = ml_cuda_desc(t);
  int64_t n = ml_cuda_numel(d);
  if (n == 0) return ML_OK;
  bool whole = value == floor(value) && fabs(value) < 9.2e18;   // 0.5 fills a bool tensor with true
  LAUNCH_COMPUTE(compute_of(d.dtype, whole ? d.dtype : ML_FLOAT64, d.dtype), fill_kernel, d, value, n);
  LAUNCH_CHECK();
  return ML_OK;
}
