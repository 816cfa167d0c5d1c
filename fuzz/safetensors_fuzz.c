/* safetensors_fuzz.c: libFuzzer target over the safetensors validator and tensor extraction.
   Every input is opened from memory with all the format checks; when it passes, every tensor is
   materialised on the CPU and its bytes read (ASan catches any read outside the input), and the
   metadata is walked. A valid input is also written back with ml_safetensors_save into a
   scratch directory and reopened: what the writer produces from any valid file must be valid.
   Build and run: make fuzz (see fuzz/run.sh). */
#include "moonload.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char scratch[256];

static void remove_scratch(void) { unlink(scratch); }

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc; (void)argv;
  snprintf(scratch, sizeof scratch, "/tmp/moonload-fuzz-%d.safetensors", (int)getpid());
  atexit(remove_scratch);
  return 0;
}

static volatile uint64_t sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  ml_safetensors *h = NULL;
  if (ml_safetensors_open_memory(data, size, "fuzz", &h) != ML_OK) {
    if (ml_last_error()[0] == '\0') abort();         /* every failure carries a message */
    return 0;
  }
  int64_t n = ml_safetensors_count(h);
  for (int64_t i = 0; i < ml_safetensors_metadata_count(h); i++)
    sink += strlen(ml_safetensors_metadata_key(h, i)) + strlen(ml_safetensors_metadata_value(h, i));

  ml_device cpu = {ML_DEVICE_CPU, 0};
  ml_tensor **ts = calloc((size_t)n + 1, sizeof *ts);
  const char **names = calloc((size_t)n + 1, sizeof *names);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; i++) {
    ml_safetensors_info info;
    if (ml_safetensors_info_at(h, i, &info) != ML_OK) abort();
    if (info.end < info.begin || info.file_offset + (info.end - info.begin) > size) abort();
    ml_tensor *t = NULL;
    if (ml_safetensors_tensor(h, i, cpu, &t) != ML_OK) continue;   /* unsupported dtype or rank */
    const uint8_t *p = ml_tensor_data(t);
    size_t nb = (size_t)(info.end - info.begin);
    if (nb != (size_t)ml_tensor_numel(t) * ml_dtype_size(ml_tensor_dtype(t))) abort();
    for (size_t k = 0; k < nb; k++) sink += p[k];
    if (memcmp(p, data + info.file_offset, nb) != 0) abort();
    ts[kept] = t;
    names[kept] = info.name;
    kept++;
  }
  if (kept > 0) {
    int64_t nm = ml_safetensors_metadata_count(h);            /* -1: no __metadata__ */
    size_t slots = (size_t)(nm > 0 ? nm : 0) + 1;
    const char **mk = calloc(slots, sizeof *mk), **mv = calloc(slots, sizeof *mv);
    for (int64_t i = 0; i < nm; i++) { mk[i] = ml_safetensors_metadata_key(h, i); mv[i] = ml_safetensors_metadata_value(h, i); }
    if (ml_safetensors_save(scratch, kept, names, ts, nm, mk, mv) != ML_OK) abort();
    ml_safetensors *back = NULL;
    if (ml_safetensors_open(scratch, &back) != ML_OK) {
      fprintf(stderr, "rewritten file does not reopen: %s\n", ml_last_error());
      abort();
    }
    if (ml_safetensors_count(back) != kept || ml_safetensors_metadata_count(back) != nm) abort();
    ml_safetensors_release(back);
    free(mk); free(mv);
  }
  for (int64_t i = 0; i < kept; i++) ml_tensor_release(ts[i]);
  free(ts); free(names);
  ml_safetensors_release(h);
  return 0;
}
