/* error.c: the thread-local error message behind ml_last_error(), and message helpers. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char last_error[1024];

const char *ml_last_error(void) { return last_error; }

int ml_abi_version(void) { return ML_ABI_VERSION; }

ml_status ml_fail(ml_status status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  return status;
}

ml_status ml_fail_context(ml_status status, const char *fmt, ...) {
  char reason[sizeof last_error];
  snprintf(reason, sizeof reason, "%s", last_error);
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  if (n >= 0 && (size_t)n + 3 < sizeof last_error) {              /* the reason, cut to what fits */
    size_t room = sizeof last_error - (size_t)n;
    snprintf(last_error + n, room, ": %.*s", (int)(room - 3), reason);
  }
  return status;
}

const char *ml_shape_str(int ndim, const int64_t *shape, char *buf, size_t n) {
  size_t used = 0;
  used += (size_t)snprintf(buf + used, n - used, "[");
  for (int i = 0; i < ndim && used < n; i++)
    used += (size_t)snprintf(buf + used, n - used, i ? ", %lld" : "%lld", (long long)shape[i]);
  if (used < n) snprintf(buf + used, n - used, "]");
  return buf;
}

const char *ml_device_str(ml_device dev) {
  static _Thread_local char ring[4][32];
  static _Thread_local int next;
  char *buf = ring[next++ & 3];
  ml_device_name(dev, buf, sizeof ring[0]);
  return buf;
}
