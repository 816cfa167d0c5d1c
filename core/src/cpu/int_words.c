/* int_words.c: integer weights packed into int32 words, as compressed-tensors' "pack-quantized"
   format stores them (llm-compressor's W4A16 and W8A16 checkpoints: weight_packed). Value i of a
   row sits at bits i * bits of the row's little-endian words, stored + 2^(bits - 1) (unsigned),
   so a 4-bit row is bytes holding values 2j (low nibble) and 2j + 1 (high nibble), and an 8-bit
   row is bytes holding value + 128. ml_unpack_int_words rewrites them into moonload's int4
   (llama.cpp's Q4_0 order: value j of a block of 32 in byte j's low nibble, j + 16 in its high
   one, both + 8) and int8 layouts (cpu/q8.c), exactly: the same integers, only reordered. The
   words are read as bytes, so a view into a mapped file needs no alignment. */
#include "internal.h"

#include <string.h>

enum { BLOCK = 32 };

typedef struct {
  const uint8_t *src;
  uint8_t *dst;
  int64_t row_bytes;            /* in and out: 4 bits keep their bytes, 8 bits too */
  int bits;
  int64_t src_row_stride;       /* bytes between rows of the source */
} unpack_words_job;

static void unpack_word_rows(void *ctx, int64_t begin, int64_t end) {
  const unpack_words_job *j = ctx;
  for (int64_t r = begin; r < end; r++) {
    const uint8_t *s = j->src + r * j->src_row_stride;
    uint8_t *d = j->dst + r * j->row_bytes;
    if (j->bits == 8) {
      for (int64_t i = 0; i < j->row_bytes; i++) d[i] = s[i] ^ 0x80;      /* value + 128 -> int8 value */
      continue;
    }
    for (int64_t b = 0; b < j->row_bytes; b += BLOCK / 2) {
      uint8_t v[BLOCK];
      for (int k = 0; k < BLOCK / 2; k++) {
        v[2 * k] = s[b + k] & 0x0f;
        v[2 * k + 1] = s[b + k] >> 4;
      }
      for (int k = 0; k < BLOCK / 2; k++) d[b + k] = (uint8_t)(v[k] | (v[k + BLOCK / 2] << 4));
    }
  }
}

ml_status ml_unpack_int_words(const ml_tensor *packed, int bits, ml_tensor **out) {
  char s[64];
  if (bits != 4 && bits != 8) return ml_fail(ML_EINVAL, "unpack_int_words: bits must be 4 or 8, got %d", bits);
  ml_device dev = ml_tensor_device(packed);
  if (dev.type != ML_DEVICE_CPU || packed->dtype != ML_INT32 || packed->ndim < 2 ||
      packed->strides[packed->ndim - 1] != 1)
    return ml_fail(ML_EINVAL, "unpack_int_words: expected int32 words (..., words) on the CPU with contiguous rows, "
                   "got %s %s on %s", ml_dtype_name(packed->dtype),
                   ml_shape_str(packed->ndim, packed->shape, s, sizeof s), ml_device_str(dev));
  int64_t rows = 1, words = packed->shape[packed->ndim - 1];
  for (int d = 0; d < packed->ndim - 1; d++) rows *= packed->shape[d];
  /* every leading dim must step by whole rows, so that row r starts r row strides in */
  int64_t expect = packed->strides[packed->ndim - 2];
  for (int d = packed->ndim - 2; d >= 0; d--) {
    if (packed->shape[d] > 1 && packed->strides[d] != expect)
      return ml_fail(ML_EINVAL, "unpack_int_words: the words' leading dims must step by whole rows");
    expect *= packed->shape[d];
  }
  int64_t cols = words * (32 / bits);
  if (bits == 4 && cols % BLOCK != 0)
    return ml_fail(ML_EINVAL, "unpack_int_words: %lld int4 values a row are not whole blocks of %d (moonload's int4 layout)",
                   (long long)cols, BLOCK);
  int64_t shape[ML_MAX_DIMS];
  memcpy(shape, packed->shape, sizeof(int64_t) * (size_t)packed->ndim);
  shape[packed->ndim - 1] = bits == 8 ? cols : cols / 2;
  ml_device cpu = {ML_DEVICE_CPU, 0};
  ML_TRY(ml_tensor_empty(bits == 8 ? ML_INT8 : ML_UINT8, packed->ndim, shape, cpu, out));
  unpack_words_job j = {ml_tensor_data(packed), ml_tensor_data(*out), words * 4, bits,
                        packed->strides[packed->ndim - 2] * 4};
  ml_parallel_for(rows, words * 4, unpack_word_rows, &j);
  return ML_OK;
}
