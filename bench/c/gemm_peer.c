/* gemm_peer.c: OpenBLAS cblas_sgemm called directly from C, the peer of bench/gemm.lua.
   Usage: gemm_peer N REPS. Prints one JSON line with the best wall time and GFLOP/s of an
   N x N x N float32 product (row-major, no transposes, beta = 0), after one warm-up run. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 1024, reps = argc > 2 ? atoi(argv[2]) : 3;
  size_t nn = (size_t)n * (size_t)n;
  float *a = aligned_alloc(64, nn * sizeof *a), *b = aligned_alloc(64, nn * sizeof *b),
        *c = aligned_alloc(64, nn * sizeof *c);
  if (!a || !b || !c) { fprintf(stderr, "gemm_peer: out of memory\n"); return 1; }
  for (size_t i = 0; i < nn; i++) { a[i] = (float)(i % 13) * 0.1f - 0.6f; b[i] = (float)(i % 7) * 0.2f - 0.6f; }
  double best = 1e30;
  for (int r = 0; r <= reps; r++) {
    double t0 = now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
    double dt = now() - t0;
    if (r > 0 && dt < best) best = dt;
  }
  printf("{\"peer\":\"openblas_sgemm\",\"n\":%d,\"best_s\":%.6f,\"gflops\":%.3f,\"check\":%g}\n", n, best,
         2.0 * n * (double)n * n / best * 1e-9, (double)c[nn / 2]);
  free(a); free(b); free(c);
  return 0;
}
