/* kernels.h: private helpers shared by the CPU kernels in core/src/cpu/ (elementwise, reduce,
   index, random): the device gate every op goes through, row seeking for parallel iteration, and
   block loaders/storers that move strided rows of any dtype into compute buffers and back. */
#ifndef ML_CPU_KERNELS_H
#define ML_CPU_KERNELS_H

#include "internal.h"

/* Elements per compute block: a row is processed in pieces of this size so that float16/bfloat16
   operands are converted a few KB at a time, never whole tensors up front. */
#define ML_BLOCK 1024

/* The class of arithmetic an op runs in, from its (promoted) dtype. */
typedef enum { ML_CALC_F32 = 0, ML_CALC_F64, ML_CALC_I64 } ml_calc;

static inline ml_calc ml_calc_of(ml_dtype dt) {
  if (dt == ML_FLOAT64) return ML_CALC_F64;
  return ml_dtype_is_floating(dt) ? ML_CALC_F32 : ML_CALC_I64;
}

/* The one place that decides where an op runs. Checks every tensor is on the same device and
   that the device has data (not meta). For cpu tensors *cu is NULL; for cuda tensors it is the
   loaded CUDA backend's table (whose op entries may still be NULL: see ml_no_cuda_kernel). */
ml_status ml_op_device(const char *fn, int n, const ml_tensor *const *ts, const ml_cuda_api **cu);
/* The same with operand names for the messages (what[i] names ts[i]; NULL operands are optional). */
ml_status ml_op_route(const char *fn, int n, const ml_tensor *const *ts, const char *const *what,
                      const ml_cuda_api **cu);
/* For ops with no CUDA kernel: ml_op_device, then ML_EUNSUPPORTED naming the op for cuda. */
ml_status ml_cpu_gate(const char *fn, int n, const ml_tensor *const *ts);
/* The error for an op on a device that has no kernel for it. */
ml_status ml_no_cuda_kernel(const char *fn, const ml_tensor *t);
/* Argument checks of the recurrent kernels (delta_rule.c, ssm_scan.c). */
static inline bool ml_is_float3(ml_dtype dt) { return dt == ML_FLOAT32 || dt == ML_BFLOAT16 || dt == ML_FLOAT16; }
/* t has exactly the shape want (n dims), or an error naming it and the layout it should have. */
ml_status ml_need_shape(const char *fn, const char *name, const ml_tensor *t, int n, const int64_t *want,
                        const char *layout);
/* Rows are read and written as vectors: the last dim must be unit-stride (the Lua bindings make
   their inputs so first). */
ml_status ml_need_unit_last(const char *fn, const char *name, const ml_tensor *t);

/* Positions a freshly initialised iterator so that its next ml_iter_next returns row `row`
   (0-based). Lets threads start in the middle of an iteration. */
void ml_iter_seek(ml_iter *it, int64_t row);

/* n elements of dtype dt at p with element stride s -> contiguous compute buffer. Returns the
   buffer to read from: p itself when it already is contiguous data of the compute type. */
const float *ml_load_f32(const void *p, ml_dtype dt, int64_t s, int64_t n, float *buf);
const double *ml_load_f64_row(const void *p, ml_dtype dt, int64_t s, int64_t n, double *buf);
const int64_t *ml_load_i64(const void *p, ml_dtype dt, int64_t s, int64_t n, int64_t *buf);

/* Contiguous compute buffer -> n elements of dtype dt at p with element stride s. */
void ml_store_f32(const float *buf, void *p, ml_dtype dt, int64_t s, int64_t n);
void ml_store_f64_row(const double *buf, void *p, ml_dtype dt, int64_t s, int64_t n);
void ml_store_i64(const int64_t *buf, void *p, ml_dtype dt, int64_t s, int64_t n);

/* Same-dtype strided copy of a whole (ndim, shape, strides) block into contiguous dst. */
void ml_copy_block(void *dst, const void *src, size_t esize, int ndim, const int64_t *shape,
                   const int64_t *strides);

static inline uint8_t *ml_byte_at(const void *base, ml_dtype dt, int64_t off) {
  return (uint8_t *)base + off * (int64_t)ml_dtype_size(dt);
}

/* Direct products of a few rows by a packed weight (cpu/few_rows.c; fp8_linear, mxfp4_linear):
   at most ML_FEW_ROWS rows, read from the packed bytes; more rows expand the weight for a GEMM. */
enum { ML_FEW_ROWS = 16 };
/* The operands: x (..., K) as M x K float32 rows in *xf, then the bias (N values, when b) at *bf,
   in one buffer to free(), and the output (..., N) of x's dtype in *out. fn names the op. */
ml_status ml_few_rows_operands(const char *fn, const ml_tensor *x, const ml_tensor *b, int64_t M, int64_t K, int64_t N,
                               float **xf, float **bf, ml_tensor **out);
/* out (M, N) of odt = dots + bias: column_dots(ctx, n, dots) fills dots[0..M) for the weight's row
   n; columns go in blocks of 32 over the threads, each block converted to odt once. cost: the
   work of one column. */
typedef struct {
  int64_t M, N;
  const float *bias;           /* N float32, or NULL */
  void *out;
  ml_dtype odt;
  void (*column_dots)(const void *ctx, int64_t n, float *dots);
  const void *ctx;
} ml_few_rows_job;
void ml_few_rows_run(const ml_few_rows_job *j, int64_t cost);

/* Whether the AVX-512 variants of the direct few-row kernels run (fp8_linear, mxfp4_linear, int8
   weights): the CPU has AVX-512F and BW, and MOONLOAD_NO_AVX512 is not 1 (which runs the AVX2
   paths, to compare the two on one machine). Read once. */
bool ml_avx512(void);

#endif /* ML_CPU_KERNELS_H */
