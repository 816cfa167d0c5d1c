/* device.c: device names, per-device byte accounting (in use and peak), and the garbage
   pressure that tells the Lua binding when dead tensors are worth collecting: LuaJIT's
   collector sees only the small wrappers, not the device memory behind them (Torch7 had
   heap tracking for the same reason). */
#include "internal.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define ML_MAX_CUDA_DEVICES 16

typedef struct {
  atomic_llong in_use, peak;
  atomic_llong since_gc;      /* bytes allocated since the last ml_gc_done */
  atomic_llong gc_threshold;  /* since_gc beyond this raises the flag; 0: the device's minimum */
  atomic_llong gc_cap;        /* ml_gc_set_cap: the most garbage allowed before a collection; 0: none */
} device_counter;

/* The CPU's threshold grows with what is live, by a quarter: a larger share (it was all of it)
   let a 537 MB key-value cache hold as much garbage again beside it (bench/fit_context.lua). */
#define GC_MIN_CPU ((long long)64 << 20)
#define GC_MIN_CUDA ((long long)64 << 20)

static volatile int32_t gc_flag;

static device_counter cpu_counter;
static device_counter cuda_counters[ML_MAX_CUDA_DEVICES];

static device_counter *counter_for(ml_device dev) {
  if (dev.type == ML_DEVICE_CPU) return &cpu_counter;
  if (dev.type == ML_DEVICE_CUDA && dev.index >= 0 && dev.index < ML_MAX_CUDA_DEVICES)
    return &cuda_counters[dev.index];
  return NULL;
}

void ml_device_account(ml_device dev, int64_t delta) {
  device_counter *c = counter_for(dev);
  if (!c) return;
  long long now = atomic_fetch_add(&c->in_use, delta) + delta;
  long long peak = atomic_load(&c->peak);
  while (now > peak && !atomic_compare_exchange_weak(&c->peak, &peak, now)) {}
  if (delta > 0) {
    long long since = atomic_fetch_add(&c->since_gc, delta) + delta;
    long long limit = atomic_load(&c->gc_threshold);
    if (limit == 0) limit = dev.type == ML_DEVICE_CPU ? GC_MIN_CPU : GC_MIN_CUDA;
    long long cap = atomic_load(&c->gc_cap);
    if (cap > 0 && cap < limit) limit = cap;
    if (since > limit) gc_flag = 1;
  }
}

volatile int32_t *ml_gc_flag(void) { return &gc_flag; }

ml_status ml_gc_set_cap(ml_device dev, int64_t bytes, int64_t *previous) {
  device_counter *c = counter_for(dev);
  if (!c) {
    char name[32];
    ml_device_name(dev, name, sizeof name);
    return ml_fail(ML_EINVAL, "set_gc_cap: device \"%s\" holds no memory of its own", name);
  }
  if (bytes < 0) return ml_fail(ML_EINVAL, "set_gc_cap: bytes must be >= 0, got %lld", (long long)bytes);
  long long old = atomic_exchange(&c->gc_cap, bytes);
  if (previous) *previous = old;
  return ML_OK;
}

void ml_gc_done(void) {
  gc_flag = 0;
  long long live = atomic_load(&cpu_counter.in_use);
  atomic_store(&cpu_counter.since_gc, 0);
  atomic_store(&cpu_counter.gc_threshold, live / 4 > GC_MIN_CPU ? live / 4 : GC_MIN_CPU);
  for (int i = 0; i < ML_MAX_CUDA_DEVICES; i++) {
    device_counter *c = &cuda_counters[i];
    if (atomic_load(&c->since_gc) == 0 && atomic_load(&c->in_use) == 0) continue;   /* never used */
    atomic_store(&c->since_gc, 0);
    int64_t free_b = 0, total_b = 0;
    long long limit = GC_MIN_CUDA;
    if (ml_cuda_mem_get_info(i, &free_b, &total_b) == ML_OK && free_b / 4 > limit) limit = free_b / 4;
    atomic_store(&c->gc_threshold, limit);
  }
}

// --- memory given back on demand ---------------------------------------------------------

typedef struct { ml_reclaim_fn fn; void *ctx; } reclaimer;
static pthread_mutex_t reclaim_mu = PTHREAD_MUTEX_INITIALIZER;
static reclaimer *reclaimers;
static int nreclaimers, reclaim_cap;

ml_status ml_reclaimer_add(ml_reclaim_fn fn, void *ctx) {
  pthread_mutex_lock(&reclaim_mu);
  if (nreclaimers == reclaim_cap) {
    int cap = reclaim_cap ? reclaim_cap * 2 : 4;
    reclaimer *p = realloc(reclaimers, (size_t)cap * sizeof *p);
    if (!p) { pthread_mutex_unlock(&reclaim_mu); return ml_fail(ML_ENOMEM, "ml_reclaimer_add: out of memory"); }
    reclaimers = p;
    reclaim_cap = cap;
  }
  reclaimers[nreclaimers++] = (reclaimer){fn, ctx};
  pthread_mutex_unlock(&reclaim_mu);
  return ML_OK;
}

void ml_reclaimer_remove(ml_reclaim_fn fn, void *ctx) {
  pthread_mutex_lock(&reclaim_mu);
  for (int i = 0; i < nreclaimers; i++)
    if (reclaimers[i].fn == fn && reclaimers[i].ctx == ctx) { reclaimers[i] = reclaimers[--nreclaimers]; break; }
  pthread_mutex_unlock(&reclaim_mu);
}

/* Held across the calls, so an owner cannot be removed (and freed) while it gives memory back. */
size_t ml_cuda_reclaim(int device) {
  size_t freed = 0;
  pthread_mutex_lock(&reclaim_mu);
  for (int i = 0; i < nreclaimers; i++) freed += reclaimers[i].fn(reclaimers[i].ctx, device);
  pthread_mutex_unlock(&reclaim_mu);
  return freed;
}

ml_status ml_device_parse(const char *name, ml_device *out) {
  if (!name) return ml_fail(ML_EINVAL, "device: name is missing");
  if (strcmp(name, "cpu") == 0) { *out = ml_cpu(); return ML_OK; }
  if (strcmp(name, "meta") == 0) { *out = ml_meta(); return ML_OK; }
  if (strcmp(name, "cuda") == 0) { out->type = ML_DEVICE_CUDA; out->index = 0; return ML_OK; }
  if (strncmp(name, "cuda:", 5) == 0 && name[5] >= '0' && name[5] <= '9') {
    char *end;
    long idx = strtol(name + 5, &end, 10);
    if (*end == '\0' && idx < ML_MAX_CUDA_DEVICES) {
      out->type = ML_DEVICE_CUDA; out->index = (int32_t)idx; return ML_OK;
    }
  }
  return ml_fail(ML_EINVAL, "unknown device \"%s\" (expected \"cpu\", \"meta\", \"cuda\" or \"cuda:N\")", name);
}

void ml_device_name(ml_device dev, char *buf, size_t n) {
  switch (dev.type) {
  case ML_DEVICE_CPU: snprintf(buf, n, "cpu"); break;
  case ML_DEVICE_META: snprintf(buf, n, "meta"); break;
  case ML_DEVICE_CUDA: snprintf(buf, n, "cuda:%d", dev.index); break;
  default: snprintf(buf, n, "device(%d:%d)", dev.type, dev.index); break;
  }
}

bool ml_device_equal(ml_device a, ml_device b) { return a.type == b.type && a.index == b.index; }

ml_status ml_device_memory(ml_device dev, int64_t *in_use, int64_t *peak) {
  if (dev.type == ML_DEVICE_META) { *in_use = 0; *peak = 0; return ML_OK; }
  device_counter *c = counter_for(dev);
  if (!c) return ml_fail(ML_EINVAL, "ml_device_memory: no accounting for device %s", ml_device_str(dev));
  *in_use = atomic_load(&c->in_use);
  *peak = atomic_load(&c->peak);
  return ML_OK;
}

ml_status ml_device_reset_peak(ml_device dev) {
  if (dev.type == ML_DEVICE_META) return ML_OK;
  device_counter *c = counter_for(dev);
  if (!c) return ml_fail(ML_EINVAL, "ml_device_reset_peak: no accounting for device %s", ml_device_str(dev));
  atomic_store(&c->peak, atomic_load(&c->in_use));
  return ML_OK;
}
