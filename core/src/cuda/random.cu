// random.cu: uniform_ and normal_ on CUDA. Element i (row-major over the tensor's shape) takes the
// Philox block and words the CPU fill would give it (philox.h), so a seed gives the same values
// on both devices: uniforms bit for bit, normals up to the last bit of the device's log/sin/cos.
#include "common.cuh"
#include "philox.h"

static const int kThreads = 256;

__global__ void random_fill_kernel(TensorDesc t, int64_t n, bool normal, bool wide, double a, double b,
                                   unsigned long long seed, unsigned long long base) {
  ml_fill_kind kind = normal ? ML_FILL_NORMAL : ML_FILL_UNIFORM;
  int64_t per = ml_fill_per_block(kind, wide);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    ml_philox_block blk = ml_philox(seed, base + (unsigned long long)(i / per));
    store_as<double>(t.data, t.dtype, desc_offset(t, i), ml_fill_value(&blk, kind, a, b, wide, i));
  }
}

ml_status ml_cuda_random_fill(ml_tensor *t, bool normal, double a, double b, uint64_t seed, uint64_t base) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(t), &st));
  TensorDesc d = ml_cuda_desc(t);
  int64_t n = ml_cuda_numel(d);
  if (n == 0) return ML_OK;
  bool wide = d.dtype == ML_FLOAT64 && !normal;   // float64 uniforms draw 53 bits: 2 per block
  random_fill_kernel<<<ml_cuda_blocks(n, kThreads), kThreads, 0, st->compute>>>(d, n, normal, wide, a, b, seed, base);
  LAUNCH_CHECK();
  return ML_OK;
}
