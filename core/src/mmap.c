/* mmap.c: whole-file mappings. Tensors borrow their bytes through storages that keep the mapping
   alive, so a checkpoint's pages come in on first use and are never copied. The mapping is
   private and writable (copy on write, as a loaded PyTorch tensor is writable): an in-place op on
   a loaded weight copies the pages it writes into the process and leaves the file as it is.
   MAP_NORESERVE keeps a mapping larger than RAM from being charged as if it could all be written
   (the kernel's heuristic overcommit would refuse it); where that is refused anyway (strict
   overcommit), the mapping falls back to read-only. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

ml_status ml_mapping_open(const char *path, ml_mapping **out) {
  if (!path) return ml_fail(ML_EINVAL, "ml_mapping_open: path is missing");
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ml_fail(ML_EIO, "cannot open %s: %s", path, strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno; close(fd);
    return ml_fail(ML_EIO, "cannot stat %s: %s", path, strerror(e));
  }
  if (!S_ISREG(st.st_mode)) { close(fd); return ml_fail(ML_EIO, "%s is not a regular file", path); }
  size_t size = (size_t)st.st_size;
  uint8_t *data = NULL;
  if (size > 0) {
    data = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
    if (data == MAP_FAILED) data = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (data == MAP_FAILED) {
      int e = errno; close(fd);
      return ml_fail(ML_EIO, "cannot map %s (%zu bytes): %s", path, size, strerror(e));
    }
  }
  ml_mapping *m = calloc(1, sizeof *m);
  char *p = strdup(path);
  if (!m || !p) {
    free(m); free(p);
    if (data) munmap(data, size);
    close(fd);
    return ml_fail(ML_ENOMEM, "ml_mapping_open: out of memory");
  }
  atomic_init(&m->refcount, 1);
  atomic_init(&m->registered, 0);
  m->fd = fd;
  m->data = data;
  m->size = size;
  m->path = p;
  *out = m;
  return ML_OK;
}

void ml_mapping_retain(ml_mapping *m) { if (m) atomic_fetch_add(&m->refcount, 1); }

void ml_mapping_release(ml_mapping *m) {
  if (!m || atomic_fetch_sub(&m->refcount, 1) != 1) return;
  if (atomic_load(&m->registered) == 1) {            /* page-locked in place: unlock before unmapping */
    const ml_cuda_api *cu = ml_cuda();
    if (cu) cu->host_unregister(m->data);
  }
  if (m->data) munmap(m->data, m->size);
  close(m->fd);
  free(m->path);
  free(m);
}

const uint8_t *ml_mapping_data(const ml_mapping *m) { return m ? m->data : NULL; }
size_t ml_mapping_size(const ml_mapping *m) { return m ? m->size : 0; }
const char *ml_mapping_path(const ml_mapping *m) { return m ? m->path : ""; }

ml_status ml_tensor_file_source(const ml_tensor *t, const char **path, uint64_t *offset, uint64_t *file_size,
                                int64_t *mtime_ns) {
  const ml_storage *s = t->storage;
  if (!s->mapping) return ml_fail(ML_EINVAL, "tensor_file_source: the tensor is not a view of a mapped file");
  struct stat st;
  if (fstat(s->mapping->fd, &st) != 0)
    return ml_fail(ML_EIO, "cannot stat %s: %s", s->mapping->path, strerror(errno));
  *path = s->mapping->path;
  *offset = (uint64_t)((const uint8_t *)s->data - s->mapping->data) + (uint64_t)t->offset * ml_dtype_size(t->dtype);
  *file_size = (uint64_t)st.st_size;
  *mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
  return ML_OK;
}

ml_status ml_mapping_check(const ml_mapping *m) {
  struct stat st;
  if (fstat(m->fd, &st) != 0) return ml_fail(ML_EIO, "cannot stat %s: %s", m->path, strerror(errno));
  if ((size_t)st.st_size < m->size)
    return ml_fail(ML_EIO, "%s shrank from %zu to %lld bytes while mapped", m->path, m->size,
                   (long long)st.st_size);
  return ML_OK;
}

ml_status ml_mapping_advise(const ml_mapping *m, size_t offset, size_t nbytes, int advice) {
  if (!m || offset > m->size || nbytes > m->size - offset)
    return ml_fail(ML_EINVAL, "ml_mapping_advise: range outside the mapping");
  if (nbytes == 0) return ML_OK;
  long page = sysconf(_SC_PAGESIZE);
  size_t start = offset & ~((size_t)page - 1);
  size_t len = nbytes + (offset - start);
  int adv = advice == 0 ? MADV_WILLNEED : MADV_DONTNEED;
  if (madvise(m->data + start, len, adv) != 0)
    return ml_fail(ML_EIO, "madvise on %s failed: %s", m->path, strerror(errno));
  if (advice == 1) posix_fadvise(m->fd, (off_t)start, (off_t)len, POSIX_FADV_DONTNEED);
  else posix_fadvise(m->fd, (off_t)start, (off_t)len, POSIX_FADV_WILLNEED);
  return ML_OK;
}

int64_t ml_tensor_drop_mapped_pages(const ml_tensor *t) {
  const ml_mapping *m = t->storage ? t->storage->mapping : NULL;
  if (!m) return 0;
  /* the bytes from the first element to the last (any strides) */
  int64_t lo = 0, hi = 0;
  for (int d = 0; d < t->ndim; d++) {
    if (t->shape[d] == 0) return 0;
    int64_t span = (t->shape[d] - 1) * t->strides[d];
    if (span < 0) lo += span; else hi += span;
  }
  size_t es = ml_dtype_size(t->dtype);
  const uint8_t *first = (const uint8_t *)t->storage->data + (size_t)(t->offset + lo) * es;
  size_t begin = (size_t)(first - m->data), end = begin + (size_t)(hi - lo + 1) * es;
  /* only whole pages inside the tensor: a neighbour's partial page stays */
  long ps = sysconf(_SC_PAGESIZE);
  size_t start = (begin + (size_t)ps - 1) & ~((size_t)ps - 1), stop = end & ~((size_t)ps - 1);
  if (stop <= start) return 0;
  if (madvise(m->data + start, stop - start, MADV_DONTNEED) != 0) return 0;
  return (int64_t)(stop - start);
}
