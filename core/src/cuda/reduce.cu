// reduce.cu: reductions, softmax, layer/RMS norms and embedding lookup on CUDA. Each output row
// is one thread block: a block-wide reduction in shared memory over a strided row.
#include "common.cuh"

#include <climits>
#include <float.h>
#include <math.h>

static const int kBlock = 256;

// --- general reduction ---------------------------------------------------------------------

// Is v a better extreme than best? NaN wins (as in PyTorch); integers have none.
template <typename T>
__device__ __forceinline__ bool beats(T v, T best, bool want_max) {
  if (best != best) return false;
  if (v != v) return true;
  return want_max ? v > best : v < best;
}

// kept: x's kept dims (shape/strides), red: x's reduced dims. One block per output element.
// T is the accumulator: double for floating inputs, long long for integer and bool inputs, whose
// sums, products and extremes are exact in int64 (as on the CPU).
template <typename T>
__global__ void reduce_kernel(int op, TensorDesc kept, TensorDesc red, TensorDesc o, int64_t nout, int64_t r) {
  __shared__ T sh_v[32];
  __shared__ long long sh_i[32];
  __shared__ T all_v[kBlock];
  __shared__ long long all_i[kBlock];
  bool is_arg = op == ML_REDUCE_ARGMAX || op == ML_REDUCE_ARGMIN;
  bool want_max = op == ML_REDUCE_MAX || op == ML_REDUCE_ARGMAX;
  bool additive = op == ML_REDUCE_SUM || op == ML_REDUCE_MEAN;
  for (int64_t out = blockIdx.x; out < nout; out += gridDim.x) {
    int64_t base = desc_offset(kept, out);
    T acc = op == ML_REDUCE_PROD ? (T)1 : (T)0;
    long long idx = -1;
    for (int64_t j = threadIdx.x; j < r; j += blockDim.x) {
      T v = load_as<T>(red.data, red.dtype, base + desc_offset(red, j));
      if (additive) acc = add_wrap(acc, v);
      else if (op == ML_REDUCE_PROD) acc = mul_wrap(acc, v);
      else if (idx < 0 || beats(v, acc, want_max)) { acc = v; idx = j; }   // ties keep the first index
    }
    if (additive) {
      acc = block_sum<T>(acc, sh_v);
      if (op == ML_REDUCE_MEAN) acc /= (T)r;
    } else if (op == ML_REDUCE_PROD) {
      // Products are rare; combine through shared memory serially.
      if (threadIdx.x == 0) sh_v[0] = (T)1;
      __syncthreads();
      for (int t = 0; t < blockDim.x; t++) {
        if (threadIdx.x == t) sh_v[0] = mul_wrap(sh_v[0], acc);
        __syncthreads();
      }
      acc = sh_v[0];
      __syncthreads();
    } else {
      // Serial combine of (value, index) pairs in thread order keeps "first index on ties".
      all_v[threadIdx.x] = acc;
      all_i[threadIdx.x] = idx;
      __syncthreads();
      if (threadIdx.x == 0) {
        T bv = 0; long long bi = -1;
        for (int t = 0; t < blockDim.x; t++) {
          if (all_i[t] < 0) continue;
          T v = all_v[t];
          bool better = bi < 0 || beats(v, bv, want_max) || (bv == bv && v == bv && all_i[t] < bi);
          if (better) { bv = v; bi = all_i[t]; }
        }
        sh_v[0] = bv; sh_i[0] = bi;
      }
      __syncthreads();
      acc = sh_v[0]; idx = sh_i[0];
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      if (is_arg) ((long long *)o.data)[out] = idx < 0 ? 0 : idx;
      else store_as<T>(o.data, o.dtype, out, acc);
    }
  }
}

ml_status ml_cuda_reduce(ml_reduce_op op, const ml_tensor *x, int ndims, const int *dims, ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(x), &st));
  TensorDesc xd = ml_cuda_desc(x), od = ml_cuda_desc(out);
  TensorDesc kept = xd, red = xd;
  kept.ndim = 0; red.ndim = 0;
  bool reduced[ML_MAX_DIMS] = {false};
  if (ndims == 0) for (int i = 0; i < xd.ndim; i++) reduced[i] = true;
  for (int i = 0; i < ndims; i++) reduced[dims[i]] = true;
  for (int i = 0; i < xd.ndim; i++) {
    TensorDesc &d = reduced[i] ? red : kept;
    d.shape[d.ndim] = xd.shape[i];
    d.strides[d.ndim] = xd.strides[i];
    d.ndim++;
  }
  int64_t nout = ml_cuda_numel(kept), r = ml_cuda_numel(red);
  if (nout == 0) return ML_OK;
  // Over nothing: the identity (sum 0, prod 1, mean NaN as 0/0); max/min/arg were refused before.
  if (r == 0) return ml_cuda_fill(out, op == ML_REDUCE_PROD ? 1.0 : op == ML_REDUCE_MEAN ? NAN : 0.0);
  unsigned grid = (unsigned)(nout < 65535 * 16 ? nout : 65535 * 16);
  if (ml_dtype_is_floating((ml_dtype)ml_tensor_dtype(x))) reduce_kernel<double><<<grid, kBlock, 0, st->compute>>>((int)op, kept, red, od, nout, r);
  else reduce_kernel<long long><<<grid, kBlock, 0, st->compute>>>((int)op, kept, red, od, nout, r);
  LAUNCH_CHECK();
  return ML_OK;
}

// --- rows: softmax and norms ---------------------------------------------------------------

// Splits x into rows: `outer` walks the row starts, `inner` the elements of one row.
static void split_rows(const TensorDesc &x, int first_inner, int last_inner, TensorDesc *outer, TensorDesc *inner) {
  *outer = x; *inner = x;
  outer->ndim = 0; inner->ndim = 0;
  for (int i = 0; i < x.ndim; i++) {
    TensorDesc *d = (i >= first_inner && i <= last_inner) ? inner : outer;
    d->shape[d->ndim] = x.shape[i];
    d->strides[d->ndim] = x.strides[i];
    d->ndim++;
  }
}

// Rows in C: float, or double when float64 is involved (as on the CPU).
template <typename C>
__global__ void softmax_kernel(TensorDesc xo, TensorDesc xi, TensorDesc oo, TensorDesc oi, int64_t rows, int64_t n,
                               bool log_out) {
  __shared__ C sh[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int64_t xb = desc_offset(xo, row), ob = desc_offset(oo, row);
    C m = -INFINITY;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      m = max_of(m, load_as<C>(xi.data, xi.dtype, xb + desc_offset(xi, j)));
    m = block_max<C>(m, sh);
    C s = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      s += exp_of(load_as<C>(xi.data, xi.dtype, xb + desc_offset(xi, j)) - m);
    s = block_sum<C>(s, sh);
    C ls = log(s);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      C v = load_as<C>(xi.data, xi.dtype, xb + desc_offset(xi, j)) - m;
      store_as<C>(oi.data, oi.dtype, ob + desc_offset(oi, j), log_out ? v - ls : exp_of(v) / s);
    }
  }
}

static unsigned row_grid(int64_t rows) { return (unsigned)(rows < 65535 * 16 ? (rows > 0 ? rows : 1) : 65535 * 16); }

ml_status ml_cuda_softmax(const ml_tensor *x, int dim, bool log, ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(x), &st));
  TensorDesc xd = ml_cuda_desc(x), od = ml_cuda_desc(out);
  if (xd.ndim == 0) { xd.ndim = 1; xd.shape[0] = 1; xd.strides[0] = 1; od = xd; od.data = ml_tensor_data(out); od.dtype = ml_tensor_dtype(out); }
  TensorDesc xo, xi, oo, oi;
  split_rows(xd, dim, dim, &xo, &xi);
  split_rows(od, dim, dim, &oo, &oi);
  int64_t rows = ml_cuda_numel(xo), n = ml_cuda_numel(xi);
  if (rows == 0 || n == 0) return ML_OK;
  if (ml_cuda_wide(xd.dtype) || ml_cuda_wide(od.dtype))
    softmax_kernel<double><<<row_grid(rows), kBlock, 0, st->compute>>>(xo, xi, oo, oi, rows, n, log);
  else
    softmax_kernel<float><<<row_grid(rows), kBlock, 0, st->compute>>>(xo, xi, oo, oi, rows, n, log);
  LAUNCH_CHECK();
  return ML_OK;
}

// mode 0: layer norm (mean and variance), 1: RMS norm (mean of squares); in C as softmax.
template <typename C>
__global__ void norm_kernel(int mode, TensorDesc xo, TensorDesc xi, TensorDesc oo, TensorDesc oi, TensorDesc w,
                            bool has_w, TensorDesc b, bool has_b, int64_t rows, int64_t n, C eps) {
  __shared__ C sh[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int64_t xb = desc_offset(xo, row), ob = desc_offset(oo, row);
    C mean = 0;
    if (mode == 0) {
      C s = 0;
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += load_as<C>(xi.data, xi.dtype, xb + desc_offset(xi, j));
      mean = block_sum<C>(s, sh) / (C)n;
    }
    C q = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      C v = load_as<C>(xi.data, xi.dtype, xb + desc_offset(xi, j)) - mean;
      q += v * v;
    }
    C inv = (C)1 / sqrt(block_sum<C>(q, sh) / (C)n + eps);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      C v = (load_as<C>(xi.data, xi.dtype, xb + desc_offset(xi, j)) - mean) * inv;
      if (has_w) v *= load_as<C>(w.data, w.dtype, desc_offset(w, j));
      if (has_b) v += load_as<C>(b.data, b.dtype, desc_offset(b, j));
      store_as<C>(oi.data, oi.dtype, ob + desc_offset(oi, j), v);
    }
  }
}

static ml_status norm(int mode, const ml_tensor *x, int nnorm, const ml_tensor *w, const ml_tensor *b, double eps,
                      ml_tensor *out) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(x), &st));
  TensorDesc xd = ml_cuda_desc(x), od = ml_cuda_desc(out);
  TensorDesc xo, xi, oo, oi;
  split_rows(xd, xd.ndim - nnorm, xd.ndim - 1, &xo, &xi);
  split_rows(od, od.ndim - nnorm, od.ndim - 1, &oo, &oi);
  int64_t rows = ml_cuda_numel(xo), n = ml_cuda_numel(xi);
  if (rows == 0 || n == 0) return ML_OK;
  TensorDesc wd = w ? ml_cuda_desc(w) : xi, bd = b ? ml_cuda_desc(b) : xi;
  if (ml_cuda_wide(xd.dtype) || ml_cuda_wide(od.dtype))
    norm_kernel<double><<<row_grid(rows), kBlock, 0, st->compute>>>(mode, xo, xi, oo, oi, wd, w != NULL, bd, b != NULL,
                                                                    rows, n, eps);
  else
    norm_kernel<float><<<row_grid(rows), kBlock, 0, st->compute>>>(mode, xo, xi, oo, oi, wd, w != NULL, bd, b != NULL,
                                                                   rows, n, (float)eps);
  LAUNCH_CHECK();
  return ML_OK;
}

ml_status ml_cuda_layer_norm(const ml_tensor *x, int nnorm, const ml_tensor *w, const ml_tensor *b, double eps,
                             ml_tensor *out) {
  return norm(0, x, nnorm, w, b, eps, out);
}

ml_status ml_cuda_rms_norm(const ml_tensor *x, int nnorm, const ml_tensor *w, double eps, ml_tensor *out) {
  return norm(1, x, nnorm, w, NULL, eps, out);
}

// --- embedding -----------------------------------------------------------------------------

// out (numel(ids), d) contiguous; a bad id is reported through *bad (first one wins).
__global__ void embedding_kernel(TensorDesc ids, TensorDesc w, TensorDesc o, int64_t count, int64_t d, int64_t rows,
                                 long long *bad) {
  for (int64_t p = blockIdx.x; p < count; p += gridDim.x) {
    long long id = load_as<long long>(ids.data, ids.dtype, desc_offset(ids, p));
    if (id < 0 || id >= rows) {
      if (threadIdx.x == 0) flag_bad(bad, id);
      continue;
    }
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      float v = load_as<float>(w.data, w.dtype, id * w.strides[0] + j * w.strides[1]);
      store_as<float>(o.data, o.dtype, p * d + j, v);
    }
  }
}

ml_status ml_cuda_embedding(const ml_tensor *ids, const ml_tensor *weight, ml_tensor *out) {
  int dev = ml_cuda_device_of(weight);
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(dev, &st));
  TensorDesc idd = ml_cuda_desc(ids), wd = ml_cuda_desc(weight), od = ml_cuda_desc(out);
  int64_t count = ml_cuda_numel(idd), d = wd.shape[1], rows = wd.shape[0];
  if (count == 0) return ML_OK;
  long long bad;
  ML_TRY(with_bad_flag(dev, st, "embedding", &bad, [&](long long *flag) {
    embedding_kernel<<<row_grid(count), 128, 0, st->compute>>>(idd, wd, od, count, d, rows, flag);
  }));
  if (bad != LLONG_MIN)
    return ml_fail(ML_EINVAL, "embedding: index %lld is out of range for a table of %lld rows", bad, (long long)rows);
  return ML_OK;
}

// --- topk ----------------------------------------------------------------------------------

// The CPU's order (cpu/reduce.c): largest first with NaN ranked above everything, or smallest
// first with NaN last; equal keys by index. A strict total order, so both devices pick the same.
template <typename K>
__device__ __forceinline__ bool ranks_before(K a, long long ia, K b, long long ib, bool largest) {
  bool na = a != a, nb = b != b;
  if (na != nb) return largest ? na : nb;
  if (!na && a != b) return largest ? a > b : a < b;
  return ia < ib;
}

// One block per line; pass r picks the element ranking first among those ranking after pick
// r - 1 (O(k n / threads) per line: meant for top-k sampling). Keys in K: double for floating
// dtypes (exact for all of them), long long for integers. Values are copied as bytes.
template <typename K>
__global__ void topk_kernel(TensorDesc lines, TensorDesc x, int64_t xs, TensorDesc vlines, int64_t vs,
                            TensorDesc ilines, int64_t is, int64_t nlines, int64_t n, int64_t k, bool largest, int es) {
  __shared__ K sk[kBlock];
  __shared__ long long si[kBlock];
  __shared__ K last_k;
  __shared__ long long last_i;
  int tid = threadIdx.x;
  for (int64_t line = blockIdx.x; line < nlines; line += gridDim.x) {
    int64_t xb = desc_offset(lines, line), vb = desc_offset(vlines, line), ib = desc_offset(ilines, line);
    for (int64_t r = 0; r < k; r++) {
      K best = 0;
      long long bi = -1;
      for (int64_t j = tid; j < n; j += blockDim.x) {
        K v = load_as<K>(x.data, x.dtype, xb + j * xs);
        if (r > 0 && !ranks_before<K>(last_k, last_i, v, j, largest)) continue;   // picked already
        if (bi < 0 || ranks_before<K>(v, j, best, bi, largest)) { best = v; bi = j; }
      }
      sk[tid] = best;
      si[tid] = bi;
      __syncthreads();
      for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s && si[tid + s] >= 0 &&
            (si[tid] < 0 || ranks_before<K>(sk[tid + s], si[tid + s], sk[tid], si[tid], largest))) {
          sk[tid] = sk[tid + s];
          si[tid] = si[tid + s];
        }
        __syncthreads();
      }
      if (tid == 0) {
        copy_elem((char *)vlines.data + (vb + r * vs) * es, (const char *)x.data + (xb + si[0] * xs) * es, es);
        ((long long *)ilines.data)[ib + r * is] = si[0];
        last_k = sk[0];
        last_i = si[0];
      }
      __syncthreads();
    }
  }
}

ml_status ml_cuda_topk(const ml_tensor *x, int dim, int64_t k, bool largest, ml_tensor *values, ml_tensor *indices) {
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(x), &st));
  TensorDesc xd = ml_cuda_desc(x), vd = ml_cuda_desc(values), id = ml_cuda_desc(indices);
  if (xd.ndim == 0) {   // a 0-d tensor is one line of one element
    xd.ndim = vd.ndim = id.ndim = 1;
    xd.shape[0] = 1; xd.strides[0] = 1;
    vd.shape[0] = id.shape[0] = k; vd.strides[0] = id.strides[0] = 1;
  }
  int64_t n = xd.shape[dim], total = ml_cuda_numel(xd);
  if (k == 0 || n == 0 || total == 0) return ML_OK;
  int64_t nlines = total / n, xs = xd.strides[dim], vs = vd.strides[dim], is = id.strides[dim];
  // Line starts: each tensor with dim taken out (size 1), walked over the other dims.
  TensorDesc lines = xd, vlines = vd, ilines = id;
  lines.shape[dim] = vlines.shape[dim] = ilines.shape[dim] = 1;
  int es = (int)ml_dtype_size((ml_dtype)xd.dtype);
  if (ml_dtype_is_floating((ml_dtype)xd.dtype))
    topk_kernel<double><<<row_grid(nlines), kBlock, 0, st->compute>>>(lines, xd, xs, vlines, vs, ilines, is, nlines, n, k,
                                                                      largest, es);
  else
    topk_kernel<long long><<<row_grid(nlines), kBlock, 0, st->compute>>>(lines, xd, xs, vlines, vs, ilines, is, nlines,
                                                                         n, k, largest, es);
  LAUNCH_CHECK();
  return ML_OK;
}
