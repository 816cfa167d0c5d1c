/* cuda_api.h: the table that libmoonload_cuda.so fills in and libmoonload.so calls through.
 * Included by C (internal.h) and by CUDA C++ (the .cu files under core/src/cuda), so it uses only the public
 * header. Contract of the op entries: the public ml_* function has already validated its inputs
 * (shapes, dtypes, same cuda device) and allocated the output on that device; the entry only
 * computes. Outputs are contiguous; inputs may be strided. */
#ifndef ML_CUDA_API_H
#define ML_CUDA_API_H

#include "moonload.h"

#ifdef __cplusplus
extern "C" {
#endif

#define ML_CUDA_API_VERSION 16
#define ML_CUDA_Q8_ATTN_MAX_E 512

typedef struct ml_cuda_api {
  int version;
  int (*device_count)(void);
  ml_status (*alloc)(int device, size_t nbytes, void **out);            /* caching allocator */
  /* Only what is free now (a cached block or the driver's free memory): no cache flush, no
     reclaim, no message; for memory that is nice to have (uploads streamed ahead). */
  ml_status (*alloc_if_free)(int device, size_t nbytes, void **out);
  void (*free)(int device, void *p, size_t nbytes);
  ml_status (*alloc_pinned)(size_t nbytes, void **out);
  void (*free_pinned)(void *p);
  /* Page-locks [p, p + nbytes) where it lies (cudaHostRegister; read_only for a file's read-only
     pages) and undoes it (cudaHostUnregister, after the copies queued from it). */
  ml_status (*host_register)(void *p, size_t nbytes, bool read_only);
  void (*host_unregister)(void *p);
  /* kind: 0 host->device, 1 device->host, 2 device->device; ordered on the device's compute
     stream and complete on return */
  ml_status (*memcpy)(int device, void *dst, const void *src, size_t nbytes, int kind);
  ml_status (*mem_info)(int device, size_t *free_bytes, size_t *total_bytes);
  ml_status (*properties)(int device, ml_cuda_props *out);
  /* Elementwise over strided inputs broadcast to out's shape; out dtype as allocated. */
  ml_status (*unary)(ml_unary_op op, const ml_tensor *x, ml_tensor *out);
  ml_status (*binary)(ml_binary_op op, const ml_tensor *a, const ml_tensor *b, ml_tensor *out);
  ml_status (*copy_strided)(ml_tensor *dst, const ml_tensor *src);      /* same device, any dtypes */
  ml_status (*binary_scalar)(ml_binary_op op, const ml_tensor *a, double s, bool scalar_first, ml_tensor *out);
  ml_status (*fill)(ml_tensor *t, double value);
  /* dims: ndims sorted 0-based reduced dims (ndims 0 = all); out holds the kept dims in order. */
  ml_status (*reduce)(ml_reduce_op op, const ml_tensor *x, int ndims, const int *dims, ml_tensor *out);
  ml_status (*softmax)(const ml_tensor *x, int dim, bool log, ml_tensor *out);
  ml_status (*matmul)(const ml_tensor *a, const ml_tensor *b, ml_tensor *out);   /* shapes checked */
  ml_status (*linear)(const ml_tensor *x, const ml_tensor *w, const ml_tensor *b, ml_tensor *out);
  ml_status (*embedding)(const ml_tensor *ids, const ml_tensor *weight, ml_tensor *out);
  ml_status (*layer_norm)(const ml_tensor *x, int nnorm, const ml_tensor *w, const ml_tensor *b, double eps, ml_tensor *out);
  ml_status (*rms_norm)(const ml_tensor *x, int nnorm, const ml_tensor *w, double eps, ml_tensor *out);
  /* k and v may have fewer heads (dim -3) than q, dividing them: grouped-query attention;
     sinks NULL or one logit per query head (ml_sdpa), checked */
  ml_status (*sdpa)(const ml_tensor *q, const ml_tensor *k, const ml_tensor *v, const ml_tensor *mask,
                    const ml_tensor *sinks, bool is_causal, double scale, ml_tensor *out);
  ml_status (*where)(const ml_tensor *cond, const ml_tensor *a, const ml_tensor *b, ml_tensor *out);
  /* Streams for weight movement (upload.c): copies on the device's copy stream, events to order
     the two streams and to let the host reuse a pinned staging buffer. */
  ml_status (*copy_async)(int device, void *dst, const void *src, size_t nbytes, int kind);
  ml_status (*event_record)(int device, bool on_copy_stream, void **event_out);
  ml_status (*event_wait)(int device, bool on_copy_stream, void *event);  /* that stream waits */
  ml_status (*event_sync)(void *event);                                   /* the host waits */
  void (*event_free)(void *event);
  ml_status (*synchronize)(int device);
  /* Indexing. gather and index_select set *bad_index to the first out-of-range index they met
     (INT64_MIN: none), which the public function reports; dims are 0-based and validated. */
  ml_status (*triangle)(const ml_tensor *x, int64_t k, bool upper, ml_tensor *out);
  ml_status (*gather)(const ml_tensor *x, int dim, const ml_tensor *index, ml_tensor *out, int64_t *bad_index);
  ml_status (*index_select)(const ml_tensor *x, int dim, const ml_tensor *index, ml_tensor *out, int64_t *bad_index);
  ml_status (*cumsum)(const ml_tensor *x, int dim, ml_tensor *out);
  /* cos and sin broadcast to x's shape (checked); out contiguous in the promoted dtype. */
  ml_status (*rotary_embedding)(const ml_tensor *x, const ml_tensor *cos, const ml_tensor *sin, ml_tensor *out);
  /* uniform_ (low a, high b) or normal_ (mean a, std b) in place, element i from the counter
     block of philox.h that the CPU would use: seed and first block reserved by the caller. */
  ml_status (*random_fill)(ml_tensor *t, bool normal, double a, double b, uint64_t seed, uint64_t base);
  /* k of dim's elements per line in the CPU's order; values and indices allocated (shape with k). */
  ml_status (*topk)(const ml_tensor *x, int dim, int64_t k, bool largest, ml_tensor *values, ml_tensor *indices);
  /* The caching allocator: idle bytes held, and handing them back to the driver. */
  size_t (*cached_bytes)(int device);
  ml_status (*empty_cache)(int device);
  /* Whether the work before the event's record is done, without waiting. */
  ml_status (*event_query)(void *event, bool *done);
  /* int8 weights (cpu/q8.c's layout); quantize_q8 goes through quantize_q8_into below. */
  ml_status (*q8_linear)(const ml_tensor *x, const ml_tensor *q, const ml_tensor *scales, const ml_tensor *b,
                         ml_tensor *out);
  /* int8 rows (the key-value cache): shapes checked, any strides; out contiguous, allocated. */
  ml_status (*quantize_q8_into)(const ml_tensor *x, ml_tensor *q, ml_tensor *scales);
  ml_status (*dequantize_q8)(const ml_tensor *q, const ml_tensor *scales, ml_tensor *out);
  /* Attention over int8 keys and values (ml_sdpa_q8), checked as sdpa's, head dim E at most
     ML_CUDA_Q8_ATTN_MAX_E (the caller dequantizes beyond); out allocated. */
  ml_status (*sdpa_q8)(const ml_tensor *q, const ml_tensor *k, const ml_tensor *k_scales, const ml_tensor *v,
                       const ml_tensor *v_scales, const ml_tensor *mask, const ml_tensor *sinks, bool is_causal,
                       double scale, ml_tensor *out);
  /* int4 weights (cpu/q8.c's Q4_0 layout): q and scales allocated by the caller (contiguous,
     (out, in / 2) uint8 and (out, in / 32) float32); the CPU's bytes exactly. */
  ml_status (*quantize_q4)(const ml_tensor *w, ml_tensor *q, ml_tensor *scales);
  ml_status (*q4_linear)(const ml_tensor *x, const ml_tensor *q, const ml_tensor *scales, const ml_tensor *b,
                         ml_tensor *out);
  ml_status (*dequantize_q4)(const ml_tensor *q, const ml_tensor *scales, ml_tensor *out);
  /* out (O, I) = w (O, I) fp8 * scale_inv[o / block_o][i / block_i] (ml_dequantize_fp8_blocks) */
  ml_status (*dequantize_fp8_blocks)(const ml_tensor *w, const ml_tensor *scale_inv, int64_t block_o,
                                     int64_t block_i, ml_tensor *out);
  /* out (..., O, G * 32) = MXFP4 blocks (..., O, G, 16) uint8 times 2^(scales - 127) (ml_dequantize_mxfp4) */
  ml_status (*dequantize_mxfp4)(const ml_tensor *blocks, const ml_tensor *scales, bool ggml_order, ml_tensor *out);
  /* The gated delta rule (ml_gated_delta_rule), checked: state (B, Hv, Dk, Dv) float32 contiguous
     updated in place; q, k, v and out with a unit-stride last dim, out written where it lies. */
  ml_status (*gated_delta_rule)(const ml_tensor *q, const ml_tensor *k, const ml_tensor *v, const ml_tensor *g,
                                const ml_tensor *beta, ml_tensor *state, ml_tensor *out);
  /* The Mamba-2 scan (ml_ssm_scan), checked: state (B, H, P, N) float32 contiguous updated in
     place; x, B, C and out with a unit-stride last dim; D may be NULL. */
  ml_status (*ssm_scan)(const ml_tensor *x, const ml_tensor *dt, const ml_tensor *A, const ml_tensor *B,
                        const ml_tensor *C, const ml_tensor *D, bool A_log, ml_tensor *state, ml_tensor *out);
} ml_cuda_api;

/* Memory the core can give back when cuda:device is out of memory: the CUDA allocator calls this
   before it reports the failure, and retries when it returns more than 0 bytes. Exported from
   libmoonload.so, like ml_fail. */
__attribute__((visibility("default"))) size_t ml_cuda_reclaim(int device);

/* What libmoonload_cuda.so exports: fills err on failure and returns NULL. */
typedef const ml_cuda_api *(*ml_cuda_backend_fn)(char *err, size_t n);

/* Formats the thread-local message behind ml_last_error() and returns status. Exported from
   libmoonload.so (not part of the public API) so the CUDA library reports errors the same way. */
__attribute__((visibility("default"))) ml_status ml_fail(ml_status status, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#ifdef __cplusplus
}
#endif

#endif /* ML_CUDA_API_H */
