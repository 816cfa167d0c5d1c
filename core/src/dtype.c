/* dtype.c: dtype names, sizes, promotion and bulk conversion between any two dtypes. */
#include "internal.h"

#include <pthread.h>

static const struct { const char *name; size_t size; } dtype_info[ML_DTYPE_COUNT] = {
  [ML_FLOAT32] = {"float32", 4}, [ML_FLOAT16] = {"float16", 2}, [ML_BFLOAT16] = {"bfloat16", 2},
  [ML_FLOAT64] = {"float64", 8}, [ML_INT64] = {"int64", 8},     [ML_INT32] = {"int32", 4},
  [ML_INT16] = {"int16", 2},     [ML_INT8] = {"int8", 1},       [ML_UINT8] = {"uint8", 1},
  [ML_BOOL] = {"bool", 1},       [ML_FLOAT8_E4M3FN] = {"float8_e4m3fn", 1},
  [ML_FLOAT8_E5M2] = {"float8_e5m2", 1},
};

/* FP8 (OCP formats, as PyTorch's float8_e4m3fn and float8_e5m2). e4m3fn: bias 7, 3 mantissa bits,
   no infinities, S.1111.111 is NaN, the largest finite 448. e5m2: float16's upper byte (bias 15,
   2 mantissa bits, infinities and NaNs as IEEE). Decoding goes through a 256-entry table per
   format, built once. */
static float fp8_table[2][256];
static pthread_once_t fp8_once = PTHREAD_ONCE_INIT;

static float fp8_decode(uint8_t b, bool e5) {
  int mbits = e5 ? 2 : 3, bias = e5 ? 15 : 7, emax = e5 ? 31 : 15;
  int exp = (b & 0x7f) >> mbits, man = b & ((1 << mbits) - 1);
  float v;
  if (e5 && exp == emax) v = man ? NAN : INFINITY;
  else if (!e5 && exp == emax && man == 7) v = NAN;
  else if (exp == 0) v = ldexpf((float)man, 1 - bias - mbits);        /* subnormal */
  else v = ldexpf(1.0f + (float)man / (1 << mbits), exp - bias);
  return (b & 0x80) ? -v : v;
}

static void fp8_build(void) {
  for (int b = 0; b < 256; b++) {
    fp8_table[0][b] = fp8_decode((uint8_t)b, false);
    fp8_table[1][b] = fp8_decode((uint8_t)b, true);
  }
}

const float *ml_fp8_table(ml_dtype dt) {
  pthread_once(&fp8_once, fp8_build);
  return fp8_table[dt == ML_FLOAT8_E5M2];
}

/* Rounds to nearest even, straight from the float (no float16 step, which would round twice);
   past the largest finite value (and from infinity) e4m3fn saturates at +-448 (it has no
   infinity) and e5m2 gives infinity, as PyTorch's casts do. The CUDA backend's float_to_fp8 is
   the same code. */
static uint8_t f32_to_fp8(float f, bool e5) {
  int mbits = e5 ? 2 : 3, bias = e5 ? 15 : 7;
  uint8_t sign = signbit(f) ? 0x80 : 0, nan = 0x7f | sign;
  uint8_t overflow = e5 ? (uint8_t)(0x7c | sign) : (uint8_t)(0x7e | sign);
  float a = fabsf(f);
  if (a != a) return nan;
  if (isinf(a)) return overflow;
  if (a < ldexpf(1.0f, 1 - bias))                                  /* subnormal steps */
    return sign | (uint8_t)nearbyintf(ldexpf(a, bias - 1 + mbits));  /* (the top one is the smallest normal) */
  int e;
  float q = nearbyintf(ldexpf(frexpf(a, &e), mbits + 1));          /* 1.m with mbits bits, scaled */
  if (q == (float)(2 << mbits)) { q = (float)(1 << mbits); e++; }
  int biased = e - 1 + bias, man = (int)q - (1 << mbits);
  if (e5 ? biased > 30 : (biased > 15 || (biased == 15 && man == 7))) return overflow;
  return sign | (uint8_t)(biased << mbits) | (uint8_t)man;
}

size_t ml_dtype_size(ml_dtype dt) { return (unsigned)dt < ML_DTYPE_COUNT ? dtype_info[dt].size : 0; }

const char *ml_dtype_name(ml_dtype dt) {
  return (unsigned)dt < ML_DTYPE_COUNT ? dtype_info[dt].name : "invalid";
}

ml_status ml_dtype_parse(const char *name, ml_dtype *out) {
  static const struct { const char *alias; ml_dtype dt; } aliases[] = {
    {"float", ML_FLOAT32}, {"half", ML_FLOAT16}, {"double", ML_FLOAT64}, {"long", ML_INT64},
    {"int", ML_INT32}, {"short", ML_INT16},
  };
  if (!name) return ml_fail(ML_EINVAL, "dtype: name is missing");
  const char *n = strncmp(name, "torch.", 6) == 0 ? name + 6 : name;
  for (int i = 0; i < ML_DTYPE_COUNT; i++)
    if (strcmp(n, dtype_info[i].name) == 0) { *out = (ml_dtype)i; return ML_OK; }
  for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++)
    if (strcmp(n, aliases[i].alias) == 0) { *out = aliases[i].dt; return ML_OK; }
  return ml_fail(ML_EINVAL, "unknown dtype \"%s\" (expected float32, float16, bfloat16, float64, "
                 "int64, int32, int16, int8, uint8, bool, float8_e4m3fn or float8_e5m2)", name);
}

bool ml_dtype_is_floating(ml_dtype dt) {
  return dt == ML_FLOAT32 || dt == ML_FLOAT16 || dt == ML_BFLOAT16 || dt == ML_FLOAT64;
}

/* PyTorch's category-then-size promotion: bool < integers < floats; uint8 with a signed type
   goes to the next signed type that holds both; float16 with bfloat16 gives float32. */
ml_dtype ml_dtype_promote(ml_dtype a, ml_dtype b) {
  if (a == b) return a;
  bool fa = ml_dtype_is_floating(a), fb = ml_dtype_is_floating(b);
  if (fa && fb) {
    if (a == ML_FLOAT64 || b == ML_FLOAT64) return ML_FLOAT64;
    return ML_FLOAT32;                    /* f32 with anything, or f16 with bf16 */
  }
  if (fa) return a;
  if (fb) return b;
  if (a == ML_BOOL) return b;
  if (b == ML_BOOL) return a;
  if (a == ML_UINT8 || b == ML_UINT8) {
    ml_dtype o = a == ML_UINT8 ? b : a;
    return o == ML_INT8 ? ML_INT16 : o;
  }
  return ml_dtype_size(a) >= ml_dtype_size(b) ? a : b;
}

double ml_load_f64(const void *p, ml_dtype dt, int64_t i) {
  switch (dt) {
  case ML_FLOAT32: return ((const float *)p)[i];
  case ML_FLOAT16: return ml_f16_to_f32(((const uint16_t *)p)[i]);
  case ML_BFLOAT16: return ml_bf16_to_f32(((const uint16_t *)p)[i]);
  case ML_FLOAT64: return ((const double *)p)[i];
  case ML_INT64: return (double)((const int64_t *)p)[i];
  case ML_INT32: return ((const int32_t *)p)[i];
  case ML_INT16: return ((const int16_t *)p)[i];
  case ML_INT8: return ((const int8_t *)p)[i];
  case ML_UINT8: return ((const uint8_t *)p)[i];
  case ML_BOOL: return ((const uint8_t *)p)[i] != 0;
  case ML_FLOAT8_E4M3FN: case ML_FLOAT8_E5M2: return ml_fp8_table(dt)[((const uint8_t *)p)[i]];
  default: return 0;
  }
}

/* Float to integer follows C truncation toward zero (as PyTorch); NaN becomes 0 rather than UB. */
static inline int64_t to_i64(double v) {
  if (v != v) return 0;
  if (v >= 9.2233720368547758e18) return INT64_MAX;
  if (v <= -9.2233720368547758e18) return INT64_MIN;
  return (int64_t)v;
}

void ml_store_f64(void *p, ml_dtype dt, int64_t i, double v) {
  switch (dt) {
  case ML_FLOAT32: ((float *)p)[i] = (float)v; break;
  case ML_FLOAT16: ((uint16_t *)p)[i] = ml_f32_to_f16((float)v); break;
  case ML_BFLOAT16: ((uint16_t *)p)[i] = ml_f32_to_bf16((float)v); break;
  case ML_FLOAT64: ((double *)p)[i] = v; break;
  case ML_INT64: ((int64_t *)p)[i] = to_i64(v); break;
  case ML_INT32: ((int32_t *)p)[i] = (int32_t)to_i64(v); break;
  case ML_INT16: ((int16_t *)p)[i] = (int16_t)to_i64(v); break;
  case ML_INT8: ((int8_t *)p)[i] = (int8_t)to_i64(v); break;
  case ML_UINT8: ((uint8_t *)p)[i] = (uint8_t)to_i64(v); break;
  case ML_BOOL: ((uint8_t *)p)[i] = v != 0; break;
  case ML_FLOAT8_E4M3FN: ((uint8_t *)p)[i] = f32_to_fp8((float)v, false); break;
  case ML_FLOAT8_E5M2: ((uint8_t *)p)[i] = f32_to_fp8((float)v, true); break;
  default: break;
  }
}

/* The common cases get tight loops; everything else goes through double, which is exact for
   every value of every dtype here except int64 beyond 2^53 (handled by the int64 fast paths). */
void ml_convert(const void *src, ml_dtype sdt, void *dst, ml_dtype ddt, int64_t n) {
  if (n <= 0) return;
  if (sdt == ddt) { memmove(dst, src, (size_t)n * ml_dtype_size(sdt)); return; }
  if (sdt == ML_FLOAT16 && ddt == ML_FLOAT32) {
    const uint16_t *s = src; float *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = ml_f16_to_f32(s[i]);
  } else if (sdt == ML_BFLOAT16 && ddt == ML_FLOAT32) {
    const uint16_t *s = src; float *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = ml_bf16_to_f32(s[i]);
  } else if ((sdt == ML_FLOAT8_E4M3FN || sdt == ML_FLOAT8_E5M2) && ddt == ML_FLOAT32) {
    const uint8_t *s = src; float *d = dst;
    const float *lut = ml_fp8_table(sdt);
    for (int64_t i = 0; i < n; i++) d[i] = lut[s[i]];
  } else if ((sdt == ML_FLOAT8_E4M3FN || sdt == ML_FLOAT8_E5M2) && ddt == ML_BFLOAT16) {
    const uint8_t *s = src; uint16_t *d = dst;                 /* exact: fp8 values fit bfloat16 */
    const float *lut = ml_fp8_table(sdt);
    for (int64_t i = 0; i < n; i++) d[i] = ml_f32_to_bf16(lut[s[i]]);
  } else if (sdt == ML_FLOAT32 && ddt == ML_FLOAT16) {
    const float *s = src; uint16_t *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = ml_f32_to_f16(s[i]);
  } else if (sdt == ML_FLOAT32 && ddt == ML_BFLOAT16) {
    const float *s = src; uint16_t *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = ml_f32_to_bf16(s[i]);
  } else if (sdt == ML_INT64 && (ddt == ML_INT32 || ddt == ML_INT16 || ddt == ML_INT8 || ddt == ML_UINT8)) {
    const int64_t *s = src;
    for (int64_t i = 0; i < n; i++) {
      switch (ddt) {
      case ML_INT32: ((int32_t *)dst)[i] = (int32_t)s[i]; break;
      case ML_INT16: ((int16_t *)dst)[i] = (int16_t)s[i]; break;
      case ML_INT8: ((int8_t *)dst)[i] = (int8_t)s[i]; break;
      default: ((uint8_t *)dst)[i] = (uint8_t)s[i]; break;
      }
    }
  } else if (ddt == ML_INT64 && !ml_dtype_is_floating(sdt)) {
    int64_t *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = (int64_t)ml_load_f64(src, sdt, i);
  } else if (sdt == ML_INT64 && ddt == ML_BOOL) {
    const int64_t *s = src; uint8_t *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = s[i] != 0;
  } else {
    for (int64_t i = 0; i < n; i++) ml_store_f64(dst, ddt, i, ml_load_f64(src, sdt, i));
  }
}
