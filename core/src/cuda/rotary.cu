// rotary.cu: rotary position embeddings (rotate-half form) on CUDA; see cpu/rotary.c for the
// definition. One thread per pair (i, i + D/2) of a row: both outputs read the same two inputs.
// Products and the sum are rounded to the output dtype where the composed ops would round.
#include "common.cuh"

static const int kThreads = 256;

// v rounded to dtype (float16/bfloat16), as a store and a load would.
template <typename C>
__device__ __forceinline__ C round_to(C v, int dtype) {
  if (dtype == ML_FLOAT16) return (C)__half2float(__float2half_rn((float)v));
  if (dtype == ML_BFLOAT16) return (C)__bfloat162float(__float2bfloat16_rn((float)v));
  return v;
}

template <typename C>
__global__ void rotary_kernel(TensorDesc x, TensorDesc c, TensorDesc s, TensorDesc o, int64_t pairs, int64_t h) {
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pairs; p += (int64_t)gridDim.x * blockDim.x) {
    int64_t i1 = p / h * 2 * h + p % h, i2 = i1 + h;   // linear indices of the pair in x's shape
    C x1 = load_as<C>(x.data, x.dtype, desc_offset(x, i1)), x2 = load_as<C>(x.data, x.dtype, desc_offset(x, i2));
    C c1 = load_as<C>(c.data, c.dtype, desc_offset(c, i1)), c2 = load_as<C>(c.data, c.dtype, desc_offset(c, i2));
    C s1 = load_as<C>(s.data, s.dtype, desc_offset(s, i1)), s2 = load_as<C>(s.data, s.dtype, desc_offset(s, i2));
    store_as<C>(o.data, o.dtype, i1, round_to<C>(x1 * c1, o.dtype) + round_to<C>(-x2 * s1, o.dtype));
    store_as<C>(o.data, o.dtype, i2, round_to<C>(x2 * c2, o.dtype) + round_to<C>(x1 * s2, o.dtype));
  }
}

ml_status ml_cuda_rotary_embedding(const ml_tensor *x, const ml_tensor *cos, const ml_tensor *sin, ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(out), &st));
  TensorDesc xd = ml_cuda_desc(x), od = ml_cuda_desc(out);
  TensorDesc cd = ml_cuda_desc_broadcast(cos, xd.ndim, xd.shape), sd = ml_cuda_desc_broadcast(sin, xd.ndim, xd.shape);
  int64_t h = xd.shape[xd.ndim - 1] / 2, pairs = h > 0 ? ml_cuda_numel(xd) / 2 : 0;
  if (pairs == 0) return ML_OK;
  unsigned grid = ml_cuda_blocks(pairs, kThreads);
  if (od.dtype == ML_FLOAT64)
    rotary_kernel<double><<<grid, kThreads, 0, st->compute>>>(xd, cd, sd, od, pairs, h);
  else
    rotary_kernel<float><<<grid, kThreads, 0, st->compute>>>(xd, cd, sd, od, pairs, h);
  LAUNCH_CHECK();
  return ML_OK;
}
