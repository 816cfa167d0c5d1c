/* rows.h: row kernels shared by softmax, the norms and attention (cpu/nn.c, cpu/attention.c). */
#ifndef ML_CPU_ROWS_H
#define ML_CPU_ROWS_H

#include "internal.h"

/* exp(x) in float32 within 2 ulp, written so that loops over it vectorise (no libm call):
   Cephes' range reduction and polynomial. exp(-inf) = 0, exp(+inf) = inf, NaN stays NaN. */
static inline float ml_expf_fast(float x) {
  float xc = x < -87.33654f ? -87.33654f : x;
  xc = xc > 88.72283f ? 88.72283f : xc;
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round to nearest */
  float r = fmaf(n, -0.693359375f, xc);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p, r * r, r) + 1.0f;
  int32_t ni = (int32_t)(n == n ? n : 0.0f);
  uint32_t bits = (uint32_t)(ni + 127) << 23;
  float s;
  memcpy(&s, &bits, sizeof s);
  return x < -87.33654f ? 0.0f : p * s;
}

/* n elements of sdt at src, element stride s -> contiguous dst in dt (float32 or float64), and back. */
void ml_row_load(void *dst, ml_dtype dt, const void *src, ml_dtype sdt, int64_t n, int64_t s);
void ml_row_store(const void *src, ml_dtype dt, void *dst, ml_dtype ddt, int64_t n, int64_t s);

/* Softmax (or log-softmax) of n contiguous values x into y (y may be x). A row whose maximum is
   -inf (every entry masked) becomes all zeros when zero_masked, else NaN as in PyTorch's softmax. */
void ml_softmax_row_f32(const float *x, float *y, int64_t n, bool log, bool zero_masked);
void ml_softmax_row_f64(const double *x, double *y, int64_t n, bool log, bool zero_masked);

#endif /* ML_CPU_ROWS_H */
