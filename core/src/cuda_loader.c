/* cuda_loader.c: opens libmoonload_cuda.so on first use of a cuda device, so the same
   libmoonload.so runs everything on the CPU where no CUDA driver or GPU exists. */
#include "internal.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static const ml_cuda_api *loaded;
static char load_error[768];

static void load_backend(void) {
  /* Next to libmoonload.so first (installed rock, build tree), then the loader's search path. */
  Dl_info info;
  char path[1024];
  void *h = NULL;
  const char *env = getenv("MOONLOAD_CUDA_LIB");
  if (env && *env) h = dlopen(env, RTLD_NOW | RTLD_LOCAL);
  if (!h && dladdr((void *)load_backend, &info) && info.dli_fname) {
    const char *slash = strrchr(info.dli_fname, '/');
    if (slash) {
      snprintf(path, sizeof path, "%.*s/libmoonload_cuda.so", (int)(slash - info.dli_fname), info.dli_fname);
      h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    }
  }
  if (!h) h = dlopen("libmoonload_cuda.so", RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char *e = dlerror();
    snprintf(load_error, sizeof load_error,
             "CUDA is not available: libmoonload_cuda.so could not be loaded (%s); build with nvcc "
             "present (make CUDA=1) and run on a machine with an NVIDIA driver", e ? e : "not found");
    return;
  }
  ml_cuda_backend_fn get = (ml_cuda_backend_fn)dlsym(h, "ml_cuda_backend");
  if (!get) {
    snprintf(load_error, sizeof load_error, "CUDA is not available: libmoonload_cuda.so has no ml_cuda_backend");
    return;
  }
  const ml_cuda_api *api = get(load_error, sizeof load_error);
  if (api && api->version != ML_CUDA_API_VERSION) {
    /* A table of another layout would be read past its end: refuse it. */
    snprintf(load_error, sizeof load_error,
             "CUDA is not available: libmoonload_cuda.so is from another build (backend API version %d, this "
             "library expects %d); rebuild both with make CUDA=1", api->version, ML_CUDA_API_VERSION);
    return;
  }
  loaded = api;
}

const ml_cuda_api *ml_cuda(void) {
  pthread_once(&load_once, load_backend);
  if (!loaded) ml_fail(ML_EUNSUPPORTED, "%s", load_error);
  return loaded;
}

int ml_cuda_device_count(void) {
  const ml_cuda_api *cu = ml_cuda();
  return cu ? cu->device_count() : 0;
}

/* The backend table, after checking that the device exists (fn names the caller in errors). */
static ml_status cuda_device(const char *fn, int device, const ml_cuda_api **out) {
  const ml_cuda_api *cu = ml_cuda();
  if (!cu) return ML_EUNSUPPORTED;   /* the loader's message says why */
  if (device < 0 || device >= cu->device_count())
    return ml_fail(ML_EINVAL, "%s: cuda:%d does not exist (%d CUDA devices)", fn, device, cu->device_count());
  *out = cu;
  return ML_OK;
}

ml_status ml_cuda_mem_get_info(int device, int64_t *free_bytes, int64_t *total_bytes) {
  const ml_cuda_api *cu = NULL;
  ML_TRY(cuda_device("mem_get_info", device, &cu));
  size_t f = 0, t = 0;
  ML_TRY(cu->mem_info(device, &f, &t));
  *free_bytes = (int64_t)f;
  *total_bytes = (int64_t)t;
  return ML_OK;
}

ml_status ml_cuda_get_device_properties(int device, ml_cuda_props *out) {
  const ml_cuda_api *cu = NULL;
  ML_TRY(cuda_device("get_device_properties", device, &cu));
  return cu->properties(device, out);
}

ml_status ml_cuda_synchronize(int device) {
  const ml_cuda_api *cu = NULL;
  ML_TRY(cuda_device("synchronize", device, &cu));
  return cu->synchronize(device);
}

ml_status ml_cuda_cached_bytes(int device, int64_t *out) {
  const ml_cuda_api *cu = NULL;
  ML_TRY(cuda_device("memory_reserved", device, &cu));
  *out = (int64_t)cu->cached_bytes(device);
  return ML_OK;
}

ml_status ml_cuda_empty_cache(int device) {
  const ml_cuda_api *cu = NULL;
  ML_TRY(cuda_device("empty_cache", device, &cu));
  return cu->empty_cache(device);
}
