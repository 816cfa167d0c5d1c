// delta_rule.cu: the gated delta rule (Qwen3-Next's linear attention) on CUDA; see cpu/delta_rule.c
// for the definition. A block per (b, h, 32 columns of S): column j of S only ever meets column j
// (kv_j = sum_i S[i][j] k[i]), so blocks share no state, and a warp's 32 columns are one coalesced
// row segment. The block's 8 warps split the Dk rows (warp w takes rows w, w + 8, ...) and add
// their partial sums through shared memory. The tokens go one after another, as each needs the
// state the last one left; for a prompt the block's slice of S lives in shared memory (Dk up to
// 256), for one token, or a larger Dk, it is updated where it lies in the state tensor.
#include "common.cuh"

static const int kCols = 32;                     // columns of S a block owns: a warp's width
static const int kRowGroups = 8;                 // warps, splitting the rows
static const int kThreads = kCols * kRowGroups;
static const int kSharedRows = 256;              // Dk up to this keeps S in shared memory (32 KiB)
static const int kMaxDk = 1024;                  // a token's q and k in shared memory (8 KiB)

// Element offset of (b, t, h, 0) in a (B, T, H, D) descriptor, or of (b, t, h) in a (B, T, H) one.
__device__ __forceinline__ int64_t row_offset(const TensorDesc &d, int64_t b, int64_t t, int64_t h) {
  return b * d.strides[0] + t * d.strides[1] + h * d.strides[2];
}

__global__ void __launch_bounds__(kThreads)
gated_delta_rule_kernel(TensorDesc q, TensorDesc k, TensorDesc v, TensorDesc g, TensorDesc beta, float *state,
                        TensorDesc out, int64_t group, float scale) {
  __shared__ float s_tile[kSharedRows * kCols];  // (Dk, 32): the block's columns of S
  __shared__ float s_q[kMaxDk], s_k[kMaxDk];     // (Dk): this token's q and k, normalized
  __shared__ float s_part[kRowGroups][kCols];    // each warp's partial kv, then partial out
  __shared__ float s_delta[kCols];
  int64_t T = q.shape[1], Dk = q.shape[3], Hv = v.shape[2], Dv = v.shape[3];
  int64_t ncb = (Dv + kCols - 1) / kCols, bh = blockIdx.x / ncb, col = blockIdx.x % ncb * kCols + threadIdx.x % kCols;
  int64_t b = bh / Hv, h = bh % Hv, hk = h / group;
  int lane = threadIdx.x % kCols, warp = threadIdx.x / kCols;
  bool live = col < Dv;                          // the last block of a head may reach past Dv
  float *head = state + bh * Dk * Dv;            // (Dk, Dv)
  bool in_shared = T > 1 && Dk <= kSharedRows;
  float *S = in_shared ? s_tile + lane : head + (live ? col : 0);
  int64_t ld = in_shared ? kCols : Dv;
  // Each thread only ever touches its own elements of S: no barrier around the copies.
  if (in_shared && live)
    for (int64_t i = warp; i < Dk; i += kRowGroups) S[i * ld] = head[i * Dv + col];

  for (int64_t t = 0; t < T; t++) {
    int64_t qo = row_offset(q, b, t, hk), ko = row_offset(k, b, t, hk);
    for (int64_t i = threadIdx.x; i < Dk; i += kThreads) {
      s_q[i] = load_as<float>(q.data, q.dtype, qo + i);
      s_k[i] = load_as<float>(k.data, k.dtype, ko + i);
    }
    __syncthreads();
    if (warp < 2) {                              // warp 0 normalizes q (and scales it), warp 1 k
      float *x = warp == 0 ? s_q : s_k;
      float ss = 0;
      for (int64_t i = lane; i < Dk; i += 32) ss += x[i] * x[i];
      for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      float inv = 1.0f / sqrtf(ss + 1e-6f), sc = warp == 0 ? scale : 1.0f;
      for (int64_t i = lane; i < Dk; i += 32) x[i] = x[i] * inv * sc;
    }
    __syncthreads();
    float decay = expf(load_as<float>(g.data, g.dtype, row_offset(g, b, t, h)));
    float bt = load_as<float>(beta.data, beta.dtype, row_offset(beta, b, t, h));
    // pass 1: decay S and read kv = k S
    float p = 0;
    if (live)
      for (int64_t i = warp; i < Dk; i += kRowGroups) {
        float s = S[i * ld] * decay;
        S[i * ld] = s;
        p += s * s_k[i];
      }
    s_part[warp][lane] = p;
    __syncthreads();
    if (warp == 0 && live) {
      float kv = 0;
      for (int r = 0; r < kRowGroups; r++) kv += s_part[r][lane];
      float vj = load_as<float>(v.data, v.dtype, row_offset(v, b, t, h) + col);
      s_delta[lane] = (vj - kv) * bt;
    }
    __syncthreads();
    // pass 2: S += k^T delta and out = q S
    float d = s_delta[lane], o = 0;
    if (live)
      for (int64_t i = warp; i < Dk; i += kRowGroups) {
        float s = S[i * ld] + s_k[i] * d;
        S[i * ld] = s;
        o += s * s_q[i];
      }
    s_part[warp][lane] = o;
    __syncthreads();
    if (warp == 0 && live) {
      float sum = 0;
      for (int r = 0; r < kRowGroups; r++) sum += s_part[r][lane];
      store_as<float>(out.data, out.dtype, row_offset(out, b, t, h) + col, sum);
    }
    // the next token's first writes (s_q, s_k) come after every read of this one's: the barrier
    // above separates them, and s_part and s_delta are next written after two more
  }
  if (in_shared && live)
    for (int64_t i = warp; i < Dk; i += kRowGroups) head[i * Dv + col] = S[i * ld];
}

ml_status ml_cuda_gated_delta_rule(const ml_tensor *q, const ml_tensor *k, const ml_tensor *v, const ml_tensor *g,
                                   const ml_tensor *beta, ml_tensor *state, ml_tensor *out) {
  TensorDesc qd = ml_cuda_desc(q), kd = ml_cuda_desc(k), vd = ml_cuda_desc(v), gd = ml_cuda_desc(g);
  TensorDesc bd = ml_cuda_desc(beta), od = ml_cuda_desc(out);
  int64_t B = qd.shape[0], Hk = qd.shape[2], Dk = qd.shape[3], Hv = vd.shape[2], Dv = vd.shape[3];
  if (Dk > kMaxDk)
    return ml_fail(ML_EUNSUPPORTED, "gated_delta_rule: a key head dim Dk of %lld is over the CUDA kernel's %d",
                   (long long)Dk, kMaxDk);
  int64_t blocks = B * Hv * ((Dv + kCols - 1) / kCols);
  if (blocks == 0 || qd.shape[1] == 0) return ML_OK;
  if (blocks > INT_MAX) return ml_fail(ML_EUNSUPPORTED, "gated_delta_rule: %lld blocks are too many", (long long)blocks);
  DeviceState *st;
  ML_TRY(ml_cuda_device_state(ml_cuda_device_of(out), &st));
  float scale = 1.0f / sqrtf((float)Dk);   // Dk > 0: the caller fills out for an empty state
  gated_delta_rule_kernel<<<(unsigned)blocks, kThreads, 0, st->compute>>>(
      qd, kd, vd, gd, bd, (float *)ml_tensor_data(state), od, Hv / Hk, scale);
  LAUNCH_CHECK();
  return ML_OK;
}
