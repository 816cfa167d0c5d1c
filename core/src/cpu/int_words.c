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

/* --- raw values and zero points (asymmetric checkpoints, AutoAWQ's order) ------------------- */

/* Word c of a row, little-endian, read byte by byte (a mapped file's words need no alignment). */
static inline uint32_t word_at(const uint8_t *row, int64_t c) {
  const uint8_t *b = row + 4 * c;
  return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

/* AutoAWQ's GEMM packing: value t of each 8 sits in nibble AWQ_NIBBLE[t] of its word. */
static const int AWQ_NIBBLE[8] = {0, 4, 1, 5, 2, 6, 3, 7};

typedef struct {
  const uint8_t *src;
  uint8_t *dst;
  int64_t R, C, src_row_stride;           /* words (R, C); bytes between rows of words */
  int64_t UR, UC;                         /* the unpacked matrix U (UR, UC) */
  int bits, per;
  bool awq, along_rows, transpose;
} word_values_job;

enum { WORD_BLOCK = 16 };                 /* words a task takes side by side (a cache line) */

/* Value t of word (r, c) is U[r][c * per + t] (packed along columns) or U[r * per + t][c] (along
   rows); it goes to U's place, or U^T's. Tasks split what they write: blocks of word rows, or (for
   U^T) blocks of word columns, whose rows of words are read 16 words at a time. */
/* U^T of values packed along columns (AutoAWQ's qweight (in, out / 8) as (out, in)): a tile of 64
   word rows x 16 word columns gathers first, so each of its out rows is written 64 bytes at a time. */
enum { TILE_ROWS = 64 };

static void word_value_tiles(const word_values_job *j, int64_t c0, int64_t c1) {
  uint8_t tile[WORD_BLOCK * 8][TILE_ROWS];
  int mask = (1 << j->bits) - 1;
  for (int64_t r0 = 0; r0 < j->R; r0 += TILE_ROWS) {
    int64_t nr = j->R - r0 < TILE_ROWS ? j->R - r0 : TILE_ROWS;
    for (int64_t r = 0; r < nr; r++) {
      const uint8_t *s = j->src + (r0 + r) * j->src_row_stride;
      for (int64_t c = c0; c < c1; c++) {
        uint32_t word = word_at(s, c);
        for (int t = 0; t < j->per; t++) {
          int slot = j->awq ? AWQ_NIBBLE[t] : t;
          tile[(c - c0) * j->per + t][r] = (uint8_t)((word >> (slot * j->bits)) & (uint32_t)mask);
        }
      }
    }
    for (int64_t u = 0; u < (c1 - c0) * j->per; u++) memcpy(j->dst + (c0 * j->per + u) * j->UR + r0, tile[u], (size_t)nr);
  }
}

static void word_value_blocks(void *ctx, int64_t begin, int64_t end) {
  const word_values_job *j = ctx;
  int mask = (1 << j->bits) - 1;
  int64_t r0 = 0, r1 = j->R, c0 = 0, c1 = j->C;
  if (j->transpose) {
    c0 = begin * WORD_BLOCK;
    c1 = end * WORD_BLOCK < j->C ? end * WORD_BLOCK : j->C;
    if (!j->along_rows) {
      for (int64_t c = c0; c < c1; c += WORD_BLOCK) word_value_tiles(j, c, c + WORD_BLOCK < c1 ? c + WORD_BLOCK : c1);
      return;
    }
  } else {
    r0 = begin;
    r1 = end;
  }
  for (int64_t r = r0; r < r1; r++) {
    const uint8_t *s = j->src + r * j->src_row_stride;
    for (int64_t c = c0; c < c1; c++) {
      uint32_t word = word_at(s, c);
      for (int t = 0; t < j->per; t++) {
        int slot = j->awq ? AWQ_NIBBLE[t] : t;
        int64_t ui = j->along_rows ? r * j->per + t : r, uj = j->along_rows ? c : c * j->per + t;
        j->dst[j->transpose ? uj * j->UR + ui : ui * j->UC + uj] = (uint8_t)((word >> (slot * j->bits)) & (uint32_t)mask);
      }
    }
  }
}

ml_status ml_int_words_values(const ml_tensor *packed, int bits, bool awq_order, bool along_rows, bool transpose,
                              ml_tensor **out) {
  char s[64];
  if (bits != 4 && bits != 8) return ml_fail(ML_EINVAL, "int_words_values: bits must be 4 or 8, got %d", bits);
  if (awq_order && bits != 4) return ml_fail(ML_EINVAL, "int_words_values: AutoAWQ's order packs 4-bit values, not %d", bits);
  ml_device dev = ml_tensor_device(packed);
  if (dev.type != ML_DEVICE_CPU || packed->dtype != ML_INT32 || packed->ndim != 2 || packed->strides[1] != 1)
    return ml_fail(ML_EINVAL, "int_words_values: expected int32 words (rows, words) on the CPU with contiguous rows, "
                   "got %s %s on %s", ml_dtype_name(packed->dtype), ml_shape_str(packed->ndim, packed->shape, s, sizeof s),
                   ml_device_str(dev));
  int per = 32 / bits;
  int64_t R = packed->shape[0], C = packed->shape[1];
  int64_t UR = along_rows ? R * per : R, UC = along_rows ? C : C * per;
  int64_t shape[2] = {transpose ? UC : UR, transpose ? UR : UC};
  ml_device cpu = {ML_DEVICE_CPU, 0};
  ML_TRY(ml_tensor_empty(ML_UINT8, 2, shape, cpu, out));
  word_values_job j = {ml_tensor_data(packed), ml_tensor_data(*out), R, C, packed->strides[0] * 4, UR, UC, bits, per,
                       awq_order, along_rows, transpose};
  if (transpose)
    ml_parallel_for((C + WORD_BLOCK - 1) / WORD_BLOCK, R * WORD_BLOCK * 4, word_value_blocks, &j);
  else
    ml_parallel_for(R, C * 4, word_value_blocks, &j);
  return ML_OK;
}

typedef struct {
  const uint8_t *values, *zeros;
  uint8_t *dst;
  int64_t K, groups, group;
  int zero, bits_out;
  atomic_llong bad;                       /* first element out of range + 1 (0: none) */
} values_to_q_job;

static void values_to_q_rows(void *ctx, int64_t begin, int64_t end) {
  values_to_q_job *j = ctx;
  int lo = j->bits_out == 4 ? -8 : -128, hi = j->bits_out == 4 ? 7 : 127;
  for (int64_t n = begin; n < end; n++) {
    const uint8_t *v = j->values + n * j->K;
    uint8_t *d = j->dst + n * (j->bits_out == 4 ? j->K / 2 : j->K);
    for (int64_t b = 0; b < j->K; b += BLOCK) {
      int8_t q[BLOCK];
      for (int k = 0; k < BLOCK; k++) {
        int64_t i = b + k;
        int z = (j->zeros ? j->zeros[n * j->groups + i / j->group] : 0) + j->zero;
        int x = (int)v[i] - z;
        if (x < lo || x > hi) {
          long long none = 0;
          atomic_compare_exchange_strong(&j->bad, &none, (long long)(n * j->K + i + 1));
          x = x < lo ? lo : hi;
        }
        q[k] = (int8_t)x;
      }
      if (j->bits_out == 8) {
        memcpy(d + b, q, BLOCK);
      } else {
        for (int k = 0; k < BLOCK / 2; k++)
          d[b / 2 + k] = (uint8_t)((q[k] + 8) | ((q[k + BLOCK / 2] + 8) << 4));
      }
    }
  }
}

ml_status ml_int_values_to_q(const ml_tensor *values, const ml_tensor *zeros, int zero, int bits_out, ml_tensor **out) {
  char s[64], z[64];
  if (bits_out != 4 && bits_out != 8)
    return ml_fail(ML_EINVAL, "int_values_to_q: bits_out must be 4 or 8, got %d", bits_out);
  if (ml_tensor_device(values).type != ML_DEVICE_CPU || values->dtype != ML_UINT8 || values->ndim != 2 ||
      !ml_tensor_is_contiguous(values))
    return ml_fail(ML_EINVAL, "int_values_to_q: expected contiguous uint8 values (out, in) on the CPU, got %s %s",
                   ml_dtype_name(values->dtype), ml_shape_str(values->ndim, values->shape, s, sizeof s));
  int64_t N = values->shape[0], K = values->shape[1], G = 1;
  if (K % BLOCK != 0)
    return ml_fail(ML_EINVAL, "int_values_to_q: in_features %lld is not a multiple of %d", (long long)K, BLOCK);
  if (zeros) {
    G = zeros->ndim == 2 ? zeros->shape[1] : 0;
    if (ml_tensor_device(zeros).type != ML_DEVICE_CPU || zeros->dtype != ML_UINT8 || zeros->ndim != 2 ||
        zeros->shape[0] != N || G <= 0 || K % G != 0 || !ml_tensor_is_contiguous(zeros))
      return ml_fail(ML_EINVAL, "int_values_to_q: zero points %s %s do not go with values %s (contiguous uint8 "
                     "(out, groups), groups dividing in)", ml_dtype_name(zeros->dtype),
                     ml_shape_str(zeros->ndim, zeros->shape, z, sizeof z), ml_shape_str(2, values->shape, s, sizeof s));
  }
  int64_t shape[2] = {N, bits_out == 4 ? K / 2 : K};
  ml_device cpu = {ML_DEVICE_CPU, 0};
  ML_TRY(ml_tensor_empty(bits_out == 4 ? ML_UINT8 : ML_INT8, 2, shape, cpu, out));
  values_to_q_job j = {ml_tensor_data(values), zeros ? ml_tensor_data(zeros) : NULL, ml_tensor_data(*out), K, G,
                       K / G, zero, bits_out, 0};
  ml_parallel_for(N, K, values_to_q_rows, &j);
  long long bad = atomic_load(&j.bad);
  if (bad) {
    ml_tensor_release(*out);
    *out = NULL;
    int64_t i = bad - 1, n = i / K, k = i % K;
    int zp = (zeros ? ((const uint8_t *)ml_tensor_data(zeros))[n * G + k / (K / G)] : 0) + zero;
    return ml_fail(ML_EFORMAT, "int_values_to_q: value %d minus zero point %d at [%lld, %lld] is outside int%d's range",
                   ((const uint8_t *)ml_tensor_data(values))[i], zp, (long long)n, (long long)k, bits_out);
  }
  return ML_OK;
}
