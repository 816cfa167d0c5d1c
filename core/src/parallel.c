/* parallel.c: the library's thread count and a parallel-for over OpenMP for the hand-written
   kernels (OpenBLAS keeps its own pool for GEMM). */
#include "internal.h"

#include <omp.h>

static int num_threads = 0;   /* 0: not set, use OpenMP's default (the core count) */

void ml_set_num_threads(int n) { num_threads = n > 0 ? n : 0; }

int ml_get_num_threads(void) { return num_threads > 0 ? num_threads : omp_get_max_threads(); }

/* Below this much work (elements x cost) threads cost more than they save. */
#define ML_PARALLEL_GRAIN 65536

void ml_parallel_for(int64_t n, int64_t cost_per_item, ml_parallel_fn fn, void *ctx) {
  if (n <= 0) return;
  int nt = ml_get_num_threads();
  if (cost_per_item < 1) cost_per_item = 1;
  if (nt <= 1 || n < 2 || n * cost_per_item < ML_PARALLEL_GRAIN || omp_in_parallel()) {
    fn(ctx, 0, n);
    return;
  }
  if (nt > n) nt = (int)n;
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num(), k = omp_get_num_threads();
    int64_t begin = n * t / k, end = n * (t + 1) / k;
    if (begin < end) fn(ctx, begin, end);
  }
}
