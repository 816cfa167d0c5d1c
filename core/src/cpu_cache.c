/* cpu_cache.c: keeps freed large CPU storage blocks for reuse. glibc hands every block over
   ~128 KiB straight back to the kernel, so each fresh activation of a layer page-faults its way
   in again (a 64 MB output costs more in faults than the op itself). Blocks of 256 KiB and up are
   kept in 64 KiB size classes, at most MOONLOAD_CPU_CACHE_MB in all (default 256; 0 turns the
   cache off). Cached bytes do not count as in use; ml_cpu_empty_cache() gives them back. */
#include "internal.h"

#include <pthread.h>
#include <stdlib.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#define CACHE_MIN_BYTES ((size_t)256 << 10)
#define CACHE_GRANULE ((size_t)64 << 10)
#define CACHE_SLOTS 64

typedef struct { void *ptr; size_t size; } cached_block;

static pthread_mutex_t cache_mutex = PTHREAD_MUTEX_INITIALIZER;
static cached_block cache[CACHE_SLOTS];
static int cache_count;
static size_t cache_bytes;
static size_t cache_limit = (size_t)-1;   /* read from the environment on first use */

static size_t limit(void) {
  if (cache_limit == (size_t)-1) {
    const char *env = getenv("MOONLOAD_CPU_CACHE_MB");
    long mb = env && *env ? atol(env) : 256;
    cache_limit = mb > 0 ? (size_t)mb << 20 : 0;
  }
  return cache_limit;
}

static size_t size_class(size_t nbytes) {
  return nbytes < CACHE_MIN_BYTES ? nbytes : (nbytes + CACHE_GRANULE - 1) & ~(CACHE_GRANULE - 1);
}

bool ml_cpu_block_pages(size_t nbytes, size_t *span) {
  size_t size = size_class(nbytes);
  if (size < CACHE_MIN_BYTES) return false;
  *span = size;
  return true;
}

void *ml_cpu_alloc(size_t nbytes) {
  size_t size = size_class(nbytes);
  if (size >= CACHE_MIN_BYTES) {
    pthread_mutex_lock(&cache_mutex);
    for (int i = cache_count - 1; i >= 0; i--) {
      if (cache[i].size == size) {
        void *p = cache[i].ptr;
        cache[i] = cache[--cache_count];
        cache_bytes -= size;
        pthread_mutex_unlock(&cache_mutex);
        return p;
      }
    }
    pthread_mutex_unlock(&cache_mutex);
  }
  return ml_aligned_alloc(size);
}

void ml_cpu_free(void *p, size_t nbytes) {
  if (!p) return;
  size_t size = size_class(nbytes);
  if (size >= CACHE_MIN_BYTES && size <= limit()) {
    pthread_mutex_lock(&cache_mutex);
    /* Make room by dropping the oldest blocks; a block bigger than the whole cache is not kept. */
    while (cache_count > 0 && (cache_count == CACHE_SLOTS || cache_bytes + size > cache_limit)) {
      ml_aligned_free(cache[0].ptr);
      cache_bytes -= cache[0].size;
      memmove(cache, cache + 1, (size_t)(--cache_count) * sizeof cache[0]);
    }
    cache[cache_count].ptr = p;
    cache[cache_count].size = size;
    cache_count++;
    cache_bytes += size;
    pthread_mutex_unlock(&cache_mutex);
    return;
  }
  ml_aligned_free(p);
}

int64_t ml_cpu_cached_bytes(void) {
  pthread_mutex_lock(&cache_mutex);
  int64_t n = (int64_t)cache_bytes;
  pthread_mutex_unlock(&cache_mutex);
  return n;
}

int64_t ml_cpu_cache_limit(void) {
  pthread_mutex_lock(&cache_mutex);
  int64_t n = (int64_t)limit();
  pthread_mutex_unlock(&cache_mutex);
  return n;
}

int64_t ml_cpu_cache_set_limit(int64_t bytes) {
  pthread_mutex_lock(&cache_mutex);
  int64_t previous = (int64_t)limit();
  cache_limit = bytes > 0 ? (size_t)bytes : 0;
  while (cache_count > 0 && cache_bytes > cache_limit) {     /* oldest first, as when full */
    ml_aligned_free(cache[0].ptr);
    cache_bytes -= cache[0].size;
    memmove(cache, cache + 1, (size_t)(--cache_count) * sizeof cache[0]);
  }
  pthread_mutex_unlock(&cache_mutex);
  return previous;
}

void ml_cpu_empty_cache(void) {
  pthread_mutex_lock(&cache_mutex);
  for (int i = 0; i < cache_count; i++) ml_aligned_free(cache[i].ptr);
  cache_count = 0;
  cache_bytes = 0;
  pthread_mutex_unlock(&cache_mutex);
#ifdef __GLIBC__
  /* glibc keeps freed blocks below its (grown) mmap threshold in the heap: hand them back too */
  malloc_trim(0);
#endif
}
