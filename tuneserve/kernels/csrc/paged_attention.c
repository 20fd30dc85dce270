/* Paged attention for short queries (decode, speculative verification, short prompt tails), fp32.
 *
 * Reads K/V straight from the paged cache through each sequence's block table: no gather copy.
 * One work item = one query row's one head, so a single decode row spreads over the threads (one item per
 * row, all heads, left batch 1 on one thread: SmolLM2, 200 positions from L2, 48.7 -> 26.8 us a layer; in a
 * decode step the K/V rows come from memory and that read dominates, Xeon). A head's numbers do not depend
 * on which items share a thread, so a row's output is the same in any batch. Three
 * passes over the visible positions: scores and their max; the exp-weights (a plain loop the compiler
 * vectorizes); the weighted sum of V. Visible positions: kpos <= qpos, and with a window W also
 * kpos > qpos - W, except the first `sinks` positions which stay visible. The head size is a compile-time
 * constant in the specialised copies (64, 128, 256) so the inner loops unroll into whole vector registers;
 * other sizes take the generic copy.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_D 256 /* the largest head size (the specialised copies' sizes, and the generic copy's bound) */

typedef struct {
    const float *q; float *out; const float *k_cache; const float *v_cache;
    const int64_t *rows; const int64_t *qpos; const int64_t *row_seq; const int64_t *block_table;
    int64_t max_blocks, H, Hkv, D, bs, window, sinks; float scale;
} args_t;

/* the token position of the j-th visible key */
static inline int64_t pos_of(int64_t j, int64_t n_sink, int64_t lo) { return j < n_sink ? j : lo + (j - n_sink); }

#define DEFINE_ITEM(NAME, DCONST)                                                                        \
static void NAME(const args_t *a, int64_t r, int64_t h, float *scores, float *acc) {                     \
    const int64_t D = (DCONST) ? (DCONST) : a->D;                                                        \
    const int64_t H = a->H, G = a->H / a->Hkv, Hkv = a->Hkv, bs = a->bs;                                  \
    const int64_t p = a->qpos[r];                                                                        \
    const int64_t *bt = a->block_table + a->row_seq[r] * a->max_blocks;                                  \
    int64_t lo = 0;                                                                                      \
    if (a->window > 0 && p - a->window + 1 > 0) lo = p - a->window + 1;                                  \
    const int64_t n_sink = (lo > 0) ? (a->sinks < lo ? a->sinks : lo) : 0;                             \
    const int64_t n = n_sink + (p - lo + 1);                                                             \
    const float *qrow = a->q + (a->rows[r] * H + h) * D;                                                 \
    const int64_t kv = (h / G) * D; /* this head's KV head within a token's row of every KV head */     \
    float qs[MAX_D];                                                                                     \
    for (int64_t d = 0; d < D; d++) qs[d] = qrow[d] * a->scale;                                          \
    float mx = -INFINITY;                                                                                \
    for (int64_t j = 0; j < n; j++) {                                                                    \
        const int64_t t = pos_of(j, n_sink, lo);                                                         \
        const float *kr = a->k_cache + (bt[t / bs] * bs + t % bs) * Hkv * D + kv;                       \
        float s = 0.f;                                                                                   \
        for (int64_t d = 0; d < D; d++) s += qs[d] * kr[d];                                              \
        scores[j] = s;                                                                                   \
        mx = s > mx ? s : mx;                                                                            \
    }                                                                                                    \
    float total = 0.f;                                                                                   \
    for (int64_t j = 0; j < n; j++) { scores[j] = expf(scores[j] - mx); total += scores[j]; }           \
    memset(acc, 0, sizeof(float) * D);                                                                   \
    for (int64_t j = 0; j < n; j++) {                                                                    \
        const int64_t t = pos_of(j, n_sink, lo);                                                         \
        const float w = scores[j], *vr = a->v_cache + (bt[t / bs] * bs + t % bs) * Hkv * D + kv;        \
        for (int64_t d = 0; d < D; d++) acc[d] += w * vr[d];                                             \
    }                                                                                                    \
    float *orow = a->out + (a->rows[r] * H + h) * D;                                                     \
    const float inv = 1.f / total;                                                                       \
    for (int64_t d = 0; d < D; d++) orow[d] = acc[d] * inv;                                              \
}

DEFINE_ITEM(item_d64, 64)
DEFINE_ITEM(item_d128, 128)
DEFINE_ITEM(item_d256, 256)
DEFINE_ITEM(item_generic, 0)

void paged_attention_f32(
    const float *q,            /* [N, H, D] */
    float *out,                /* [N, H, D] */
    const float *k_cache,      /* [num_blocks, bs, Hkv, D] */
    const float *v_cache,
    const int64_t *rows,       /* [R] rows of q/out to compute */
    const int64_t *qpos,       /* [R] position of each query row */
    const int64_t *row_seq,    /* [R] sequence index of each row */
    const int64_t *block_table,/* [S, max_blocks] */
    int64_t max_blocks, int64_t R, int64_t H, int64_t Hkv, int64_t D, int64_t bs,
    int64_t window, int64_t sinks, float scale)
{
    const args_t a = {q, out, k_cache, v_cache, rows, qpos, row_seq, block_table,
                      max_blocks, H, Hkv, D, bs, window, sinks, scale};
    void (*item)(const args_t *, int64_t, int64_t, float *, float *) =
        D == 64 ? item_d64 : D == 128 ? item_d128 : D == 256 ? item_d256 : item_generic;
    #pragma omp parallel
    {
        float *scores = NULL;
        int64_t cap = 0;
        float *acc = (float *)malloc(sizeof(float) * D);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < R * H; i++) {
            const int64_t r = i / H, need = qpos[r] + 1;
            if (need > cap) {
                cap = need * 2;
                scores = (float *)realloc(scores, sizeof(float) * cap);
            }
            item(&a, r, i % H, scores, acc);
        }
        free(scores);
        free(acc);
    }
}
