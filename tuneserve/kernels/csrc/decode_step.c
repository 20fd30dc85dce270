/* Every decoder layer of a llama-family model for a few short query rows, in one call.
 *
 * At batch 1 a step's weight reads take a few milliseconds, and the same step run op by op from Python
 * spends as long again dispatching ~45 PyTorch ops and ~11 module calls per layer. Here one call runs all
 * layers: the matmuls and the attention go through the same compiled kernels the op-by-op path calls
 * (given as function pointers, so this file links to no other library and every kernel keeps its own
 * CPU-specific build), and the small elementwise work between them (RMS norms, rotary embedding, the KV
 * write, the gated activation, the residual adds) runs here, on the calling thread, over M x hidden floats.
 *
 * Layout of everything is the op-by-op path's: x (M, hidden) row-major; the fused q|k|v projection's
 * output rows are [q (H*D) | k (Hkv*D) | v (Hkv*D)]; gate|up is [gate (I) | up (I)]; K/V caches
 * (num_blocks, block_size, Hkv, D), a token's slot = block * block_size + offset. The rotary tables hold
 * cos/sin (max_pos, rot/2) with the attention factor folded in; rotate-half over each head's first `rot`
 * dims, the rest pass.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { LIN_F32 = 1, LIN_Q4 = 2, LIN_Q8 = 3 };
enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

typedef void (*f32_fn)(const float *, int64_t, int64_t, const float *, int64_t, const float *, float *);
typedef void (*q4_fn)(const float *, int64_t, int64_t, const void *, const void *, const void *, const void *, int64_t,
                      int64_t, int64_t, const float *, float *);
typedef void (*q8_fn)(const float *, int64_t, int64_t, const void *, const void *, int64_t, int64_t, int64_t,
                      const float *, float *);
typedef void (*attn_fn)(const float *, float *, const float *, const float *, const int64_t *, const int64_t *,
                        const int64_t *, const int64_t *, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                        int64_t, int64_t, float);

typedef struct {
    int64_t kind;  /* LIN_* */
    void *fn;      /* the kernel for kind */
    const void *w; /* fp32 weight (N, K), or packed qweight */
    const void *qh; /* q5's high-bit words (LIN_Q4 with them), or NULL */
    const void *scales, *mins;
    int64_t f16, n, k, group;
    const float *bias;
} linear_t;

typedef struct {
    const float *in_norm, *post_norm; /* (hidden,): before attention, before the MLP */
    const float *attn_out_norm, *mlp_out_norm; /* (hidden,) on each block's output (gemma), or NULL */
    const float *q_norm, *k_norm;     /* (D,) per-head RMS norms (qwen3), or NULL */
    linear_t qkv, o, gate_up, down;
    const float *cos, *sin;           /* (max_pos, rot / 2) */
    int64_t rot;
    float *k_cache, *v_cache;
    int64_t group;                    /* index of this layer's KV group in the step's groups */
    float scale;
} layer_t;

typedef struct {                      /* one KV group's attention metadata for this step */
    const int64_t *slots;             /* (M,) */
    const int64_t *rows, *qpos, *row_seq, *block_table;
    int64_t max_blocks, num_rows, window, sinks;
} group_t;

typedef struct {
    int64_t num_layers, hidden, heads, kv_heads, head_dim, inter, block_size, act;
    float eps;
    const layer_t *layers;
    attn_fn attention;
    const float *final_norm; /* (hidden,): the model's norm after the last layer, or NULL */
} model_t;

static void linear(const linear_t *l, const float *x, int64_t m, float *y) {
    if (l->kind == LIN_F32)
        ((f32_fn)l->fn)(x, m, l->k, (const float *)l->w, l->n, l->bias, y);
    else if (l->kind == LIN_Q4)
        ((q4_fn)l->fn)(x, m, l->k, l->w, l->qh, l->scales, l->mins, l->f16, l->n, l->group, l->bias, y);
    else
        ((q8_fn)l->fn)(x, m, l->k, l->w, l->scales, l->f16, l->n, l->group, l->bias, y);
}

/* y = x / rms(x) * w over n values (torch's rms_norm: mean of squares in fp32, then rsqrt) */
static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *y) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * inv * w[i];
}

/* rotate-half over the first rot dims of each of `heads` heads of x (heads, D), in place */
static void rotary(float *x, int64_t heads, int64_t d, int64_t rot, const float *cos, const float *sin) {
    const int64_t half = rot / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *x1 = x + h * d, *x2 = x1 + half;
        for (int64_t i = 0; i < half; i++) {
            const float a = x1[i], b = x2[i];
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = b * cos[i] + a * sin[i];
        }
    }
}

/* x += norm(y) row by row (y normed in place), or x += y without a norm */
static void add_normed(float *x, float *y, const float *norm, int64_t rows, int64_t hid, float eps) {
    if (norm)
        for (int64_t r = 0; r < rows; r++) rms_norm(y + r * hid, norm, hid, eps, y + r * hid);
    for (int64_t i = 0; i < rows * hid; i++) x[i] += y[i];
}

static inline float act(float g, int64_t kind) {
    if (kind == ACT_SILU) return g / (1.f + expf(-g));
    const float c = 0.7978845608028654f; /* sqrt(2 / pi): gelu's tanh approximation, as torch's */
    return 0.5f * g * (1.f + tanhf(c * (g + 0.044715f * g * g * g)));
}

/* q (M, H*D) rows of the projection -> contiguous q, rotated and normed; k/v rotated into the cache */
static void attention_inputs(const model_t *m, const layer_t *l, const group_t *g, const int64_t *pos,
                             int64_t rows, const float *qkv, float *q) {
    const int64_t d = m->head_dim, qs = m->heads * d, kvs = m->kv_heads * d, width = qs + 2 * kvs;
    const int64_t half = l->rot / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *src = qkv + r * width;
        float *qr = q + r * qs;
        float *kr = l->k_cache + g->slots[r] * kvs, *vr = l->v_cache + g->slots[r] * kvs;
        memcpy(qr, src, sizeof(float) * qs);
        memcpy(kr, src + qs, sizeof(float) * kvs);
        memcpy(vr, src + qs + kvs, sizeof(float) * kvs);
        if (l->q_norm) {
            for (int64_t h = 0; h < m->heads; h++) rms_norm(qr + h * d, l->q_norm, d, m->eps, qr + h * d);
            for (int64_t h = 0; h < m->kv_heads; h++) rms_norm(kr + h * d, l->k_norm, d, m->eps, kr + h * d);
        }
        const float *c = l->cos + pos[r] * half, *s = l->sin + pos[r] * half;
        rotary(qr, m->heads, d, l->rot, c, s);
        rotary(kr, m->kv_heads, d, l->rot, c, s);
    }
}

static void layer_forward(const model_t *m, const layer_t *l, const group_t *g, const int64_t *pos,
                          int64_t rows, float *x, float *h, float *big, float *q, float *attn) {
    const int64_t hid = m->hidden, inter = m->inter;
    for (int64_t r = 0; r < rows; r++) rms_norm(x + r * hid, l->in_norm, hid, m->eps, h + r * hid);
    linear(&l->qkv, h, rows, big);
    attention_inputs(m, l, g, pos, rows, big, q);
    m->attention(q, attn, l->k_cache, l->v_cache, g->rows, g->qpos, g->row_seq, g->block_table, g->max_blocks,
                 g->num_rows, m->heads, m->kv_heads, m->head_dim, m->block_size, g->window, g->sinks, l->scale);
    linear(&l->o, attn, rows, h);
    add_normed(x, h, l->attn_out_norm, rows, hid, m->eps);
    for (int64_t r = 0; r < rows; r++) rms_norm(x + r * hid, l->post_norm, hid, m->eps, h + r * hid);
    linear(&l->gate_up, h, rows, big);
    for (int64_t r = 0; r < rows; r++) {  /* gate|up -> act(gate) * up, over the gate half, then packed */
        float *gr = big + r * 2 * inter, *out = gr;  /* element i is written after both its reads */
        for (int64_t i = 0; i < inter; i++) out[i] = act(gr[i], m->act) * gr[inter + i];
    }
    for (int64_t r = 1; r < rows; r++) memmove(big + r * inter, big + r * 2 * inter, sizeof(float) * inter);
    linear(&l->down, big, rows, h);
    add_normed(x, h, l->mlp_out_norm, rows, hid, m->eps);
}

/* Run every layer (then the final norm, where given) over x (rows, hidden) in place; positions (rows,); groups:
 * this step's KV groups.
 * Returns 0, or -1 when the scratch memory could not be allocated (x is then untouched). */
int64_t decode_step(const model_t *m, const group_t *groups, const int64_t *positions, int64_t rows, float *x) {
    const int64_t qs = m->heads * m->head_dim, width = qs + 2 * m->kv_heads * m->head_dim;
    const int64_t big_w = width > 2 * m->inter ? width : 2 * m->inter;
    float *h = malloc(sizeof(float) * rows * (m->hidden > qs ? m->hidden : qs));
    float *big = malloc(sizeof(float) * rows * big_w);
    float *q = malloc(sizeof(float) * rows * qs), *attn = malloc(sizeof(float) * rows * qs);
    int64_t rc = 0;
    if (!h || !big || !q || !attn) {
        rc = -1;
    } else {
        for (int64_t i = 0; i < m->num_layers; i++) {
            const layer_t *l = m->layers + i;
            layer_forward(m, l, groups + l->group, positions, rows, x, h, big, q, attn);
        }
        /* here, not as a torch op after the call: that op took ~0.3 ms a step (SmolLM2 batch 1, Xeon) where the
         * same norm alone takes 0.03; in C it is a few microseconds */
        if (m->final_norm)
            for (int64_t r = 0; r < rows; r++) {
                float *xr = x + r * m->hidden;
                rms_norm(xr, m->final_norm, m->hidden, m->eps, xr);
            }
    }
    free(h);
    free(big);
    free(q);
    free(attn);
    return rc;
}
