/* fp8.c: FP8 weights with block scales, as DeepSeek-V3's checkpoints and transformers' "fp8"
   quant_method store them: an (O, I) float8 matrix and a float32 scale_inv per block_o x block_i
   tile (the last tiles may be partial). ml_dequantize_fp8_blocks expands them into a float
   matrix, one table lookup and one multiply an element, rows split over the threads. */
#include "internal.h"
#include "cuda_api.h"
#include "kernels.h"

typedef struct {
  const uint8_t *w;
  const float *scale;
  void *out;
  ml_dtype dtype;
  const float *lut;
  int64_t I, block_o, block_i, scale_cols, w_row, s_row, s_col;   /* strides in elements */
} fp8_job;

static void dequantize_rows(void *arg, int64_t r0, int64_t r1) {
  const fp8_job *j = arg;
  float buf[256];
  for (int64_t o = r0; o < r1; o++) {
    const uint8_t *w = j->w + o * j->w_row;
    const float *s = j->scale + (o / j->block_o) * j->s_row;
    for (int64_t i0 = 0; i0 < j->I; i0 += 256) {
      int64_t n = j->I - i0 < 256 ? j->I - i0 : 256;
      for (int64_t i = 0; i < n; i++) buf[i] = j->lut[w[i0 + i]] * s[((i0 + i) / j->block_i) * j->s_col];
      ml_convert(buf, ML_FLOAT32, (char *)j->out + (o * j->I + i0) * (int64_t)ml_dtype_size(j->dtype), j->dtype, n);
    }
  }
}

ml_status ml_dequantize_fp8_blocks(const ml_tensor *w, const ml_tensor *scale_inv, int64_t block_o, int64_t block_i,
                                   ml_dtype dtype, ml_tensor **out) {
  char sw[ML_SHAPE_BUF], ss[ML_SHAPE_BUF];
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route("dequantize_fp8_blocks", 2, (const ml_tensor *[]){w, scale_inv},
                     (const char *[]){"the float8 weight", "the scales"}, &cu));
  if (cu && !cu->dequantize_fp8_blocks) return ml_no_cuda_kernel("dequantize_fp8_blocks", w);
  if (!(dtype == ML_FLOAT32 || dtype == ML_FLOAT16 || dtype == ML_BFLOAT16))
    return ml_fail(ML_EINVAL, "dequantize_fp8_blocks: the output dtype must be float32, float16 or bfloat16, got %s",
                   ml_dtype_name(dtype));
  if (block_o < 1 || block_i < 1)
    return ml_fail(ML_EINVAL, "dequantize_fp8_blocks: block sizes must be positive, got %lld x %lld",
                   (long long)block_o, (long long)block_i);
  bool ok = (w->dtype == ML_FLOAT8_E4M3FN || w->dtype == ML_FLOAT8_E5M2) && w->ndim == 2 &&
            scale_inv->dtype == ML_FLOAT32 && scale_inv->ndim == 2;
  ok = ok && scale_inv->shape[0] == (w->shape[0] + block_o - 1) / block_o &&
       scale_inv->shape[1] == (w->shape[1] + block_i - 1) / block_i;
  if (!ok)
    return ml_fail(ML_EINVAL, "dequantize_fp8_blocks: weight %s %s and scales %s %s do not go together (a float8 "
                   "(O, I) weight and float32 scales (ceil(O / %lld), ceil(I / %lld)))", ml_dtype_name(w->dtype),
                   ml_shape_str(w->ndim, w->shape, sw, sizeof sw), ml_dtype_name(scale_inv->dtype),
                   ml_shape_str(scale_inv->ndim, scale_inv->shape, ss, sizeof ss), (long long)block_o, (long long)block_i);
  if (w->strides[1] != 1 && w->shape[1] > 1)
    return ml_fail(ML_EINVAL, "dequantize_fp8_blocks: the weight's rows must be contiguous");
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(dtype, 2, w->shape, w->storage->device, &o));
  ml_status st = ML_OK;
  if (cu) st = cu->dequantize_fp8_blocks(w, scale_inv, block_o, block_i, o);
  else {
    fp8_job j = {ml_tensor_data(w), ml_tensor_data(scale_inv), ml_tensor_data(o), dtype, ml_fp8_table(w->dtype),
                 w->shape[1], block_o, block_i, scale_inv->shape[1], w->strides[0], scale_inv->strides[0],
                 scale_inv->strides[1]};
    ml_parallel_for(w->shape[0], w->shape[1] * 2, dequantize_rows, &j);
  }
  if (st) { ml_tensor_release(o); return st; }
  *out = o;
  return ML_OK;
}
