/* Paged attention for short queries (decode, speculative verification, short prompt tails), fp32.
 *
 * Reads K/V straight from the paged cache through each sequence's block table: no gather copy.
 * One work item = (query row, KV head); the G query heads sharing that KV head are done together so
 * each K/V row is loaded once. Two passes over the visible positions: scores (and their max), then
 * exp-weights accumulated into V. Visible positions: kpos <= qpos, and with a window W also
 * kpos > qpos - W, except the first `sinks` positions which stay visible.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float dot(const float *a, const float *b, int d) {
    float s = 0.f;
    for (int i = 0; i < d; i++) s += a[i] * b[i];
    return s;
}

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
    const int64_t G = H / Hkv;
    #pragma omp parallel
    {
        float *scores = NULL;
        int64_t cap = 0;
        float *acc = (float *)malloc(sizeof(float) * G * D);
        float *qs = (float *)malloc(sizeof(float) * G * D);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < R * Hkv; item++) {
            const int64_t r = item / Hkv, kvh = item % Hkv;
            const int64_t p = qpos[r];
            const int64_t *bt = block_table + row_seq[r] * max_blocks;
            int64_t lo = 0;
            if (window > 0 && p - window + 1 > 0) lo = p - window + 1;
            const int64_t n_sink = (lo > 0) ? (sinks < lo ? sinks : lo) : 0;
            const int64_t n = n_sink + (p - lo + 1);
            if (n * G > cap) {
                cap = n * G * 2;
                scores = (float *)realloc(scores, sizeof(float) * cap);
            }
            const float *qrow = q + (rows[r] * H + kvh * G) * D;
            for (int64_t i = 0; i < G * D; i++) qs[i] = qrow[i] * scale;
            float mx[64];
            for (int64_t g = 0; g < G; g++) mx[g] = -INFINITY;
            for (int64_t j = 0; j < n; j++) {
                const int64_t t = j < n_sink ? j : lo + (j - n_sink);
                const float *kr = k_cache + ((bt[t / bs] * bs + t % bs) * Hkv + kvh) * D;
                for (int64_t g = 0; g < G; g++) {
                    const float s = dot(qs + g * D, kr, (int)D);
                    scores[g * n + j] = s;
                    if (s > mx[g]) mx[g] = s;
                }
            }
            float sum[64];
            for (int64_t g = 0; g < G; g++) sum[g] = 0.f;
            memset(acc, 0, sizeof(float) * G * D);
            for (int64_t j = 0; j < n; j++) {
                const int64_t t = j < n_sink ? j : lo + (j - n_sink);
                const float *vr = v_cache + ((bt[t / bs] * bs + t % bs) * Hkv + kvh) * D;
                for (int64_t g = 0; g < G; g++) {
                    const float w = expf(scores[g * n + j] - mx[g]);
                    sum[g] += w;
                    float *a = acc + g * D;
                    for (int64_t i = 0; i < D; i++) a[i] += w * vr[i];
                }
            }
            float *orow = out + (rows[r] * H + kvh * G) * D;
            for (int64_t g = 0; g < G; g++) {
                const float inv = 1.f / sum[g];
                for (int64_t i = 0; i < D; i++) orow[g * D + i] = acc[g * D + i] * inv;
            }
        }
        free(scores);
        free(acc);
        free(qs);
    }
}
