// selftest.cu: checks the CUDA emulator itself (tests/cudasim), so `make test-cuda-sim` can be
// trusted: barriers and shuffles compute what CUDA computes, streams are really asynchronous
// (a missing event wait reads stale memory), the copy rules hold, and every bug the emulator
// claims to catch (out-of-range arguments, host pointers in kernels, divergent barriers,
// shuffles with exited lanes, bad launch configurations, bad cuBLAS arguments) is caught.
// Cases that must abort run in a forked child; the output is TAP.
#include <cuda_runtime.h>
#include <cublas_v2.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>

static int g_case = 0, g_failed = 0;

static void report(bool ok, const char *what) {
  printf("%sok %d - cudasim: %s\n", ok ? "" : "not ", ++g_case, what);
  if (!ok) g_failed++;
}

// Runs fn in a child that must abort with `expect` in its stderr.
static void expect_abort(const char *what, const char *expect, void (*fn)()) {
  int fds[2];
  if (pipe(fds) != 0) { report(false, what); return; }
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(fds[1], 2);
    close(fds[0]);
    fn();
    cudaDeviceSynchronize();
    _exit(0);
  }
  close(fds[1]);
  std::string err;
  char buf[512];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof buf)) > 0) err.append(buf, (size_t)n);
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  bool ok = WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT && err.find(expect) != std::string::npos;
  if (!ok) fprintf(stderr, "# %s: status %d, stderr: %s\n", what, status, err.c_str());
  report(ok, what);
}

// --- kernels -------------------------------------------------------------------------------

// out[block] = sum of in[block * blockDim.x + i] through shuffles and shared memory.
__global__ void block_sum_kernel(const float *in, float *out) {
  __shared__ float part[32];
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0;
    for (unsigned w = 0; w < blockDim.x / 32; w++) s += part[w];
    out[blockIdx.x] = s;
  }
}

__global__ void copy_kernel(const float *in, float *out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i];
}

__global__ void divergent_kernel(float *out) {
  if (threadIdx.x < 16) __syncthreads();
  else out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

__global__ void exited_lanes_kernel(float *out) {
  if ((threadIdx.x & 31) >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

// Thread 0 writes shared memory that the others read: with the barrier every thread reads 7,
// without it the result depends on which threads run first.
__global__ void shared_handoff_kernel(float *out, bool barrier) {
  __shared__ float x;
  if (threadIdx.x == 0) x = 0;
  __syncthreads();
  if (threadIdx.x == blockDim.x - 1) x = 7;
  if (barrier) __syncthreads();
  out[threadIdx.x] = x;
}

struct Desc {
  void *data;
  int dtype, ndim;
  int64_t shape[2], strides[2];
};
__global__ void desc_kernel(Desc d) {}

// --- death cases -----------------------------------------------------------------------------

static float *device_floats(int n) {
  void *p = NULL;
  cudaMalloc(&p, (size_t)n * sizeof(float));
  return (float *)p;
}

static void launch_with_host_pointer() {
  static float host[64];
  copy_kernel<<<1, 64>>>(host, device_floats(64), 64);
}

static void launch_past_the_end() {
  float *d = device_floats(16);
  Desc desc = {d, ML_FLOAT32, 2, {4, 5}, {4, 1}};   // needs 20 floats
  desc_kernel<<<1, 32>>>(desc);
}

static void launch_divergent() { divergent_kernel<<<1, 64>>>(device_floats(64)); }
static void launch_exited_lanes() { exited_lanes_kernel<<<1, 32>>>(device_floats(32)); }

static void gemm_past_the_end() {
  cublasHandle_t h;
  cublasCreate(&h);
  float one = 1, zero = 0;
  float *a = device_floats(4), *b = device_floats(4), *c = device_floats(4);
  // 3x2 * 2x2 needs A of 6 floats.
  cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 3, 2, 2, &one, a, CUDA_R_32F, 3, 0, b, CUDA_R_32F, 2, 0,
                             &zero, c, CUDA_R_32F, 3, 0, 1, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

// --- cases that must work ----------------------------------------------------------------------

static void check_block_sums() {
  const int blocks = 3, threads = 256, n = blocks * threads;
  float host[n], sums[blocks];
  for (int i = 0; i < n; i++) host[i] = (float)(i % 7);
  float *in = device_floats(n), *out = device_floats(blocks);
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  cudaMemcpyAsync(in, host, sizeof host, cudaMemcpyHostToDevice, s);
  block_sum_kernel<<<blocks, threads, 0, s>>>(in, out);
  cudaMemcpyAsync(sums, out, sizeof sums, cudaMemcpyDeviceToHost, s);   // pageable: returns when done
  bool ok = true;
  for (int b = 0; b < blocks; b++) {
    float want = 0;
    for (int i = 0; i < threads; i++) want += (float)((b * threads + i) % 7);
    ok = ok && sums[b] == want;
  }
  report(ok, "block reductions through shuffles and __syncthreads");
}

// A pinned upload on one stream, read by a kernel on another: right only with the event wait.
static bool cross_stream_read(bool wait) {
  const int n = 256;
  float *pinned;
  cudaHostAlloc((void **)&pinned, n * sizeof(float), cudaHostAllocPortable);
  for (int i = 0; i < n; i++) pinned[i] = 1.0f;
  float *dev = device_floats(n), *out = device_floats(n), back[n];
  cudaStream_t copy, compute;
  cudaStreamCreateWithFlags(&copy, cudaStreamNonBlocking);
  cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking);
  cudaEvent_t done;
  cudaEventCreateWithFlags(&done, cudaEventDisableTiming);
  cudaMemcpyAsync(dev, pinned, n * sizeof(float), cudaMemcpyHostToDevice, copy);
  cudaEventRecord(done, copy);
  if (wait) cudaStreamWaitEvent(compute, done, 0);
  copy_kernel<<<1, n, 0, compute>>>(dev, out, n);
  cudaMemcpyAsync(back, out, sizeof back, cudaMemcpyDeviceToHost, compute);
  cudaDeviceSynchronize();
  cudaEventDestroy(done);
  cudaFreeHost(pinned);
  for (int i = 0; i < n; i++)
    if (back[i] != 1.0f) return false;
  return true;
}

// Sum of what the threads of shared_handoff_kernel read, run in the given thread order.
static float shared_handoff(const char *order, bool barrier) {
  const int n = 64;
  setenv("MOONLOAD_CUDASIM_THREAD_ORDER", order, 1);
  float *out = device_floats(n), back[n], sum = 0;
  shared_handoff_kernel<<<1, n>>>(out, barrier);
  cudaMemcpy(back, out, sizeof back, cudaMemcpyDeviceToHost);
  unsetenv("MOONLOAD_CUDASIM_THREAD_ORDER");
  for (int i = 0; i < n; i++) sum += back[i];
  return sum;
}

static void check_thread_orders() {
  bool same = true;
  for (const char *o : {"forward", "reverse", "random"}) same = same && shared_handoff(o, true) == 64 * 7.0f;
  report(same, "threads read what another wrote before a barrier, in every thread order");
  report(shared_handoff("forward", false) != shared_handoff("reverse", false),
         "a missing barrier gives different results in forward and reverse thread order");
}

static void check_copy_rules() {
  float *dev = device_floats(1), host = 1.0f, back = 0;
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  cudaMemcpyAsync(dev, &host, sizeof host, cudaMemcpyHostToDevice, s);
  host = 2.0f;   // pageable source: already staged
  cudaMemcpyAsync(&back, dev, sizeof back, cudaMemcpyDeviceToHost, s);
  report(back == 1.0f, "pageable copies: the source is staged, the destination written on return");
  report(cudaMemcpyAsync(&host, dev, sizeof host, cudaMemcpyHostToDevice, s) == cudaErrorInvalidValue &&
             cudaGetLastError() == cudaErrorInvalidValue && cudaGetLastError() == cudaSuccess,
         "a copy whose kind does not match its pointers is refused");
}

static void check_launch_config() {
  float *d = device_floats(2048);
  copy_kernel<<<1, 2048>>>(d, d, 2048);
  report(cudaGetLastError() == cudaErrorInvalidConfiguration, "a 2048-thread block is an invalid configuration");
}

static void check_gemm() {
  cublasHandle_t h;
  cublasCreate(&h);
  // Column-major A (2x3) = [1 2 3; 4 5 6], B (3x2) = [1 0; 0 1; 1 1]; C = A B = [4 5; 10 11].
  float a[6] = {1, 4, 2, 5, 3, 6}, b[6] = {1, 0, 1, 0, 1, 1}, c[4], one = 1, zero = 0;
  float *da = device_floats(6), *db = device_floats(6), *dc = device_floats(4);
  cudaMemcpy(da, a, sizeof a, cudaMemcpyHostToDevice);
  cudaMemcpy(db, b, sizeof b, cudaMemcpyHostToDevice);
  cublasStatus_t st = cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, da, CUDA_R_32F, 2, 0, db,
                                                 CUDA_R_32F, 3, 0, &zero, dc, CUDA_R_32F, 2, 0, 1, CUBLAS_COMPUTE_32F,
                                                 CUBLAS_GEMM_DEFAULT);
  cudaMemcpy(c, dc, sizeof c, cudaMemcpyDeviceToHost);
  report(st == CUBLAS_STATUS_SUCCESS && c[0] == 4 && c[1] == 10 && c[2] == 5 && c[3] == 11,
         "GEMM is column-major, and C is not read when beta is 0");
  // Transposed A: the same storage read as A^T (3x2) with lda 2.
  st = cublasGemmStridedBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_N, 3, 1, 2, &one, da, CUDA_R_32F, 2, 0, db, CUDA_R_32F, 2,
                                  0, &zero, dc, CUDA_R_32F, 3, 0, 1, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  cudaMemcpy(c, dc, 3 * sizeof(float), cudaMemcpyDeviceToHost);
  report(st == CUBLAS_STATUS_SUCCESS && c[0] == 1 && c[1] == 2 && c[2] == 3, "GEMM with a transposed operand");
  st = cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, da, CUDA_R_32F, 1, 0, db, CUDA_R_32F, 3,
                                  0, &zero, dc, CUDA_R_32F, 2, 0, 1, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  report(st == CUBLAS_STATUS_INVALID_VALUE, "GEMM refuses a leading dimension below the row count");
  st = cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, da, CUDA_R_32F, 2, 0, db, CUDA_R_16BF, 3,
                                  0, &zero, dc, CUDA_R_32F, 2, 0, 1, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  report(st == CUBLAS_STATUS_NOT_SUPPORTED, "GEMM refuses mixed operand types");
  cublasDestroy(h);
}

static void check_budget() {
  size_t free_b, total_b;
  cudaMemGetInfo(&free_b, &total_b);
  void *p = NULL;
  report(cudaMalloc(&p, total_b + 1) == cudaErrorMemoryAllocation && cudaGetLastError() == cudaErrorMemoryAllocation,
         "cudaMalloc beyond the device budget fails with cudaErrorMemoryAllocation");
}

int main() {
  setenv("MOONLOAD_CUDASIM_COPY_DELAY_US", "20000", 1);   // before the first copy reads it
  // Death cases first: forked children must not inherit streams that have work in flight.
  expect_abort("a host pointer handed to a kernel is caught", "addresses host memory", launch_with_host_pointer);
  expect_abort("a descriptor reaching past its allocation is caught", "past the end", launch_past_the_end);
  expect_abort("a __syncthreads that part of a warp never reaches is caught", "deadlocks", launch_divergent);
  expect_abort("a full-mask shuffle after lanes exited is caught", "has exited", launch_exited_lanes);
  expect_abort("a GEMM operand reaching past its allocation is caught", "past the end", gemm_past_the_end);
  check_block_sums();
  check_thread_orders();
  report(cross_stream_read(true), "a kernel ordered after a pinned upload by an event sees the data");
  report(!cross_stream_read(false), "without the event wait the kernel runs before the upload (streams are async)");
  check_copy_rules();
  check_launch_config();
  check_gemm();
  check_budget();
  printf("1..%d\n", g_case);
  return g_failed ? 1 : 0;
}
