// mxfp4.cu: MXFP4 weights (gpt-oss's experts; the layout is in cpu/mxfp4.c and moonload.h)
// expanded on the GPU for ml_dequantize_mxfp4, which ml_mxfp4_linear then hands to cuBLAS. A
// thread a packed byte: its two values, as on the CPU twice the e2m1 value times 2^(scale - 128)
// (both exact in float32), so the CPU's values exactly, rounded to the output dtype alike.
#include "common.cuh"

#include <string.h>

static const int kThreads = 256;

// e2m1 nibble -> twice its value as float bits: 0, 1, then 2^e * (1 + m / 2) for e = 1..3; the
// sign from bit 3 (so nibble 8 is -0, as transformers' FP4_VALUES has it).
__device__ __forceinline__ float fp4_twice(unsigned n) {
  unsigned u = n & 7u;
  unsigned bits = u < 2 ? (u ? 0x3f800000u : 0u) : ((((u >> 1) + 127u) << 23) | ((u & 1u) << 22));
  bits |= (n & 8u) << 28;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// Half the e8m0 scale, 2^(s - 128), from the bits: subnormal for s = 0 and 1, finite for 255.
__device__ __forceinline__ float half_scale(unsigned s) {
  unsigned bits = s >= 2 ? (s - 1) << 23 : 0x00200000u << s;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// Byte i of the blocks (row-major over their shape) holds out elements 2i and 2i + 1 (llama.cpp's
// order: elements i and i + 16 of its group of 32); its group, i / 16, is the scale's index.
// Contiguous operands skip the strided addressing.
__global__ void dequantize_mxfp4_kernel(TensorDesc b, TensorDesc s, bool contiguous, bool ggml_order, void *out,
                                        int odt, int64_t n) {
  const unsigned char *bd = (const unsigned char *)b.data, *sd = (const unsigned char *)s.data;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    unsigned byte = contiguous ? bd[i] : bd[desc_offset(b, i)];
    float half = half_scale(contiguous ? sd[i / 16] : sd[desc_offset(s, i / 16)]);
    int64_t lo = 2 * i, hi = 2 * i + 1;
    if (ggml_order) {
      lo = i / 16 * 32 + i % 16;
      hi = lo + 16;
    }
    store_as<float>(out, odt, lo, fp4_twice(byte & 15u) * half);
    store_as<float>(out, odt, hi, fp4_twice(byte >> 4) * half);
  }
}

ml_status ml_cuda_dequantize_mxfp4(const ml_tensor *blocks, const ml_tensor *scales, bool ggml_order, ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(out), &st));
  TensorDesc bd = ml_cuda_desc(blocks), sd = ml_cuda_desc(scales);
  int64_t n = ml_cuda_numel(bd);
  if (n == 0) return ML_OK;
  bool contiguous = ml_cuda_is_contiguous(bd) && ml_cuda_is_contiguous(sd);
  dequantize_mxfp4_kernel<<<ml_cuda_blocks(n, kThreads), kThreads, 0, st->compute>>>(
      bd, sd, contiguous, ggml_order, ml_tensor_data(out), ml_tensor_dtype(out), n);
  LAUNCH_CHECK();
  return ML_OK;
}
