/*
 * voxlane's native CPU decode step: int8 Llama layers for one token of B sequences.
 *
 * Built at run time by native.py (cc -O3 -march=native) and called through ctypes, which
 * releases the GIL for the whole call. Why: a TorchScript decode step of the small demo
 * model is ~400 short torch calls around 32 int8 products, and on this kind of CPU the
 * calls cost about as much as the products. Here a step is one call: no dispatcher, no
 * allocator, no temporary tensors.
 *
 * Numbers: float32 activations and KV caches; weights int8, symmetric per output row
 * (q in -127..127, w ~ q * scale[n]), packed in blocks of 16 rows x 4 inputs
 * ([N/16][K/4][16][4]) so that one VNNI instruction multiplies 16 rows by 4 inputs.
 * Activations are quantized per row to uint8 over that row's own [min, max], the scheme of
 * Int8Linear's fbgemm path, so a row's result never depends on the other rows of a batch.
 *
 * Two kernels for the int8 product: AVX512-VNNI (vpdpbusd) where the compiler targets it,
 * and portable C (exact int32 sums, so both give the same integers) everywhere else.
 * Float loops use GCC/Clang vector extensions, which lower to whatever SIMD the target has.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(VX_GENERIC)
#include <immintrin.h>
#define VX_VNNI 1
#else
#define VX_VNNI 0
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint8_t vu8 __attribute__((vector_size(16)));
/* The same vectors at any float's address (unaligned loads and stores). */
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

/* One int8 linear map y = x W^T: packed int8 weights, per-row scales and row sums
 * (sum_k q[n,k] * scale[n], which undoes the activations' offset). */
typedef struct {
  const int8_t *w;
  const float *scale;
  const float *rowsum;
  int64_t n, k;
} vx_linear;

typedef struct {
  const float *norm1, *norm2;
  double eps1, eps2;
  vx_linear qkv, o, gate_up, down;
} vx_layer;

typedef struct {
  int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, inter, vocab;
  double scaling, norm_eps;
  const float *embed; /* [vocab, dim] */
  const float *norm;  /* final norm weight [dim] */
  const float *cos, *sin; /* RoPE tables [rope_len, head_dim] */
  int64_t rope_len;
  const vx_layer *layers;
} vx_model;

enum { VX_OK = 0, VX_ENOMEM = 1, VX_ETOKEN = 2, VX_EPOSITION = 3, VX_ESHAPE = 4 };

int vx_has_vnni(void) { return VX_VNNI; }

/* ---- float helpers ------------------------------------------------------------------ */

static inline v16 vload(const float *p) { return *(const v16u *)p; }

static inline void vstore(float *p, v16 v) { *(v16u *)p = v; }

static inline v16 vsplat(float x) { return (v16){0} + x; }

/* Lane-wise a where mask else b (C has no vector ?:). */
static inline v16 vselect(vi16 mask, v16 a, v16 b) {
  vi16 ai, bi;
  memcpy(&ai, &a, sizeof ai);
  memcpy(&bi, &b, sizeof bi);
  ai = (ai & mask) | (bi & ~mask);
  memcpy(&a, &ai, sizeof a);
  return a;
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* Sum of the 16 lanes as a tree (4 adds deep, not 16). */
static inline float vsum(v16 v) {
#if defined(__clang__) || __GNUC__ >= 12
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
#else
  float s = 0.0f;
  for (int i = 0; i < 16; i++) s += v[i];
  return s;
#endif
}

/* e^x, 16 lanes: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n through the
 * exponent bits. Relative error ~2e-7 over the clamped range [-87, 88]. */
static inline v16 vexp(v16 x) {
  const v16 lo = vsplat(-87.0f), hi = vsplat(88.0f);
  x = vselect(x < lo, lo, x);
  x = vselect(x > hi, hi, x);
  const v16 magic = vsplat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
  v16 n = (x * 1.44269504088896341f + magic) - magic;
  v16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi16 e = __builtin_convertvector(n, vi16);
  vi16 bits;
  memcpy(&bits, &p, sizeof bits);
  bits += e << 23;
  memcpy(&p, &bits, sizeof p);
  return p;
}

#if defined(__clang__) || __GNUC__ >= 12
#define VX_SUM16 1
/* Adjacent lanes of a and b summed: lanes 0-7 from a, 8-15 from b. */
static inline v16 vpair(v16 a, v16 b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* Lane l of the result is the sum of the 16 lanes of v[l] (a transposing tree of 15 pairs). */
static inline v16 vsum16(const v16 *v) {
  v16 r[8], s[4];
  for (int i = 0; i < 8; i++) r[i] = vpair(v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 4; i++) s[i] = vpair(r[2 * i], r[2 * i + 1]);
  return vpair(vpair(s[0], s[1]), vpair(s[2], s[3]));
}
#else
#define VX_SUM16 0
#endif

/* HF LlamaRMSNorm in float32: y = w * (x / sqrt(mean(x^2) + eps)). */
static void rms_norm(const float *x, const float *w, float *y, int64_t d, double eps) {
  v16 acc = {0};
  for (int64_t i = 0; i < d; i += 16) {
    v16 v = vload(x + i);
    acc += v * v;
  }
  float inv = 1.0f / sqrtf(vsum(acc) / (float)d + (float)eps);
  for (int64_t i = 0; i < d; i += 16) vstore(y + i, vload(w + i) * (vload(x + i) * inv));
}

/* ---- int8 products ------------------------------------------------------------------ */

/* Row i of x [M, K] to uint8 over its own range: a = round((x - lo) * 255 / span). */
static void quantize_rows(const float *x, int64_t m, int64_t k, uint8_t *a, float *lo,
                          float *span) {
  for (int64_t i = 0; i < m; i++) {
    const float *r = x + i * k;
    v16 mn = vload(r), mx = mn;
    for (int64_t j = 16; j < k; j += 16) {
      const v16 v = vload(r + j);
      mn = vselect(v < mn, v, mn);
      mx = vselect(v > mx, v, mx);
    }
    float lo_i = mn[0], hi_i = mx[0];
    for (int t = 1; t < 16; t++) {
      lo_i = mn[t] < lo_i ? mn[t] : lo_i;
      hi_i = mx[t] > hi_i ? mx[t] : hi_i;
    }
    float s = hi_i - lo_i;
    s = s > 1e-30f ? s : 1e-30f; /* a constant row maps to 0, exactly */
    const float inv = 255.0f / s;
    const v16 magic = vsplat(12582912.0f); /* rounds to nearest, ties to even */
    for (int64_t j = 0; j < k; j += 16) {
      const v16 q = ((vload(r + j) - lo_i) * inv + magic) - magic;
      const vu8 b = __builtin_convertvector(__builtin_convertvector(q, vi16), vu8);
      memcpy(a + i * k + j, &b, sizeof b);
    }
    lo[i] = lo_i;
    span[i] = s;
  }
}

/* acc[i][n] for rows i < MB of a (row stride k) and the NB blocks of 16 weight rows from
 * block nb0: the weight bytes are loaded once for all MB rows. MB and NB are compile-time
 * constants so the sums stay in registers. */
#if VX_VNNI
#define VX_TILE(NAME, MB, NB)                                                                 \
  static void NAME(const int8_t *w, const uint8_t *a, int32_t *acc, int64_t n, int64_t k,    \
                   int64_t nb0) {                                                             \
    __m512i sum[NB][MB];                                                                      \
    for (int j = 0; j < NB; j++)                                                              \
      for (int i = 0; i < MB; i++) sum[j][i] = _mm512_setzero_si512();                        \
    const int8_t *wp = w + nb0 * 16 * k;                                                      \
    for (int64_t k4 = 0; k4 < k / 4; k4++) {                                                  \
      __m512i wv[NB];                                                                         \
      for (int j = 0; j < NB; j++) {                                                          \
        const int8_t *p = wp + j * 16 * k + k4 * 64;                                          \
        _mm_prefetch((const char *)(p + 1024), _MM_HINT_T0);                                  \
        wv[j] = _mm512_loadu_si512((const void *)p);                                          \
      }                                                                                       \
      for (int i = 0; i < MB; i++) {                                                          \
        int32_t t;                                                                            \
        memcpy(&t, a + i * k + k4 * 4, 4);                                                    \
        const __m512i av = _mm512_set1_epi32(t);                                              \
        for (int j = 0; j < NB; j++) sum[j][i] = _mm512_dpbusd_epi32(sum[j][i], av, wv[j]);   \
      }                                                                                       \
    }                                                                                         \
    for (int j = 0; j < NB; j++)                                                              \
      for (int i = 0; i < MB; i++)                                                            \
        _mm512_storeu_si512((void *)(acc + i * n + (nb0 + j) * 16), sum[j][i]);               \
  }
#else
#define VX_TILE(NAME, MB, NB)                                                                 \
  static void NAME(const int8_t *w, const uint8_t *a, int32_t *acc, int64_t n, int64_t k,    \
                   int64_t nb0) {                                                             \
    for (int j = 0; j < NB; j++) {                                                            \
      const int8_t *wp = w + (nb0 + j) * 16 * k;                                              \
      int32_t sum[MB][16] = {{0}};                                                            \
      for (int64_t k4 = 0; k4 < k / 4; k4++) {                                                \
        const int8_t *p = wp + k4 * 64;                                                       \
        for (int i = 0; i < MB; i++) {                                                        \
          const uint8_t *x = a + i * k + k4 * 4;                                              \
          for (int r = 0; r < 16; r++)                                                        \
            sum[i][r] += p[r * 4] * x[0] + p[r * 4 + 1] * x[1] + p[r * 4 + 2] * x[2] +        \
                         p[r * 4 + 3] * x[3];                                                 \
        }                                                                                     \
      }                                                                                       \
      for (int i = 0; i < MB; i++) memcpy(acc + i * n + (nb0 + j) * 16, sum[i], 64);          \
    }                                                                                         \
  }
#endif

typedef void (*vx_tile)(const int8_t *, const uint8_t *, int32_t *, int64_t, int64_t, int64_t);
VX_TILE(tile1x4, 1, 4)
VX_TILE(tile2x4, 2, 4)
VX_TILE(tile3x4, 3, 4)
VX_TILE(tile4x4, 4, 4)
VX_TILE(tile1x1, 1, 1)
VX_TILE(tile2x1, 2, 1)
VX_TILE(tile3x1, 3, 1)
VX_TILE(tile4x1, 4, 1)
static const vx_tile TILES4[4] = {tile1x4, tile2x4, tile3x4, tile4x4};
static const vx_tile TILES1[4] = {tile1x1, tile2x1, tile3x1, tile4x1};

/* y [M, N] = x [M, K] W^T (+ y if accumulate). */
static int linear(const vx_linear *l, const float *x, float *y, int64_t m, int accumulate) {
  const int64_t n = l->n, k = l->k;
  uint8_t *a = malloc((size_t)(m * k));
  float *lo = malloc((size_t)m * sizeof(float)), *span = malloc((size_t)m * sizeof(float));
  if (!a || !lo || !span) {
    free(a), free(lo), free(span);
    return VX_ENOMEM;
  }
  quantize_rows(x, m, k, a, lo, span);
  /* 64 weight rows (4 blocks of 16: 64 x K bytes, cache-resident) against every 4 rows of x
   * in turn, so the weights stream from memory once per call whatever M is; each 4 x 64 tile
   * of sums is scaled into y at once. */
  const int64_t blocks = n / 16;
  int32_t acc[4 * 64];
  for (int64_t b = 0; b < blocks; b += 4) {
    const int64_t group = blocks - b < 4 ? blocks - b : 4;
    const int8_t *w = l->w + b * 16 * k;
    for (int64_t m0 = 0; m0 < m; m0 += 4) {
      const int64_t mb = m - m0 < 4 ? m - m0 : 4;
      if (group == 4)
        TILES4[mb - 1](w, a + m0 * k, acc, 64, k, 0);
      else
        for (int64_t j = 0; j < group; j++) TILES1[mb - 1](w, a + m0 * k, acc, 64, k, j);
      for (int64_t i = 0; i < mb; i++) {
        const float unit = span[m0 + i] / 255.0f, off = lo[m0 + i];
        const float *sc = l->scale + b * 16, *rs = l->rowsum + b * 16;
        float *yi = y + (m0 + i) * n + b * 16;
        for (int64_t j = 0; j < group * 16; j++) {
          const float v = (float)acc[i * 64 + j] * (sc[j] * unit) + off * rs[j];
          yi[j] = accumulate ? yi[j] + v : v;
        }
      }
    }
  }
  free(a), free(lo), free(span);
  return VX_OK;
}

/* y [M, N] = x [M, K] W^T, for Int8Linear's "native" kernel (prefill chunks, heads). */
int vx_linear_forward(const vx_linear *l, const float *x, float *y, int64_t m) {
  if (l->n % 16 || l->k % 16) return VX_ESHAPE;
  return linear(l, x, y, m, 0);
}

/* ---- attention ---------------------------------------------------------------------- */

/* One query token of G heads (those sharing one KV head) over keys/values 0..len-1, each
 * [S, D] with row stride D (D % 16 == 0): o = softmax(q k^T * scaling) v, in float32. Each key
 * is loaded once for the G heads; the weighted sum of values keeps 64 output columns of a
 * head in registers while it walks the keys. */
static void attend(const float *q, const float *k, const float *v, int64_t len, int64_t g,
                   int64_t d, float scaling, float *scores, float *o) {
  float inv[64];
  int64_t s0 = 0;
#if VX_SUM16
  /* 16 keys per head at a time, their 16 dot products reduced together. */
  if (d == 64) {
    for (; s0 + 16 <= len; s0 += 16) {
      for (int64_t j = 0; j < g; j++) {
        const float *qj = q + j * d;
        const v16 q0 = vload(qj), q1 = vload(qj + 16), q2 = vload(qj + 32), q3 = vload(qj + 48);
        v16 acc[16];
        for (int i = 0; i < 16; i++) {
          const float *ks = k + (s0 + i) * d;
          acc[i] = q0 * vload(ks) + q1 * vload(ks + 16) + q2 * vload(ks + 32) + q3 * vload(ks + 48);
        }
        vstore(scores + j * len + s0, vsum16(acc) * scaling);
      }
    }
  }
#endif
  for (int64_t s = s0; s < len; s++) {
    const float *ks = k + s * d;
    for (int64_t j = 0; j < g; j++) {
      const float *qj = q + j * d;
      v16 acc = vload(qj) * vload(ks);
      for (int64_t t = 16; t < d; t += 16) acc += vload(qj + t) * vload(ks + t);
      scores[j * len + s] = vsum(acc) * scaling;
    }
  }
  for (int64_t j = 0; j < g; j++) {
    float *sj = scores + j * len;
    float mx = sj[0];
    for (int64_t s = 1; s < len; s++) mx = sj[s] > mx ? sj[s] : mx;
    float total = 0.0f;
    int64_t s = 0;
    for (; s + 16 <= len; s += 16) {
      v16 e = vexp(vload(sj + s) - mx);
      vstore(sj + s, e);
      total += vsum(e);
    }
    if (s < len) {
      float tail[16] = {0};
      memcpy(tail, sj + s, (size_t)(len - s) * sizeof(float));
      v16 e = vexp(vload(tail) - mx);
      for (int64_t t = 0; s + t < len; t++) {
        sj[s + t] = e[t];
        total += e[t];
      }
    }
    inv[j] = 1.0f / total;
  }
  /* o_j = sum_s p_j[s] v_s for all G heads in one pass over the values, 64 columns at a
   * time: each value row is loaded once and its sums stay in registers. */
  for (int64_t t0 = 0; t0 < d; t0 += 64) {
    const int64_t w = d - t0 < 64 ? (d - t0) / 16 : 4;
    for (int64_t j0 = 0; j0 < g; j0 += 4) {
      const int64_t gb = g - j0 < 4 ? g - j0 : 4;
      v16 acc[4][4] = {{{0}}};
      const float *vs = v + t0;
      if (w == 4 && gb == 4) { /* the common case, with constant bounds: all in registers */
        const float *p0 = scores + j0 * len;
        for (int64_t s2 = 0; s2 < len; s2++, vs += d) {
          const v16 r0 = vload(vs), r1 = vload(vs + 16), r2 = vload(vs + 32), r3 = vload(vs + 48);
          for (int j = 0; j < 4; j++) {
            const v16 p = vsplat(p0[j * len + s2]);
            acc[j][0] += p * r0;
            acc[j][1] += p * r1;
            acc[j][2] += p * r2;
            acc[j][3] += p * r3;
          }
        }
      } else {
        for (int64_t s2 = 0; s2 < len; s2++, vs += d) {
          v16 row[4];
          for (int64_t c = 0; c < w; c++) row[c] = vload(vs + 16 * c);
          for (int64_t j = 0; j < gb; j++) {
            const v16 p = vsplat(scores[(j0 + j) * len + s2]);
            for (int64_t c = 0; c < w; c++) acc[j][c] += p * row[c];
          }
        }
      }
      for (int64_t j = 0; j < gb; j++)
        for (int64_t c = 0; c < w; c++)
          vstore(o + (j0 + j) * d + t0 + 16 * c, acc[j][c] * inv[j0 + j]);
    }
  }
}

/* q/k heads in place: x * cos + rotate_half(x) * sin (HF Llama's RoPE). */
static void rope(float *x, int64_t heads, int64_t d, const float *cos, const float *sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; h++) {
    float *p = x + h * d;
    for (int64_t i = 0; i < half; i++) {
      float a = p[i], b = p[i + half];
      p[i] = a * cos[i] - b * sin[i];
      p[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

/* ---- the step ----------------------------------------------------------------------- */

/*
 * Append tokens[b] to sequence b at position starts[b] for b < B, through every layer, and
 * write the final-norm hidden states to hidden [B, dim].
 *
 * Sequence b's caches k_caches[b], v_caches[b] are contiguous [L, H_kv, alloc[b], head_dim]
 * float32 (a KVCache of batch 1); slot starts[b] of every layer is written here. Nothing
 * else outside the outputs is written, and on an error nothing is written at all before the
 * checks fail.
 */
int vx_decode(const vx_model *m, int64_t B, const int64_t *tokens, const int64_t *starts,
              float *const *k_caches, float *const *v_caches, const int64_t *alloc,
              float *hidden) {
  const int64_t D = m->dim, H = m->n_heads, HK = m->n_kv_heads, HD = m->head_dim;
  const int64_t G = H / HK, QKV = (H + 2 * HK) * HD, I = m->inter;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; b++) {
    if (tokens[b] < 0 || tokens[b] >= m->vocab) return VX_ETOKEN;
    if (starts[b] < 0 || starts[b] >= m->rope_len || starts[b] >= alloc[b]) return VX_EPOSITION;
    longest = starts[b] + 1 > longest ? starts[b] + 1 : longest;
  }
  float *x = malloc((size_t)(B * D) * sizeof(float));
  float *h = malloc((size_t)(B * D) * sizeof(float));
  float *qkv = malloc((size_t)(B * QKV) * sizeof(float));
  float *att = malloc((size_t)(B * H * HD) * sizeof(float));
  float *gu = malloc((size_t)(B * 2 * I) * sizeof(float));
  float *act = malloc((size_t)(B * I) * sizeof(float));
  float *scores = malloc((size_t)(G * longest) * sizeof(float));
  int rc = (x && h && qkv && att && gu && act && scores) ? VX_OK : VX_ENOMEM;
  for (int64_t b = 0; rc == VX_OK && b < B; b++)
    memcpy(x + b * D, m->embed + tokens[b] * D, (size_t)D * sizeof(float));
  for (int64_t l = 0; rc == VX_OK && l < m->n_layers; l++) {
    const vx_layer *ly = &m->layers[l];
    for (int64_t b = 0; b < B; b++) rms_norm(x + b * D, ly->norm1, h + b * D, D, ly->eps1);
    if ((rc = linear(&ly->qkv, h, qkv, B, 0))) break;
    for (int64_t b = 0; b < B; b++) {
      float *row = qkv + b * QKV;
      const int64_t s = starts[b];
      rope(row, H + HK, HD, m->cos + s * HD, m->sin + s * HD);
      const int64_t plane = alloc[b] * HD; /* one KV head of one layer */
      float *kc = k_caches[b] + l * HK * plane, *vc = v_caches[b] + l * HK * plane;
      for (int64_t j = 0; j < HK; j++) {
        memcpy(kc + j * plane + s * HD, row + (H + j) * HD, (size_t)HD * sizeof(float));
        memcpy(vc + j * plane + s * HD, row + (H + HK + j) * HD, (size_t)HD * sizeof(float));
      }
      for (int64_t j = 0; j < HK; j++)
        attend(row + j * G * HD, kc + j * plane, vc + j * plane, s + 1, G, HD,
               (float)m->scaling, scores, att + b * H * HD + j * G * HD);
    }
    if ((rc = linear(&ly->o, att, x, B, 1))) break;
    for (int64_t b = 0; b < B; b++) rms_norm(x + b * D, ly->norm2, h + b * D, D, ly->eps2);
    if ((rc = linear(&ly->gate_up, h, gu, B, 0))) break;
    for (int64_t b = 0; b < B; b++) {
      const float *g = gu + b * 2 * I, *u = g + I;
      float *o = act + b * I;
      for (int64_t i = 0; i < I; i += 16) {
        v16 gv = vload(g + i);
        vstore(o + i, gv / (1.0f + vexp(-gv)) * vload(u + i));
      }
    }
    if ((rc = linear(&ly->down, act, x, B, 1))) break;
  }
  for (int64_t b = 0; rc == VX_OK && b < B; b++)
    rms_norm(x + b * D, m->norm, hidden + b * D, D, m->norm_eps);
  free(x), free(h), free(qkv), free(att), free(gu), free(act), free(scores);
  return rc;
}

/*
 * Legal-row logits: out[b] (row stride out_stride) = heads[positions[b]] applied to hidden[b],
 * plus, where with_eos[b], the EOS logit hidden[b] . eos_row in column heads[..].n. Rows at
 * the same position share one product (their head is read once).
 */
int vx_heads(const vx_linear *heads, int64_t n_heads, int64_t B, const float *const *hidden,
             const int64_t *positions, const uint8_t *with_eos, const float *eos_row,
             int64_t dim, float *out, int64_t out_stride) {
  for (int64_t b = 0; b < B; b++)
    if (positions[b] < 0 || positions[b] >= n_heads) return VX_EPOSITION;
  float *xs = malloc((size_t)(B * dim) * sizeof(float));
  float *ys = malloc((size_t)(B * heads[0].n) * sizeof(float));
  int64_t *rows = malloc((size_t)B * sizeof(int64_t));
  int rc = (xs && ys && rows) ? VX_OK : VX_ENOMEM;
  for (int64_t p = 0; rc == VX_OK && p < n_heads; p++) {
    int64_t count = 0;
    for (int64_t b = 0; b < B; b++)
      if (positions[b] == p) {
        memcpy(xs + count * dim, hidden[b], (size_t)dim * sizeof(float));
        rows[count++] = b;
      }
    if (!count) continue;
    const vx_linear *l = &heads[p];
    if (l->k != dim || l->n % 16 || l->k % 16) {
      rc = VX_ESHAPE;
      break;
    }
    if ((rc = linear(l, xs, ys, count, 0))) break;
    for (int64_t i = 0; i < count; i++) {
      const int64_t b = rows[i];
      memcpy(out + b * out_stride, ys + i * l->n, (size_t)l->n * sizeof(float));
      if (with_eos[b]) {
        v16 acc = {0};
        for (int64_t t = 0; t < dim; t += 16) acc += vload(hidden[b] + t) * vload(eos_row + t);
        out[b * out_stride + l->n] = vsum(acc);
      }
    }
  }
  free(xs), free(ys), free(rows);
  return rc;
}

/* ---- SNAC kernels (the codec's streaming decoder, server/snac_stream.py) --------------- */

/* sin(x)^2, 16 lanes: x = j pi/2 + r with |r| <= pi/4 (three-part pi/2), then sin(r)^2 for
 * even j and cos(r)^2 for odd j (the sign of the quadrant drops out of the square). Cephes'
 * single-precision polynomials; absolute error ~1e-7 for |x| up to ~1e4. */
static inline v16 vsin2(v16 x) {
  const v16 magic = vsplat(12582912.0f);
  const v16 j = (x * 0.63661977236758134f + magic) - magic;
  v16 r = x - j * 1.5703125f;
  r = r - j * 4.837512969970703125e-4f;
  r = r - j * 7.54978995489188216e-8f;
  const v16 z = r * r;
  v16 s = vsplat(-1.9515295891e-4f);
  s = s * z + 8.3321608736e-3f;
  s = s * z - 1.6666654611e-1f;
  s = s * z * r + r;
  v16 c = vsplat(2.443315711809948e-5f);
  c = c * z - 1.388731625493765e-3f;
  c = c * z + 4.166664568298827e-2f;
  c = c * z * z - 0.5f * z + 1.0f;
  const vi16 odd = (__builtin_convertvector(j, vi16) & 1) != 0;
  return vselect(odd, c * c, s * s);
}

/* SNAC's Snake on rows [T, C]: y = x + inv_alpha[c] * sin(alpha[c] x)^2 (y may be x). */
int vx_snake(const float *x, float *y, int64_t t, int64_t c, const float *alpha,
             const float *inv_alpha) {
  if (c % 16) return VX_ESHAPE;
  for (int64_t i = 0; i < t; i++) {
    const float *xi = x + i * c;
    float *yi = y + i * c;
    for (int64_t j = 0; j < c; j += 16) {
      const v16 v = vload(xi + j);
      vstore(yi + j, v + vload(inv_alpha + j) * vsin2(v * vload(alpha + j)));
    }
  }
  return VX_OK;
}

/* Depthwise dilated convolution on rows [T_in, C] with no padding (the caller keeps the
 * context rows): y[t, c] = bias[c] + sum_j w[j, c] x[t + j d, c] for t < T_in - (k - 1) d.
 * w is [k, C] (tap-major); bias may be NULL. */
int vx_depthwise(const float *x, int64_t t_in, int64_t c, const float *w, const float *bias,
                 int64_t k, int64_t d, float *y) {
  if (c % 16) return VX_ESHAPE;
  const int64_t t_out = t_in - (k - 1) * d;
  for (int64_t t = 0; t < t_out; t++) {
    float *yt = y + t * c;
    for (int64_t j = 0; j < c; j += 16) {
      v16 acc = bias ? vload(bias + j) : vsplat(0.0f);
      for (int64_t tap = 0; tap < k; tap++)
        acc += vload(w + tap * c + j) * vload(x + (t + tap * d) * c + j);
      vstore(yt + j, acc);
    }
  }
  return VX_OK;
}
