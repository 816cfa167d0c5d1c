/* moonload.h: the one public header of libmoonload.
 *
 * The core knows nothing of Lua. Everything between the two FFI marker lines is plain C that
 * LuaJIT's ffi.cdef accepts (no preprocessor, no macros); `make` copies it into
 * lua/moonload/cdef.lua. Keep it that way: add enums and functions inside the region, helpers
 * that need the preprocessor outside it.
 *
 * Conventions: fallible functions return ml_status (0 = OK) and write results through out
 * parameters; on failure the message is in ml_last_error(). *_retain / *_release accept NULL and
 * never touch the error buffer. Dimensions are 0-based here (the Lua layer maps 1-based and
 * negative dims). Strides and offsets count elements, sizes count bytes.
 */
#ifndef MOONLOAD_H
#define MOONLOAD_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#if defined(ML_BUILDING)
#define ML_API __attribute__((visibility("default")))
#else
#define ML_API
#endif

#define ML_MAX_DIMS 8
#define ML_ABI_VERSION 1

#ifdef __cplusplus
extern "C" {
#endif

/* ML_FFI_BEGIN */
enum { ML_ABI = 1, ML_MAXDIMS = 8 };

typedef int ml_status;
enum { ML_OK = 0, ML_EINVAL = 1, ML_ENOMEM = 2, ML_EIO = 3, ML_EUNSUPPORTED = 4, ML_EFORMAT = 5 };

typedef enum {
  ML_FLOAT32 = 0, ML_FLOAT16 = 1, ML_BFLOAT16 = 2, ML_FLOAT64 = 3,
  ML_INT64 = 4, ML_INT32 = 5, ML_INT16 = 6, ML_INT8 = 7, ML_UINT8 = 8, ML_BOOL = 9,
  ML_FLOAT8_E4M3FN = 10, ML_FLOAT8_E5M2 = 11,
  ML_DTYPE_COUNT = 12
} ml_dtype;

typedef enum { ML_DEVICE_CPU = 0, ML_DEVICE_META = 1, ML_DEVICE_CUDA = 2 } ml_device_type;

/* A device is a value: type plus index (index is 0 for cpu and meta). */
typedef struct { int32_t type; int32_t index; } ml_device;

typedef struct ml_storage ml_storage;
typedef struct ml_tensor ml_tensor;
typedef struct ml_mapping ml_mapping;

/* --- errors and library ------------------------------------------------------------------ */
ML_API const char *ml_last_error(void);
ML_API int ml_abi_version(void);
ML_API void ml_set_num_threads(int n);
ML_API int ml_get_num_threads(void);

/* --- dtypes ------------------------------------------------------------------------------- */
ML_API size_t ml_dtype_size(ml_dtype dt);
ML_API const char *ml_dtype_name(ml_dtype dt);               /* "float32", ... */
ML_API ml_status ml_dtype_parse(const char *name, ml_dtype *out);
ML_API bool ml_dtype_is_floating(ml_dtype dt);
ML_API ml_dtype ml_dtype_promote(ml_dtype a, ml_dtype b);      /* PyTorch's promotion rules */
/* Converts n contiguous elements between any two dtypes (f16/bf16 round to nearest even). */
ML_API void ml_convert(const void *src, ml_dtype src_dt, void *dst, ml_dtype dst_dt, int64_t n);

/* --- devices ------------------------------------------------------------------------------ */
ML_API ml_status ml_device_parse(const char *name, ml_device *out);  /* "cpu" "meta" "cuda" "cuda:N" */
ML_API void ml_device_name(ml_device dev, char *buf, size_t n);
ML_API bool ml_device_equal(ml_device a, ml_device b);
/* Bytes this library holds on the device now and the most it has held since the last reset. */
ML_API ml_status ml_device_memory(ml_device dev, int64_t *in_use, int64_t *peak);
ML_API ml_status ml_device_reset_peak(ml_device dev);
/* Garbage-collection pressure for the binding: the flag turns non-zero once the bytes allocated
   on a device since the last ml_gc_done pass that device's threshold (cpu: the larger of 64 MiB
   and a quarter of the bytes live then; cuda: the larger of 64 MiB and a quarter of its free
   memory then).
   The binding reads it after each new tensor, collects its garbage, and calls ml_gc_done. */
ML_API volatile int32_t *ml_gc_flag(void);
ML_API void ml_gc_done(void);
/* Caps a device's threshold above at `bytes` (0: no cap), so dead tensors never hold more than
   that beside the live ones: what a memory budget leaves for garbage. Gives the previous cap. */
ML_API ml_status ml_gc_set_cap(ml_device dev, int64_t bytes, int64_t *previous);
/* Freed large CPU blocks kept for reuse (not counted as in use), and giving them back to the OS. */
ML_API int64_t ml_cpu_cached_bytes(void);
ML_API void ml_cpu_empty_cache(void);
ML_API int64_t ml_cpu_cache_limit(void);               /* the most the cache keeps (MOONLOAD_CPU_CACHE_MB) */
ML_API int64_t ml_cpu_cache_set_limit(int64_t bytes);  /* sets it (0: no cache), drops the excess; gives the previous */
ML_API int ml_cuda_device_count(void);                 /* 0 when no driver or no GPU */
/* Free and total bytes of a GPU as the planner sees them (the caching allocator's idle blocks count as free). */
ML_API ml_status ml_cuda_mem_get_info(int device, int64_t *free_bytes, int64_t *total_bytes);
/* What torch.cuda.get_device_properties reports. */
typedef struct {
  char name[256];
  int64_t total_memory;
  int major, minor;              /* compute capability */
  int multi_processor_count;
} ml_cuda_props;
ML_API ml_status ml_cuda_get_device_properties(int device, ml_cuda_props *out);
/* Waits for all queued work on a GPU (timing, benchmarks). */
ML_API ml_status ml_cuda_synchronize(int device);
/* The caching allocator of a GPU: bytes held in idle blocks, and giving them back to the driver
   (for other processes; moonload itself reuses them). */
ML_API ml_status ml_cuda_cached_bytes(int device, int64_t *out);
ML_API ml_status ml_cuda_empty_cache(int device);

/* --- storages ----------------------------------------------------------------------------- */
/* Fresh bytes on a device (cpu: 64-byte aligned, uninitialised; meta: no bytes at all). */
ML_API ml_status ml_storage_new(ml_device dev, size_t nbytes, ml_storage **out);
/* Pinned (page-locked) host memory when a CUDA driver is present, plain host memory otherwise. */
ML_API ml_status ml_storage_new_pinned(size_t nbytes, ml_storage **out);
/* Borrowed view of [offset, offset+nbytes) of a mapping; keeps the mapping alive. */
ML_API ml_status ml_storage_from_mapping(ml_mapping *map, size_t offset, size_t nbytes, ml_storage **out);
ML_API void ml_storage_retain(ml_storage *s);
ML_API void ml_storage_release(ml_storage *s);
ML_API void *ml_storage_data(const ml_storage *s);            /* NULL for meta */
ML_API size_t ml_storage_nbytes(const ml_storage *s);
ML_API ml_device ml_storage_device(const ml_storage *s);
ML_API bool ml_storage_is_borrowed(const ml_storage *s);       /* bytes belong to a file mapping */
ML_API bool ml_storage_is_pinned(const ml_storage *s);         /* page-locked host memory (CUDA) */

/* --- file mappings (read-only, whole file) ------------------------------------------------ */
ML_API ml_status ml_mapping_open(const char *path, ml_mapping **out);
ML_API void ml_mapping_retain(ml_mapping *m);
ML_API void ml_mapping_release(ml_mapping *m);
ML_API const uint8_t *ml_mapping_data(const ml_mapping *m);
ML_API size_t ml_mapping_size(const ml_mapping *m);
ML_API const char *ml_mapping_path(const ml_mapping *m);
/* Where a tensor's data comes from when it is a view of a mapped file (a checkpoint loaded
   zero-copy): the file's path, the byte offset of its first element, and the file's size and
   modification time (ns) now. ML_EINVAL when its storage is not a file mapping. */
ML_API ml_status ml_tensor_file_source(const ml_tensor *t, const char **path, uint64_t *offset, uint64_t *file_size,
                                       int64_t *mtime_ns);
/* Checks the file still has its mapped size (a truncated file would SIGBUS on access). */
ML_API ml_status ml_mapping_check(const ml_mapping *m);
/* Page-cache hints over a byte range: 0 = WILLNEED (prefetch), 1 = DONTNEED (drop resident pages). */
ML_API ml_status ml_mapping_advise(const ml_mapping *m, size_t offset, size_t nbytes, int advice);
/* A tensor read once and no longer needed in memory (a checkpoint's words rewritten into another
   layout): the whole pages of a file mapping under its elements leave the process (MADV_DONTNEED;
   the file's page cache keeps them). Returns the bytes dropped: 0 for a tensor not in a mapping. */
ML_API int64_t ml_tensor_drop_mapped_pages(const ml_tensor *t);

/* --- tensors: creation and fields --------------------------------------------------------- */
ML_API ml_status ml_tensor_empty(ml_dtype dt, int ndim, const int64_t *shape, ml_device dev, ml_tensor **out);
/* strides NULL = contiguous; offset counts elements of dt. Checks the view fits the storage. */
ML_API ml_status ml_tensor_from_storage(ml_storage *s, int64_t offset, ml_dtype dt, int ndim,
                                        const int64_t *shape, const int64_t *strides, ml_tensor **out);
ML_API void ml_tensor_retain(ml_tensor *t);
ML_API void ml_tensor_release(ml_tensor *t);
ML_API int ml_tensor_ndim(const ml_tensor *t);
ML_API const int64_t *ml_tensor_shape(const ml_tensor *t);
ML_API const int64_t *ml_tensor_strides(const ml_tensor *t);
ML_API int64_t ml_tensor_offset(const ml_tensor *t);
ML_API ml_dtype ml_tensor_dtype(const ml_tensor *t);
ML_API ml_device ml_tensor_device(const ml_tensor *t);
ML_API int64_t ml_tensor_numel(const ml_tensor *t);
ML_API ml_storage *ml_tensor_storage(const ml_tensor *t);     /* borrowed */
ML_API void *ml_tensor_data(const ml_tensor *t);             /* first element; NULL for meta */
ML_API bool ml_tensor_is_contiguous(const ml_tensor *t);

/* --- tensors: views (share storage) ------------------------------------------------------- */
ML_API ml_status ml_tensor_view(const ml_tensor *t, int ndim, const int64_t *shape, ml_tensor **out);
ML_API ml_status ml_tensor_reshape(const ml_tensor *t, int ndim, const int64_t *shape, ml_tensor **out); /* view if possible, else copy */
ML_API ml_status ml_tensor_transpose(const ml_tensor *t, int d0, int d1, ml_tensor **out);
ML_API ml_status ml_tensor_permute(const ml_tensor *t, const int *dims, ml_tensor **out);
ML_API ml_status ml_tensor_narrow(const ml_tensor *t, int dim, int64_t start, int64_t length, ml_tensor **out);
ML_API ml_status ml_tensor_select(const ml_tensor *t, int dim, int64_t index, ml_tensor **out);
ML_API ml_status ml_tensor_unsqueeze(const ml_tensor *t, int dim, ml_tensor **out);
ML_API ml_status ml_tensor_squeeze(const ml_tensor *t, int dim, ml_tensor **out);   /* dim -1: all size-1 dims */
ML_API ml_status ml_tensor_expand(const ml_tensor *t, int ndim, const int64_t *shape, ml_tensor **out); /* -1 keeps a size */
ML_API ml_status ml_tensor_as_strided(const ml_tensor *t, int ndim, const int64_t *shape,
                                      const int64_t *strides, int64_t offset, ml_tensor **out);
/* Reinterprets the bytes as another dtype of the same element size (bfloat16 <-> int16). */
ML_API ml_status ml_tensor_view_dtype(const ml_tensor *t, ml_dtype dt, ml_tensor **out);

/* --- tensors: copies and conversion ------------------------------------------------------- */
/* A copy of cpu tensor t in page-locked (pinned) host memory, which the GPU reads directly
   (t itself, retained, when already pinned); fails when CUDA is not available. */
ML_API ml_status ml_tensor_pin_memory(const ml_tensor *t, ml_tensor **out);
/* Page-locks cpu tensor t's bytes where they lie (CUDA's host registration): no copy and no second
   RAM, and the GPU then reads them directly as it reads pinned memory. A tensor borrowed from a
   checkpoint's mapping locks the whole file mapping (read-only: the pages stay the page cache's);
   one in its own block of 256 KiB or more locks that block. A smaller block shares its pages with
   other allocations and stays pageable: *pinned says which. Unlocked when the block or the mapping
   is freed. Fails when CUDA is not available or the driver refuses. A locked mapping's tensors are
   read-only to the GPU's eye: written afterwards, a page becomes the process's own copy, which the
   DMA does not see. */
ML_API ml_status ml_tensor_pin_memory_in_place(const ml_tensor *t, bool *pinned);
ML_API bool ml_tensor_is_pinned(const ml_tensor *t);
ML_API ml_status ml_tensor_contiguous(const ml_tensor *t, ml_tensor **out);  /* retains t when already contiguous */
ML_API ml_status ml_tensor_clone(const ml_tensor *t, ml_tensor **out);
ML_API ml_status ml_tensor_to(const ml_tensor *t, ml_device dev, ml_dtype dt, ml_tensor **out); /* retains t when nothing changes */
/* dst <- src with broadcasting of src to dst's shape and dtype conversion; any devices. */
ML_API ml_status ml_tensor_copy_(ml_tensor *dst, const ml_tensor *src);
ML_API ml_status ml_tensor_fill_(ml_tensor *t, double value);
/* Contiguous element values as doubles / int64s (for tolist, item, printing). n = numel. */
ML_API ml_status ml_tensor_read_f64(const ml_tensor *t, double *out, int64_t n);
ML_API ml_status ml_tensor_read_i64(const ml_tensor *t, int64_t *out, int64_t n);
/* Fills a tensor from n doubles in row-major order (for ml.tensor{...}). */
ML_API ml_status ml_tensor_write_f64(ml_tensor *t, const double *src, int64_t n);

/* --- ops (all allocate a fresh output) ---------------------------------------------------- */
typedef enum {
  ML_OP_NEG = 0, ML_OP_ABS, ML_OP_SQRT, ML_OP_RSQRT, ML_OP_EXP, ML_OP_LOG, ML_OP_TANH,
  ML_OP_SIGMOID, ML_OP_RELU, ML_OP_GELU, ML_OP_GELU_TANH, ML_OP_SILU, ML_OP_SIN, ML_OP_COS,
  ML_OP_RECIPROCAL, ML_OP_LOGICAL_NOT, ML_OP_SOFTPLUS, ML_OP_UNARY_COUNT
} ml_unary_op;

typedef enum {
  ML_OP_ADD = 0, ML_OP_SUB, ML_OP_MUL, ML_OP_DIV, ML_OP_POW, ML_OP_MAXIMUM, ML_OP_MINIMUM,
  ML_OP_EQ, ML_OP_NE, ML_OP_LT, ML_OP_LE, ML_OP_GT, ML_OP_GE, ML_OP_LOGICAL_AND, ML_OP_LOGICAL_OR,
  ML_OP_BINARY_COUNT
} ml_binary_op;

typedef enum { ML_REDUCE_SUM = 0, ML_REDUCE_MEAN, ML_REDUCE_MAX, ML_REDUCE_MIN, ML_REDUCE_PROD,
               ML_REDUCE_ARGMAX, ML_REDUCE_ARGMIN, ML_REDUCE_COUNT } ml_reduce_op;

ML_API ml_status ml_unary(ml_unary_op op, const ml_tensor *x, ml_tensor **out);
/* Broadcasting a (op) b, PyTorch type promotion; comparisons give bool. */
ML_API ml_status ml_binary(ml_binary_op op, const ml_tensor *a, const ml_tensor *b, ml_tensor **out);
/* a (op) s, or s (op) a when scalar_first. A Lua number does not promote a float tensor's dtype;
   an integer tensor with a non-integral s (or DIV) becomes float32. */
ML_API ml_status ml_binary_scalar(ml_binary_op op, const ml_tensor *a, double s, bool scalar_first, ml_tensor **out);
/* Reduces over ndims dims (ndims 0 = all dims). ARGMAX/ARGMIN need exactly one dim or all. */
ML_API ml_status ml_reduce(ml_reduce_op op, const ml_tensor *x, int ndims, const int *dims, bool keepdim, ml_tensor **out);
/* Values and int64 indices of max (or min) along dim. */
ML_API ml_status ml_max_dim(const ml_tensor *x, int dim, bool keepdim, bool is_min, ml_tensor **values, ml_tensor **indices);
ML_API ml_status ml_topk(const ml_tensor *x, int64_t k, int dim, bool largest, ml_tensor **values, ml_tensor **indices);
ML_API ml_status ml_softmax(const ml_tensor *x, int dim, bool log, ml_tensor **out);
ML_API ml_status ml_cumsum(const ml_tensor *x, int dim, ml_tensor **out);
/* torch.matmul semantics: 1-D, 2-D, batched with broadcasting of batch dims. */
ML_API ml_status ml_matmul(const ml_tensor *a, const ml_tensor *b, ml_tensor **out);
/* x (..., in) @ w(out, in)^T + b(out); b may be NULL. */
ML_API ml_status ml_linear(const ml_tensor *x, const ml_tensor *w, const ml_tensor *b, ml_tensor **out);
/* int8 weights (cpu/q8.c, cuda/q8.cu): w (out, in) floating -> q int8 (out, in) and float32 scales
   (out, in / 32), one per block of 32 along in (max |w| / 127, values rounded to nearest); in must
   be a multiple of 32. */
ML_API ml_status ml_quantize_q8(const ml_tensor *w, ml_tensor **q, ml_tensor **scales);
/* x (..., in) @ (q * scales)^T + b(out), computed in float32; out has x's dtype (float64: float32). */
ML_API ml_status ml_q8_linear(const ml_tensor *x, const ml_tensor *q, const ml_tensor *scales, const ml_tensor *b,
                              ml_tensor **out);
/* int8 rows of any tensor (the key-value cache): x (..., D) floating into q (..., D) int8 and
   scales (..., D / block) float32, views allowed (a cache's slots), a scale per block of the last
   dim as above; dequantize_q8 gives them back as a new contiguous tensor of dtype (float32,
   float16, bfloat16). */
ML_API ml_status ml_quantize_q8_into(const ml_tensor *x, ml_tensor *q, ml_tensor *scales);
ML_API ml_status ml_dequantize_q8(const ml_tensor *q, const ml_tensor *scales, ml_dtype dtype, ml_tensor **out);
/* FP8 checkpoints with block scales (DeepSeek-V3's, transformers' "fp8" quant_method): w (O, I)
   float8_e4m3fn or float8_e5m2, scale_inv (ceil(O / block_o), ceil(I / block_i)) float32 -> a new
   (O, I) tensor of dtype (float32, float16 or bfloat16): w[o][i] * scale_inv[o / block_o][i / block_i]. */
ML_API ml_status ml_dequantize_fp8_blocks(const ml_tensor *w, const ml_tensor *scale_inv, int64_t block_o,
                                          int64_t block_i, ml_dtype dtype, ml_tensor **out);
/* x W^T + b for such a weight, in x's dtype (float32, float16, bfloat16): a few rows on the CPU
   read the float8 bytes directly; more rows, or a GPU, expand the weight and run the GEMM. */
ML_API ml_status ml_fp8_linear(const ml_tensor *x, const ml_tensor *w, const ml_tensor *scale_inv, int64_t block_o,
                               int64_t block_i, const ml_tensor *b, ml_tensor **out);
/* MXFP4 weights (gpt-oss's experts, transformers' "mxfp4" quant_method; cpu/mxfp4.c, cuda/mxfp4.cu):
   blocks uint8 (..., O, G, 16) and scales uint8 (..., O, G). Group g of row o holds 32 values:
   byte j's low nibble is value 2j, its high nibble value 2j + 1, each an e2m1 float (0, .5, 1,
   1.5, 2, 3, 4, 6, then the same negated), times 2^(scale - 127) -> a new contiguous
   (..., O, G * 32) tensor of dtype (float32, float16 or bfloat16), the (out, in) weight of x W^T
   (transformers transposes it for x @ W). Each value is the exact product rounded once to dtype,
   as transformers' (only scales near 255 overflow float32). ggml_order: llama.cpp's order
   instead (GGUF's MXFP4 type): byte j's low nibble is value j, its high nibble value j + 16. */
ML_API ml_status ml_dequantize_mxfp4(const ml_tensor *blocks, const ml_tensor *scales, bool ggml_order, ml_dtype dtype,
                                     ml_tensor **out);
/* x (..., G * 32) W^T + b for blocks (O, G, 16) and scales (O, G), b (O) or NULL, in x's dtype
   (float32, float16, bfloat16): a few rows on the CPU read the packed bytes directly; more rows,
   or a GPU, expand the weight into x's dtype and run the GEMM. */
ML_API ml_status ml_mxfp4_linear(const ml_tensor *x, const ml_tensor *blocks, const ml_tensor *scales,
                                 bool ggml_order, const ml_tensor *b, ml_tensor **out);
/* int4 weights (cpu/q8.c, cuda/q8.cu), half of int8's bytes: w (out, in) floating -> q uint8
   (out, in / 2) and float32 scales (out, in / 32). llama.cpp's Q4_0 layout: in each block of 32,
   byte j holds value j in its low nibble and value j + 16 in its high one, each stored as
   round(w / scale) + 8 in 0..15; the scale is the block's largest-magnitude value / -8 (the
   positive one when both signs reach it), so that value is exact. ml_q4_linear and
   ml_dequantize_q4 read them as ml_q8_linear and ml_dequantize_q8 read int8. */
ML_API ml_status ml_quantize_q4(const ml_tensor *w, ml_tensor **q, ml_tensor **scales);
ML_API ml_status ml_q4_linear(const ml_tensor *x, const ml_tensor *q, const ml_tensor *scales, const ml_tensor *b,
                              ml_tensor **out);
ML_API ml_status ml_dequantize_q4(const ml_tensor *q, const ml_tensor *scales, ml_dtype dtype, ml_tensor **out);
/* How ml_q8_linear and ml_q4_linear meet their input on the CPU: bits 0 widens the weights to
   float (the default), bits 8 rounds the input rows to int8 in blocks of 32 (as ml_quantize_q8
   rounds weights) and multiplies integers, as llama.cpp and PyTorch's dynamic int8 do: faster,
   with a second rounding. Other bits: ML_EINVAL. The GPU kernels keep float activations. */
ML_API ml_status ml_set_quantized_activations(int bits);
ML_API int ml_get_quantized_activations(void);
/* llama.cpp's GGUF blocks (cpu/ggml_blocks.c): rows x cols values of ggml type 8 (Q8_0) or 2 (Q4_0)
   at src (src_bytes, the whole tensor) -> the int8 (Q8_0) or packed int4 (Q4_0) layouts above on
   the CPU, scales widened from float16 to float32: the same values. cols a multiple of 32. */
ML_API ml_status ml_unpack_ggml_blocks(const void *src, size_t src_bytes, int ggml_type, int64_t rows, int64_t cols,
                                       ml_tensor **q, ml_tensor **scales);
/* The block types moonload keeps only as floats, Q4_1 (3), Q5_0 (6), Q5_1 (7) and the K-quants
   Q2_K (10) to Q6_K (14), widened to a new float32 (rows, cols) tensor on the CPU as gguf-py's
   dequantizers do; cols a multiple of the type's block (32, or 256 for the K-quants). */
ML_API ml_status ml_dequantize_ggml(const void *src, size_t src_bytes, int ggml_type, int64_t rows, int64_t cols,
                                    ml_tensor **out);
/* Integer weights packed into int32 words (cpu/int_words.c; compressed-tensors' "pack-quantized"
   weight_packed): int32 (..., W) on the CPU, value i of a row at bits i * bits of its
   little-endian words, stored + 2^(bits - 1) -> bits 4: uint8 (..., W * 4) in the int4 layout
   above (W * 8 values a row, whole blocks of 32); bits 8: int8 (..., W * 4). The same integers. */
ML_API ml_status ml_unpack_int_words(const ml_tensor *packed, int bits, ml_tensor **out);
/* The raw values of int32 words (R, C), unsigned, one a byte (per = 32 / bits a word): packed along
   the columns, U (R, C * per) with U[r][c * per + t] value t of word (r, c); along_rows, U (R * per,
   C) with U[r * per + t][c]. out: U, or U^T with transpose (what GPTQ's and AutoAWQ's (in, out)
   layouts need as (out, in)), contiguous uint8. awq_order (4 bits only): AutoAWQ's GEMM packing,
   value t of each 8 in nibble {0, 4, 1, 5, 2, 6, 3, 7}[t] of its word. */
ML_API ml_status ml_int_words_values(const ml_tensor *packed, int bits, bool awq_order, bool along_rows, bool transpose,
                                     ml_tensor **out);
/* Raw values uint8 (out, in) minus their zero point -> the int4 (bits_out 4: uint8 (out, in / 2))
   or int8 (bits_out 8) layout above. The zero point of a group of in / groups values: zeros[o][g]
   + zero, zeros uint8 (out, groups) with groups dividing in (GPTQ's files store it - 1: zero 1),
   or zero alone when zeros is NULL. A difference outside the output's range is an error naming it.
   in a multiple of 32. */
ML_API ml_status ml_int_values_to_q(const ml_tensor *values, const ml_tensor *zeros, int zero, int bits_out,
                                    ml_tensor **out);
/* ids: integer tensor of 0-based rows; weight (n, d). Out-of-range ids are an error. */
ML_API ml_status ml_embedding(const ml_tensor *ids, const ml_tensor *weight, ml_tensor **out);
/* Normalises over the last nnorm dims; w and b may be NULL. */
ML_API ml_status ml_layer_norm(const ml_tensor *x, int nnorm, const ml_tensor *w, const ml_tensor *b, double eps, ml_tensor **out);
ML_API ml_status ml_rms_norm(const ml_tensor *x, int nnorm, const ml_tensor *w, double eps, ml_tensor **out);
/* q (..., L, E), k (..., S, E), v (..., S, Ev); mask bool (true = keep) or float (added), broadcast
   to (..., L, S); scale <= 0 means 1/sqrt(E). is_causal uses the top-left aligned lower triangle.
   Both may be set (unlike PyTorch's function, whose rule F.scaled_dot_product_attention keeps):
   the mask applies within the triangle, so a bias of shape (..., 1, S) needs no (L, S) copy.
   sinks (may be NULL): one logit per query head (H,), H the size of dim -3 of the output, that
   joins each row's softmax without a value (gpt-oss's attention sinks): the probabilities of the
   keys sum to less than 1, and a row whose keys are all masked gives zeros. */
ML_API ml_status ml_sdpa(const ml_tensor *q, const ml_tensor *k, const ml_tensor *v, const ml_tensor *mask,
                         const ml_tensor *sinks, bool is_causal, double scale, ml_tensor **out);
/* ml_sdpa over int8 keys and values (an int8 key-value cache): k (..., S, E) and v (..., S, Ev)
   int8 with a contiguous last dim, their float32 scales (..., S, E / block) and (..., S, Ev /
   block); the same result as ml_sdpa over the dequantized k and v, reading the int8 bytes (on a
   GPU, a block per query row; a head dim over 512 is dequantized into scratch first). q float32,
   float16 or bfloat16. */
ML_API ml_status ml_sdpa_q8(const ml_tensor *q, const ml_tensor *k, const ml_tensor *k_scales, const ml_tensor *v,
                            const ml_tensor *v_scales, const ml_tensor *mask, const ml_tensor *sinks, bool is_causal,
                            double scale, ml_tensor **out);
/* Rotary position embedding, rotate-half form (transformers' Llama): x * cos + rotate_half(x) * sin
   with rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]); cos and sin broadcast to x's shape. */
ML_API ml_status ml_rotary_embedding(const ml_tensor *x, const ml_tensor *cos, const ml_tensor *sin, ml_tensor **out);
/* The gated delta rule (Qwen3-Next's linear attention; cpu/delta_rule.c, cuda/delta_rule.cu), as
   transformers' torch_recurrent_gated_delta_rule with use_qk_l2norm_in_kernel. q, k (B, T, Hk, Dk),
   v (B, T, Hv, Dv), g, beta (B, T, Hv), each float32, bfloat16 or float16; value head h reads key
   head h / (Hv / Hk). state (B, Hv, Dk, Dv) float32 contiguous holds the initial state and is
   overwritten with the final one; out (B, T, Hv, Dv), float32, bfloat16 or float16, is written.
   Per token, in float32: q and k L2-normalized (x * rsqrt(sum x^2 + 1e-6)), q times Dk^-0.5;
   S *= exp(g_t); delta = (v_t - k S) * beta_t; S += k^T delta; out_t = q S. Any strides but a
   unit-stride last dim for q, k, v and out; g and beta any strides. Caller-allocated out (no
   fresh output): the state is updated in place anyway. */
ML_API ml_status ml_gated_delta_rule(const ml_tensor *q, const ml_tensor *k, const ml_tensor *v, const ml_tensor *g,
                                     const ml_tensor *beta, ml_tensor *state, ml_tensor *out);
/* The selective state-space scan of Mamba layers (cpu/ssm_scan.c, cuda/ssm_scan.cu), as
   transformers' mamba2_selective_state_update (Mamba-2) or mamba_selective_scan (Mamba-1) token
   after token. x (B, T, H, P); dt, the step already discretized, (B, T, H) per head or
   (B, T, H, P) per row; A, the decay rate (negative), (H) or (H, P, N); B and C (B, T, G, N); D
   (H) or (H, P), or NULL for none; each float32, bfloat16 or float16; head h reads group
   h / (H / G). state (B, H, P, N) float32 contiguous holds the initial state and is overwritten
   with the final one; out (B, T, H, P) is written. Per token, in float32:
   S[p][n] = exp(dt[p] A[p][n]) S[p][n] + dt[p] x[p] B[n]; out[p] = S[p] . C + D[p] x[p]. Any
   strides but a unit-stride last dim for x, B, C and out; dt, A and D any strides. With A_log, A
   holds the models' A_log and the rates are -exp(A_log), taken as the kernel reads them (Mamba-1's
   (1, P, N) rates are as many values as a token's state: a pass of their own each call). */
ML_API ml_status ml_ssm_scan(const ml_tensor *x, const ml_tensor *dt, const ml_tensor *A, const ml_tensor *B,
                             const ml_tensor *C, const ml_tensor *D, bool A_log, ml_tensor *state, ml_tensor *out);
ML_API ml_status ml_where(const ml_tensor *cond, const ml_tensor *a, const ml_tensor *b, ml_tensor **out);
ML_API ml_status ml_masked_fill(const ml_tensor *x, const ml_tensor *mask, double value, ml_tensor **out);
/* Lower (upper=false) or upper triangle of the last two dims, diagonal offset k. */
ML_API ml_status ml_triangle(const ml_tensor *x, int64_t k, bool upper, ml_tensor **out);
ML_API ml_status ml_cat(int n, ml_tensor *const *tensors, int dim, ml_tensor **out);
ML_API ml_status ml_gather(const ml_tensor *x, int dim, const ml_tensor *index, ml_tensor **out);
/* Selects rows along dim by a 1-D integer index tensor. */
ML_API ml_status ml_index_select(const ml_tensor *x, int dim, const ml_tensor *index, ml_tensor **out);
ML_API ml_status ml_equal(const ml_tensor *a, const ml_tensor *b, bool *out);
ML_API ml_status ml_allclose(const ml_tensor *a, const ml_tensor *b, double rtol, double atol, bool equal_nan, bool *out);
ML_API ml_status ml_arange(double start, double end, double step, ml_dtype dt, ml_tensor **out);
/* Random numbers from the library's generator (seeded by ml_manual_seed); fills t in place. */
ML_API void ml_manual_seed(uint64_t seed);
ML_API ml_status ml_uniform_(ml_tensor *t, double low, double high);
ML_API ml_status ml_normal_(ml_tensor *t, double mean, double std);
/* Draws one 0-based index from each row of non-negative weights (..., n) -> int64 (...). */
ML_API ml_status ml_multinomial(const ml_tensor *probs, ml_tensor **out);
/* --- weight streaming (upload.c) ---------------------------------------------------------- */
/* Copies host tensors to a device on a worker thread through pinned, double-buffered staging
   on the device's copy stream, overlapping the compute stream. A cpu destination works too
   (plain memcpy on the worker). */
typedef struct ml_uploader ml_uploader;
ML_API ml_status ml_uploader_new(ml_uploader **out);
ML_API void ml_uploader_release(ml_uploader *u);      /* finishes queued uploads first */
/* Queues dst <- src (both contiguous, same dtype and shape; src in host memory). */
ML_API ml_status ml_uploader_submit(ml_uploader *u, ml_tensor *dst, ml_tensor *src, int *ticket);
/* Kernels queued after this call see the upload complete (cuda); the host waits only until the
   copies are queued. For a cpu destination: returns when the bytes are there. */
ML_API ml_status ml_uploader_wait(ml_uploader *u, int ticket);
ML_API void ml_uploader_stats(ml_uploader *u, int64_t *bytes, int64_t *jobs);
/* Waits that blocked (the copies were not all queued yet), how many of those had no upload queued
   behind the awaited one (the copy engine then idles until the host submits more: a pipeline
   drain), the nanoseconds the host spent blocked, and the nanoseconds the worker spent on jobs
   (a transfer-bound forward that took longer lost the difference with the copy engine idle). */
ML_API void ml_uploader_timing(ml_uploader *u, int64_t *waits, int64_t *drains, int64_t *wait_ns, int64_t *busy_ns);
/* ML_FFI_END */

/* ML_FFI_BEGIN safetensors */
/* --- safetensors files (safetensors.c) ------------------------------------------------------
 * A handle is a validated header over a read-only mapping of the file. Tensors are listed sorted
 * by name (byte order); index i below is that order. Tensors handed out keep the mapping alive
 * on their own, so releasing the handle never invalidates them. */
typedef struct ml_safetensors ml_safetensors;

/* One header entry, as a value record; strings and shape are borrowed from the handle. */
typedef struct {
  const char *name;
  const char *st_dtype;      /* the file's dtype name: "F32", "BF16", "U16", "F8_E4M3", ... */
  int32_t dtype;             /* the moonload ml_dtype, or -1 when moonload has no such dtype */
  int32_t ndim;
  const int64_t *shape;
  uint64_t begin, end;       /* data_offsets: relative to the data section, end exclusive */
  uint64_t file_offset;      /* absolute byte offset of begin in the file */
} ml_safetensors_info;

/* Maps and validates path (every check of the format; the message names file and tensor). */
ML_API ml_status ml_safetensors_open(const char *path, ml_safetensors **out);
/* Same checks over a copy of size bytes; label names the bytes in messages (fuzzing, tests). */
ML_API ml_status ml_safetensors_open_memory(const uint8_t *data, size_t size, const char *label,
                                            ml_safetensors **out);
ML_API void ml_safetensors_retain(ml_safetensors *h);
ML_API void ml_safetensors_release(ml_safetensors *h);
ML_API const char *ml_safetensors_path(const ml_safetensors *h);
ML_API int64_t ml_safetensors_count(const ml_safetensors *h);
ML_API ml_status ml_safetensors_info_at(const ml_safetensors *h, int64_t i, ml_safetensors_info *out);
/* Index of the tensor called name; ML_EINVAL with "no tensor named ..." when there is none. */
ML_API ml_status ml_safetensors_find(const ml_safetensors *h, const char *name, int64_t *index);
/* -1 when the header has no __metadata__, else its number of entries (in file order). */
ML_API int64_t ml_safetensors_metadata_count(const ml_safetensors *h);
ML_API const char *ml_safetensors_metadata_key(const ml_safetensors *h, int64_t i);
ML_API const char *ml_safetensors_metadata_value(const ml_safetensors *h, int64_t i);
/* Tensor i on dev. cpu: a zero-copy view of the mapping when its file offset is aligned to the
 * element size (ml_storage_is_borrowed is then true), a copy otherwise; meta: shape only; cuda:
 * a copy. Rechecks the file size first, so a file truncated since open fails cleanly. */
ML_API ml_status ml_safetensors_tensor(ml_safetensors *h, int64_t i, ml_device dev, ml_tensor **out);
/* Page-cache hint for tensor i's bytes: 0 = WILLNEED (prefetch), 1 = DONTNEED (drop resident
 * pages, e.g. after copying them to a GPU). No-op for an in-memory handle. */
ML_API ml_status ml_safetensors_advise(const ml_safetensors *h, int64_t i, int advice);
/* Writes n tensors (any device but meta; non-contiguous ones are written contiguous) and nmeta
 * string pairs (nmeta -1: no __metadata__ at all; 0: an empty one) in the reference layout, to
 * a temporary file in path's directory that is fsync'd and renamed over path: on failure path
 * is untouched and no temporary file is left. */
ML_API ml_status ml_safetensors_save(const char *path, int64_t n, const char *const *names,
                                     ml_tensor *const *tensors, int64_t nmeta,
                                     const char *const *meta_keys, const char *const *meta_values);
/* For tests of the failure path: saves fail once they have written nbytes (-1 = never). */
ML_API void ml_safetensors_debug_fail_after(int64_t nbytes);
/* ML_FFI_END safetensors */

/* ML_FFI_BEGIN hookrt */
/* The hook runtime (hookrt.c): materializes a module's weights on its execution device before
 * forward and releases them after, shares copies of tied weights, learns the order groups run in
 * and prefetches the next group's mapped pages on a worker thread. */
typedef struct ml_hookrt ml_hookrt;
typedef struct {
  int64_t materialize_calls, releases;
  int64_t bytes_viewed;      /* handed out as they are (zero copy) */
  int64_t bytes_copied;      /* copied to the device or converted, once per shared tensor */
  int64_t tied_hits;         /* materializations served by a copy another group already made */
  int64_t bytes_dropped;     /* mapped bytes advised out of the process after release */
  int64_t prefetch_jobs, prefetch_bytes, prefetch_pages;
  int64_t shared_copies;     /* copies alive now */
  int64_t bytes_streamed;    /* of bytes_copied, streamed ahead on the copy stream (cuda groups) */
  int64_t streams_dropped;   /* uploads made ahead but not used (the order changed) */
  int64_t groups;            /* groups registered now (a hook's group is freed with the hook) */
  int64_t streams_pending;   /* uploads made ahead and not yet taken or dropped */
  int64_t streams_reclaimed; /* uploads made ahead, given back because the device ran out of memory */
  int64_t stream_window;     /* bytes streamed ahead now: the window, narrowed after running out of
                                memory (-1: stopped; set_stream_window starts over) */
  int64_t bytes_mapped;      /* mapped bytes of the groups registered now: what the auto drop
                                level compares with its threshold */
  int64_t stream_waits;      /* materializations that blocked on an upload streamed ahead */
  int64_t stream_drains;     /* of those, with no upload queued behind it (the copy engine ran dry) */
  int64_t stream_wait_ns;    /* time the host spent blocked there */
  int64_t stream_busy_ns;    /* time the upload worker spent copying (staging and queueing DMAs) */
} ml_hookrt_stats;
ML_API ml_status ml_hookrt_new(ml_hookrt **out);
ML_API void ml_hookrt_release(ml_hookrt *rt);
/* prefetch: 0 off, 1 on; drop: 0 keep pages, 1 MADV_DONTNEED (RSS), 2 also evict from the page
   cache, 3 auto (1 once the groups' mapped bytes exceed a threshold, else 0). -1 keeps the
   current value. Defaults: prefetch 1, drop 3 with the threshold at half the physical memory. */
ML_API ml_status ml_hookrt_configure(ml_hookrt *rt, int prefetch, int drop);
ML_API ml_status ml_hookrt_set_auto_drop(ml_hookrt *rt, int64_t above_bytes);
/* Prefetch reads ahead along the learned order: the next group, then on while the mapped bytes
   read ahead stay within lookahead_bytes (default 32 MiB); groups with fewer mapped bytes than
   min_bytes (default 64 KiB) are not worth a worker wake-up. -1 keeps a value. */
ML_API ml_status ml_hookrt_set_prefetch_window(ml_hookrt *rt, int64_t min_bytes, int64_t lookahead_bytes);
/* Streaming to a cuda device uploads ahead along the learned order: the next group, then on while
   the host-resident bytes in flight stay within bytes (default 64 MiB; 0: one group ahead). */
ML_API ml_status ml_hookrt_set_stream_window(ml_hookrt *rt, int64_t bytes);
/* Blocks until the prefetch worker has nothing queued. */
ML_API ml_status ml_hookrt_wait(ml_hookrt *rt);
/* A forward starts (the model's outermost hook runs): reads ahead the groups the learned order
   expects first, also those read ahead at the end of the last forward whose pages may have left
   the page cache since. */
ML_API ml_status ml_hookrt_forward_begins(ml_hookrt *rt);
ML_API ml_status ml_hookrt_group_new(ml_hookrt *rt, ml_device exec_device, int *out);
/* Adds a source tensor (retained) that materializes as dtype dt on the group's device. */
ML_API ml_status ml_hookrt_group_add(ml_hookrt *rt, int group, ml_tensor *src, ml_dtype dt);
ML_API ml_status ml_hookrt_group_free(ml_hookrt *rt, int group);
ML_API int ml_hookrt_group_size(const ml_hookrt *rt, int group);      /* -1: no such group */
ML_API int ml_hookrt_next(const ml_hookrt *rt, int group);            /* learned successor or -1 */
/* outs[i] (new references) = the group's tensors on its device, in the order they were added. */
ML_API ml_status ml_hookrt_materialize(ml_hookrt *rt, int group, ml_tensor **outs, int n);
ML_API ml_status ml_hookrt_release_group(ml_hookrt *rt, int group);
ML_API void ml_hookrt_get_stats(ml_hookrt *rt, ml_hookrt_stats *out);
/* ML_FFI_END hookrt */

#ifdef __cplusplus
}
#endif

#endif /* MOONLOAD_H */
