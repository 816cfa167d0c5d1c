/* internal.h: private declarations shared by the core's C files (never installed). */
#ifndef ML_INTERNAL_H
#define ML_INTERNAL_H

#define ML_BUILDING 1
#include "moonload.h"

#include <stdatomic.h>
#include <string.h>
#include <math.h>

// --- errors -------------------------------------------------------------------------------

/* ml_fail(status, fmt, ...) (declared in cuda_api.h, exported for the CUDA library) formats the
   thread-local message and returns status, so callers write `return ml_fail(...)`. */
#include "cuda_api.h"
/* As ml_fail, the message formatted from fmt followed by ": " and the message already set (the
   reason a call below gave). */
ml_status ml_fail_context(ml_status status, const char *fmt, ...);
/* Propagate a failed status unchanged (the message is already set). */
#define ML_TRY(expr) do { ml_status ml_try_s_ = (expr); if (ml_try_s_ != ML_OK) return ml_try_s_; } while (0)

/* "[2, 3]" into buf; for messages. Returns buf. */
const char *ml_shape_str(int ndim, const int64_t *shape, char *buf, size_t n);
#define ML_SHAPE_BUF 128
/* "cuda:0" etc. into a static-per-thread ring of buffers; for messages only. */
const char *ml_device_str(ml_device dev);

// --- devices and memory accounting --------------------------------------------------------

void ml_device_account(ml_device dev, int64_t delta);   /* thread-safe; updates peak */
/* Owners of device memory that can be given back on demand (the hook runtime's uploads streamed
   ahead) register here; ml_cuda_reclaim (cuda_api.h) asks each of them, in turn, for memory on a
   cuda device that is out of memory. fn returns the bytes it released. */
typedef size_t (*ml_reclaim_fn)(void *ctx, int cuda_device);
ml_status ml_reclaimer_add(ml_reclaim_fn fn, void *ctx);
void ml_reclaimer_remove(ml_reclaim_fn fn, void *ctx);
static inline ml_device ml_cpu(void) { ml_device d = {ML_DEVICE_CPU, 0}; return d; }
static inline ml_device ml_meta(void) { ml_device d = {ML_DEVICE_META, 0}; return d; }

// --- storages -----------------------------------------------------------------------------

/* How a storage's bytes are freed: one small vtable per owner kind. */
typedef struct ml_storage_backend {
  const char *name;
  void (*free_bytes)(ml_storage *s);   /* NULL: nothing to free (meta, borrowed) */
} ml_storage_backend;

struct ml_storage {
  atomic_int refcount;
  ml_device device;
  void *data;                          /* owned per backend; NULL for meta */
  size_t nbytes;
  const ml_storage_backend *backend;
  ml_mapping *mapping;                 /* owned reference when borrowed from a file mapping */
  bool accounted;                      /* counted in the device's bytes in use */
  bool registered;                     /* cpu bytes page-locked where they lie (unlocked on free) */
};

/* As ml_storage_new, but on a cuda device only from memory free now (alloc_if_free): for
   allocations that may fail quietly rather than stall the device. */
ml_status ml_storage_new_if_free(ml_device dev, size_t nbytes, ml_storage **out);
/* Page-locks s's bytes where they lie (ml_tensor_pin_memory_in_place); *pinned says whether it
   could (a small block shares its pages and stays pageable). */
ml_status ml_storage_pin_in_place(ml_storage *s, bool *pinned);

struct ml_mapping {
  atomic_int refcount;
  int fd;
  uint8_t *data;                       /* owned: munmap on last release */
  size_t size;
  char *path;                          /* owned */
  atomic_int registered;               /* 1: page-locked whole (read-only) for CUDA, unlocked on release;
                                          2: being locked */
};

// --- tensors ------------------------------------------------------------------------------

struct ml_tensor {
  atomic_int refcount;
  ml_dtype dtype;
  int ndim;
  int64_t shape[ML_MAX_DIMS];
  int64_t strides[ML_MAX_DIMS];        /* elements */
  int64_t offset;                      /* elements from the storage start */
  ml_storage *storage;                 /* owned reference */
};

/* New tensor header over s (retained), no checks; for internal callers that computed a valid view. */
ml_status ml_tensor_wrap(ml_storage *s, int64_t offset, ml_dtype dt, int ndim, const int64_t *shape,
                         const int64_t *strides, ml_tensor **out);
/* ml_tensor_empty through ml_storage_new_if_free. */
ml_status ml_tensor_empty_if_free(ml_dtype dt, int ndim, const int64_t *shape, ml_device dev, ml_tensor **out);
int64_t ml_shape_numel(int ndim, const int64_t *shape);
void ml_contiguous_strides(int ndim, const int64_t *shape, int64_t *strides);
/* Normalises a 0-based dim that may be negative (-1 = last); fails naming fn when out of range. */
ml_status ml_norm_dim(const char *fn, int dim, int ndim, int *out);
/* Broadcast shape of a and b (PyTorch rules); fails naming fn and both shapes. */
ml_status ml_broadcast_shape(const char *fn, int nda, const int64_t *sa, int ndb, const int64_t *sb,
                             int *ndo, int64_t *so);
/* Strides of t viewed at the broadcast shape (ndo, so): 0 on broadcast dims. */
void ml_broadcast_strides(const ml_tensor *t, int ndo, const int64_t *so, int64_t *strides);
/* Common checks: all tensors on the same real device (names the fn and both devices). */
ml_status ml_check_same_device(const char *fn, const ml_tensor *a, const ml_tensor *b);
ml_status ml_check_not_meta(const char *fn, const ml_tensor *t);

// --- dtype helpers ------------------------------------------------------------------------

static inline float ml_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) bits = sign;
    else {                               /* subnormal: renormalise */
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      man &= 0x3ff;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);
  else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  float f; memcpy(&f, &bits, 4); return f;
}

static inline uint16_t ml_f32_to_f16(float f) {
  uint32_t x; memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 | ((ax >> 13) & 0x3ff) : 0));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);            /* rounds to inf */
  if (ax < 0x38800000u) {                                             /* subnormal or zero */
    if (ax < 0x33000000u) return (uint16_t)sign;                      /* < half the smallest subnormal */
    uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
    /* value = m * 2^(e-150); in units of 2^-24 that is m >> (126 - e), rounded to nearest even */
    uint32_t shift = 126 - e;
    uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    uint32_t r = m >> shift;
    if (rem > half || (rem == half && (r & 1))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ax - 0x38000000u;                                      /* rebias 127 -> 15, keep mantissa */
  uint32_t rem = r & 0x1fff;
  r >>= 13;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
  return (uint16_t)(sign | r);
}

static inline float ml_bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16; float f; memcpy(&f, &bits, 4); return f;
}

static inline uint16_t ml_f32_to_bf16(float f) {
  uint32_t x; memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);   /* quiet NaN */
  x += 0x7fff + ((x >> 16) & 1);                                             /* nearest even */
  return (uint16_t)(x >> 16);
}

/* Element i of a typed buffer as double / store double into element i. */
double ml_load_f64(const void *p, ml_dtype dt, int64_t i);
/* The 256 values of a float8 dtype's bytes (ML_FLOAT8_E4M3FN or ML_FLOAT8_E5M2). */
const float *ml_fp8_table(ml_dtype dt);
void ml_store_f64(void *p, ml_dtype dt, int64_t i, double v);

// --- strided iteration ----------------------------------------------------------------------

/* Walks the outer dims of up to 4 strided operands sharing one shape, row by row: each call to
 * ml_iter_next gives the element offset of every operand for the start of the next inner row
 * (the last dim). Typical use:
 *   ml_iter it; ml_iter_init(&it, ndim, shape, 2, (const int64_t*[]){so, sa});
 *   while (ml_iter_next(&it)) { kernel(out + it.off[0], a + it.off[1], it.inner, it.inner_stride...); }
 */
typedef struct {
  int ndim, nops;
  int64_t shape[ML_MAX_DIMS];
  int64_t strides[4][ML_MAX_DIMS];
  int64_t idx[ML_MAX_DIMS];
  int64_t off[4];                 /* element offsets of the current row's first element */
  int64_t inner;                  /* length of the inner row (last dim; 1 for 0-d) */
  int64_t inner_stride[4];
  int64_t rows_left;
  bool started;
} ml_iter;
void ml_iter_init(ml_iter *it, int ndim, const int64_t *shape, int nops, const int64_t *const *strides);
bool ml_iter_next(ml_iter *it);

// --- threads ------------------------------------------------------------------------------

/* Work split: run fn(ctx, begin, end) over [0, n) on up to ml_get_num_threads() threads when
 * n * cost_per_item is large enough to pay for it, else inline. */
typedef void (*ml_parallel_fn)(void *ctx, int64_t begin, int64_t end);
void ml_parallel_for(int64_t n, int64_t cost_per_item, ml_parallel_fn fn, void *ctx);

// --- allocation ---------------------------------------------------------------------------

void *ml_aligned_alloc(size_t nbytes);    /* 64-byte aligned (page-aligned from 256 KiB); NULL on
                                             failure; nbytes 0 ok */
void ml_aligned_free(void *p);
/* CPU storage bytes through the block cache (cpu_cache.c); free needs the size allocated. */
/* Whether a block ml_cpu_alloc(nbytes) gives owns whole pages (page-aligned, a page multiple long:
   blocks of 256 KiB and more), and then how long it is. */
bool ml_cpu_block_pages(size_t nbytes, size_t *span);
void *ml_cpu_alloc(size_t nbytes);
void ml_cpu_free(void *p, size_t nbytes);

// --- backends -----------------------------------------------------------------------------

/* The CUDA side lives in libmoonload_cuda.so, opened on first use of a cuda device; cuda_api.h
 * is the table it fills in. NULL entries mean "not on this device" (callers fail clearly). */
/* The loaded CUDA backend, or NULL with the error set (no library, no driver, no GPU). */
const ml_cuda_api *ml_cuda(void);

#endif /* ML_INTERNAL_H */
