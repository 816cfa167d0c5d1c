// runtime.cc (cudasim): devices, device memory, pinned memory, streams, events and copies of the
// CPU emulation of CUDA. Streams are worker threads running their queue in order; everything
// the CUDA documentation says is asynchronous is asynchronous here too, so ordering bugs in
// the caller show up. See cudasim.h for what is emulated.
#include "cudasim_internal.h"

#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

struct CUstream_st {
  int device;
  std::mutex mu;
  std::condition_variable work, done;
  std::deque<std::function<void()>> queue;
  uint64_t submitted = 0, completed = 0;
};

namespace cudasim {

void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("cudasim: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  fflush(stderr);
  abort();
}

static long env_long(const char *name, long fallback) {
  const char *v = getenv(name);
  return v && *v ? strtol(v, NULL, 10) : fallback;
}

// --- devices and errors --------------------------------------------------------------------

static int device_total() {
  static int n = (int)env_long("MOONLOAD_CUDASIM_DEVICES", 1);
  return n < 0 ? 0 : n > kMaxDevices ? kMaxDevices : n;
}

static size_t device_budget() {
  static size_t b = (size_t)env_long("MOONLOAD_CUDASIM_MEM_MB", 4096) << 20;
  return b;
}

static thread_local int tls_device = 0;
static thread_local cudaError_t tls_last_error = cudaSuccess;

cudaError_t record_error(cudaError_t e) {
  if (e != cudaSuccess) tls_last_error = e;
  return e;
}

int current_device() { return tls_device; }

// --- memory --------------------------------------------------------------------------------

struct Allocation {
  size_t size;
  int device;   // -1: pinned host memory (cudaHostAlloc), -2: registered host memory
};

static std::mutex g_mem_mu;
static std::map<uintptr_t, Allocation> g_allocs;   // start address -> allocation
static size_t g_device_used[kMaxDevices];

// The allocation holding [p, p + n), or NULL.
static const Allocation *find_allocation(const void *p, size_t n, uintptr_t *start) {
  uintptr_t a = (uintptr_t)p;
  auto it = g_allocs.upper_bound(a);
  if (it == g_allocs.begin()) return NULL;
  --it;
  if (a < it->first || a + n > it->first + it->second.size) return NULL;
  if (start) *start = it->first;
  return &it->second;
}

MemoryKind memory_kind(const void *p, size_t n, int *device) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  const Allocation *a = find_allocation(p, n ? n : 1, NULL);
  if (!a) {
    // Starting inside an allocation but running past its end is an overrun, not host memory.
    if (find_allocation(p, 1, NULL)) return MemoryKind::overrun;
    return MemoryKind::pageable;
  }
  if (device) *device = a->device;
  return a->device < 0 ? MemoryKind::pinned : MemoryKind::device;
}

void check_device_range(const char *kernel, int arg, const void *p, size_t n) {
  int dev = -1;
  MemoryKind k = memory_kind(p, n, &dev);
  if (k == MemoryKind::device) return;
  const char *where = k == MemoryKind::overrun  ? "memory past the end of a device allocation"
                      : k == MemoryKind::pinned ? "pinned host memory"
                                                : "host memory";
  die("%s: argument %d addresses %s: [%p, +%zu bytes) (on a GPU: an illegal address)", kernel, arg, where, p, n);
}

// --- streams -------------------------------------------------------------------------------

static void stream_main(CUstream_st *s) {
  static long jitter_us = env_long("MOONLOAD_CUDASIM_JITTER_US", 0);
  std::minstd_rand rng((unsigned)(uintptr_t)s);
  std::unique_lock<std::mutex> lock(s->mu);
  for (;;) {
    s->work.wait(lock, [s] { return !s->queue.empty(); });
    std::function<void()> op = std::move(s->queue.front());
    s->queue.pop_front();
    lock.unlock();
    if (jitter_us > 0) usleep((useconds_t)(rng() % (unsigned long)jitter_us));
    op();
    lock.lock();
    s->completed++;
    s->done.notify_all();
  }
}

static std::mutex g_stream_mu;
static std::vector<CUstream_st *> g_streams;   // never destroyed: workers live until exit
static CUstream_st *g_legacy[kMaxDevices];

static CUstream_st *new_stream(int device) {
  CUstream_st *s = new CUstream_st;
  s->device = device;
  std::thread(stream_main, s).detach();
  std::lock_guard<std::mutex> lock(g_stream_mu);
  g_streams.push_back(s);
  return s;
}

// The null stream of the current device (created on first use).
static CUstream_st *resolve(cudaStream_t s) {
  if (s) return s;
  std::lock_guard<std::mutex> lock(g_stream_mu);
  int d = current_device();
  if (!g_legacy[d]) {
    g_legacy[d] = new CUstream_st;
    g_legacy[d]->device = d;
    std::thread(stream_main, g_legacy[d]).detach();
    g_streams.push_back(g_legacy[d]);
  }
  return g_legacy[d];
}

uint64_t enqueue(cudaStream_t stream, std::function<void()> op) {
  CUstream_st *s = resolve(stream);
  std::lock_guard<std::mutex> lock(s->mu);
  s->queue.push_back(std::move(op));
  s->work.notify_one();
  return ++s->submitted;
}

static void wait_for(CUstream_st *s, uint64_t ticket) {
  std::unique_lock<std::mutex> lock(s->mu);
  s->done.wait(lock, [&] { return s->completed >= ticket; });
}

static void sync_stream(CUstream_st *s) {
  uint64_t t;
  {
    std::lock_guard<std::mutex> lock(s->mu);
    t = s->submitted;
  }
  wait_for(s, t);
}

// Waits for every stream of every device (cudaFree and cudaFreeHost imply it).
static void sync_all() {
  std::vector<CUstream_st *> all;
  {
    std::lock_guard<std::mutex> lock(g_stream_mu);
    all = g_streams;
  }
  for (CUstream_st *s : all) sync_stream(s);
}

}  // namespace cudasim

// --- events --------------------------------------------------------------------------------

struct EventState {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t recorded = 0, completed = 0;   // records made, and the newest one the stream reached
};
struct CUevent_st {
  std::shared_ptr<EventState> st;
};

using namespace cudasim;

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags) {
  if (!e) return record_error(cudaErrorInvalidValue);
  *e = new CUevent_st{std::make_shared<EventState>()};
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (!e) return record_error(cudaErrorInvalidResourceHandle);
  std::shared_ptr<EventState> st = e->st;
  uint64_t target;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    target = ++st->recorded;
  }
  enqueue(s, [st, target] {
    std::lock_guard<std::mutex> lock(st->mu);
    if (st->completed < target) st->completed = target;
    st->cv.notify_all();
  });
  return cudaSuccess;
}

// Waits for the record made most recently before the call (none: nothing to wait for).
static std::function<void()> waiter(const std::shared_ptr<EventState> &st) {
  uint64_t target;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    target = st->recorded;
  }
  return [st, target] {
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return st->completed >= target; });
  };
}

cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags) {
  if (!e) return record_error(cudaErrorInvalidResourceHandle);
  enqueue(s, waiter(e->st));
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (!e) return record_error(cudaErrorInvalidResourceHandle);
  waiter(e->st)();
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t e) {
  if (!e) return record_error(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::mutex> lock(e->st->mu);
  return e->st->completed >= e->st->recorded ? cudaSuccess : record_error(cudaErrorNotReady);
}

// Pending records and waits keep the state alive, as CUDA defers the release.
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  if (!e) return record_error(cudaErrorInvalidResourceHandle);
  delete e;
  return cudaSuccess;
}

// --- devices -------------------------------------------------------------------------------

cudaError_t cudaGetDeviceCount(int *count) {
  *count = device_total();
  return device_total() > 0 ? cudaSuccess : record_error(cudaErrorNoDevice);
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= device_total()) return record_error(cudaErrorInvalidDevice);
  tls_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int *device) {
  *device = tls_device;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  sync_all();
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  cudaError_t e = tls_last_error;
  tls_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return tls_last_error; }

const char *cudaGetErrorName(cudaError_t e) {
  switch (e) {
  case cudaSuccess: return "cudaSuccess";
  case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
  case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
  case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
  case cudaErrorNoDevice: return "cudaErrorNoDevice";
  case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
  case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
  case cudaErrorNotReady: return "cudaErrorNotReady";
  case cudaErrorHostMemoryAlreadyRegistered: return "cudaErrorHostMemoryAlreadyRegistered";
  case cudaErrorHostMemoryNotRegistered: return "cudaErrorHostMemoryNotRegistered";
  }
  return "cudaErrorUnknown";
}

const char *cudaGetErrorString(cudaError_t e) {
  switch (e) {
  case cudaSuccess: return "no error";
  case cudaErrorInvalidValue: return "invalid argument";
  case cudaErrorMemoryAllocation: return "out of memory";
  case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  case cudaErrorNoDevice: return "no CUDA-capable device is detected";
  case cudaErrorInvalidDevice: return "invalid device ordinal";
  case cudaErrorInvalidResourceHandle: return "invalid resource handle";
  case cudaErrorNotReady: return "device not ready";
  case cudaErrorHostMemoryAlreadyRegistered: return "part or all of the requested memory range is already mapped";
  case cudaErrorHostMemoryNotRegistered: return "pointer does not correspond to a registered memory region";
  }
  return "unknown error";
}

// --- memory --------------------------------------------------------------------------------

// Exactly n bytes (256-byte aligned, as cudaMalloc), so a sanitizer sees an overrun of one byte.
static void *host_block(size_t n) {
  void *p = NULL;
  if (posix_memalign(&p, 256, n ? n : 1) != 0) return NULL;
  memset(p, 0xff, n ? n : 1);   // NaN in every float type: uninitialised reads show
  return p;
}

cudaError_t cudaMalloc(void **p, size_t n) {
  int d = current_device();
  std::lock_guard<std::mutex> lock(g_mem_mu);
  if (g_device_used[d] + n > device_budget()) return record_error(cudaErrorMemoryAllocation);
  void *q = host_block(n);
  if (!q) return record_error(cudaErrorMemoryAllocation);
  g_allocs[(uintptr_t)q] = Allocation{n ? n : 1, d};
  g_device_used[d] += n;
  *p = q;
  return cudaSuccess;
}

static cudaError_t release(void *p, bool pinned) {
  if (!p) return cudaSuccess;
  sync_all();   // like the real calls: no queued work may still use the block
  std::lock_guard<std::mutex> lock(g_mem_mu);
  auto it = g_allocs.find((uintptr_t)p);
  if (it == g_allocs.end() || it->second.device == -2 || (it->second.device < 0) != pinned)
    return record_error(cudaErrorInvalidValue);
  if (!pinned) g_device_used[it->second.device] -= it->second.size;
  memset(p, 0xfe, it->second.size);
  g_allocs.erase(it);
  free(p);
  return cudaSuccess;
}

cudaError_t cudaFree(void *p) { return release(p, false); }
cudaError_t cudaFreeHost(void *p) { return release(p, true); }

cudaError_t cudaHostRegister(void *p, size_t n, unsigned flags) {
  if (!p || n == 0) return record_error(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lock(g_mem_mu);
  uintptr_t a = (uintptr_t)p;
  auto it = g_allocs.lower_bound(a);                  // the first block at or after p ...
  if (it != g_allocs.end() && it->first < a + n) return record_error(cudaErrorHostMemoryAlreadyRegistered);
  if (it != g_allocs.begin()) {                       // ... and the last before it, which may reach p
    --it;
    if (it->first + it->second.size > a) return record_error(cudaErrorHostMemoryAlreadyRegistered);
  }
  g_allocs[a] = Allocation{n, -2};
  return cudaSuccess;
}

cudaError_t cudaHostUnregister(void *p) {
  sync_all();   // no queued copy may still read the range
  std::lock_guard<std::mutex> lock(g_mem_mu);
  auto it = g_allocs.find((uintptr_t)p);
  if (it == g_allocs.end() || it->second.device != -2) return record_error(cudaErrorHostMemoryNotRegistered);
  g_allocs.erase(it);
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags) {
  void *q = host_block(n);
  if (!q) return record_error(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> lock(g_mem_mu);
  g_allocs[(uintptr_t)q] = Allocation{n ? n : 1, -1};
  *p = q;
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  *total_bytes = device_budget();
  *free_bytes = device_budget() - g_device_used[current_device()];
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device) {
  if (device < 0 || device >= device_total()) return record_error(cudaErrorInvalidDevice);
  memset(prop, 0, sizeof *prop);
  snprintf(prop->name, sizeof prop->name, "cudasim (CPU emulator of a GPU)");
  prop->totalGlobalMem = device_budget();
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 1;
  return cudaSuccess;
}

// --- streams and copies ----------------------------------------------------------------------

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags) {
  *s = new_stream(current_device());
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  cudasim::sync_stream(cudasim::resolve(s));
  return cudaSuccess;
}

// Copies are slow next to kernels on a real machine (PCIe): MOONLOAD_CUDASIM_COPY_DELAY_US holds
// every queued copy back that long, so work that is not ordered after a copy runs before it.
static void copy_delay() {
  static long us = env_long("MOONLOAD_CUDASIM_COPY_DELAY_US", 0);
  if (us > 0) usleep((useconds_t)us);
}

// Copies follow the CUDA rules for asynchronous copies: from pageable memory the source is read
// before the call returns; to pageable memory the call returns when the copy is done; between
// device and pinned memory the call returns at once and the copy happens in stream order.
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind kind, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  MemoryKind dk = memory_kind(dst, n, NULL), sk = memory_kind(src, n, NULL);
  if (dk == MemoryKind::overrun || sk == MemoryKind::overrun)
    die("cudaMemcpyAsync(%p, %p, %zu bytes): a range runs past the end of its allocation", dst, src, n);
  bool dst_dev = dk == MemoryKind::device, src_dev = sk == MemoryKind::device;
  bool ok = kind == cudaMemcpyDefault || (kind == cudaMemcpyHostToDevice && dst_dev && !src_dev) ||
            (kind == cudaMemcpyDeviceToHost && !dst_dev && src_dev) ||
            (kind == cudaMemcpyDeviceToDevice && dst_dev && src_dev) ||
            (kind == cudaMemcpyHostToHost && !dst_dev && !src_dev);
  if (!ok) return record_error(cudaErrorInvalidValue);
  if (sk == MemoryKind::pageable) {
    auto staged = std::make_shared<std::vector<unsigned char>>((const unsigned char *)src,
                                                               (const unsigned char *)src + n);
    uint64_t t = enqueue(s, [dst, staged] { copy_delay(); memcpy(dst, staged->data(), staged->size()); });
    if (dk == MemoryKind::pageable) cudasim::wait_for(cudasim::resolve(s), t);
    return cudaSuccess;
  }
  uint64_t t = enqueue(s, [dst, src, n] { copy_delay(); memcpy(dst, src, n); });
  if (dk == MemoryKind::pageable) cudasim::wait_for(cudasim::resolve(s), t);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
  sync_all();
  cudaError_t e = cudaMemcpyAsync(dst, src, n, kind, 0);
  if (e == cudaSuccess) cudaStreamSynchronize(0);
  return e;
}
