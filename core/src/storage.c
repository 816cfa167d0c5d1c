/* storage.c: refcounted byte buffers on a device. Who frees the bytes is the backend's job:
   cpu (aligned malloc), pinned host and cuda (through the CUDA backend), borrowed from a file
   mapping (the mapping's refcount), meta (nothing to free: there are no bytes). */
#include "internal.h"

#include <sched.h>
#include <stdlib.h>

/* Large blocks start on a page, so that one can be page-locked in place alone (ml_cpu_block_pages). */
void *ml_aligned_alloc(size_t nbytes) {
  void *p = NULL;
  size_t align = nbytes >= ((size_t)256 << 10) ? 4096 : 64;
  if (posix_memalign(&p, align, nbytes ? (nbytes + 63) & ~(size_t)63 : 64) != 0) return NULL;
  return p;
}

void ml_aligned_free(void *p) { free(p); }

static void free_cpu(ml_storage *s) {
  /* (before the block is reused or freed; ml_cuda() only then: its first call loads the backend) */
  if (s->registered) ml_cuda()->host_unregister(s->data);
  ml_cpu_free(s->data, s->nbytes);
}
static void free_pinned(ml_storage *s) {
  const ml_cuda_api *cu = ml_cuda();
  if (cu) cu->free_pinned(s->data);
}
static void free_cuda(ml_storage *s) {
  const ml_cuda_api *cu = ml_cuda();
  if (cu) cu->free(s->device.index, s->data, s->nbytes);
}

static const ml_storage_backend backend_cpu = {"cpu", free_cpu};
static const ml_storage_backend backend_pinned = {"pinned", free_pinned};
static const ml_storage_backend backend_cuda = {"cuda", free_cuda};
static const ml_storage_backend backend_meta = {"meta", NULL};
static const ml_storage_backend backend_mapped = {"mapped", NULL};

static ml_status storage_alloc_header(ml_device dev, size_t nbytes, const ml_storage_backend *be,
                                      ml_storage **out) {
  ml_storage *s = calloc(1, sizeof *s);
  if (!s) return ml_fail(ML_ENOMEM, "ml_storage_new: out of memory for a storage header");
  atomic_init(&s->refcount, 1);
  s->device = dev;
  s->nbytes = nbytes;
  s->backend = be;
  *out = s;
  return ML_OK;
}

static ml_status storage_new(ml_device dev, size_t nbytes, bool if_free, ml_storage **out) {
  ml_storage *s = NULL;
  switch (dev.type) {
  case ML_DEVICE_META:
    return storage_alloc_header(dev, nbytes, &backend_meta, out);
  case ML_DEVICE_CPU: {
    void *p = ml_cpu_alloc(nbytes);
    if (!p) return ml_fail(ML_ENOMEM, "ml_storage_new: cannot allocate %zu bytes on cpu", nbytes);
    if (storage_alloc_header(dev, nbytes, &backend_cpu, &s) != ML_OK) { ml_cpu_free(p, nbytes); return ML_ENOMEM; }
    s->data = p;
    break;
  }
  case ML_DEVICE_CUDA: {
    const ml_cuda_api *cu = ml_cuda();
    if (!cu) return ML_EUNSUPPORTED;
    if (dev.index >= cu->device_count())
      return ml_fail(ML_EINVAL, "ml_storage_new: device cuda:%d does not exist (%d CUDA devices)",
                     dev.index, cu->device_count());
    void *p;
    ML_TRY((if_free ? cu->alloc_if_free : cu->alloc)(dev.index, nbytes, &p));
    if (storage_alloc_header(dev, nbytes, &backend_cuda, &s) != ML_OK) { cu->free(dev.index, p, nbytes); return ML_ENOMEM; }
    s->data = p;
    break;
  }
  default:
    return ml_fail(ML_EINVAL, "ml_storage_new: unknown device %s", ml_device_str(dev));
  }
  s->accounted = true;
  ml_device_account(dev, (int64_t)nbytes);
  *out = s;
  return ML_OK;
}

ml_status ml_storage_new(ml_device dev, size_t nbytes, ml_storage **out) {
  return storage_new(dev, nbytes, false, out);
}

ml_status ml_storage_new_if_free(ml_device dev, size_t nbytes, ml_storage **out) {
  return storage_new(dev, nbytes, true, out);
}

ml_status ml_storage_new_pinned(size_t nbytes, ml_storage **out) {
  const ml_cuda_api *cu = ml_cuda();
  if (!cu || cu->device_count() == 0) return ml_storage_new(ml_cpu(), nbytes, out);
  void *p;
  ML_TRY(cu->alloc_pinned(nbytes, &p));
  ml_storage *s = NULL;
  if (storage_alloc_header(ml_cpu(), nbytes, &backend_pinned, &s) != ML_OK) { cu->free_pinned(p); return ML_ENOMEM; }
  s->data = p;
  s->accounted = true;
  ml_device_account(s->device, (int64_t)nbytes);
  *out = s;
  return ML_OK;
}

ml_status ml_storage_from_mapping(ml_mapping *map, size_t offset, size_t nbytes, ml_storage **out) {
  if (!map) return ml_fail(ML_EINVAL, "ml_storage_from_mapping: mapping is NULL");
  if (offset > map->size || nbytes > map->size - offset)
    return ml_fail(ML_EINVAL, "ml_storage_from_mapping: range [%zu, %zu) is outside %s (%zu bytes)",
                   offset, offset + nbytes, map->path, map->size);
  ml_storage *s = NULL;
  ML_TRY(storage_alloc_header(ml_cpu(), nbytes, &backend_mapped, &s));
  s->data = map->data + offset;
  ml_mapping_retain(map);
  s->mapping = map;
  *out = s;
  return ML_OK;
}

void ml_storage_retain(ml_storage *s) { if (s) atomic_fetch_add(&s->refcount, 1); }

void ml_storage_release(ml_storage *s) {
  if (!s || atomic_fetch_sub(&s->refcount, 1) != 1) return;
  if (s->backend->free_bytes) s->backend->free_bytes(s);
  if (s->accounted) ml_device_account(s->device, -(int64_t)s->nbytes);
  ml_mapping_release(s->mapping);
  free(s);
}

void *ml_storage_data(const ml_storage *s) { return s ? s->data : NULL; }
size_t ml_storage_nbytes(const ml_storage *s) { return s ? s->nbytes : 0; }
ml_device ml_storage_device(const ml_storage *s) { return s ? s->device : ml_meta(); }
bool ml_storage_is_borrowed(const ml_storage *s) { return s && s->mapping != NULL; }
bool ml_storage_is_pinned(const ml_storage *s) {
  return s && (s->backend == &backend_pinned || s->registered ||
               (s->mapping && atomic_load(&s->mapping->registered) == 1));
}

/* Page-locks a whole file mapping once (read-only: its private pages stay shared with the page
   cache); the mapping unlocks it on its last release. */
static ml_status register_mapping(ml_mapping *m, const ml_cuda_api *cu) {
  int expected = 0;
  if (!atomic_compare_exchange_strong(&m->registered, &expected, 2)) {
    while (atomic_load(&m->registered) == 2) sched_yield();      /* another thread is locking it */
    if (atomic_load(&m->registered) == 1) return ML_OK;
    return ml_fail(ML_EIO, "pin_memory in place: page-locking %s failed in another thread", m->path);
  }
  ml_status st = m->size ? cu->host_register(m->data, m->size, true) : ML_OK;
  atomic_store(&m->registered, st == ML_OK ? 1 : 0);
  if (st) return ml_fail_context(st, "pin_memory in place: cannot page-lock %s (%zu bytes)", m->path, m->size);
  return ML_OK;
}

ml_status ml_storage_pin_in_place(ml_storage *s, bool *pinned) {
  *pinned = false;
  if (!s || s->device.type != ML_DEVICE_CPU)
    return ml_fail(ML_EINVAL, "pin_memory in place: only cpu storages can be pinned");
  if (ml_storage_is_pinned(s)) { *pinned = true; return ML_OK; }
  const ml_cuda_api *cu = ml_cuda();
  if (!cu) return ml_fail_context(ML_EUNSUPPORTED, "pin_memory in place");   /* (the loader's reason follows) */
  if (s->mapping) {
    ML_TRY(register_mapping(s->mapping, cu));
    *pinned = true;
    return ML_OK;
  }
  size_t span;
  if (s->backend != &backend_cpu || !ml_cpu_block_pages(s->nbytes, &span)) return ML_OK;   /* shares its pages */
  ML_TRY(cu->host_register(s->data, span, false));
  s->registered = true;
  *pinned = true;
  return ML_OK;
}
