/* ggml_blocks.c: the weights of llama.cpp's GGUF files. Q8_0 and Q4_0 go into moonload's int8 and
   int4 layouts (cpu/q8.c): a block is a float16 scale followed by its 32 values (Q8_0: 32 int8;
   Q4_0: 16 bytes, value j in the low nibble of byte j and value j + 16 in its high one, stored
   + 8), already moonload's values, so unpacking copies them out of the blocks and widens the
   scales to float32, exactly. The other block types moonload reads (Q4_1, Q5_0, Q5_1 and the
   K-quants Q2_K to Q6_K, whose super-blocks of 256 carry 4- to 8-bit sub-block scales) are
   widened to float32 by ml_dequantize_ggml, with the float operations of gguf-py's reference
   dequantizers (gguf/quants.py), for the caller to quantize again. */
#include "internal.h"

#include <stdbool.h>
#include <string.h>

enum { GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7, GGML_Q8_0 = 8, GGML_Q2_K = 10, GGML_Q3_K = 11,
       GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14, QK = 32, QK_K = 256 };

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

// --- widening to float32 --------------------------------------------------------------------------

static float f16_at(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, sizeof h);
  return ml_f16_to_f32(h);
}

/* Q4_K's and Q5_K's 12 bytes of packed 6-bit scales and mins for their 8 sub-blocks. */
static void k_scale_min(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
  for (int j = 0; j < 4; j++) {
    sc[j] = s[j] & 0x3F;
    mn[j] = s[4 + j] & 0x3F;
    sc[4 + j] = (uint8_t)((s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30));
    mn[4 + j] = (uint8_t)((s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30));
  }
}

/* One block of type t at b into y (its values per block). */
static void dequantize_block(int t, const uint8_t *b, float *y) {
  switch (t) {
  case GGML_Q4_1: {
    float d = f16_at(b), m = f16_at(b + 2);
    for (int j = 0; j < 16; j++) {
      y[j] = d * (float)(b[4 + j] & 15) + m;
      y[j + 16] = d * (float)(b[4 + j] >> 4) + m;
    }
    break;
  }
  case GGML_Q5_0:
  case GGML_Q5_1: {
    bool q51 = t == GGML_Q5_1;
    float d = f16_at(b), m = q51 ? f16_at(b + 2) : 0.0f;
    uint32_t qh;
    memcpy(&qh, b + (q51 ? 4 : 2), sizeof qh);
    const uint8_t *qs = b + (q51 ? 8 : 6);
    for (int i = 0; i < 32; i++) {
      int lo = i < 16 ? qs[i] & 15 : qs[i - 16] >> 4;
      int v = lo | (int)(((qh >> i) & 1u) << 4);
      y[i] = q51 ? d * (float)v + m : d * (float)(v - 16);
    }
    break;
  }
  case GGML_Q4_K:
  case GGML_Q5_K: {
    bool q5 = t == GGML_Q5_K;
    float d = f16_at(b), dmin = f16_at(b + 2);
    uint8_t sc[8], mn[8];
    k_scale_min(b + 4, sc, mn);
    const uint8_t *qh = b + 16, *qs = b + (q5 ? 48 : 16);
    for (int s = 0; s < 8; s++) {          /* sub-block s: nibble s % 2 of bytes 32 (s / 2) .. */
      float ds = d * (float)sc[s], dm = dmin * (float)mn[s];
      for (int l = 0; l < 32; l++) {
        int q = (qs[(s / 2) * 32 + l] >> (4 * (s % 2))) & 15;
        if (q5) q |= ((qh[l] >> s) & 1) << 4;
        y[s * 32 + l] = ds * (float)q - dm;
      }
    }
    break;
  }
  case GGML_Q2_K: {                        /* 16 sub-blocks of 16: 4-bit scale and min each */
    const uint8_t *sc = b, *qs = b + 16;
    float d = f16_at(b + 80), dmin = f16_at(b + 82);
    for (int L = 0; L < QK_K; L++) {
      int h = L / 128, k = (L % 128) / 32, i = L % 32, j = L / 16;
      int q = (qs[h * 32 + i] >> (2 * k)) & 3;
      y[L] = (d * (float)(sc[j] & 0xF)) * (float)q - dmin * (float)(sc[j] >> 4);
    }
    break;
  }
  case GGML_Q3_K: {                        /* 16 sub-blocks of 16: 6-bit signed scales */
    const uint8_t *hmask = b, *qs = b + 32, *s = b + 96;
    float d = f16_at(b + 108);
    float dl[16];
    for (int i = 0; i < 16; i++) {
      int lo = (s[i % 8] >> (4 * (i / 8))) & 0xF, hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
      dl[i] = d * (float)((int8_t)(lo | (hi << 4)) - 32);
    }
    for (int L = 0; L < QK_K; L++) {
      int h = L / 128, k = (L % 128) / 32, i = L % 32;
      int ql = (qs[h * 32 + i] >> (2 * k)) & 3;
      int qh = ((hmask[i] >> (L / 32)) & 1) ^ 1;      /* (the offset applies when the bit is 0) */
      y[L] = dl[L / 16] * (float)(ql - (qh << 2));
    }
    break;
  }
  case GGML_Q6_K: {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *scales = (const int8_t *)(b + 192);
    float d = f16_at(b + 208);
    for (int h = 0; h < 2; h++)            /* halves of 128 values */
      for (int i = 0; i < 128; i++) {
        int L = h * 128 + i;
        int lo = (ql[h * 64 + i % 64] >> (4 * (i / 64))) & 15;
        int hi = (qh[h * 32 + i % 32] >> (2 * (i / 32))) & 3;
        y[L] = (d * (float)scales[L / 16]) * (float)((lo | (hi << 4)) - 32);
      }
    break;
  }
  }
}

typedef struct {
  const uint8_t *src;
  float *out;
  int type;
  int64_t block_bytes, block_values;
} widen_job;

static void widen_blocks(void *ctx, int64_t begin, int64_t end) {
  const widen_job *j = ctx;
  for (int64_t b = begin; b < end; b++)
    dequantize_block(j->type, j->src + b * j->block_bytes, j->out + b * j->block_values);
}

ml_status ml_dequantize_ggml(const void *src, size_t src_bytes, int ggml_type, int64_t rows, int64_t cols,
                             ml_tensor **out) {
  static const struct { int type; const char *name; int values, bytes; } kinds[] = {
      {GGML_Q4_1, "Q4_1", QK, 20},   {GGML_Q5_0, "Q5_0", QK, 22},   {GGML_Q5_1, "Q5_1", QK, 24},
      {GGML_Q2_K, "Q2_K", QK_K, 84},
      {GGML_Q3_K, "Q3_K", QK_K, 110}, {GGML_Q4_K, "Q4_K", QK_K, 144},
      {GGML_Q5_K, "Q5_K", QK_K, 176}, {GGML_Q6_K, "Q6_K", QK_K, 210},
  };
  int k = -1;
  for (int i = 0; i < (int)(sizeof kinds / sizeof kinds[0]); i++)
    if (kinds[i].type == ggml_type) k = i;
  if (k < 0)
    return ml_fail(ML_EINVAL, "dequantize_ggml: ggml type %d is not one of Q4_1, Q5_0, Q5_1, Q2_K ... Q6_K (Q8_0 and Q4_0: "
                   "ml_unpack_ggml_blocks)",
                   ggml_type);
  if (rows < 0 || cols <= 0 || cols % kinds[k].values != 0)
    return ml_fail(ML_EINVAL, "dequantize_ggml: a %lld x %lld tensor is not in whole %s blocks of %d along its rows",
                   (long long)rows, (long long)cols, kinds[k].name, kinds[k].values);
  int64_t nblocks = rows * (cols / kinds[k].values);
  if ((uint64_t)src_bytes != (uint64_t)(nblocks * kinds[k].bytes))
    return ml_fail(ML_EINVAL, "dequantize_ggml: %zu bytes do not hold %lld x %lld values in %s blocks (%lld bytes)",
                   src_bytes, (long long)rows, (long long)cols, kinds[k].name, (long long)(nblocks * kinds[k].bytes));
  int64_t shape[2] = {rows, cols};
  ml_device cpu = {ML_DEVICE_CPU, 0};
  ML_TRY(ml_tensor_empty(ML_FLOAT32, 2, shape, cpu, out));
  widen_job j = {src, ml_tensor_data(*out), ggml_type, kinds[k].bytes, kinds[k].values};
  ml_parallel_for(nblocks, kinds[k].values * 2, widen_blocks, &j);
  return ML_OK;
}
