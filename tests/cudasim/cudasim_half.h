// cudasim_half.h: the 16-bit float types of cuda_fp16.h / cuda_bf16.h for the CPU emulator.
// Conversions round to nearest even like the device intrinsics (F16C for half; bfloat16 by
// hand, NaN kept quiet).
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };

inline float __half2float(__half h) { return _cvtsh_ss(h.x); }
inline __half __float2half_rn(float f) { return __half{(uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }

inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t bits = (uint32_t)b.x << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((bits >> 16) | 0x40u)};   // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return __nv_bfloat16{(uint16_t)(bits >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
