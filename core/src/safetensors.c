/* safetensors.c: a validating, zero-copy reader and an atomic writer for the safetensors format.

   File layout: u64 little-endian N, N bytes of UTF-8 JSON
   {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...},
   then the data section; offsets are relative to it, end exclusive, row-major.

   The reader checks everything a hostile file could get wrong (reference/beyond-accelerate.md),
   each with its own message naming the file and the tensor:
     1. file >= 8 bytes; N <= 100,000,000; 8 + N <= file size;
     2. header valid UTF-8 and strict JSON (one object, nothing after it but whitespace);
        __metadata__ an object of strings; each entry exactly {dtype, shape, data_offsets};
        dtype a known safetensors name; integers non-negative and 64-bit;
     3. duplicate tensor names (and duplicate keys anywhere) rejected;
     4. sorted by (begin, end), the first tensor starts at 0 and each starts where the previous
        ended; end >= begin;
     5. element and bit counts overflow-checked, a whole number of bytes, equal to end - begin;
     6. the last tensor ends exactly at the end of the file.
   Zero-size tensors (begin == end) follow the same rule: they sit at the offset where the tensor
   before them (in offset order) ends, so several may share one offset, also with the start of the
   next non-empty tensor or the end of the data. That is what the reference writer produces.

   The JSON reader is written for this schema: it never recurses (depth is fixed at 3), allocates
   one string arena no larger than the header plus arrays that grow with what it has parsed. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define ST_MAX_HEADER 100000000ull

// --- dtypes -------------------------------------------------------------------------------

/* The reference's Dtype enum in declaration order: the writer sorts by descending rank (then
   name), which puts the widest elements first so every tensor is aligned to its element size. */
typedef struct { const char *name; int bits; int ml; } st_dtype;
static const st_dtype st_dtypes[] = {
  {"BOOL", 8, ML_BOOL},     {"F4", 4, -1},            {"F6_E2M3", 6, -1},      {"F6_E3M2", 6, -1},
  {"U8", 8, ML_UINT8},      {"I8", 8, ML_INT8},       {"F8_E5M2", 8, ML_FLOAT8_E5M2}, {"F8_E4M3", 8, ML_FLOAT8_E4M3FN},
  {"F8_E8M0", 8, -1},       {"I16", 16, ML_INT16},    {"U16", 16, -1},         {"F16", 16, ML_FLOAT16},
  {"BF16", 16, ML_BFLOAT16}, {"I32", 32, ML_INT32},   {"U32", 32, -1},         {"F32", 32, ML_FLOAT32},
  {"C64", 64, -1},          {"F64", 64, ML_FLOAT64},  {"I64", 64, ML_INT64},   {"U64", 64, -1},
};
#define ST_NDTYPES ((int)(sizeof st_dtypes / sizeof st_dtypes[0]))

static int st_dtype_of_ml(ml_dtype dt) {
  for (int i = 0; i < ST_NDTYPES; i++) if (st_dtypes[i].ml == (int)dt) return i;
  return -1;
}

// --- the handle ---------------------------------------------------------------------------

typedef struct {
  const char *name;
  int dtype;                  /* index into st_dtypes */
  int ndim;
  size_t shape_at;            /* into h->dims */
  uint64_t begin, end;
} st_entry;

struct ml_safetensors {
  atomic_int refcount;
  ml_mapping *map;            /* owned reference; NULL for an in-memory handle */
  uint8_t *owned;             /* the in-memory copy, owned; NULL for a mapped file */
  const uint8_t *data;        /* whole file */
  size_t size;
  size_t data_start;          /* 8 + N */
  char *label;                /* owned: path or label, for messages */
  char *arena;                /* owned: decoded strings (names, metadata) */
  size_t arena_used;
  st_entry *entries;          /* owned, sorted by name */
  int64_t count, cap;
  int64_t *dims;              /* owned: every shape, back to back */
  size_t ndims, dims_cap;
  const char **meta;          /* owned: key, value, key, value ... (strings in the arena) */
  int64_t nmeta, meta_cap;    /* nmeta -1: no __metadata__ */
};

static void handle_free(ml_safetensors *h) {
  if (!h) return;
  ml_mapping_release(h->map);
  free(h->owned); free(h->label); free(h->arena); free(h->entries); free(h->dims); free(h->meta);
  free(h);
}

static ml_status grow(void **p, int64_t *cap, int64_t need, size_t elem, const char *label) {
  if (need <= *cap) return ML_OK;
  int64_t nc = *cap ? *cap * 2 : 16;
  while (nc < need) nc *= 2;
  void *q = realloc(*p, (size_t)nc * elem);
  if (!q) return ml_fail(ML_ENOMEM, "safetensors: %s: out of memory while reading the header", label);
  *p = q; *cap = nc;
  return ML_OK;
}

// --- UTF-8 --------------------------------------------------------------------------------

/* Length of the valid UTF-8 prefix of s (strict: no overlongs, surrogates or > U+10FFFF). */
static size_t utf8_valid_prefix(const uint8_t *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    uint8_t c = s[i];
    if (c < 0x80) { i++; continue; }
    size_t len; uint32_t cp, min;
    if (c >= 0xc2 && c <= 0xdf) { len = 2; cp = c & 0x1f; min = 0x80; }
    else if (c >= 0xe0 && c <= 0xef) { len = 3; cp = c & 0x0f; min = 0x800; }
    else if (c >= 0xf0 && c <= 0xf4) { len = 4; cp = c & 0x07; min = 0x10000; }
    else return i;
    if (n - i < len) return i;
    for (size_t k = 1; k < len; k++) {
      if ((s[i + k] & 0xc0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
    i += len;
  }
  return n;
}

// --- JSON (schema-directed, strict) -------------------------------------------------------

typedef struct {
  const uint8_t *p, *start, *end;
  ml_safetensors *h;
} jcur;

static ml_status jerr(jcur *j, const char *what) {
  size_t at = (size_t)(j->p - j->start);
  if (j->p >= j->end)
    return ml_fail(ML_EFORMAT, "safetensors: %s: header is not valid JSON: %s, found the end of the header "
                   "(byte %zu)", j->h->label, what, at);
  uint8_t c = *j->p;
  if (c >= 0x20 && c < 0x7f)
    return ml_fail(ML_EFORMAT, "safetensors: %s: header is not valid JSON: %s, found '%c' at byte %zu",
                   j->h->label, what, c, at);
  return ml_fail(ML_EFORMAT, "safetensors: %s: header is not valid JSON: %s, found byte 0x%02x at byte %zu",
                 j->h->label, what, c, at);
}

static void jws(jcur *j) {
  while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static bool jpeek(jcur *j, char c) { jws(j); return j->p < j->end && *j->p == (uint8_t)c; }

static ml_status jexpect(jcur *j, char c, const char *what) {
  jws(j);
  if (j->p >= j->end || *j->p != (uint8_t)c) return jerr(j, what);
  j->p++;
  return ML_OK;
}

static int hexval(uint8_t c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static ml_status jhex4(jcur *j, uint32_t *out) {
  if (j->end - j->p < 4) return jerr(j, "expected 4 hex digits after \\u");
  uint32_t v = 0;
  for (int k = 0; k < 4; k++) {
    int d = hexval(j->p[k]);
    if (d < 0) { j->p += k; return jerr(j, "expected 4 hex digits after \\u"); }
    v = v << 4 | (uint32_t)d;
  }
  j->p += 4;
  *out = v;
  return ML_OK;
}

/* Decodes a string into the arena (NUL-terminated). The header was checked to be UTF-8, and a
   decoded string plus its NUL is never longer than its quoted source, so the arena suffices. */
static ml_status jstring(jcur *j, const char **out, const char *what) {
  jws(j);
  if (j->p >= j->end || *j->p != '"') return jerr(j, what);
  j->p++;
  ml_safetensors *h = j->h;
  char *dst = h->arena + h->arena_used, *o = dst;
  for (;;) {
    if (j->p >= j->end) return jerr(j, "unterminated string");
    uint8_t c = *j->p;
    if (c == '"') { j->p++; break; }
    if (c < 0x20) return jerr(j, "control character in a string");
    if (c != '\\') { *o++ = (char)c; j->p++; continue; }
    j->p++;
    if (j->p >= j->end) return jerr(j, "unterminated string");
    uint8_t e = *j->p++;
    switch (e) {
    case '"': *o++ = '"'; break;
    case '\\': *o++ = '\\'; break;
    case '/': *o++ = '/'; break;
    case 'b': *o++ = '\b'; break;
    case 'f': *o++ = '\f'; break;
    case 'n': *o++ = '\n'; break;
    case 'r': *o++ = '\r'; break;
    case 't': *o++ = '\t'; break;
    case 'u': {
      uint32_t cp;
      ML_TRY(jhex4(j, &cp));
      if (cp >= 0xdc00 && cp <= 0xdfff) { j->p -= 6; return jerr(j, "lone low surrogate escape"); }
      if (cp >= 0xd800 && cp <= 0xdbff) {
        uint32_t lo;
        if (j->end - j->p < 2 || j->p[0] != '\\' || j->p[1] != 'u')
          return jerr(j, "high surrogate escape not followed by a low surrogate");
        j->p += 2;
        ML_TRY(jhex4(j, &lo));
        if (lo < 0xdc00 || lo > 0xdfff) { j->p -= 6; return jerr(j, "high surrogate escape not followed by a low surrogate"); }
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
      }
      if (cp == 0) { j->p -= 6; return jerr(j, "\\u0000 (a NUL character) is not allowed in names or metadata"); }
      if (cp < 0x80) *o++ = (char)cp;
      else if (cp < 0x800) { *o++ = (char)(0xc0 | cp >> 6); *o++ = (char)(0x80 | (cp & 0x3f)); }
      else if (cp < 0x10000) {
        *o++ = (char)(0xe0 | cp >> 12); *o++ = (char)(0x80 | ((cp >> 6) & 0x3f)); *o++ = (char)(0x80 | (cp & 0x3f));
      } else {
        *o++ = (char)(0xf0 | cp >> 18); *o++ = (char)(0x80 | ((cp >> 12) & 0x3f));
        *o++ = (char)(0x80 | ((cp >> 6) & 0x3f)); *o++ = (char)(0x80 | (cp & 0x3f));
      }
      break;
    }
    default: j->p--; return jerr(j, "invalid escape in a string");
    }
  }
  *o++ = '\0';
  h->arena_used += (size_t)(o - dst);
  *out = dst;
  return ML_OK;
}

/* A non-negative integer that fits in 63 bits (JSON grammar: no leading zeros, no sign, no
   fraction or exponent: sizes and offsets are integers). */
static ml_status juint(jcur *j, uint64_t *out, const char *tensor, const char *field) {
  jws(j);
  const uint8_t *s = j->p;
  if (j->p >= j->end || *j->p < '0' || *j->p > '9') {
    if (j->p < j->end && (*j->p == '-' )) {
      return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": %s holds a negative number",
                     j->h->label, tensor, field);
    }
    return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": %s must be a list of non-negative integers",
                   j->h->label, tensor, field);
  }
  uint64_t v = 0;
  bool over = false;
  if (*j->p == '0') j->p++;
  else
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
      uint64_t d = (uint64_t)(*j->p - '0');
      if (v > ((uint64_t)INT64_MAX - d) / 10) over = true; else v = v * 10 + d;
      j->p++;
    }
  if (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E' || (*j->p >= '0' && *j->p <= '9')))
    return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": %s must be a list of non-negative integers "
                   "(found \"%.*s\")", j->h->label, tensor, field, (int)(j->p - s + 1), (const char *)s);
  if (over)
    return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": %s value %.*s does not fit in 63 bits",
                   j->h->label, tensor, field, (int)(j->p - s > 40 ? 40 : j->p - s), (const char *)s);
  *out = v;
  return ML_OK;
}

static ml_status parse_metadata(jcur *j) {
  ml_safetensors *h = j->h;
  if (h->nmeta >= 0) return ml_fail(ML_EFORMAT, "safetensors: %s: __metadata__ appears twice", h->label);
  jws(j);
  if (j->p >= j->end || *j->p != '{')
    return ml_fail(ML_EFORMAT, "safetensors: %s: __metadata__ must be an object mapping strings to strings",
                   h->label);
  j->p++;
  h->nmeta = 0;
  if (jpeek(j, '}')) { j->p++; return ML_OK; }
  for (;;) {
    const char *k, *v;
    ML_TRY(jstring(j, &k, "expected a string key in __metadata__"));
    ML_TRY(jexpect(j, ':', "expected ':' after a key"));
    jws(j);
    if (j->p >= j->end || *j->p != '"')
      return ml_fail(ML_EFORMAT, "safetensors: %s: __metadata__ value for \"%s\" is not a string",
                     h->label, k);
    ML_TRY(jstring(j, &v, "expected a string"));
    for (int64_t i = 0; i < h->nmeta; i++)
      if (strcmp(h->meta[2 * i], k) == 0)
        return ml_fail(ML_EFORMAT, "safetensors: %s: __metadata__ key \"%s\" appears twice", h->label, k);
    ML_TRY(grow((void **)&h->meta, &h->meta_cap, 2 * (h->nmeta + 1), sizeof *h->meta, h->label));
    h->meta[2 * h->nmeta] = k;
    h->meta[2 * h->nmeta + 1] = v;
    h->nmeta++;
    jws(j);
    if (j->p < j->end && *j->p == ',') { j->p++; continue; }
    return jexpect(j, '}', "expected ',' or '}' in __metadata__");
  }
}

static ml_status parse_entry(jcur *j, const char *name) {
  ml_safetensors *h = j->h;
  jws(j);
  if (j->p >= j->end || *j->p != '{')
    return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": entry must be an object with dtype, shape "
                   "and data_offsets", h->label, name);
  j->p++;
  ML_TRY(grow((void **)&h->entries, &h->cap, h->count + 1, sizeof *h->entries, h->label));
  st_entry *e = &h->entries[h->count];
  memset(e, 0, sizeof *e);
  e->name = name;
  e->dtype = -1;
  bool seen_dtype = false, seen_shape = false, seen_offsets = false;
  if (!jpeek(j, '}'))
    for (;;) {
      const char *key;
      ML_TRY(jstring(j, &key, "expected a string key"));
      ML_TRY(jexpect(j, ':', "expected ':' after a key"));
      if (strcmp(key, "dtype") == 0) {
        if (seen_dtype) return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": dtype appears twice", h->label, name);
        seen_dtype = true;
        jws(j);
        if (j->p >= j->end || *j->p != '"')
          return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": dtype must be a string", h->label, name);
        size_t mark = h->arena_used;
        const char *dt;
        ML_TRY(jstring(j, &dt, "expected a string"));
        for (int i = 0; i < ST_NDTYPES; i++) if (strcmp(dt, st_dtypes[i].name) == 0) e->dtype = i;
        if (e->dtype < 0)
          return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": unknown dtype \"%s\"", h->label, name, dt);
        h->arena_used = mark;             /* the name lives in st_dtypes */
      } else if (strcmp(key, "shape") == 0) {
        if (seen_shape) return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": shape appears twice", h->label, name);
        seen_shape = true;
        jws(j);
        if (j->p >= j->end || *j->p != '[')
          return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": shape must be a list of non-negative "
                         "integers", h->label, name);
        j->p++;
        e->shape_at = h->ndims;
        if (!jpeek(j, ']'))
          for (;;) {
            uint64_t d;
            ML_TRY(juint(j, &d, name, "shape"));
            int64_t cap = (int64_t)h->dims_cap;
            ML_TRY(grow((void **)&h->dims, &cap, (int64_t)h->ndims + 1, sizeof *h->dims, h->label));
            h->dims_cap = (size_t)cap;
            h->dims[h->ndims++] = (int64_t)d;
            e->ndim++;
            jws(j);
            if (j->p < j->end && *j->p == ',') { j->p++; continue; }
            break;
          }
        ML_TRY(jexpect(j, ']', "expected ',' or ']' in a shape"));
      } else if (strcmp(key, "data_offsets") == 0) {
        if (seen_offsets) return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": data_offsets appears twice", h->label, name);
        seen_offsets = true;
        jws(j);
        if (j->p >= j->end || *j->p != '[')
          return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": data_offsets must be a list of two "
                         "non-negative integers", h->label, name);
        j->p++;
        ML_TRY(juint(j, &e->begin, name, "data_offsets"));
        if (!jpeek(j, ','))
          return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": data_offsets must be a list of two "
                         "non-negative integers", h->label, name);
        j->p++;
        ML_TRY(juint(j, &e->end, name, "data_offsets"));
        if (!jpeek(j, ']'))
          return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": data_offsets must be a list of two "
                         "non-negative integers", h->label, name);
        j->p++;
      } else {
        return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": unknown field \"%s\" (expected dtype, shape, "
                       "data_offsets)", h->label, name, key);
      }
      jws(j);
      if (j->p < j->end && *j->p == ',') { j->p++; continue; }
      break;
    }
  ML_TRY(jexpect(j, '}', "expected ',' or '}' in a tensor entry"));
  const char *missing = !seen_dtype ? "dtype" : !seen_shape ? "shape" : !seen_offsets ? "data_offsets" : NULL;
  if (missing) return ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": missing %s", h->label, name, missing);
  h->count++;
  return ML_OK;
}

static ml_status parse_header(ml_safetensors *h, const uint8_t *hdr, size_t n) {
  size_t ok = utf8_valid_prefix(hdr, n);
  if (ok != n)
    return ml_fail(ML_EFORMAT, "safetensors: %s: header is not valid UTF-8 (byte 0x%02x at header offset %zu)",
                   h->label, hdr[ok], ok);
  h->arena = malloc(n + 1);
  if (!h->arena) return ml_fail(ML_ENOMEM, "safetensors: %s: out of memory for a %zu-byte header", h->label, n);
  jcur j = {hdr, hdr, hdr + n, h};
  jws(&j);
  if (j.p >= j.end || *j.p != '{')
    return ml_fail(ML_EFORMAT, "safetensors: %s: header is not a JSON object (it must start with '{')", h->label);
  j.p++;
  if (!jpeek(&j, '}'))
    for (;;) {
      const char *key;
      ML_TRY(jstring(&j, &key, "expected a string key"));
      ML_TRY(jexpect(&j, ':', "expected ':' after a key"));
      if (strcmp(key, "__metadata__") == 0) ML_TRY(parse_metadata(&j));
      else ML_TRY(parse_entry(&j, key));
      jws(&j);
      if (j.p < j.end && *j.p == ',') { j.p++; continue; }
      break;
    }
  ML_TRY(jexpect(&j, '}', "expected ',' or '}' after a header entry"));
  jws(&j);
  if (j.p != j.end) return jerr(&j, "expected only whitespace after the header object");
  return ML_OK;
}

// --- validation of the layout ---------------------------------------------------------------

static int cmp_name(const void *a, const void *b) {
  return strcmp(((const st_entry *)a)->name, ((const st_entry *)b)->name);
}

static _Thread_local const st_entry *sort_base;   /* qsort has no context argument */
static int cmp_offsets(const void *a, const void *b) {
  const st_entry *x = &sort_base[*(const int64_t *)a], *y = &sort_base[*(const int64_t *)b];
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end) return x->end < y->end ? -1 : 1;
  return strcmp(x->name, y->name);
}

static const char *entry_shape_str(const ml_safetensors *h, const st_entry *e, char *buf, size_t n) {
  return ml_shape_str(e->ndim, h->dims + e->shape_at, buf, n);
}

static ml_status check_layout(ml_safetensors *h) {
  const char *L = h->label;
  if (h->count > 1) qsort(h->entries, (size_t)h->count, sizeof *h->entries, cmp_name);
  for (int64_t i = 1; i < h->count; i++)
    if (strcmp(h->entries[i - 1].name, h->entries[i].name) == 0)
      return ml_fail(ML_EFORMAT, "safetensors: %s: duplicate tensor name \"%s\"", L, h->entries[i].name);

  int64_t *order = malloc((size_t)(h->count ? h->count : 1) * sizeof *order);
  if (!order) return ml_fail(ML_ENOMEM, "safetensors: %s: out of memory", L);
  for (int64_t i = 0; i < h->count; i++) order[i] = i;
  sort_base = h->entries;
  if (h->count > 1) qsort(order, (size_t)h->count, sizeof *order, cmp_offsets);

  uint64_t data_size = h->size - h->data_start;
  uint64_t cursor = 0;
  const char *prev = NULL;
  ml_status st = ML_OK;
  char sb[ML_SHAPE_BUF];
  for (int64_t k = 0; k < h->count && st == ML_OK; k++) {
    const st_entry *e = &h->entries[order[k]];
    const st_dtype *dt = &st_dtypes[e->dtype];
    if (e->end < e->begin) {
      st = ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": data_offsets [%llu, %llu] end before begin",
                   L, e->name, (unsigned long long)e->begin, (unsigned long long)e->end);
      break;
    }
    if (e->begin != cursor) {
      if (!prev)
        st = ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\" starts at byte %llu of the data section; the "
                     "first tensor must start at 0", L, e->name, (unsigned long long)e->begin);
      else
        st = ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\" starts at byte %llu but \"%s\" ends at %llu (%s)",
                     L, e->name, (unsigned long long)e->begin, prev, (unsigned long long)cursor,
                     e->begin > cursor ? "gap between tensors" : "tensors overlap");
      break;
    }
    /* element count, then bits, with overflow checks */
    uint64_t numel = 1;
    bool over = false;
    for (int d = 0; d < e->ndim; d++) {
      uint64_t v = (uint64_t)h->dims[e->shape_at + d];
      if (v && numel > UINT64_MAX / v) over = true;
      numel *= v;
    }
    if (!over && numel > UINT64_MAX / (uint64_t)dt->bits) over = true;
    if (over) {
      st = ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": shape %s has too many elements (overflow)",
                   L, e->name, entry_shape_str(h, e, sb, sizeof sb));
      break;
    }
    uint64_t bits = numel * (uint64_t)dt->bits;
    if (bits % 8) {
      st = ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": %s shape %s is %llu bits, not a whole number of "
                   "bytes", L, e->name, dt->name, entry_shape_str(h, e, sb, sizeof sb), (unsigned long long)bits);
      break;
    }
    if (bits / 8 != e->end - e->begin) {
      st = ml_fail(ML_EFORMAT, "safetensors: %s: tensor \"%s\": %s shape %s needs %llu bytes but data_offsets "
                   "[%llu, %llu] hold %llu", L, e->name, dt->name, entry_shape_str(h, e, sb, sizeof sb),
                   (unsigned long long)(bits / 8), (unsigned long long)e->begin, (unsigned long long)e->end,
                   (unsigned long long)(e->end - e->begin));
      break;
    }
    cursor = e->end;
    prev = e->name;
  }
  free(order);
  ML_TRY(st);
  if (cursor != data_size) {
    if (cursor > data_size)
      return ml_fail(ML_EFORMAT, "safetensors: %s: tensors need %llu bytes of data but the file holds %llu after "
                     "the header (truncated)", L, (unsigned long long)cursor, (unsigned long long)data_size);
    return ml_fail(ML_EFORMAT, "safetensors: %s: tensors end at byte %llu of the data section but the file has "
                   "%llu more bytes after it (trailing data)", L, (unsigned long long)cursor,
                   (unsigned long long)(data_size - cursor));
  }
  return ML_OK;
}

static ml_status parse_file(ml_safetensors *h) {
  const char *L = h->label;
  if (h->size < 8)
    return ml_fail(ML_EFORMAT, "safetensors: %s: file is %zu bytes, too small to hold the 8-byte header length",
                   L, h->size);
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = n << 8 | h->data[i];
  if (n > ST_MAX_HEADER)
    return ml_fail(ML_EFORMAT, "safetensors: %s: header length %llu exceeds the limit of %llu bytes", L,
                   (unsigned long long)n, ST_MAX_HEADER);
  if (n > h->size - 8)
    return ml_fail(ML_EFORMAT, "safetensors: %s: header length %llu runs past the end of the file (%zu bytes)",
                   L, (unsigned long long)n, h->size);
  h->data_start = 8 + (size_t)n;
  h->nmeta = -1;
  ML_TRY(parse_header(h, h->data + 8, (size_t)n));
  return check_layout(h);
}

static ml_status handle_new(const char *label, ml_safetensors **out) {
  ml_safetensors *h = calloc(1, sizeof *h);
  char *l = strdup(label ? label : "<memory>");
  if (!h || !l) { free(h); free(l); return ml_fail(ML_ENOMEM, "safetensors: out of memory"); }
  atomic_init(&h->refcount, 1);
  h->label = l;
  *out = h;
  return ML_OK;
}

ml_status ml_safetensors_open(const char *path, ml_safetensors **out) {
  if (!path) return ml_fail(ML_EINVAL, "ml_safetensors_open: path is missing");
  ml_mapping *m;
  ML_TRY(ml_mapping_open(path, &m));
  ml_safetensors *h = NULL;
  ml_status st = handle_new(path, &h);
  if (st) { ml_mapping_release(m); return st; }
  h->map = m;
  h->data = ml_mapping_data(m);
  h->size = ml_mapping_size(m);
  st = ml_mapping_check(m);        /* a file truncated while we mapped it would SIGBUS below */
  if (!st) st = parse_file(h);
  if (st) { handle_free(h); return st; }
  *out = h;
  return ML_OK;
}

ml_status ml_safetensors_open_memory(const uint8_t *data, size_t size, const char *label, ml_safetensors **out) {
  if (!data && size) return ml_fail(ML_EINVAL, "ml_safetensors_open_memory: data is NULL");
  ml_safetensors *h = NULL;
  ML_TRY(handle_new(label, &h));
  h->owned = malloc(size ? size : 1);
  if (!h->owned) { handle_free(h); return ml_fail(ML_ENOMEM, "safetensors: out of memory for %zu bytes", size); }
  if (size) memcpy(h->owned, data, size);
  h->data = h->owned;
  h->size = size;
  ml_status st = parse_file(h);
  if (st) { handle_free(h); return st; }
  *out = h;
  return ML_OK;
}

void ml_safetensors_retain(ml_safetensors *h) { if (h) atomic_fetch_add(&h->refcount, 1); }

void ml_safetensors_release(ml_safetensors *h) {
  if (!h || atomic_fetch_sub(&h->refcount, 1) != 1) return;
  handle_free(h);
}

const char *ml_safetensors_path(const ml_safetensors *h) { return h ? h->label : ""; }
int64_t ml_safetensors_count(const ml_safetensors *h) { return h ? h->count : 0; }
int64_t ml_safetensors_metadata_count(const ml_safetensors *h) { return h ? h->nmeta : -1; }

const char *ml_safetensors_metadata_key(const ml_safetensors *h, int64_t i) {
  return h && i >= 0 && i < h->nmeta ? h->meta[2 * i] : NULL;
}

const char *ml_safetensors_metadata_value(const ml_safetensors *h, int64_t i) {
  return h && i >= 0 && i < h->nmeta ? h->meta[2 * i + 1] : NULL;
}

ml_status ml_safetensors_info_at(const ml_safetensors *h, int64_t i, ml_safetensors_info *out) {
  if (!h || i < 0 || i >= h->count)
    return ml_fail(ML_EINVAL, "ml_safetensors_info_at: index %lld is out of range (%lld tensors)",
                   (long long)i, (long long)(h ? h->count : 0));
  const st_entry *e = &h->entries[i];
  out->name = e->name;
  out->st_dtype = st_dtypes[e->dtype].name;
  out->dtype = st_dtypes[e->dtype].ml;
  out->ndim = e->ndim;
  out->shape = h->dims ? h->dims + e->shape_at : NULL;
  out->begin = e->begin;
  out->end = e->end;
  out->file_offset = h->data_start + e->begin;
  return ML_OK;
}

ml_status ml_safetensors_find(const ml_safetensors *h, const char *name, int64_t *index) {
  if (!h || !name) return ml_fail(ML_EINVAL, "ml_safetensors_find: handle or name is missing");
  int64_t lo = 0, hi = h->count - 1;
  while (lo <= hi) {
    int64_t mid = lo + (hi - lo) / 2;
    int c = strcmp(h->entries[mid].name, name);
    if (c == 0) { *index = mid; return ML_OK; }
    if (c < 0) lo = mid + 1; else hi = mid - 1;
  }
  return ml_fail(ML_EINVAL, "safetensors: %s: no tensor named \"%s\"", h->label, name);
}

// --- tensors out ----------------------------------------------------------------------------

ml_status ml_safetensors_tensor(ml_safetensors *h, int64_t i, ml_device dev, ml_tensor **out) {
  ml_safetensors_info info;
  ML_TRY(ml_safetensors_info_at(h, i, &info));
  if (info.dtype < 0)
    return ml_fail(ML_EUNSUPPORTED, "safetensors: %s: tensor \"%s\": dtype %s is not supported by moonload",
                   h->label, info.name, info.st_dtype);
  if (info.ndim > ML_MAX_DIMS)
    return ml_fail(ML_EUNSUPPORTED, "safetensors: %s: tensor \"%s\" has %d dimensions; moonload supports at most %d",
                   h->label, info.name, info.ndim, ML_MAX_DIMS);
  for (int d = 0; d < info.ndim; d++)     /* the byte count matched, but ml_tensor caps numel lower */
    if (info.shape[d] > INT64_MAX / 16) {
      char sb[ML_SHAPE_BUF];
      return ml_fail(ML_EUNSUPPORTED, "safetensors: %s: tensor \"%s\": shape %s is too large", h->label,
                     info.name, ml_shape_str(info.ndim, info.shape, sb, sizeof sb));
    }
  ml_dtype dt = (ml_dtype)info.dtype;
  if (dev.type == ML_DEVICE_META) return ml_tensor_empty(dt, info.ndim, info.shape, dev, out);
  if (dev.type != ML_DEVICE_CPU && dev.type != ML_DEVICE_CUDA)
    return ml_fail(ML_EINVAL, "safetensors: cannot load onto device %s", ml_device_str(dev));
  if (h->map) ML_TRY(ml_mapping_check(h->map));
  size_t nbytes = (size_t)(info.end - info.begin);
  size_t es = ml_dtype_size(dt);
  ml_tensor *cpu = NULL;
  if (h->map && info.file_offset % es == 0) {
    ml_storage *s;
    ML_TRY(ml_storage_from_mapping(h->map, (size_t)info.file_offset, nbytes, &s));
    ml_status st = ml_tensor_from_storage(s, 0, dt, info.ndim, info.shape, NULL, &cpu);
    ml_storage_release(s);
    ML_TRY(st);
  } else {
    ML_TRY(ml_tensor_empty(dt, info.ndim, info.shape, ml_cpu(), &cpu));
    if (nbytes) memcpy(ml_tensor_data(cpu), h->data + info.file_offset, nbytes);
  }
  if (dev.type == ML_DEVICE_CPU) { *out = cpu; return ML_OK; }
  ml_status st = ml_tensor_to(cpu, dev, dt, out);
  ml_tensor_release(cpu);
  return st;
}

ml_status ml_safetensors_advise(const ml_safetensors *h, int64_t i, int advice) {
  ml_safetensors_info info;
  ML_TRY(ml_safetensors_info_at(h, i, &info));
  if (advice != 0 && advice != 1)
    return ml_fail(ML_EINVAL, "ml_safetensors_advise: advice %d is neither 0 (willneed) nor 1 (dontneed)", advice);
  if (!h->map) return ML_OK;
  return ml_mapping_advise(h->map, (size_t)info.file_offset, (size_t)(info.end - info.begin), advice);
}

// --- writer ---------------------------------------------------------------------------------

static _Atomic long long fail_after = -1;
void ml_safetensors_debug_fail_after(int64_t nbytes) { atomic_store(&fail_after, (long long)nbytes); }

typedef struct { char *p; size_t n, cap; bool oom; } sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
  if (b->oom) return;
  if (b->n + n + 1 > b->cap) {
    size_t nc = b->cap ? b->cap : 256;
    while (b->n + n + 1 > nc) nc *= 2;
    char *q = realloc(b->p, nc);
    if (!q) { b->oom = true; return; }
    b->p = q; b->cap = nc;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = '\0';
}
static void sb_puts(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

/* A JSON string the way serde_json writes it (the reference writer): short escapes for
   " \ \b \f \n \r \t, \u00xx for other control bytes, everything else as raw UTF-8. */
static void sb_json_string(sbuf *b, const char *s) {
  sb_put(b, "\"", 1);
  for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
    char esc[8];
    switch (*c) {
    case '"': sb_put(b, "\\\"", 2); break;
    case '\\': sb_put(b, "\\\\", 2); break;
    case '\b': sb_put(b, "\\b", 2); break;
    case '\f': sb_put(b, "\\f", 2); break;
    case '\n': sb_put(b, "\\n", 2); break;
    case '\r': sb_put(b, "\\r", 2); break;
    case '\t': sb_put(b, "\\t", 2); break;
    default:
      if (*c < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", *c); sb_put(b, esc, 6); }
      else sb_put(b, (const char *)c, 1);
    }
  }
  sb_put(b, "\"", 1);
}

typedef struct { const char *name; const ml_tensor *t; int rank; uint64_t nbytes; } save_item;

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static int cmp_save(const void *a, const void *b) {
  const save_item *x = a, *y = b;
  if (x->rank != y->rank) return x->rank > y->rank ? -1 : 1;
  return strcmp(x->name, y->name);
}

static ml_status write_all(int fd, const void *p, size_t n, long long *written, const char *path) {
  const uint8_t *c = p;
  while (n) {
    size_t chunk = n > ((size_t)1 << 30) ? (size_t)1 << 30 : n;
    long long limit = atomic_load(&fail_after);
    if (limit >= 0 && *written + (long long)chunk > limit) {
      if (*written < limit) chunk = (size_t)(limit - *written);
      else return ml_fail(ML_EIO, "save_file: cannot write %s: %s (simulated)", path, strerror(ENOSPC));
    }
    ssize_t w = write(fd, c, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      return ml_fail(ML_EIO, "save_file: cannot write %s: %s", path, strerror(errno));
    }
    c += w; n -= (size_t)w; *written += w;
  }
  return ML_OK;
}

static ml_status check_utf8_name(const char *what, const char *s, const char *path) {
  size_t n = strlen(s);
  if (utf8_valid_prefix((const uint8_t *)s, n) != n)
    return ml_fail(ML_EINVAL, "save_file: %s %s is not valid UTF-8 (writing %s)", what, s, path);
  return ML_OK;
}

/* Builds the header: {"__metadata__":{...},"name":{"dtype":..,"shape":[..],"data_offsets":[b,e]},...}
   then spaces up to a multiple of 8, like the reference. */
static ml_status build_header(sbuf *b, const save_item *items, int64_t n, int64_t nmeta,
                              const char *const *mk, const char *const *mv) {
  sb_puts(b, "{");
  bool first = true;
  if (nmeta >= 0) {
    sb_puts(b, "\"__metadata__\":{");
    for (int64_t i = 0; i < nmeta; i++) {
      if (i) sb_puts(b, ",");
      sb_json_string(b, mk[i]);
      sb_puts(b, ":");
      sb_json_string(b, mv[i]);
    }
    sb_puts(b, "}");
    first = false;
  }
  uint64_t off = 0;
  char num[64];
  for (int64_t i = 0; i < n; i++) {
    const ml_tensor *t = items[i].t;
    if (!first) sb_puts(b, ",");
    first = false;
    sb_json_string(b, items[i].name);
    sb_puts(b, ":{\"dtype\":\"");
    sb_puts(b, st_dtypes[items[i].rank].name);
    sb_puts(b, "\",\"shape\":[");
    for (int d = 0; d < t->ndim; d++) {
      snprintf(num, sizeof num, d ? ",%lld" : "%lld", (long long)t->shape[d]);
      sb_puts(b, num);
    }
    snprintf(num, sizeof num, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
             (unsigned long long)(off + items[i].nbytes));
    sb_puts(b, num);
    off += items[i].nbytes;
  }
  sb_puts(b, "}");
  while (!b->oom && (b->n % 8) != 0) sb_puts(b, " ");
  if (b->oom) return ml_fail(ML_ENOMEM, "save_file: out of memory building the header");
  return ML_OK;
}

/* A fresh temporary file next to path (same filesystem, so rename is atomic). */
static ml_status open_temp(const char *path, char **tmp_out, int *fd_out) {
  size_t n = strlen(path) + 64;
  char *dir_copy = strdup(path), *base_copy = strdup(path), *tmp = malloc(n);
  if (!dir_copy || !base_copy || !tmp) {
    free(dir_copy); free(base_copy); free(tmp);
    return ml_fail(ML_ENOMEM, "save_file: out of memory");
  }
  const char *dir = dirname(dir_copy), *base = basename(base_copy);
  static _Atomic unsigned counter;
  ml_status st = ML_OK;
  for (int attempt = 0;; attempt++) {
    unsigned r = atomic_fetch_add(&counter, 1) ^ (unsigned)time(NULL) * 2654435761u;
    snprintf(tmp, n, "%s/.%s.tmp-%d-%08x", dir, base, (int)getpid(), r);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0) { *fd_out = fd; *tmp_out = tmp; break; }
    if (errno != EEXIST || attempt > 100) {
      st = ml_fail(ML_EIO, "save_file: cannot create a temporary file in %s to write %s: %s", dir, path,
                   strerror(errno));
      free(tmp);
      break;
    }
  }
  free(dir_copy); free(base_copy);
  return st;
}

static void fsync_dir(const char *path) {
  char *copy = strdup(path);
  if (!copy) return;
  int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) { fsync(fd); close(fd); }
  free(copy);
}

ml_status ml_safetensors_save(const char *path, int64_t n, const char *const *names, ml_tensor *const *tensors,
                              int64_t nmeta, const char *const *meta_keys, const char *const *meta_values) {
  if (!path || !*path) return ml_fail(ML_EINVAL, "save_file: path is missing");
  if (n < 0 || nmeta < -1 || (n && (!names || !tensors)) || (nmeta > 0 && (!meta_keys || !meta_values)))
    return ml_fail(ML_EINVAL, "save_file: invalid arguments");
  for (int64_t i = 0; i < nmeta; i++) {
    if (!meta_keys[i] || !meta_values[i]) return ml_fail(ML_EINVAL, "save_file: metadata entry %lld is NULL", (long long)i);
    ML_TRY(check_utf8_name("metadata key", meta_keys[i], path));
    ML_TRY(check_utf8_name("metadata value", meta_values[i], path));
    for (int64_t k = 0; k < i; k++)
      if (strcmp(meta_keys[k], meta_keys[i]) == 0)
        return ml_fail(ML_EINVAL, "save_file: metadata key \"%s\" appears twice", meta_keys[i]);
  }
  save_item *items = malloc((size_t)(n ? n : 1) * sizeof *items);
  if (!items) return ml_fail(ML_ENOMEM, "save_file: out of memory");
  ml_status st = ML_OK;
  for (int64_t i = 0; i < n && !st; i++) {
    const ml_tensor *t = tensors[i];
    const char *name = names[i];
    if (!name || !t) { st = ml_fail(ML_EINVAL, "save_file: tensor %lld or its name is NULL", (long long)i); break; }
    if (strcmp(name, "__metadata__") == 0) {
      st = ml_fail(ML_EINVAL, "save_file: \"__metadata__\" is reserved and cannot name a tensor"); break;
    }
    if ((st = check_utf8_name("tensor name", name, path))) break;
    if (t->storage->device.type == ML_DEVICE_META) {
      st = ml_fail(ML_EINVAL, "save_file: tensor \"%s\" is on the meta device and has no data to save", name);
      break;
    }
    int rank = st_dtype_of_ml(t->dtype);
    if (rank < 0) { st = ml_fail(ML_EINVAL, "save_file: tensor \"%s\" has invalid dtype %d", name, (int)t->dtype); break; }
    items[i] = (save_item){name, t, rank, (uint64_t)ml_tensor_numel(t) * ml_dtype_size(t->dtype)};
  }
  if (st) { free(items); return st; }
  /* duplicate names, whatever their dtypes */
  const char **sorted = malloc((size_t)(n ? n : 1) * sizeof *sorted);
  if (!sorted) { free(items); return ml_fail(ML_ENOMEM, "save_file: out of memory"); }
  for (int64_t i = 0; i < n; i++) sorted[i] = items[i].name;
  qsort(sorted, (size_t)n, sizeof *sorted, cmp_str);
  for (int64_t i = 1; i < n && !st; i++)
    if (strcmp(sorted[i - 1], sorted[i]) == 0)
      st = ml_fail(ML_EINVAL, "save_file: tensor name \"%s\" appears twice", sorted[i]);
  free(sorted);
  if (st) { free(items); return st; }
  qsort(items, (size_t)n, sizeof *items, cmp_save);

  sbuf hdr = {0};
  st = build_header(&hdr, items, n, nmeta, meta_keys, meta_values);
  if (st) { free(hdr.p); free(items); return st; }

  char *tmp = NULL;
  int fd = -1;
  st = open_temp(path, &tmp, &fd);
  if (st) { free(hdr.p); free(items); return st; }
  long long written = 0;
  uint8_t len8[8];
  for (int k = 0; k < 8; k++) len8[k] = (uint8_t)((uint64_t)hdr.n >> (8 * k));
  st = write_all(fd, len8, 8, &written, path);
  if (!st) st = write_all(fd, hdr.p, hdr.n, &written, path);
  for (int64_t i = 0; i < n && !st; i++) {
    if (items[i].nbytes == 0) continue;
    ml_tensor *c = NULL;
    st = ml_tensor_to(items[i].t, ml_cpu(), items[i].t->dtype, &c);
    if (!st && !ml_tensor_is_contiguous(c)) {
      ml_tensor *cc;
      st = ml_tensor_contiguous(c, &cc);
      ml_tensor_release(c);
      c = st ? NULL : cc;
    }
    if (!st) st = write_all(fd, ml_tensor_data(c), (size_t)items[i].nbytes, &written, path);
    ml_tensor_release(c);
  }
  if (!st && fsync(fd) != 0) st = ml_fail(ML_EIO, "save_file: cannot fsync %s: %s", tmp, strerror(errno));
  if (close(fd) != 0 && !st) st = ml_fail(ML_EIO, "save_file: cannot close %s: %s", tmp, strerror(errno));
  if (!st && rename(tmp, path) != 0)
    st = ml_fail(ML_EIO, "save_file: cannot rename the temporary file to %s: %s", path, strerror(errno));
  if (st) unlink(tmp);
  else fsync_dir(path);
  free(tmp); free(hdr.p); free(items);
  return st;
}

