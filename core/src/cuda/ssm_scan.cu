// ssm_scan.cu: the selective scan of Mamba layers on CUDA; see cpu/ssm_scan.c for the definition. A
// warp per row p of a head's state (P, N): its lanes hold the row's N entries in registers (lane l
// the entries l, l + 32, ...), with their decay rates when those are per entry (Mamba-1), update
// them each token and add their share of y_p = sum_n S[p][n] C[n] with shuffles. Rows never mix,
// so the warps of a block (8 rows of one head) need no barriers; the tokens go one after another,
// as each needs the state the last one left.
#include "common.cuh"

static const int kWarps = 8;                     // rows of S a block owns
static const int kPerLane = 8;                   // state entries a lane holds: N up to 256
static const int kMaxN = 32 * kPerLane;

__device__ __forceinline__ int64_t row_offset(const TensorDesc &d, int64_t b, int64_t t, int64_t h) {
  return b * d.strides[0] + t * d.strides[1] + h * d.strides[2];
}

__global__ void __launch_bounds__(32 * kWarps)
ssm_scan_kernel(TensorDesc x, TensorDesc dt, TensorDesc A, TensorDesc Bm, TensorDesc Cm, TensorDesc D, bool has_D,
                bool A_log, float *state, TensorDesc out, int64_t group) {
  bool dt_rows = dt.ndim == 4, A_rows = A.ndim == 3, D_rows = D.ndim == 2;   // per row (Mamba-1), else per head
  int64_t T = x.shape[1], H = x.shape[2], P = x.shape[3], N = Bm.shape[3];
  int64_t nrb = (P + kWarps - 1) / kWarps, bh = blockIdx.x / nrb;
  int64_t p = blockIdx.x % nrb * kWarps + threadIdx.x / 32;
  if (p >= P) return;                            // the last block of a head may reach past P
  int64_t b = bh / H, h = bh % H, g = h / group;
  int lane = threadIdx.x % 32;
  float *row = state + (bh * P + p) * N;
  float s[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; i++) s[i] = lane + 32 * i < N ? row[lane + 32 * i] : 0.0f;
  float rate[kPerLane];                          // decay rates: the head's, or the row's entries'
#pragma unroll
  for (int i = 0; i < kPerLane; i++)
    rate[i] = !A_rows ? load_as<float>(A.data, A.dtype, h * A.strides[0])
              : lane + 32 * i < N ? load_as<float>(A.data, A.dtype, h * A.strides[0] + p * A.strides[1] +
                                                                     (lane + 32 * i) * A.strides[2])
                                  : 0.0f;
  if (A_log)
#pragma unroll
    for (int i = 0; i < kPerLane; i++) rate[i] = -expf(rate[i]);
  float d = has_D ? load_as<float>(D.data, D.dtype, h * D.strides[0] + (D_rows ? p * D.strides[1] : 0)) : 0.0f;

  for (int64_t t = 0; t < T; t++) {
    float dtv = load_as<float>(dt.data, dt.dtype, row_offset(dt, b, t, h) + (dt_rows ? p * dt.strides[3] : 0));
    float xv = load_as<float>(x.data, x.dtype, row_offset(x, b, t, h) + p);
    float da = expf(dtv * rate[0]), dx = dtv * xv, y = 0;
    int64_t bo = row_offset(Bm, b, t, g), co = row_offset(Cm, b, t, g);
#pragma unroll
    for (int i = 0; i < kPerLane; i++) {
      int64_t n = lane + 32 * i;
      if (n < N) {
        s[i] = s[i] * (A_rows ? expf(dtv * rate[i]) : da) + dx * load_as<float>(Bm.data, Bm.dtype, bo + n);
        y += s[i] * load_as<float>(Cm.data, Cm.dtype, co + n);
      }
    }
    for (int o = 16; o > 0; o >>= 1) y += __shfl_xor_sync(0xffffffffu, y, o);
    if (lane == 0) store_as<float>(out.data, out.dtype, row_offset(out, b, t, h) + p, y + d * xv);
  }
#pragma unroll
  for (int i = 0; i < kPerLane; i++)
    if (lane + 32 * i < N) row[lane + 32 * i] = s[i];
}

ml_status ml_cuda_ssm_scan(const ml_tensor *x, const ml_tensor *dt, const ml_tensor *A, const ml_tensor *B,
                           const ml_tensor *C, const ml_tensor *D, bool A_log, ml_tensor *state, ml_tensor *out) {
  TensorDesc xd = ml_cuda_desc(x), dtd = ml_cuda_desc(dt), ad = ml_cuda_desc(A), bd = ml_cuda_desc(B);
  TensorDesc cd = ml_cuda_desc(C), od = ml_cuda_desc(out), dd = D ? ml_cuda_desc(D) : ad;
  int64_t Bt = xd.shape[0], H = xd.shape[2], P = xd.shape[3], G = bd.shape[2], N = bd.shape[3];
  if (N > kMaxN)
    return ml_fail(ML_EUNSUPPORTED, "ssm_scan: a state size N of %lld is over the CUDA kernel's %d", (long long)N,
                   kMaxN);
  int64_t blocks = Bt * H * ((P + kWarps - 1) / kWarps);
  if (blocks == 0 || xd.shape[1] == 0) return ML_OK;
  if (blocks > INT_MAX) return ml_fail(ML_EUNSUPPORTED, "ssm_scan: %lld blocks are too many", (long long)blocks);
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(out), &st));
  ssm_scan_kernel<<<(unsigned)blocks, 32 * kWarps, 0, st->compute>>>(
      xd, dtd, ad, bd, cd, dd, D != NULL, A_log, (float *)ml_tensor_data(state), od, H / G);
  LAUNCH_CHECK();
  return ML_OK;
}
