/* device.c: device names and per-device byte accounting (in use and peak). */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>

#define ML_MAX_CUDA_DEVICES 16

typedef struct { atomic_llong in_use, peak; } device_counter;

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
