/* rotary.c: rotary position embeddings in the rotate-half form of transformers' Llama, on the
   CPU (and routed to the CUDA backend):
     out = x * cos + rotate_half(x) * sin,  rotate_half(x) = cat(-x[..., h:], x[..., :h]),
   with x (..., D), h = D / 2, and cos, sin broadcast to x's shape. One pass over x instead of the
   seven ops and six temporaries of the composed form; the products and the sum are rounded to
   the output dtype at the same three points as those ops, so the results are the same bits. */
#include "kernels.h"

#define CHUNK 256   /* elements of each half handled at once */

typedef struct {
  const ml_tensor *x, *c, *s;
  ml_tensor *o;
  int64_t cstr[ML_MAX_DIMS], sstr[ML_MAX_DIMS];   /* cos, sin strides at x's shape */
  int64_t d, h;
} rotary_job;

/* b[0..n) rounded to dt (float16/bfloat16) in place, as storing into a dt tensor and reading
   back would; through the block converters, which vectorise. */
static void round_block(float *b, int64_t n, ml_dtype dt) {
  if (dt != ML_FLOAT16 && dt != ML_BFLOAT16) return;
  uint16_t tmp[CHUNK];
  float back[CHUNK];
  ml_store_f32(b, tmp, dt, 1, n);
  const float *r = ml_load_f32(tmp, dt, 1, n, back);
  if (r != b) memcpy(b, r, (size_t)n * sizeof *b);
}

/* Element offsets of row r (x's leading dims) in x, cos and sin. */
static void row_offsets(const rotary_job *j, int64_t r, int64_t *xo, int64_t *co, int64_t *so) {
  const ml_tensor *x = j->x;
  *xo = *co = *so = 0;
  for (int k = x->ndim - 2; k >= 0; k--) {
    int64_t i = r % x->shape[k];
    r /= x->shape[k];
    *xo += i * x->strides[k];
    *co += i * j->cstr[k];
    *so += i * j->sstr[k];
  }
}


/* Loads n elements of t's row at element offset off, from position i of the row (stride s). */
#define LOAD32(t, base, off, s, i, n, buf) \
  ml_load_f32(ml_byte_at(base, (t)->dtype, (off) + (i) * (s)), (t)->dtype, s, n, buf)
#define LOAD64(t, base, off, s, i, n, buf) \
  ml_load_f64_row(ml_byte_at(base, (t)->dtype, (off) + (i) * (s)), (t)->dtype, s, n, buf)

static void rotary_rows(void *ctx, int64_t begin, int64_t end) {
  const rotary_job *j = ctx;
  const ml_tensor *x = j->x, *c = j->c, *s = j->s;
  int last = x->ndim - 1;
  int64_t h = j->h, xs = x->strides[last], cs = j->cstr[last], ss = j->sstr[last];
  ml_dtype odt = j->o->dtype;
  const uint8_t *xd = ml_tensor_data(x), *cd = ml_tensor_data(c), *sd = ml_tensor_data(s);
  uint8_t *od = ml_tensor_data(j->o);
  for (int64_t r = begin; r < end; r++) {
    int64_t xo, co, so, oo = r * j->d;
    row_offsets(j, r, &xo, &co, &so);
    for (int64_t i0 = 0; i0 < h; i0 += CHUNK) {
      int64_t n = h - i0 < CHUNK ? h - i0 : CHUNK;
      if (odt == ML_FLOAT64) {
        double b[6][CHUNK], o1[CHUNK], o2[CHUNK];
        const double *x1 = LOAD64(x, xd, xo, xs, i0, n, b[0]), *x2 = LOAD64(x, xd, xo, xs, i0 + h, n, b[1]);
        const double *c1 = LOAD64(c, cd, co, cs, i0, n, b[2]), *c2 = LOAD64(c, cd, co, cs, i0 + h, n, b[3]);
        const double *s1 = LOAD64(s, sd, so, ss, i0, n, b[4]), *s2 = LOAD64(s, sd, so, ss, i0 + h, n, b[5]);
        for (int64_t i = 0; i < n; i++) {
          o1[i] = x1[i] * c1[i] + -x2[i] * s1[i];
          o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
        }
        ml_store_f64_row(o1, ml_byte_at(od, odt, oo + i0), odt, 1, n);
        ml_store_f64_row(o2, ml_byte_at(od, odt, oo + i0 + h), odt, 1, n);
      } else {
        float b[6][CHUNK], p[4][CHUNK], o1[CHUNK], o2[CHUNK];
        const float *x1 = LOAD32(x, xd, xo, xs, i0, n, b[0]), *x2 = LOAD32(x, xd, xo, xs, i0 + h, n, b[1]);
        const float *c1 = LOAD32(c, cd, co, cs, i0, n, b[2]), *c2 = LOAD32(c, cd, co, cs, i0 + h, n, b[3]);
        const float *s1 = LOAD32(s, sd, so, ss, i0, n, b[4]), *s2 = LOAD32(s, sd, so, ss, i0 + h, n, b[5]);
        for (int64_t i = 0; i < n; i++) {
          p[0][i] = x1[i] * c1[i];
          p[1][i] = -x2[i] * s1[i];
          p[2][i] = x2[i] * c2[i];
          p[3][i] = x1[i] * s2[i];
        }
        for (int k = 0; k < 4; k++) round_block(p[k], n, odt);
        for (int64_t i = 0; i < n; i++) {
          o1[i] = p[0][i] + p[1][i];
          o2[i] = p[2][i] + p[3][i];
        }
        ml_store_f32(o1, ml_byte_at(od, odt, oo + i0), odt, 1, n);
        ml_store_f32(o2, ml_byte_at(od, odt, oo + i0 + h), odt, 1, n);
      }
    }
  }
}

ml_status ml_rotary_embedding(const ml_tensor *x, const ml_tensor *cos, const ml_tensor *sin, ml_tensor **out) {
  const char *fn = "rotary_embedding";
  const ml_cuda_api *cu;
  ML_TRY(ml_op_route(fn, 3, (const ml_tensor *[]){x, cos, sin}, (const char *[]){"x", "cos", "sin"}, &cu));
  if (!x || !cos || !sin) return ml_fail(ML_EINVAL, "%s: x, cos and sin are required", fn);
  if (cu && !cu->rotary_embedding) return ml_no_cuda_kernel(fn, x);
  const ml_tensor *ts[3] = {x, cos, sin};
  const char *names[3] = {"x", "cos", "sin"};
  for (int i = 0; i < 3; i++)
    if (!ml_dtype_is_floating(ts[i]->dtype))
      return ml_fail(ML_EINVAL, "%s: %s must be floating point, got %s", fn, names[i], ml_dtype_name(ts[i]->dtype));
  char a[ML_SHAPE_BUF], b[ML_SHAPE_BUF];
  if (x->ndim < 1 || x->shape[x->ndim - 1] % 2 != 0)
    return ml_fail(ML_EINVAL, "%s: the last dimension of x must be even (it is split in halves), x has shape %s", fn,
                   ml_shape_str(x->ndim, x->shape, a, sizeof a));
  if (cos->ndim != sin->ndim || memcmp(cos->shape, sin->shape, (size_t)cos->ndim * sizeof *cos->shape) != 0)
    return ml_fail(ML_EINVAL, "%s: cos (shape %s) and sin (shape %s) must have the same shape", fn,
                   ml_shape_str(cos->ndim, cos->shape, a, sizeof a), ml_shape_str(sin->ndim, sin->shape, b, sizeof b));
  bool fits = cos->ndim <= x->ndim;   /* each dim of cos, aligned right, is x's or 1 */
  for (int k = 1; fits && k <= cos->ndim; k++) {
    int64_t c = cos->shape[cos->ndim - k];
    fits = c == 1 || c == x->shape[x->ndim - k];
  }
  if (!fits)
    return ml_fail(ML_EINVAL, "%s: cos and sin (shape %s) must broadcast to the shape of x %s", fn,
                   ml_shape_str(cos->ndim, cos->shape, a, sizeof a), ml_shape_str(x->ndim, x->shape, b, sizeof b));
  ml_dtype odt = ml_dtype_promote(x->dtype, ml_dtype_promote(cos->dtype, sin->dtype));
  ml_tensor *o;
  ML_TRY(ml_tensor_empty(odt, x->ndim, x->shape, x->storage->device, &o));
  int64_t d = x->shape[x->ndim - 1], rows = d > 0 ? ml_tensor_numel(x) / d : 0;
  ml_status st = ML_OK;
  if (cu) st = cu->rotary_embedding(x, cos, sin, o);
  else if (rows > 0 && d > 0) {
    rotary_job j = {.x = x, .c = cos, .s = sin, .o = o, .d = d, .h = d / 2};
    ml_broadcast_strides(cos, x->ndim, x->shape, j.cstr);
    ml_broadcast_strides(sin, x->ndim, x->shape, j.sstr);
    ml_parallel_for(rows, 8 * d, rotary_rows, &j);
  }
  if (st) { ml_tensor_release(o); return st; }
  *out = o;
  return ML_OK;
}
