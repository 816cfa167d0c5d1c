// index.cu: tril/triu, gather, index_select and cumsum on CUDA. The public functions (cpu/*.c)
// validate shapes and dtypes and allocate the contiguous output; these entries only compute.
// An out-of-range index cannot be checked before the kernel runs: the kernels record the first
// bad value in a device flag that the entry reads back, and the public function reports it.
#include "common.cuh"

#include <climits>

static const int kThreads = 256;

__device__ __forceinline__ void zero_elem(char *dst, int es) {
  switch (es) {
  case 1: *dst = 0; break;
  case 2: *(short *)dst = 0; break;
  case 4: *(int *)dst = 0; break;
  default: *(long long *)dst = 0; break;
  }
}

// --- tril / triu ---------------------------------------------------------------------------

// out (contiguous, x's shape) = x with the elements above (tril) or below (triu) diagonal k zeroed.
__global__ void triangle_kernel(TensorDesc x, TensorDesc o, int64_t n, int64_t rows, int64_t cols, long long k,
                                bool upper, int es) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t c = i % cols, r = i / cols % rows;
    bool keep = upper ? c - r >= k : c - r <= k;
    char *dst = (char *)o.data + i * es;
    if (keep) copy_elem(dst, (const char *)x.data + desc_offset(x, i) * es, es);
    else zero_elem(dst, es);
  }
}

// --- gather / index_select -------------------------------------------------------------------

// out[i] = x[..., index[i], ...] along d: index has out's shape; xw is x with stride 0 along d.
__global__ void gather_kernel(TensorDesc xw, TensorDesc idx, TensorDesc o, int64_t n, int64_t size, int64_t dstride,
                              int es, long long *bad) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    long long v = load_as<long long>(idx.data, idx.dtype, desc_offset(idx, i));
    long long p = v < 0 ? v + size : v;
    if (p < 0 || p >= size) { flag_bad(bad, v); continue; }
    copy_elem((char *)o.data + i * es, (const char *)xw.data + (desc_offset(xw, i) + p * dstride) * es, es);
  }
}

// out viewed as x's shape with m along d: out[.., i, ..] = x[.., index[i], ..].
__global__ void index_select_kernel(TensorDesc x, TensorDesc idx, TensorDesc o, int64_t n, int d, int64_t size,
                                    int es, long long *bad) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    // Walk out's shape (o.shape) and read x at the selected position along d.
    int64_t rest = i, off = 0;
    for (int k = o.ndim - 1; k >= 0; k--) {
      int64_t c = rest % o.shape[k];
      rest /= o.shape[k];
      if (k == d) {
        long long v = load_as<long long>(idx.data, idx.dtype, c * (idx.ndim ? idx.strides[0] : 0));
        long long p = v < 0 ? v + size : v;
        if (p < 0 || p >= size) { flag_bad(bad, v); off = -1; break; }
        c = p;
      }
      off += c * x.strides[k];
    }
    if (off >= 0) copy_elem((char *)o.data + i * es, (const char *)x.data + off * es, es);
  }
}

// --- cumsum --------------------------------------------------------------------------------

// One thread per line along d (lines are independent); sums in double, or long long for
// integer inputs (their output is int64), as on the CPU.
template <typename C>
__global__ void cumsum_kernel(TensorDesc lines, TensorDesc x, TensorDesc o, int64_t nlines, int64_t n, int64_t xs,
                              int64_t os) {
  for (int64_t l = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; l < nlines; l += (int64_t)gridDim.x * blockDim.x) {
    int64_t xb = desc_offset(lines, l);
    // o is contiguous with x's shape: its line starts where x's line index maps in o's layout.
    int64_t ob = desc_offset(o, l);
    C acc = 0;
    for (int64_t j = 0; j < n; j++) {
      acc += load_as<C>(x.data, x.dtype, xb + j * xs);
      store_as<C>(o.data, o.dtype, ob + j * os, acc);
    }
  }
}

// --- entry points ----------------------------------------------------------------------------

ml_status ml_cuda_triangle(const ml_tensor *x, int64_t k, bool upper, ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(out), &st));
  TensorDesc xd = ml_cuda_desc(x), od = ml_cuda_desc(out);
  int64_t n = ml_cuda_numel(od), rows = xd.shape[xd.ndim - 2], cols = xd.shape[xd.ndim - 1];
  if (n == 0) return ML_OK;
  int es = (int)ml_dtype_size((ml_dtype)xd.dtype);
  triangle_kernel<<<ml_cuda_blocks(n, kThreads), kThreads, 0, st->compute>>>(xd, od, n, rows, cols, (long long)k, upper,
                                                                              es);
  LAUNCH_CHECK();
  return ML_OK;
}

// What gather and index_select share: the device, descriptors (a 0-d input as one element), the
// output size, and the launch with the bad-index flag.
struct IndexOp {
  int dev;
  DeviceState *st;
  TensorDesc xd, id, od;
  int64_t n;
  int es;
  int64_t *bad_index;

  // Runs launch(flag) on the compute stream; the first out-of-range index goes to *bad_index.
  template <typename Launch>
  ml_status run(const char *fn, Launch launch) {
    long long bad;
    ML_TRY(with_bad_flag(dev, st, fn, &bad, launch));
    *bad_index = bad;
    return ML_OK;
  }
};

static ml_status index_op_begin(const ml_tensor *x, const ml_tensor *index, ml_tensor *out, int64_t *bad_index,
                                IndexOp *op) {
  op->dev = ml_cuda_device_of(out);
  ML_TRY(ml_cuda_device_state(op->dev, &op->st));
  op->xd = ml_cuda_desc(x);
  op->id = ml_cuda_desc(index);
  op->od = ml_cuda_desc(out);
  if (op->xd.ndim == 0) { op->xd.ndim = 1; op->xd.shape[0] = 1; op->xd.strides[0] = 0; }
  op->n = ml_cuda_numel(op->od);
  op->es = (int)ml_dtype_size((ml_dtype)op->xd.dtype);
  op->bad_index = bad_index;
  *bad_index = INT64_MIN;
  return ML_OK;
}

ml_status ml_cuda_gather(const ml_tensor *x, int dim, const ml_tensor *index, ml_tensor *out, int64_t *bad_index) {
  IndexOp op;
  ML_TRY(index_op_begin(x, index, out, bad_index, &op));
  if (op.n == 0) return ML_OK;
  TensorDesc id = op.id;
  if (id.ndim == 0) { id.ndim = 1; id.shape[0] = 1; id.strides[0] = 0; }
  // x walked at index's shape, with stride 0 along dim (the index value picks the position).
  TensorDesc xw = op.xd;
  xw.ndim = id.ndim;
  for (int k = 0; k < id.ndim; k++) { xw.shape[k] = id.shape[k]; xw.strides[k] = k == dim ? 0 : op.xd.strides[k]; }
  int64_t size = op.xd.shape[dim], dstride = op.xd.strides[dim];
  return op.run("gather", [&](long long *flag) {
    gather_kernel<<<ml_cuda_blocks(op.n, kThreads), kThreads, 0, op.st->compute>>>(xw, id, op.od, op.n, size, dstride,
                                                                                   op.es, flag);
  });
}

ml_status ml_cuda_index_select(const ml_tensor *x, int dim, const ml_tensor *index, ml_tensor *out,
                               int64_t *bad_index) {
  IndexOp op;
  ML_TRY(index_op_begin(x, index, out, bad_index, &op));
  if (op.n == 0) return ML_OK;
  TensorDesc od = op.od;
  if (od.ndim == 0) { od.ndim = 1; od.shape[0] = 1; od.strides[0] = 1; }
  int64_t size = op.xd.shape[dim];
  return op.run("index_select", [&](long long *flag) {
    index_select_kernel<<<ml_cuda_blocks(op.n, kThreads), kThreads, 0, op.st->compute>>>(op.xd, op.id, od, op.n, dim,
                                                                                         size, op.es, flag);
  });
}

ml_status ml_cuda_cumsum(const ml_tensor *x, int dim, ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(out), &st));
  TensorDesc xd = ml_cuda_desc(x), od = ml_cuda_desc(out);
  if (xd.ndim == 0) { xd.ndim = 1; xd.shape[0] = 1; xd.strides[0] = 1; od = xd; od.data = ml_tensor_data(out);
                      od.dtype = ml_tensor_dtype(out); }
  int64_t n = xd.shape[dim], total = ml_cuda_numel(xd);
  if (n == 0 || total == 0) return ML_OK;
  int64_t nlines = total / n;
  // Line starts: x and out with dim taken out (size 1), walked over the other dims.
  TensorDesc lines = xd, olines = od;
  lines.shape[dim] = 1;
  olines.shape[dim] = 1;
  int64_t xs = xd.strides[dim], os = od.strides[dim];
  unsigned grid = ml_cuda_blocks(nlines, kThreads);
  if (ml_dtype_is_floating((ml_dtype)od.dtype))
    cumsum_kernel<double><<<grid, kThreads, 0, st->compute>>>(lines, xd, olines, nlines, n, xs, os);
  else
    cumsum_kernel<long long><<<grid, kThreads, 0, st->compute>>>(lines, xd, olines, nlines, n, xs, os);
  LAUNCH_CHECK();
  return ML_OK;
}
