/* ggml_blocks.c: the weights of llama.cpp's GGUF files in Q8_0 and Q4_0 into moonload's int8 and
   int4 layouts (cpu/q8.c). A GGUF block is a float16 scale followed by its 32 values (Q8_0: 32
   int8; Q4_0: 16 bytes, value j in the low nibble of byte j and value j + 16 in its high one,
   stored + 8): the values are already moonload's, so unpacking copies them out of the blocks and
   widens the scales to float32, exactly. */
#include "internal.h"

#include <string.h>

enum { GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q8_0 = 8, QK = 32 };

typedef struct {
  const uint8_t *src;
  uint8_t *q;
  float *scales;
  int64_t nblocks, block_bytes, value_bytes;     /* per block: in the file, of values */
} unpack_job;

static void unpack_blocks(void *ctx, int64_t begin, int64_t end) {
  const unpack_job *j = ctx;
  for (int64_t b = begin; b < end; b++) {
    const uint8_t *blk = j->src + b * j->block_bytes;
    uint16_t h;
    memcpy(&h, blk, sizeof h);                  /* (little-endian, as GGUF is) */
    j->scales[b] = ml_f16_to_f32(h);
    memcpy(j->q + b * j->value_bytes, blk + 2, (size_t)j->value_bytes);
  }
}

ml_status ml_unpack_ggml_blocks(const void *src, size_t src_bytes, int ggml_type, int64_t rows, int64_t cols,
                                ml_tensor **q, ml_tensor **scales) {
  if (ggml_type != GGML_Q8_0 && ggml_type != GGML_Q4_0)
    return ml_fail(ML_EINVAL, "unpack_ggml_blocks: ggml type %d is not Q8_0 (8) or Q4_0 (2)", ggml_type);
  if (rows < 0 || cols <= 0 || cols % QK != 0)
    return ml_fail(ML_EINVAL, "unpack_ggml_blocks: a %lld x %lld tensor is not in whole blocks of %d along its rows",
                   (long long)rows, (long long)cols, QK);
  int64_t value_bytes = ggml_type == GGML_Q8_0 ? QK : QK / 2, block_bytes = 2 + value_bytes;
  int64_t nblocks = rows * (cols / QK);
  if ((uint64_t)src_bytes != (uint64_t)(nblocks * block_bytes))
    return ml_fail(ML_EINVAL, "unpack_ggml_blocks: %zu bytes do not hold %lld x %lld values in %s blocks (%lld bytes)",
                   src_bytes, (long long)rows, (long long)cols, ggml_type == GGML_Q8_0 ? "Q8_0" : "Q4_0",
                   (long long)(nblocks * block_bytes));
  int64_t qshape[2] = {rows, ggml_type == GGML_Q8_0 ? cols : cols / 2}, sshape[2] = {rows, cols / QK};
  ml_device cpu = {ML_DEVICE_CPU, 0};
  ML_TRY(ml_tensor_empty(ggml_type == GGML_Q8_0 ? ML_INT8 : ML_UINT8, 2, qshape, cpu, q));
  ml_status st = ml_tensor_empty(ML_FLOAT32, 2, sshape, cpu, scales);
  if (st) {
    ml_tensor_release(*q);
    *q = NULL;
    return st;
  }
  unpack_job j = {src, ml_tensor_data(*q), ml_tensor_data(*scales), nblocks, block_bytes, value_bytes};
  ml_parallel_for(nblocks, block_bytes, unpack_blocks, &j);
  return ML_OK;
}
