/* few_rows.c: what the direct few-row products over packed weights share (fp8.c's float8,
   mxfp4.c's MXFP4): their operands as float32 rows, and the driver that spreads output columns
   over the threads, asks the format's kernel for each column's dot products, adds the bias and
   writes a block of columns in the output's dtype. The formats differ only in how a weight row
   becomes floats, which their column_dots callbacks do. */
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

enum { FEW_COLS = 32 };

ml_status ml_few_rows_operands(const char *fn, const ml_tensor *x, const ml_tensor *b, int64_t M, int64_t K, int64_t N,
                               float **xf, float **bf, ml_tensor **out) {
  int64_t oshape[ML_MAX_DIMS];
  memcpy(oshape, x->shape, sizeof oshape);
  oshape[x->ndim - 1] = N;
  float *buf = malloc((size_t)(M * K + (b ? N : 0)) * sizeof(float));
  if (!buf) return ml_fail(ML_ENOMEM, "%s: out of memory for %lld input values", fn, (long long)(M * K));
  ml_tensor *xc = NULL, *o = NULL;
  ml_status st = ml_tensor_contiguous(x, &xc);
  if (!st) st = ml_tensor_empty(x->dtype, x->ndim, oshape, x->storage->device, &o);
  if (st) {
    free(buf);
    if (xc) ml_tensor_release(xc);
    return st;
  }
  ml_convert(ml_tensor_data(xc), x->dtype, buf, ML_FLOAT32, M * K);
  ml_tensor_release(xc);
  *bf = NULL;
  if (b) {
    *bf = buf + M * K;
    for (int64_t n = 0; n < N; n++) (*bf)[n] = (float)ml_load_f64(ml_tensor_data(b), b->dtype, n * b->strides[0]);
  }
  *xf = buf;
  *out = o;
  return ML_OK;
}

static void few_rows_columns(void *ctx, int64_t begin, int64_t end) {
  const ml_few_rows_job *j = ctx;
  float acc[ML_FEW_ROWS][FEW_COLS], dots[ML_FEW_ROWS];
  size_t oe = ml_dtype_size(j->odt);
  for (int64_t blk = begin; blk < end; blk++) {
    int64_t n0 = blk * FEW_COLS, w = j->N - n0 < FEW_COLS ? j->N - n0 : FEW_COLS;
    for (int64_t i = 0; i < w; i++) {
      j->column_dots(j->ctx, n0 + i, dots);
      float add = j->bias ? j->bias[n0 + i] : 0.0f;
      for (int64_t m = 0; m < j->M; m++) acc[m][i] = dots[m] + add;
    }
    for (int64_t m = 0; m < j->M; m++)
      ml_convert(acc[m], ML_FLOAT32, (uint8_t *)j->out + (m * j->N + n0) * (int64_t)oe, j->odt, w);
  }
}

void ml_few_rows_run(const ml_few_rows_job *j, int64_t cost) {
  ml_parallel_for((j->N + FEW_COLS - 1) / FEW_COLS, FEW_COLS * cost, few_rows_columns, (void *)j);
}
