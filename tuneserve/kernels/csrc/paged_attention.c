/* Paged attention for short queries (decode, speculative verification, short prompt tails), fp32.
 *
 * Reads K/V straight from the paged cache through each sequence's block table: no gather copy.
 * One work item = one query row, all heads: each token's K/V rows (every KV head, contiguous) are
 * read once, in order, and serve the G query heads of each KV head. Three passes over the visible positions: scores and their max; the
 * exp-weights (a plain loop the compiler vectorizes); the weighted sum of V. Visible positions:
 * kpos <= qpos, and with a window W also kpos > qpos - W, except the first `sinks` positions which stay
 * visible. The head size is a compile-time constant in the specialised copies (64, 128, 256) so the
 * inner loops unroll into whole vector registers; other sizes take the generic copy.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_H 256

typedef struct {
    const float *q; float *out; const float *k_cache; const float *v_cache;
    const int64_t *rows; const int64_t *qpos; const int64_t *row_seq; const int64_t *block_table;
    int64_t max_blocks, H, Hkv, D, bs, window, sinks; float scale;
} args_t;

/* the token position of the j-th visible key */
static inline int64_t pos_of(int64_t j, int64_t n_sink, int64_t lo) { return j < n_sink ? j : lo + (j - n_sink); }

#define DEFINE_ITEM(NAME, DCONST)                                                                        \
static void NAME(const args_t *a, int64_t r, float *scores, float *acc, float *qs) {                     \
    const int64_t D = (DCONST) ? (DCONST) : a->D;                                                        \
    const int64_t H = a->H, G = a->H / a->Hkv, Hkv = a->Hkv, bs = a->bs;                                  \
    const int64_t p = a->qpos[r];                                                                        \
    const int64_t *bt = a->block_table + a->row_seq[r] * a->max_blocks;                                  \
    int64_t lo = 0;                                                                                      \
    if (a->window > 0 && p - a->window + 1 > 0) lo = p - a->window + 1;                                  \
    const int64_t n_sink = (lo > 0) ? (a->sinks < lo ? a->sinks : lo) : 0;                             \
    const int64_t n = n_sink + (p - lo + 1);                                                             \
    const float *qrow = a->q + a->rows[r] * H * D;                                                       \
    for (int64_t i = 0; i < H * D; i++) qs[i] = qrow[i] * a->scale;                                     \
    float mx[MAX_H];                                                                                     \
    for (int64_t h = 0; h < H; h++) mx[h] = -INFINITY;                                                   \
    for (int64_t j = 0; j < n; j++) {                                                                    \
        const int64_t t = pos_of(j, n_sink, lo);                                                         \
        const float *krow = a->k_cache + (bt[t / bs] * bs + t % bs) * Hkv * D; /* all KV heads */       \
        for (int64_t h = 0; h < H; h++) {                                                                \
            const float *qh = qs + h * D, *kr = krow + (h / G) * D;                                      \
            float s = 0.f;                                                                               \
            for (int64_t d = 0; d < D; d++) s += qh[d] * kr[d];                                          \
            scores[h * n + j] = s;                                                                       \
            mx[h] = s > mx[h] ? s : mx[h];                                                               \
        }                                                                                                \
    }                                                                                                    \
    float sum[MAX_H];                                                                                    \
    for (int64_t h = 0; h < H; h++) {                                                                    \
        float *sh = scores + h * n, m = mx[h], total = 0.f;                                              \
        for (int64_t j = 0; j < n; j++) { sh[j] = expf(sh[j] - m); total += sh[j]; }                     \
        sum[h] = total;                                                                                  \
    }                                                                                                    \
    memset(acc, 0, sizeof(float) * H * D);                                                               \
    for (int64_t j = 0; j < n; j++) {                                                                    \
        const int64_t t = pos_of(j, n_sink, lo);                                                         \
        const float *vrow = a->v_cache + (bt[t / bs] * bs + t % bs) * Hkv * D;                           \
        for (int64_t h = 0; h < H; h++) {                                                                \
            const float w = scores[h * n + j], *vr = vrow + (h / G) * D;                                 \
            float *ah = acc + h * D;                                                                     \
            for (int64_t d = 0; d < D; d++) ah[d] += w * vr[d];                                          \
        }                                                                                                \
    }                                                                                                    \
    float *orow = a->out + a->rows[r] * H * D;                                                           \
    for (int64_t h = 0; h < H; h++) {                                                                    \
        const float inv = 1.f / sum[h];                                                                  \
        for (int64_t d = 0; d < D; d++) orow[h * D + d] = acc[h * D + d] * inv;                          \
    }                                                                                                    \
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
    void (*item)(const args_t *, int64_t, float *, float *, float *) =
        D == 64 ? item_d64 : D == 128 ? item_d128 : D == 256 ? item_d256 : item_generic;
    #pragma omp parallel
    {
        float *scores = NULL;
        int64_t cap = 0;
        float *acc = (float *)malloc(sizeof(float) * H * D);
        float *qs = (float *)malloc(sizeof(float) * H * D);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < R; r++) {
            const int64_t need = H * (qpos[r] + 1);
            if (need > cap) {
                cap = need * 2;
                scores = (float *)realloc(scores, sizeof(float) * cap);
            }
            item(&a, r, scores, acc, qs);
        }
        free(scores);
        free(acc);
        free(qs);
    }
}
