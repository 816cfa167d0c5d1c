// cublas.cc (cudasim): cublasGemmStridedBatchedEx as a reference loop on the handle's stream,
// with cuBLAS's argument rules (leading dimensions, supported type combinations) and the
// emulator's range checks on every operand. Column-major, like cuBLAS:
//   C[b] = alpha * op(A[b]) op(B[b]) + beta * C[b], op(A) m x k, op(B) k x n, C m x n.
// Accumulates in float for CUBLAS_COMPUTE_32F (inputs rounded to TF32 when the handle allows
// it) and in double for CUBLAS_COMPUTE_64F; C is not read when beta is 0, as in cuBLAS.
#include "cudasim_internal.h"
#include "cublas_v2.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"

#include <algorithm>

struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
};

cublasStatus_t cublasCreate(cublasHandle_t *handle) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) return CUBLAS_STATUS_NOT_INITIALIZED;
  *handle = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t s) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->math = mode;
  return CUBLAS_STATUS_SUCCESS;
}

namespace {

size_t type_size(cudaDataType_t t) {
  switch (t) {
  case CUDA_R_16F: case CUDA_R_16BF: return 2;
  case CUDA_R_32F: return 4;
  case CUDA_R_64F: return 8;
  }
  return 0;
}

double load(const void *p, cudaDataType_t t, int64_t i) {
  switch (t) {
  case CUDA_R_16F: return __half2float(((const __half *)p)[i]);
  case CUDA_R_16BF: return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
  case CUDA_R_32F: return ((const float *)p)[i];
  case CUDA_R_64F: return ((const double *)p)[i];
  }
  return 0;
}

void store(void *p, cudaDataType_t t, int64_t i, double v) {
  switch (t) {
  case CUDA_R_16F: ((__half *)p)[i] = __float2half_rn((float)v); break;
  case CUDA_R_16BF: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn((float)v); break;
  case CUDA_R_32F: ((float *)p)[i] = (float)v; break;
  case CUDA_R_64F: ((double *)p)[i] = v; break;
  }
}

// Keeps the 10 mantissa bits TF32 tensor cores use (round to nearest).
float tf32(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & ~0x1fffu;
  memcpy(&x, &bits, sizeof x);
  return x;
}

// The (A, B, C, compute) combinations cublasGemmEx documents, among the types emulated here.
bool supported(cudaDataType_t a, cudaDataType_t b, cudaDataType_t c, cublasComputeType_t ct) {
  if (a != b) return false;
  if (ct == CUBLAS_COMPUTE_64F) return a == CUDA_R_64F && c == CUDA_R_64F;
  if (ct != CUBLAS_COMPUTE_32F && ct != CUBLAS_COMPUTE_32F_FAST_TF32) return false;
  if (a == CUDA_R_32F) return c == CUDA_R_32F;
  if (a == CUDA_R_16F) return c == CUDA_R_16F || c == CUDA_R_32F;
  if (a == CUDA_R_16BF) return c == CUDA_R_16BF || c == CUDA_R_32F;
  return false;
}

// A matrix of `rows` x `cols` (column-major, leading dimension ld) in each of `batch` strides.
void check_operand(const char *name, const void *p, cudaDataType_t t, int rows, int cols, int ld, long long stride,
                   int batch) {
  if (rows == 0 || cols == 0 || batch == 0) return;
  long long last = (long long)(cols - 1) * ld + (rows - 1);
  long long lo = std::min(0LL, (long long)(batch - 1) * stride), hi = std::max(0LL, (long long)(batch - 1) * stride);
  size_t es = type_size(t);
  cudasim::check_device_range(name, 0, (const char *)p + lo * (long long)es, (size_t)(hi - lo + last + 1) * es);
}

}  // namespace

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const void *alpha, const void *A,
                                          cudaDataType_t Atype, int lda, long long strideA, const void *B,
                                          cudaDataType_t Btype, int ldb, long long strideB, const void *beta, void *C,
                                          cudaDataType_t Ctype, int ldc, long long strideC, int batchCount,
                                          cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  bool ta = transa == CUBLAS_OP_T, tb = transb == CUBLAS_OP_T;
  if (m < 0 || n < 0 || k < 0 || batchCount < 0 || lda < std::max(1, ta ? k : m) ||
      ldb < std::max(1, tb ? n : k) || ldc < std::max(1, m) || !alpha || !beta)
    return CUBLAS_STATUS_INVALID_VALUE;
  if (!supported(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (m == 0 || n == 0 || batchCount == 0) return CUBLAS_STATUS_SUCCESS;
  bool wide = computeType == CUBLAS_COMPUTE_64F;
  // Host pointer mode: the scalars are read now.
  double a = wide ? *(const double *)alpha : *(const float *)alpha;
  double b = wide ? *(const double *)beta : *(const float *)beta;
  check_operand("cublasGemmStridedBatchedEx: A", A, Atype, ta ? k : m, ta ? m : k, lda, strideA, batchCount);
  check_operand("cublasGemmStridedBatchedEx: B", B, Btype, tb ? n : k, tb ? k : n, ldb, strideB, batchCount);
  check_operand("cublasGemmStridedBatchedEx: C", C, Ctype, m, n, ldc, strideC, batchCount);
  bool round_tf32 = Atype == CUDA_R_32F && (computeType == CUBLAS_COMPUTE_32F_FAST_TF32 ||
                                            handle->math == CUBLAS_TF32_TENSOR_OP_MATH);
  cudasim::enqueue(handle->stream, [=] {
    for (int bi = 0; bi < batchCount; bi++) {
      const char *pa = (const char *)A + bi * strideA * (long long)type_size(Atype);
      const char *pb = (const char *)B + bi * strideB * (long long)type_size(Btype);
      char *pc = (char *)C + bi * strideC * (long long)type_size(Ctype);
      for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
          double accd = 0;
          float accf = 0;
          for (int l = 0; l < k; l++) {
            double x = load(pa, Atype, ta ? (int64_t)i * lda + l : (int64_t)l * lda + i);
            double y = load(pb, Btype, tb ? (int64_t)l * ldb + j : (int64_t)j * ldb + l);
            if (wide) accd += x * y;
            else if (round_tf32) accf += tf32((float)x) * tf32((float)y);
            else accf += (float)x * (float)y;
          }
          double acc = wide ? accd : (double)accf;
          int64_t ci = (int64_t)j * ldc + i;
          store(pc, Ctype, ci, b == 0 ? a * acc : a * acc + b * load(pc, Ctype, ci));
        }
    }
  });
  return CUBLAS_STATUS_SUCCESS;
}
