/* upload.c: streams weights from host memory (a checkpoint mapping, CPU RAM) to a device while
 * the device computes. A worker thread copies each tensor in chunks through two pinned staging
 * buffers: while the DMA engine moves chunk i from buffer A on the device's copy stream, the
 * worker fills buffer B with chunk i+1 (reading the mapped file: page faults and disk reads
 * happen here, off the compute path). When the last chunk is queued, an event marks the
 * tensor complete; ml_uploader_wait makes the compute stream wait on that event, so kernels that
 * read the weight are ordered after its copy without the host blocking on the transfer.
 *
 * Memory reuse: the destination usually reuses a block the caching allocator got back from a
 * layer that just ran, whose kernels may still be queued on the compute stream. Submit therefore
 * makes the copy stream wait for everything queued on the compute stream so far.
 *
 * A pinned source (t:pin_memory()) skips the staging: one DMA straight from it. The worker does
 * not wait for that DMA; it keeps a reference to the source until an event says the DMA is done
 * (checked before each later job and every millisecond while idle, and waited for when the
 * uploader is released).
 *
 * A cpu destination takes the same path with plain memcpy and no streams: that is how the
 * scheduling (tickets, chunking, the worker) is tested on machines without a GPU.
 */
#include "internal.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define UPLOAD_CHUNK ((size_t)16 << 20)   /* two of these are pinned per uploader */

typedef enum { TICKET_FREE = 0, TICKET_QUEUED, TICKET_ISSUED, TICKET_FAILED } ticket_state;

typedef struct {
  ticket_state state;
  void *done_event;            /* cuda: recorded on the copy stream after the last chunk */
  ml_device dev;
  char error[256];
} upload_ticket;

typedef struct {
  ml_tensor *src;              /* owned: a pinned source a DMA may still read */
  void *event;                 /* recorded after that DMA */
} retired_source;

typedef struct upload_job {
  int ticket;
  ml_tensor *dst, *src;        /* owned references, both contiguous with the same bytes */
  struct upload_job *next;
} upload_job;

struct ml_uploader {
  pthread_mutex_t mu;
  pthread_cond_t cv, done;
  pthread_t worker;
  bool worker_started, stop;
  upload_job *head, *tail;
  upload_ticket *tickets;
  int nticket, tcap;
  void *pinned[2];             /* staging buffers (cuda only), allocated on first use */
  void *pinned_event[2];       /* copy that last read each buffer, or NULL */
  int pinned_device;
  int staging_threads;         /* threads filling a staging buffer */
  retired_source *retired;     /* the worker's alone (and release's, after the join) */
  int nretired, rcap;
  atomic_llong bytes, jobs;
  int64_t waits, drains, wait_ns; /* under mu: see ml_uploader_timing */
  atomic_llong busy_ns;        /* the worker's time running jobs */
};

// --- the worker ---------------------------------------------------------------------------

static int64_t monotonic_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Threads that fill a staging buffer: one core's memcpy (~10-20 GB/s) is slower than a PCIe 5
   link, so the copy into pinned memory is split. MOONLOAD_UPLOAD_THREADS when the uploader is
   made, else half the cores, at most 8. On an H200's 16-core host, 1 GiB from pageable memory went
   at 7-9 GB/s with 1 thread, 18-30 with 4, 32-48 with 8 and 45-46 with 16, over three runs (the
   link reads pinned memory at 55). */
static int staging_threads(void) {
  const char *e = getenv("MOONLOAD_UPLOAD_THREADS");
  int v = e && *e ? atoi(e) : 0;
  if (v <= 0) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    v = cores >= 16 ? 8 : cores >= 8 ? 4 : cores >= 4 ? 2 : 1;
  }
  return v > 64 ? 64 : v;
}

/* memcpy of one staging chunk, in slices over nt threads (this worker's own OpenMP team, apart
   from the compute threads). Non-temporal stores (SSE2 streaming, skipping the read of each
   destination line) were tried on the H200's host on 2026-11-30 and lost: 1 GiB staged at 29-31
   GB/s against memcpy's 41-44, the streamed Llama forward no faster. */
static void stage_copy(uint8_t *dst, const uint8_t *src, size_t len, int nt) {
  if (nt <= 1 || len < ((size_t)1 << 20)) { memcpy(dst, src, len); return; }
  size_t slice = ((len + (size_t)nt - 1) / (size_t)nt + 63) & ~(size_t)63;
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (int t = 0; t < nt; t++) {
    size_t off = (size_t)t * slice;
    if (off < len) memcpy(dst + off, src + off, len - off < slice ? len - off : slice);
  }
}

/* Lets go of the pinned sources whose DMA is done; with wait, of all of them once it is. */
static void reap_retired(ml_uploader *u, bool wait) {
  const ml_cuda_api *cu = ml_cuda();
  int kept = 0;
  for (int i = 0; i < u->nretired; i++) {
    retired_source r = u->retired[i];
    bool done = true;
    if (cu && wait) cu->event_sync(r.event);   /* after an error too, no DMA reads the source any more */
    else if (cu && cu->event_query(r.event, &done) != ML_OK) done = false;   /* left to the release */
    if (!done) { u->retired[kept++] = r; continue; }
    if (cu) cu->event_free(r.event);
    ml_tensor_release(r.src);
  }
  u->nretired = kept;
}

/* Keeps src (a reference handed over) until event completes; false if it cannot be kept. */
static bool retire_source(ml_uploader *u, ml_tensor *src, void *event) {
  if (u->nretired == u->rcap) {
    int cap = u->rcap ? u->rcap * 2 : 16;
    retired_source *p = realloc(u->retired, (size_t)cap * sizeof *p);
    if (!p) return false;
    u->retired = p;
    u->rcap = cap;
  }
  u->retired[u->nretired++] = (retired_source){src, event};
  return true;
}

/* Copies job j chunk by chunk; on cuda returns the event recorded after the last chunk, and for a
   pinned source src_event, recorded after the DMA that reads it (the source must live until then). */
static ml_status run_job(ml_uploader *u, const upload_job *j, void **done_event, void **src_event) {
  size_t nbytes = (size_t)ml_tensor_numel(j->src) * ml_dtype_size(j->src->dtype);
  const uint8_t *src = ml_tensor_data(j->src);
  uint8_t *dst = ml_tensor_data(j->dst);
  ml_device dev = j->dst->storage->device;
  *done_event = NULL;
  *src_event = NULL;
  if (dev.type == ML_DEVICE_CPU) {
    for (size_t off = 0; off < nbytes; off += UPLOAD_CHUNK)
      memcpy(dst + off, src + off, nbytes - off < UPLOAD_CHUNK ? nbytes - off : UPLOAD_CHUNK);
    return ML_OK;
  }
  const ml_cuda_api *cu = ml_cuda();
  if (!cu) return ML_EUNSUPPORTED;
  if (ml_storage_is_pinned(j->src->storage)) {
    /* Page-locked source (t:pin_memory()): the DMA reads it directly, no staging copy, and the
       worker goes on to the next job while it runs (the source is retired, not released). */
    ML_TRY(cu->copy_async(dev.index, dst, src, nbytes, 0));
    ML_TRY(cu->event_record(dev.index, true, done_event));
    ml_status st = cu->event_record(dev.index, true, src_event);
    if (st) {
      cu->event_sync(*done_event);
      cu->event_free(*done_event);
      *done_event = NULL;
    }
    return st;
  }
  for (int b = 0; b < 2; b++) {
    if (!u->pinned[b]) ML_TRY(cu->alloc_pinned(UPLOAD_CHUNK, &u->pinned[b]));
  }
  u->pinned_device = dev.index;
  int b = 0;
  for (size_t off = 0; off < nbytes; off += UPLOAD_CHUNK, b ^= 1) {
    size_t len = nbytes - off < UPLOAD_CHUNK ? nbytes - off : UPLOAD_CHUNK;
    if (u->pinned_event[b]) {            /* the DMA that last read this buffer must be done */
      ml_status st = cu->event_sync(u->pinned_event[b]);
      cu->event_free(u->pinned_event[b]);
      u->pinned_event[b] = NULL;
      if (st) return st;
    }
    stage_copy(u->pinned[b], src + off, len, u->staging_threads);
    ML_TRY(cu->copy_async(dev.index, dst + off, u->pinned[b], len, 0));
    ML_TRY(cu->event_record(dev.index, true, &u->pinned_event[b]));
  }
  return cu->event_record(dev.index, true, done_event);
}

/* Waits (u->mu held) for a job or the stop flag. While pinned sources are retired it wakes every
   millisecond to let go of those whose DMA is done, so a dropped model's pinned weights do not
   wait for the next upload. */
static void wait_for_work(ml_uploader *u) {
  while (!u->head && !u->stop) {
    if (u->nretired == 0) { pthread_cond_wait(&u->cv, &u->mu); continue; }
    pthread_mutex_unlock(&u->mu);
    reap_retired(u, false);
    pthread_mutex_lock(&u->mu);
    if (u->nretired == 0 || u->head || u->stop) continue;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 1000000;
    if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
    pthread_cond_timedwait(&u->cv, &u->mu, &ts);
  }
}

static void *worker_main(void *arg) {
  ml_uploader *u = arg;
  pthread_mutex_lock(&u->mu);
  for (;;) {
    wait_for_work(u);
    if (!u->head && u->stop) break;
    upload_job *j = u->head;
    u->head = j->next;
    if (!u->head) u->tail = NULL;
    pthread_mutex_unlock(&u->mu);
    reap_retired(u, false);
    long long nbytes = (long long)((size_t)ml_tensor_numel(j->src) * ml_dtype_size(j->src->dtype));
    void *ev = NULL, *src_ev = NULL;
    int64_t t0 = monotonic_ns();
    ml_status st = run_job(u, j, &ev, &src_ev);
    atomic_fetch_add(&u->busy_ns, monotonic_ns() - t0);
    if (src_ev) {
      if (retire_source(u, j->src, src_ev)) j->src = NULL;   /* the reference moved */
      else { ml_cuda()->event_sync(src_ev); ml_cuda()->event_free(src_ev); }
    }
    pthread_mutex_lock(&u->mu);
    upload_ticket *t = &u->tickets[j->ticket];
    if (st) {
      t->state = TICKET_FAILED;
      snprintf(t->error, sizeof t->error, "%s", ml_last_error());
    } else {
      t->state = TICKET_ISSUED;
      t->done_event = ev;
      atomic_fetch_add(&u->bytes, nbytes);
      atomic_fetch_add(&u->jobs, 1);
    }
    pthread_cond_broadcast(&u->done);
    ml_tensor_release(j->dst);
    ml_tensor_release(j->src);
    free(j);
  }
  pthread_mutex_unlock(&u->mu);
  return NULL;
}

// --- public -------------------------------------------------------------------------------

ml_status ml_uploader_new(ml_uploader **out) {
  ml_uploader *u = calloc(1, sizeof *u);
  if (!u) return ml_fail(ML_ENOMEM, "ml_uploader_new: out of memory");
  pthread_mutex_init(&u->mu, NULL);
  pthread_cond_init(&u->cv, NULL);
  pthread_cond_init(&u->done, NULL);
  u->staging_threads = staging_threads();
  *out = u;
  return ML_OK;
}

void ml_uploader_release(ml_uploader *u) {
  if (!u) return;
  pthread_mutex_lock(&u->mu);
  u->stop = true;                    /* the worker finishes what is queued, then exits */
  pthread_cond_broadcast(&u->cv);
  pthread_mutex_unlock(&u->mu);
  if (u->worker_started) pthread_join(u->worker, NULL);
  reap_retired(u, true);
  free(u->retired);
  const ml_cuda_api *cu = NULL;
  for (int i = 0; i < u->nticket; i++)
    if (u->tickets[i].done_event && (cu || (cu = ml_cuda()))) {
      cu->event_sync(u->tickets[i].done_event);
      cu->event_free(u->tickets[i].done_event);
    }
  for (int b = 0; b < 2; b++) {
    if (u->pinned_event[b] && (cu || (cu = ml_cuda()))) { cu->event_sync(u->pinned_event[b]); cu->event_free(u->pinned_event[b]); }
    if (u->pinned[b] && (cu || (cu = ml_cuda()))) cu->free_pinned(u->pinned[b]);
  }
  free(u->tickets);
  pthread_cond_destroy(&u->done);
  pthread_cond_destroy(&u->cv);
  pthread_mutex_destroy(&u->mu);
  free(u);
}

ml_status ml_uploader_submit(ml_uploader *u, ml_tensor *dst, ml_tensor *src, int *ticket) {
  if (!u || !dst || !src) return ml_fail(ML_EINVAL, "ml_uploader_submit: NULL argument");
  ml_device dd = dst->storage->device, sd = src->storage->device;
  if (sd.type != ML_DEVICE_CPU)
    return ml_fail(ML_EINVAL, "ml_uploader_submit: the source must be in host memory, it is on %s", ml_device_str(sd));
  if (dd.type != ML_DEVICE_CPU && dd.type != ML_DEVICE_CUDA)
    return ml_fail(ML_EINVAL, "ml_uploader_submit: cannot stream to %s", ml_device_str(dd));
  if (dst->dtype != src->dtype || dst->ndim != src->ndim ||
      memcmp(dst->shape, src->shape, (size_t)src->ndim * sizeof *src->shape) != 0 ||
      !ml_tensor_is_contiguous(dst) || !ml_tensor_is_contiguous(src)) {
    char a[ML_SHAPE_BUF], b[ML_SHAPE_BUF];
    return ml_fail(ML_EINVAL, "ml_uploader_submit: source %s %s and destination %s %s must be contiguous with the "
                   "same dtype and shape", ml_dtype_name(src->dtype), ml_shape_str(src->ndim, src->shape, a, sizeof a),
                   ml_dtype_name(dst->dtype), ml_shape_str(dst->ndim, dst->shape, b, sizeof b));
  }
  if (dd.type == ML_DEVICE_CUDA) {
    /* Order the copy after every kernel already queued (dst may reuse memory they still read). */
    const ml_cuda_api *cu = ml_cuda();
    if (!cu) return ML_EUNSUPPORTED;
    void *ev;
    ML_TRY(cu->event_record(dd.index, false, &ev));
    ml_status st = cu->event_wait(dd.index, true, ev);
    cu->event_free(ev);
    if (st) return st;
  }
  upload_job *j = calloc(1, sizeof *j);
  if (!j) return ml_fail(ML_ENOMEM, "ml_uploader_submit: out of memory");
  pthread_mutex_lock(&u->mu);
  int t = -1;
  for (int i = 0; i < u->nticket; i++) if (u->tickets[i].state == TICKET_FREE) { t = i; break; }
  if (t < 0) {
    if (u->nticket == u->tcap) {
      int cap = u->tcap ? u->tcap * 2 : 16;
      upload_ticket *p = realloc(u->tickets, (size_t)cap * sizeof *p);
      if (!p) { pthread_mutex_unlock(&u->mu); free(j); return ml_fail(ML_ENOMEM, "ml_uploader_submit: out of memory"); }
      u->tickets = p;
      u->tcap = cap;
    }
    t = u->nticket++;
  }
  if (!u->worker_started) {
    if (pthread_create(&u->worker, NULL, worker_main, u) != 0) {
      pthread_mutex_unlock(&u->mu);
      free(j);
      return ml_fail(ML_EIO, "ml_uploader_submit: cannot start the upload thread");
    }
    u->worker_started = true;
  }
  memset(&u->tickets[t], 0, sizeof u->tickets[t]);
  u->tickets[t].state = TICKET_QUEUED;
  u->tickets[t].dev = dd;
  ml_tensor_retain(dst);
  ml_tensor_retain(src);
  j->ticket = t;
  j->dst = dst;
  j->src = src;
  if (u->tail) u->tail->next = j; else u->head = j;
  u->tail = j;
  pthread_cond_signal(&u->cv);
  pthread_mutex_unlock(&u->mu);
  *ticket = t;
  return ML_OK;
}

ml_status ml_uploader_wait(ml_uploader *u, int ticket) {
  if (!u) return ml_fail(ML_EINVAL, "ml_uploader_wait: uploader is NULL");
  pthread_mutex_lock(&u->mu);
  if (ticket < 0 || ticket >= u->nticket || u->tickets[ticket].state == TICKET_FREE) {
    pthread_mutex_unlock(&u->mu);
    return ml_fail(ML_EINVAL, "ml_uploader_wait: no pending upload %d", ticket);
  }
  if (u->tickets[ticket].state == TICKET_QUEUED) {
    /* the host blocks until the copies are queued; with no job queued behind this one the worker
       (and so the copy engine) runs dry until the host submits more */
    u->waits++;
    u->drains += !u->tail || u->tail->ticket == ticket;
    int64_t t0 = monotonic_ns();
    while (u->tickets[ticket].state == TICKET_QUEUED) pthread_cond_wait(&u->done, &u->mu);
    u->wait_ns += monotonic_ns() - t0;
  }
  upload_ticket t = u->tickets[ticket];
  u->tickets[ticket].state = TICKET_FREE;
  u->tickets[ticket].done_event = NULL;
  pthread_mutex_unlock(&u->mu);
  if (t.state == TICKET_FAILED) return ml_fail(ML_EIO, "upload failed: %s", t.error);
  if (!t.done_event) return ML_OK;
  const ml_cuda_api *cu = ml_cuda();
  if (!cu) return ML_EUNSUPPORTED;
  ml_status st = cu->event_wait(t.dev.index, false, t.done_event);   /* compute waits, host does not */
  cu->event_free(t.done_event);
  return st;
}

void ml_uploader_stats(ml_uploader *u, int64_t *bytes, int64_t *jobs) {
  *bytes = u ? atomic_load(&u->bytes) : 0;
  *jobs = u ? atomic_load(&u->jobs) : 0;
}

void ml_uploader_timing(ml_uploader *u, int64_t *waits, int64_t *drains, int64_t *wait_ns, int64_t *busy_ns) {
  *waits = *drains = *wait_ns = *busy_ns = 0;
  if (!u) return;
  pthread_mutex_lock(&u->mu);
  *waits = u->waits;
  *drains = u->drains;
  *wait_ns = u->wait_ns;
  pthread_mutex_unlock(&u->mu);
  *busy_ns = atomic_load(&u->busy_ns);
}
