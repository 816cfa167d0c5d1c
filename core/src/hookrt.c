/* hookrt.c: the hook runtime, the weight movement behind AlignDevicesHook.
 *
 * A hook registers its module's tensors as one "group": for each tensor the source it is read
 * from (a view into a checkpoint or offload-folder mapping, or a CPU state-dict tensor) and the
 * dtype the module wants. Before forward the group is materialized on its execution device:
 * a source already on that device with that dtype is handed out as it is (a zero-copy view into
 * the mapping for disk weights on a cpu device); anything else is copied through ml_tensor_to,
 * once per (source, dtype, device) even when several groups share it (tied weights). After
 * forward the group is released: the runtime drops its references and advises the kernel that
 * the group's mapped pages may leave the process (MADV_DONTNEED: RSS stays bounded when the
 * model is larger than RAM; the page cache keeps them unless the drop level asks for
 * POSIX_FADV_DONTNEED too).
 *
 * The runtime learns the order groups are materialized in (each group remembers the group that
 * came right after it last time, and whether that successor ever changed since it was last seen
 * again: a mixture-of-experts block picks different experts each token, and reading ahead the
 * ones chosen last time would mostly read weights nobody uses. Read-ahead stops at such a link). When a group is materialized, a worker thread starts reading
 * the mapped pages of the group expected next (posix_fadvise WILLNEED, then touching each page)
 * while the caller computes. Jobs carry their own mapping references, so the worker never
 * looks at group state. C never calls Lua; the Lua side drives everything through these calls.
 *
 * On a cuda execution device the next group's host-resident weights are also streamed ahead:
 * when group g is about to be materialized, before its own uploads are waited for, each weight of
 * the group expected next gets a device buffer and an upload (upload.c: pinned double-buffered
 * staging on the copy stream). When that group is materialized, the compute stream waits on the
 * upload's event instead of the host copying synchronously. One group is streamed ahead (more
 * with a stream window), so device memory holds the resident weights plus about two modules;
 * uploads for a group that did not come next are dropped.
 */
#include "internal.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

// --- state ----------------------------------------------------------------------------------

typedef struct {
  ml_tensor *src;             /* owned reference */
  ml_dtype dt;                /* dtype the module wants */
  ml_mapping *map;            /* borrowed through src's storage; NULL when not file-backed */
  size_t map_off, map_len;    /* bytes of src inside the mapping */
} hr_slot;

typedef struct {
  bool used;                  /* slot of the groups array is taken */
  bool active;                /* materialized and not yet released */
  ml_device dev;
  hr_slot *slots;
  int nslots, cap;
  ml_tensor **live;           /* owned references to what materialize handed out, nslots long */
  int next;                   /* learned successor group, -1 when unknown */
  bool next_unsure;           /* the successor changed and has not come twice in a row since */
  bool queued;                /* prefetch queued since it was last materialized */
  size_t host_bytes;          /* bytes of the sources in host memory (what streaming uploads) */
} hr_group;

typedef struct {
  const void *data;           /* key: source bytes, dtypes, device, geometry */
  ml_dtype src_dt, dt;
  ml_device dev;
  int ndim;
  int64_t shape[ML_MAX_DIMS], strides[ML_MAX_DIMS];
  ml_tensor *t;               /* owned */
  int users;                  /* active groups holding it */
} hr_tie;

typedef struct { ml_mapping *map; size_t off, len; } hr_range;

typedef struct {
  const void *data;           /* key: source bytes, dtype, element count, device */
  ml_dtype src_dt;
  int64_t numel;
  ml_device dev;
  ml_tensor *t;               /* owned: the device buffer being filled, source dtype */
  int ticket;                 /* the uploader's */
  int group;                  /* the group it was streamed for */
} hr_stage;

typedef struct hr_job {
  hr_range *ranges;           /* mapping references owned by the job */
  int n;
  int group;                  /* the group whose pages it reads */
  struct hr_job *next;
} hr_job;

struct ml_hookrt {
  hr_group *groups;
  int ngroups, gcap;
  hr_tie *ties;
  int nties, tcap;
  int last;                   /* group materialized most recently, -1 at start */
  int prefetch;               /* 0 off, 1 on */
  int drop;                   /* 0 keep pages, 1 MADV_DONTNEED, 2 + POSIX_FADV_DONTNEED, 3 auto */
  size_t mapped_total;        /* mapped bytes of all groups' sources */
  size_t auto_drop_above;     /* auto: drop (as level 1) once mapped_total exceeds this */
  size_t prefetch_min;        /* groups with fewer mapped bytes are not worth a worker wake-up */
  size_t lookahead;           /* mapped bytes read ahead along the learned order */
  size_t stream_ahead;        /* host bytes uploaded ahead to a cuda device, past the next group */
  size_t stream_limit;        /* narrowed from SIZE_MAX each time a device ran out of memory */
  bool stream_stopped;        /* out of memory with one group in flight: no streaming ahead */
  bool reclaimed;             /* since the last forward began */
  int calm_forwards;          /* forwards begun since streaming stopped */
  int stop_backoff;           /* calm forwards before a stopped stream tries one group again */
  atomic_bool has_owner;      /* owner is set (once, before this) */
  pthread_t owner;            /* the thread that materializes (its stages are its own) */
  pthread_mutex_t mu;
  pthread_cond_t cv, idle;
  pthread_t worker;
  bool worker_started, stop;
  hr_job *head, *tail;
  int pending;                /* jobs queued or running */
  ml_uploader *uploader;      /* cuda streaming, created on first use */
  hr_stage *stages;
  int nstages, scap;
  atomic_llong bytes_streamed, streams_dropped, streams_reclaimed;
  atomic_llong materialize_calls, bytes_viewed, bytes_copied, tied_hits, releases, bytes_dropped,
               prefetch_jobs, prefetch_bytes, prefetch_pages;
};

static long page_size(void) {
  static long ps;
  if (!ps) ps = sysconf(_SC_PAGESIZE);
  return ps;
}

// --- worker ---------------------------------------------------------------------------------

static void job_free(hr_job *j) {
  for (int i = 0; i < j->n; i++) ml_mapping_release(j->ranges[i].map);
  free(j->ranges);
  free(j);
}

/* Reads every page of the range so it is resident when the module runs. Checks the stop flag
   every megabyte so closing the runtime never waits for a whole layer. */
static void prefetch_range(ml_hookrt *rt, const hr_range *r) {
  long ps = page_size();
  size_t start = r->off & ~((size_t)ps - 1), end = r->off + r->len;
  posix_fadvise(r->map->fd, (off_t)start, (off_t)(end - start), POSIX_FADV_WILLNEED);
  volatile const uint8_t *p = r->map->data;
  uint8_t sink = 0;
  long long pages = 0;
  for (size_t off = start; off < end; off += (size_t)ps) {
    sink ^= p[off];
    pages++;
    if ((pages & 255) == 0) {
      pthread_mutex_lock(&rt->mu);
      bool stop = rt->stop;
      pthread_mutex_unlock(&rt->mu);
      if (stop) break;
    }
  }
  (void)sink;
  atomic_fetch_add(&rt->prefetch_pages, pages);
  atomic_fetch_add(&rt->prefetch_bytes, (long long)r->len);
}

static void *worker_main(void *arg) {
  ml_hookrt *rt = arg;
  pthread_mutex_lock(&rt->mu);
  for (;;) {
    while (!rt->head && !rt->stop) pthread_cond_wait(&rt->cv, &rt->mu);
    if (rt->stop) break;
    hr_job *j = rt->head;
    rt->head = j->next;
    if (!rt->head) rt->tail = NULL;
    pthread_mutex_unlock(&rt->mu);
    for (int i = 0; i < j->n; i++) prefetch_range(rt, &j->ranges[i]);
    atomic_fetch_add(&rt->prefetch_jobs, 1);
    job_free(j);
    pthread_mutex_lock(&rt->mu);
    if (--rt->pending == 0) pthread_cond_broadcast(&rt->idle);
  }
  /* drain what is left without reading it */
  while (rt->head) {
    hr_job *j = rt->head;
    rt->head = j->next;
    job_free(j);
    rt->pending--;
  }
  rt->tail = NULL;
  pthread_cond_broadcast(&rt->idle);
  pthread_mutex_unlock(&rt->mu);
  return NULL;
}

static size_t mapped_bytes(const hr_group *gr, int *n) {
  size_t bytes = 0;
  *n = 0;
  for (int i = 0; i < gr->nslots; i++)
    if (gr->slots[i].map) { (*n)++; bytes += gr->slots[i].map_len; }
  return bytes;
}

/* Queues the mapped ranges of group g for the worker. Failures to queue are not errors: a
   prefetch is a hint, the forward pass reads the pages itself when they are not resident. */
static void enqueue_prefetch(ml_hookrt *rt, int g) {
  hr_group *gr = &rt->groups[g];
  int n;
  size_t bytes = mapped_bytes(gr, &n);
  if (n == 0 || bytes < rt->prefetch_min) return;
  hr_job *j = calloc(1, sizeof *j);
  if (!j) return;
  j->group = g;
  j->ranges = calloc((size_t)n, sizeof *j->ranges);
  if (!j->ranges) { free(j); return; }
  for (int i = 0; i < gr->nslots; i++) {
    hr_slot *s = &gr->slots[i];
    if (!s->map) continue;
    ml_mapping_retain(s->map);
    j->ranges[j->n++] = (hr_range){s->map, s->map_off, s->map_len};
  }
  pthread_mutex_lock(&rt->mu);
  if (!rt->worker_started) {
    if (pthread_create(&rt->worker, NULL, worker_main, rt) != 0) {
      pthread_mutex_unlock(&rt->mu);
      job_free(j);
      return;
    }
    rt->worker_started = true;
  }
  if (rt->tail) rt->tail->next = j; else rt->head = j;
  rt->tail = j;
  rt->pending++;
  gr->queued = true;
  pthread_cond_signal(&rt->cv);
  pthread_mutex_unlock(&rt->mu);
}

// --- lifetime -------------------------------------------------------------------------------

static size_t hookrt_reclaim(void *ctx, int cuda_device);
static void stage_drop_others(ml_hookrt *rt, const ml_device *dev, const int *keep, int nkeep);

ml_status ml_hookrt_new(ml_hookrt **out) {
  ml_hookrt *rt = calloc(1, sizeof *rt);
  if (!rt) return ml_fail(ML_ENOMEM, "ml_hookrt_new: out of memory");
  rt->last = -1;
  rt->prefetch = 1;
  /* auto: a model whose file-backed weights fit comfortably in RAM keeps them mapped (a warm
     forward from disk then costs what one from RAM does); above half the physical memory,
     released pages leave the process so RSS stays bounded. */
  rt->drop = 3;
  long pages = sysconf(_SC_PHYS_PAGES);
  rt->auto_drop_above = pages > 0 ? (size_t)pages * (size_t)page_size() / 2 : (size_t)1 << 30;
  rt->prefetch_min = 64 * 1024;
  rt->lookahead = 32 * 1024 * 1024;
  rt->stream_ahead = 64 * 1024 * 1024;
  rt->stream_limit = SIZE_MAX;
  ml_status st = ml_reclaimer_add(hookrt_reclaim, rt);
  if (st) { free(rt); return st; }
  pthread_mutex_init(&rt->mu, NULL);
  pthread_cond_init(&rt->cv, NULL);
  pthread_cond_init(&rt->idle, NULL);
  *out = rt;
  return ML_OK;
}

static void group_clear(ml_hookrt *rt, hr_group *gr);

void ml_hookrt_release(ml_hookrt *rt) {
  if (!rt) return;
  ml_reclaimer_remove(hookrt_reclaim, rt);
  pthread_mutex_lock(&rt->mu);
  rt->stop = true;
  pthread_cond_broadcast(&rt->cv);
  pthread_mutex_unlock(&rt->mu);
  if (rt->worker_started) pthread_join(rt->worker, NULL);
  stage_drop_others(rt, NULL, NULL, 0);
  free(rt->stages);
  ml_uploader_release(rt->uploader);
  for (int g = 0; g < rt->ngroups; g++) if (rt->groups[g].used) group_clear(rt, &rt->groups[g]);
  for (int i = 0; i < rt->nties; i++) ml_tensor_release(rt->ties[i].t);
  free(rt->ties);
  free(rt->groups);
  pthread_cond_destroy(&rt->idle);
  pthread_cond_destroy(&rt->cv);
  pthread_mutex_destroy(&rt->mu);
  free(rt);
}

ml_status ml_hookrt_configure(ml_hookrt *rt, int prefetch, int drop) {
  if (!rt) return ml_fail(ML_EINVAL, "ml_hookrt_configure: runtime is NULL");
  if (prefetch < -1 || prefetch > 1)
    return ml_fail(ML_EINVAL, "ml_hookrt_configure: prefetch must be 0 or 1 (-1 keeps it), got %d", prefetch);
  if (drop < -1 || drop > 3)
    return ml_fail(ML_EINVAL, "ml_hookrt_configure: drop must be 0, 1, 2 or 3 (auto) (-1 keeps it), got %d", drop);
  if (prefetch >= 0) rt->prefetch = prefetch;
  if (drop >= 0) rt->drop = drop;
  return ML_OK;
}

ml_status ml_hookrt_set_prefetch_window(ml_hookrt *rt, int64_t min_bytes, int64_t lookahead_bytes) {
  if (!rt) return ml_fail(ML_EINVAL, "ml_hookrt_set_prefetch_window: runtime is NULL");
  if (min_bytes < -1 || lookahead_bytes < -1)
    return ml_fail(ML_EINVAL, "ml_hookrt_set_prefetch_window: sizes must be >= 0 (-1 keeps one), got %lld and %lld",
                   (long long)min_bytes, (long long)lookahead_bytes);
  if (min_bytes >= 0) rt->prefetch_min = (size_t)min_bytes;
  if (lookahead_bytes >= 0) rt->lookahead = (size_t)lookahead_bytes;
  return ML_OK;
}

ml_status ml_hookrt_set_stream_window(ml_hookrt *rt, int64_t bytes) {
  if (!rt) return ml_fail(ML_EINVAL, "ml_hookrt_set_stream_window: runtime is NULL");
  if (bytes < 0) return ml_fail(ML_EINVAL, "set_stream_window: bytes must be >= 0, got %lld", (long long)bytes);
  rt->stream_ahead = (size_t)bytes;
  rt->stream_limit = SIZE_MAX;      /* a new window starts unnarrowed */
  rt->stream_stopped = false;
  rt->stop_backoff = 0;
  return ML_OK;
}

ml_status ml_hookrt_set_auto_drop(ml_hookrt *rt, int64_t above_bytes) {
  if (!rt) return ml_fail(ML_EINVAL, "ml_hookrt_set_auto_drop: runtime is NULL");
  if (above_bytes < 0)
    return ml_fail(ML_EINVAL, "ml_hookrt_set_auto_drop: threshold must be >= 0, got %lld", (long long)above_bytes);
  rt->auto_drop_above = (size_t)above_bytes;
  return ML_OK;
}

ml_status ml_hookrt_wait(ml_hookrt *rt) {
  if (!rt) return ml_fail(ML_EINVAL, "ml_hookrt_wait: runtime is NULL");
  pthread_mutex_lock(&rt->mu);
  while (rt->pending > 0 && !rt->stop) pthread_cond_wait(&rt->idle, &rt->mu);
  pthread_mutex_unlock(&rt->mu);
  return ML_OK;
}

// --- groups ---------------------------------------------------------------------------------

static ml_status check_group(const char *fn, const ml_hookrt *rt, int g) {
  if (!rt) return ml_fail(ML_EINVAL, "%s: runtime is NULL", fn);
  if (g < 0 || g >= rt->ngroups || !rt->groups[g].used)
    return ml_fail(ML_EINVAL, "%s: no group %d in this runtime", fn, g);
  return ML_OK;
}

ml_status ml_hookrt_group_new(ml_hookrt *rt, ml_device dev, int *out) {
  if (!rt) return ml_fail(ML_EINVAL, "ml_hookrt_group_new: runtime is NULL");
  if (dev.type != ML_DEVICE_CPU && dev.type != ML_DEVICE_CUDA && dev.type != ML_DEVICE_META)
    return ml_fail(ML_EINVAL, "ml_hookrt_group_new: unknown execution device %s", ml_device_str(dev));
  int g = -1;
  for (int i = 0; i < rt->ngroups; i++) if (!rt->groups[i].used) { g = i; break; }
  if (g < 0) {
    if (rt->ngroups == rt->gcap) {
      int cap = rt->gcap ? rt->gcap * 2 : 16;
      hr_group *p = realloc(rt->groups, (size_t)cap * sizeof *p);
      if (!p) return ml_fail(ML_ENOMEM, "ml_hookrt_group_new: out of memory");
      rt->groups = p;
      rt->gcap = cap;
    }
    g = rt->ngroups++;
  }
  hr_group *gr = &rt->groups[g];
  memset(gr, 0, sizeof *gr);
  gr->used = true;
  gr->dev = dev;
  gr->next = -1;
  *out = g;
  return ML_OK;
}

/* Where src's bytes sit in a file mapping, when they do. */
static void locate_in_mapping(const ml_tensor *src, hr_slot *s) {
  ml_storage *st = src->storage;
  s->map = NULL;
  if (!st->mapping || !st->data) return;
  size_t es = ml_dtype_size(src->dtype);
  int64_t lo = 0, hi = 0;   /* element extent relative to offset */
  for (int d = 0; d < src->ndim; d++) {
    if (src->shape[d] == 0) return;
    int64_t span = (src->shape[d] - 1) * src->strides[d];
    if (span < 0) lo += span; else hi += span;
  }
  size_t base = (size_t)((const uint8_t *)st->data - st->mapping->data);
  s->map = st->mapping;
  s->map_off = base + (size_t)(src->offset + lo) * es;
  s->map_len = (size_t)(hi - lo + 1) * es;
}

ml_status ml_hookrt_group_add(ml_hookrt *rt, int g, ml_tensor *src, ml_dtype dt) {
  ML_TRY(check_group("ml_hookrt_group_add", rt, g));
  hr_group *gr = &rt->groups[g];
  if (!src) return ml_fail(ML_EINVAL, "ml_hookrt_group_add: tensor is NULL");
  if ((unsigned)dt >= ML_DTYPE_COUNT) return ml_fail(ML_EINVAL, "ml_hookrt_group_add: invalid dtype %d", (int)dt);
  if (src->storage->device.type == ML_DEVICE_META)
    return ml_fail(ML_EINVAL, "ml_hookrt_group_add: source tensor %s is on meta: it has no data to materialize",
                   ml_shape_str(src->ndim, src->shape, (char[ML_SHAPE_BUF]){0}, ML_SHAPE_BUF));
  if (gr->active) return ml_fail(ML_EINVAL, "ml_hookrt_group_add: group %d is materialized; release it first", g);
  if (gr->nslots == gr->cap) {
    int cap = gr->cap ? gr->cap * 2 : 4;
    hr_slot *p = realloc(gr->slots, (size_t)cap * sizeof *p);
    if (!p) return ml_fail(ML_ENOMEM, "ml_hookrt_group_add: out of memory");
    gr->slots = p;
    ml_tensor **l = realloc(gr->live, (size_t)cap * sizeof *l);
    if (!l) return ml_fail(ML_ENOMEM, "ml_hookrt_group_add: out of memory");
    gr->live = l;
    gr->cap = cap;
  }
  hr_slot *s = &gr->slots[gr->nslots];
  ml_tensor_retain(src);
  s->src = src;
  s->dt = dt;
  locate_in_mapping(src, s);
  if (s->map) rt->mapped_total += s->map_len;
  if (src->storage->device.type == ML_DEVICE_CPU) gr->host_bytes += (size_t)ml_tensor_numel(src) * ml_dtype_size(src->dtype);
  gr->live[gr->nslots] = NULL;
  gr->nslots++;
  return ML_OK;
}

int ml_hookrt_group_size(const ml_hookrt *rt, int g) {
  if (!rt || g < 0 || g >= rt->ngroups || !rt->groups[g].used) return -1;
  return rt->groups[g].nslots;
}

int ml_hookrt_next(const ml_hookrt *rt, int g) {
  if (!rt || g < 0 || g >= rt->ngroups || !rt->groups[g].used) return -1;
  return rt->groups[g].next;
}

// --- streaming ahead (cuda) -------------------------------------------------------------------

static int stage_find(const ml_hookrt *rt, const ml_tensor *src, ml_device dev) {
  for (int i = 0; i < rt->nstages; i++) {
    const hr_stage *e = &rt->stages[i];
    if (e->data == ml_tensor_data(src) && e->src_dt == src->dtype && e->numel == ml_tensor_numel(src) &&
        ml_device_equal(e->dev, dev))
      return i;
  }
  return -1;
}

/* Hands over the device buffer of stage i (a new reference) once the compute stream is ordered
   after its upload, and forgets the stage. */
static ml_status stage_take(ml_hookrt *rt, int i, ml_tensor **out) {
  hr_stage e = rt->stages[i];
  rt->stages[i] = rt->stages[--rt->nstages];
  ml_status st = ml_uploader_wait(rt->uploader, e.ticket);
  if (st) { ml_tensor_release(e.t); return st; }
  atomic_fetch_add(&rt->bytes_streamed, (long long)((size_t)e.numel * ml_dtype_size(e.src_dt)));
  *out = e.t;
  return ML_OK;
}

/* Forgets stage i once its upload is done: its device memory goes back to the allocator only
   when no copy writes it. */
static void stage_drop(ml_hookrt *rt, int i) {
  ml_tensor *t;
  if (stage_take(rt, i, &t) == ML_OK) ml_tensor_release(t);
  atomic_fetch_add(&rt->streams_dropped, 1);
}

/* Drops uploads to dev (any device when NULL) made for any group outside keep[0..nkeep) (the order
   changed, or a group was skipped). Uploads to other devices are their groups' to keep or drop. */
static void stage_drop_others(ml_hookrt *rt, const ml_device *dev, const int *keep, int nkeep) {
  for (int i = rt->nstages - 1; i >= 0; i--) {
    if (dev && !ml_device_equal(rt->stages[i].dev, *dev)) continue;
    bool kept = false;
    for (int k = 0; k < nkeep && !kept; k++) kept = rt->stages[i].group == keep[k];
    if (!kept) stage_drop(rt, i);
  }
}

/* Called by the CUDA allocator when cuda:device is out of memory: gives back the uploads streamed
   ahead to it and narrows the window, so the next forward does not run into the same wall: to
   half of what was in flight, or, when that was a single group, to no streaming ahead at all.
   Only on the thread that materializes (the stages are its own, and the runtime is not
   thread-safe); stages never call here, as they allocate only free memory. */
static size_t hookrt_reclaim(void *ctx, int cuda_device) {
  ml_hookrt *rt = ctx;
  if (!atomic_load(&rt->has_owner) || !pthread_equal(rt->owner, pthread_self())) return 0;
  size_t freed = 0;
  int group = -1;
  bool several = false;
  for (int i = rt->nstages - 1; i >= 0; i--) {
    const hr_stage *e = &rt->stages[i];
    if (e->dev.type != ML_DEVICE_CUDA || e->dev.index != cuda_device) continue;
    several |= group >= 0 && e->group != group;
    group = e->group;
    freed += (size_t)e->numel * ml_dtype_size(e->src_dt);
    stage_drop(rt, i);
    atomic_fetch_add(&rt->streams_reclaimed, 1);
  }
  if (freed == 0) return 0;
  rt->reclaimed = true;
  if (several && freed / 2 < rt->stream_limit) rt->stream_limit = freed / 2;
  if (!several) {
    rt->stream_stopped = true;
    rt->calm_forwards = 0;
    rt->stop_backoff = rt->stop_backoff ? 2 * rt->stop_backoff : 1;
  }
  return freed;
}

/* The host bytes streamed ahead now, past the next group: the window set, as narrowed after running
   out of memory; -1 when streaming ahead stopped. */
static int64_t stream_window(const ml_hookrt *rt) {
  if (rt->stream_stopped) return -1;
  return (int64_t)(rt->stream_ahead < rt->stream_limit ? rt->stream_ahead : rt->stream_limit);
}

/* Starts uploading group h's host-resident weights to its cuda device. A hint: whatever cannot be
   streamed (no free memory now, strided source) is copied at materialize time instead. */
static void stage_group(ml_hookrt *rt, int h) {
  hr_group *gr = &rt->groups[h];
  if (!rt->uploader && ml_uploader_new(&rt->uploader) != ML_OK) return;
  for (int i = 0; i < gr->nslots; i++) {
    ml_tensor *src = gr->slots[i].src;
    if (src->storage->device.type != ML_DEVICE_CPU || !ml_tensor_is_contiguous(src) ||
        ml_tensor_numel(src) == 0 || stage_find(rt, src, gr->dev) >= 0)
      continue;
    bool tied_live = false;   /* already on the device for an active group: nothing to stream */
    for (int k = 0; k < rt->nties && !tied_live; k++)
      tied_live = rt->ties[k].data == ml_tensor_data(src) && ml_device_equal(rt->ties[k].dev, gr->dev);
    if (tied_live) continue;
    if (rt->nstages == rt->scap) {
      int cap = rt->scap ? rt->scap * 2 : 16;
      hr_stage *p = realloc(rt->stages, (size_t)cap * sizeof *p);
      if (!p) return;
      rt->stages = p;
      rt->scap = cap;
    }
    ml_tensor *t;
    if (ml_tensor_empty_if_free(src->dtype, src->ndim, src->shape, gr->dev, &t) != ML_OK) return;
    int ticket;
    if (ml_uploader_submit(rt->uploader, t, src, &ticket) != ML_OK) { ml_tensor_release(t); return; }
    rt->stages[rt->nstages++] = (hr_stage){ml_tensor_data(src), src->dtype, ml_tensor_numel(src), gr->dev, t,
                                           ticket, h};
  }
}

// --- tied sharing -----------------------------------------------------------------------------

static bool tie_matches(const hr_tie *e, const ml_tensor *src, ml_dtype dt, ml_device dev) {
  if (e->data != ml_tensor_data(src) || e->src_dt != src->dtype || e->dt != dt ||
      !ml_device_equal(e->dev, dev) || e->ndim != src->ndim) return false;
  for (int d = 0; d < src->ndim; d++)
    if (e->shape[d] != src->shape[d] || e->strides[d] != src->strides[d]) return false;
  return true;
}

/* A copy of src on dev as dt, shared with every active group that asks for the same bytes. */
static ml_status tie_acquire(ml_hookrt *rt, const ml_tensor *src, ml_dtype dt, ml_device dev, ml_tensor **out) {
  for (int i = 0; i < rt->nties; i++) {
    hr_tie *e = &rt->ties[i];
    if (tie_matches(e, src, dt, dev)) {
      e->users++;
      ml_tensor_retain(e->t);
      *out = e->t;
      atomic_fetch_add(&rt->tied_hits, 1);
      return ML_OK;
    }
  }
  if (rt->nties == rt->tcap) {
    int cap = rt->tcap ? rt->tcap * 2 : 16;
    hr_tie *p = realloc(rt->ties, (size_t)cap * sizeof *p);
    if (!p) return ml_fail(ML_ENOMEM, "ml_hookrt_materialize: out of memory");
    rt->ties = p;
    rt->tcap = cap;
  }
  ml_tensor *t;
  int si = dev.type == ML_DEVICE_CUDA ? stage_find(rt, src, dev) : -1;
  if (si >= 0) {              /* streamed ahead: the device buffer is (being) filled */
    ml_tensor *up;
    ML_TRY(stage_take(rt, si, &up));
    if (up->dtype == dt) t = up;
    else {
      ml_status st = ml_tensor_to(up, dev, dt, &t);   /* converted on the device */
      ml_tensor_release(up);
      ML_TRY(st);
    }
  } else {
    ML_TRY(ml_tensor_to(src, dev, dt, &t));
  }
  hr_tie *e = &rt->ties[rt->nties++];
  memset(e, 0, sizeof *e);
  e->data = ml_tensor_data(src);
  e->src_dt = src->dtype;
  e->dt = dt;
  e->dev = dev;
  e->ndim = src->ndim;
  memcpy(e->shape, src->shape, sizeof e->shape);
  memcpy(e->strides, src->strides, sizeof e->strides);
  e->t = t;
  e->users = 1;
  atomic_fetch_add(&rt->bytes_copied, (long long)((size_t)ml_tensor_numel(t) * ml_dtype_size(dt)));
  ml_tensor_retain(t);
  *out = t;
  return ML_OK;
}

static void tie_drop(ml_hookrt *rt, const ml_tensor *t) {
  for (int i = 0; i < rt->nties; i++) {
    if (rt->ties[i].t != t) continue;
    if (--rt->ties[i].users == 0) {
      ml_tensor_release(rt->ties[i].t);
      rt->ties[i] = rt->ties[--rt->nties];
    }
    return;
  }
}

// --- materialize / release ------------------------------------------------------------------

static void group_unmaterialize(ml_hookrt *rt, hr_group *gr) {
  for (int i = 0; i < gr->nslots; i++) {
    ml_tensor *t = gr->live[i];
    if (!t) continue;
    if (t != gr->slots[i].src) tie_drop(rt, t);
    ml_tensor_release(t);
    gr->live[i] = NULL;
  }
  gr->active = false;
}

static void read_ahead(ml_hookrt *rt, int h, int stop, bool again);

/* Streams ahead of group g (about to be materialized) along the learned order: the next group,
   then on while the window holds; past a group far smaller than the one after it (a layer's norm
   before its big matrix) always to that one too. Groups that run on another device (an embedding
   looked up on the CPU at the start of the next forward) are passed over. Called before g's own
   uploads are waited for, so the uploader has the next group queued while the host waits: the
   copy engine never runs dry at a module boundary waiting for the host to wake up and ask for
   more. Uploads made for any other group are dropped. */
static void stage_ahead_of(ml_hookrt *rt, int g) {
  hr_group *gr = &rt->groups[g];
  enum { MAX_AHEAD = 64 };
  int window[MAX_AHEAD + 1], nwindow = 0;
  window[nwindow++] = g;                /* its own uploads are kept */
  int64_t limit = stream_window(rt);
  size_t ahead = 0;
  int steps = 0;
  for (int h = gr->next_unsure ? -1 : gr->next;
       rt->prefetch && limit >= 0 && h >= 0 && h != g && nwindow <= MAX_AHEAD && steps++ < rt->ngroups;
       h = rt->groups[h].next_unsure ? -1 : rt->groups[h].next) {
    hr_group *o = &rt->groups[h];
    if (!o->used || o->active) break;
    if (!ml_device_equal(o->dev, gr->dev)) continue;   /* runs elsewhere (a lookup on the CPU): passed over */
    size_t b = o->host_bytes;
    if (nwindow > 1 && ahead + b > (size_t)limit && ahead >= b / 8) break;
    bool seen = false;                  /* a cycle in the learned order */
    for (int k = 1; k < nwindow && !seen; k++) seen = window[k] == h;
    if (seen) break;
    window[nwindow++] = h;
    ahead += b;
  }
  stage_drop_others(rt, &gr->dev, window, nwindow);
  for (int k = 1; k < nwindow; k++) stage_group(rt, window[k]);
}

ml_status ml_hookrt_materialize(ml_hookrt *rt, int g, ml_tensor **outs, int n) {
  ML_TRY(check_group("ml_hookrt_materialize", rt, g));
  hr_group *gr = &rt->groups[g];
  if (n != gr->nslots)
    return ml_fail(ML_EINVAL, "ml_hookrt_materialize: group %d has %d tensors, caller expects %d", g, gr->nslots, n);
  if (gr->active) group_unmaterialize(rt, gr);   /* materialized twice: the new call wins */
  if (gr->dev.type == ML_DEVICE_CUDA && (rt->nstages > 0 || rt->prefetch)) stage_ahead_of(rt, g);
  for (int i = 0; i < n; i++) outs[i] = NULL;
  for (int i = 0; i < n; i++) {
    hr_slot *s = &gr->slots[i];
    ml_tensor *t;
    if (ml_device_equal(s->src->storage->device, gr->dev) && s->src->dtype == s->dt) {
      ml_tensor_retain(s->src);                 /* zero copy: the source is already what is needed */
      t = s->src;
      atomic_fetch_add(&rt->bytes_viewed, (long long)((size_t)ml_tensor_numel(t) * ml_dtype_size(t->dtype)));
    } else if (gr->dev.type == ML_DEVICE_META) {
      ml_status st = ml_tensor_empty(s->dt, s->src->ndim, s->src->shape, gr->dev, &t);
      if (st) goto fail;
    } else {
      ml_status st = tie_acquire(rt, s->src, s->dt, gr->dev, &t);
      if (st) {
      fail:
        group_unmaterialize(rt, gr);
        for (int k = 0; k < i; k++) { ml_tensor_release(outs[k]); outs[k] = NULL; }
        return st;
      }
    }
    gr->live[i] = t;
    ml_tensor_retain(t);
    outs[i] = t;
  }
  gr->active = true;
  atomic_fetch_add(&rt->materialize_calls, 1);
  /* learn the order, then read ahead what is expected next */
  if (rt->last >= 0 && rt->last != g && rt->last < rt->ngroups && rt->groups[rt->last].used) {
    hr_group *prev = &rt->groups[rt->last];
    if (prev->next == g) prev->next_unsure = false;        /* seen again: follow it */
    else {
      prev->next_unsure = prev->next >= 0;                 /* a different successor than before */
      prev->next = g;
    }
  }
  rt->last = g;
  if (!atomic_load(&rt->has_owner)) {   /* the first thread to run a forward owns the runtime */
    rt->owner = pthread_self();
    atomic_store(&rt->has_owner, true);
  }
  gr->queued = false;
  if (rt->prefetch && !gr->next_unsure) read_ahead(rt, gr->next, g, false);
  return ML_OK;
}

/* At the start of a forward: if the last one ran without giving uploads back, a narrowed window
   doubles back toward the one set (from 1 MiB at least), and a stopped stream tries one group
   ahead again once as many forwards went by as it failed before, doubled each time. */
static void widen_stream_window(ml_hookrt *rt) {
  bool calm = !rt->reclaimed;
  rt->reclaimed = false;
  if (!calm) return;
  if (rt->stream_stopped) {
    if (++rt->calm_forwards >= rt->stop_backoff) {
      rt->stream_stopped = false;
      rt->stream_limit = 0;            /* one group ahead */
    }
  } else if (rt->stream_limit != SIZE_MAX) {
    size_t wider = rt->stream_limit < ((size_t)1 << 20) ? (size_t)1 << 20 : 2 * rt->stream_limit;
    rt->stream_limit = wider >= rt->stream_ahead ? SIZE_MAX : wider;
  }
}

ml_status ml_hookrt_forward_begins(ml_hookrt *rt) {
  if (!rt) return ml_fail(ML_EINVAL, "ml_hookrt_forward_begins: runtime is NULL");
  widen_stream_window(rt);
  if (rt->prefetch && rt->last >= 0 && rt->last < rt->ngroups && rt->groups[rt->last].used &&
      !rt->groups[rt->last].next_unsure)
    read_ahead(rt, rt->groups[rt->last].next, rt->last, true);
  return ML_OK;
}

/* True while the worker has a job for group g queued (not yet started). */
static bool job_queued(ml_hookrt *rt, int g) {
  pthread_mutex_lock(&rt->mu);
  bool found = false;
  for (hr_job *j = rt->head; j && !found; j = j->next) found = j->group == g;
  pthread_mutex_unlock(&rt->mu);
  return found;
}

/* Reads ahead along the learned order from group h (up to, not including, group stop): at least
   h, then on until the lookahead window is covered (a layer's small norms must not starve its big
   matrices). again: also the groups read ahead since they last ran, unless their job has not
   started yet (their pages may have left the page cache since). */
static void read_ahead(ml_hookrt *rt, int h, int stop, bool again) {
  size_t ahead = 0;
  for (int steps = 0; h >= 0 && h != stop && steps < rt->ngroups; steps++) {
    hr_group *o = &rt->groups[h];
    if (!o->used) break;
    int n;
    size_t b = mapped_bytes(o, &n);
    if (steps > 0 && ahead + b > rt->lookahead) break;
    if (!o->active && (!o->queued || (again && !job_queued(rt, h)))) enqueue_prefetch(rt, h);
    ahead += b;
    h = o->next_unsure ? -1 : o->next;
  }
}

/* True when another active group reads bytes of map overlapping [off, off+len). */
static bool range_in_use(const ml_hookrt *rt, int skip, const ml_mapping *map, size_t off, size_t len) {
  for (int g = 0; g < rt->ngroups; g++) {
    const hr_group *o = &rt->groups[g];
    if (g == skip || !o->used || !o->active) continue;
    for (int i = 0; i < o->nslots; i++) {
      const hr_slot *s = &o->slots[i];
      if (s->map == map && s->map_off < off + len && off < s->map_off + s->map_len) return true;
    }
  }
  return false;
}

ml_status ml_hookrt_release_group(ml_hookrt *rt, int g) {
  ML_TRY(check_group("ml_hookrt_release_group", rt, g));
  hr_group *gr = &rt->groups[g];
  if (!gr->active) return ML_OK;
  group_unmaterialize(rt, gr);
  atomic_fetch_add(&rt->releases, 1);
  if (rt->drop == 0 || (rt->drop == 3 && rt->mapped_total <= rt->auto_drop_above)) return ML_OK;
  long ps = page_size();
  for (int i = 0; i < gr->nslots; i++) {
    hr_slot *s = &gr->slots[i];
    if (!s->map || range_in_use(rt, g, s->map, s->map_off, s->map_len)) continue;
    /* only whole pages inside the tensor: a neighbour's partial page stays */
    size_t start = (s->map_off + (size_t)ps - 1) & ~((size_t)ps - 1);
    size_t end = (s->map_off + s->map_len) & ~((size_t)ps - 1);
    if (end <= start) continue;
    madvise(s->map->data + start, end - start, MADV_DONTNEED);
    if (rt->drop == 2) posix_fadvise(s->map->fd, (off_t)start, (off_t)(end - start), POSIX_FADV_DONTNEED);
    atomic_fetch_add(&rt->bytes_dropped, (long long)(end - start));
  }
  return ML_OK;
}

static void group_clear(ml_hookrt *rt, hr_group *gr) {
  group_unmaterialize(rt, gr);
  for (int i = 0; i < gr->nslots; i++) {
    if (gr->slots[i].map) rt->mapped_total -= gr->slots[i].map_len;
    ml_tensor_release(gr->slots[i].src);
  }
  free(gr->slots);
  free(gr->live);
  memset(gr, 0, sizeof *gr);
}

ml_status ml_hookrt_group_free(ml_hookrt *rt, int g) {
  ML_TRY(check_group("ml_hookrt_group_free", rt, g));
  /* uploads streamed ahead for it go too: their key is its sources' host addresses, which a
     later tensor may reuse once the sources are released */
  for (int i = rt->nstages - 1; i >= 0; i--)
    if (rt->stages[i].group == g) stage_drop(rt, i);
  group_clear(rt, &rt->groups[g]);
  for (int i = 0; i < rt->ngroups; i++)
    if (rt->groups[i].next == g) { rt->groups[i].next = -1; rt->groups[i].next_unsure = false; }
  if (rt->last == g) rt->last = -1;
  return ML_OK;
}

void ml_hookrt_get_stats(ml_hookrt *rt, ml_hookrt_stats *out) {
  memset(out, 0, sizeof *out);
  if (!rt) return;
  out->materialize_calls = atomic_load(&rt->materialize_calls);
  out->releases = atomic_load(&rt->releases);
  out->bytes_viewed = atomic_load(&rt->bytes_viewed);
  out->bytes_copied = atomic_load(&rt->bytes_copied);
  out->tied_hits = atomic_load(&rt->tied_hits);
  out->bytes_dropped = atomic_load(&rt->bytes_dropped);
  out->prefetch_jobs = atomic_load(&rt->prefetch_jobs);
  out->prefetch_bytes = atomic_load(&rt->prefetch_bytes);
  out->prefetch_pages = atomic_load(&rt->prefetch_pages);
  int n = 0;
  for (int i = 0; i < rt->nties; i++) n += rt->ties[i].users > 0;
  out->shared_copies = n;
  out->bytes_streamed = atomic_load(&rt->bytes_streamed);
  out->streams_dropped = atomic_load(&rt->streams_dropped);
  for (int g = 0; g < rt->ngroups; g++) out->groups += rt->groups[g].used;
  out->streams_pending = rt->nstages;
  out->streams_reclaimed = atomic_load(&rt->streams_reclaimed);
  out->stream_window = stream_window(rt);
  out->bytes_mapped = (int64_t)rt->mapped_total;
  ml_uploader_timing(rt->uploader, &out->stream_waits, &out->stream_drains, &out->stream_wait_ns,
                     &out->stream_busy_ns);
}
