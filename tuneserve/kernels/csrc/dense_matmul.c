/* fp32 y = x W^T (+ bias) for a few rows of x (decode steps, speculative verification).
 *
 * W is [N, K] row-major (nn.Linear's layout). From 4 rows on, PyTorch's CPU GEMM runs far slower per row
 * than at one row (measured for SmolLM2's linears: 20 ms at M = 1 and 2, 47 ms at M = 8), although the
 * step is bound by reading W. Here the output is computed in register tiles of 4 weight rows x up to 4 rows
 * of x (16 independent accumulators: each x load feeds 4 FMAs, each weight load 4), the 4 weight rows stay
 * in L1 while every 4-row slice of x passes over them, so W is read from memory once per step. Tiles of
 * weight rows are split over the OpenMP threads in guided chunks: large first (per-chunk overhead cost
 * 3-5 ms per SmolLM2 step with small dynamic chunks), small at the end (a descheduled thread's share is
 * taken over by the others). Measured at M = 8: 30.8 ms vs torch's 46.0 ms; M = 1: the same as torch.
 * Tiles of 2+ rows of x prefetch the weight rows PF floats ahead: their FMAs otherwise delay the loads
 * that keep the memory stream busy (SmolLM2's linears at M = 5: 28.5 -> 25.2 ms; M = 8: 31.6 -> 26.6 ms).
 * At one row the prefetches only add instructions (19 -> 21 ms), so they are skipped there.
 * AVX-512 where the compiler targets it, plain C loops over 16 lanes otherwise.
 */
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define NR 4 /* weight rows per tile */
#define MR 4 /* rows of x per tile */
#define PF 256 /* prefetch distance in floats (1 KiB): 128..1024 measured alike */

#if defined(__AVX512F__)
/* out[i][j] = sum_k w[i][k] x[j][k] for nr weight rows and mr rows of x */
ALWAYS_INLINE void tile(const float *x, const float *w, int64_t K, int nr, int mr, float out[NR][MR]) {
    __m512 a[NR][MR];
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < mr; j++) a[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[NR];
        for (int i = 0; i < nr; i++) {
            if (mr > 1) _mm_prefetch((const char *)(w + i * K + k + PF), _MM_HINT_T0);
            wv[i] = _mm512_loadu_ps(w + i * K + k);
        }
        for (int j = 0; j < mr; j++) {
            const __m512 xv = _mm512_loadu_ps(x + j * K + k);
            for (int i = 0; i < nr; i++) a[i][j] = _mm512_fmadd_ps(xv, wv[i], a[i][j]);
        }
    }
    if (k < K) { /* the last K % 16 inputs through masked loads (zeros beyond K) */
        const __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        __m512 wv[NR];
        for (int i = 0; i < nr; i++) wv[i] = _mm512_maskz_loadu_ps(m, w + i * K + k);
        for (int j = 0; j < mr; j++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, x + j * K + k);
            for (int i = 0; i < nr; i++) a[i][j] = _mm512_fmadd_ps(xv, wv[i], a[i][j]);
        }
    }
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < mr; j++) out[i][j] = _mm512_reduce_add_ps(a[i][j]);
}
#else
ALWAYS_INLINE void tile(const float *x, const float *w, int64_t K, int nr, int mr, float out[NR][MR]) {
    float a[NR][MR][16] = {{{0}}};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
        for (int i = 0; i < nr; i++)
            for (int j = 0; j < mr; j++)
                for (int l = 0; l < 16; l++) a[i][j][l] += w[i * K + k + l] * x[j * K + k + l];
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < mr; j++) {
            float s = 0.f;
            for (int l = 0; l < 16; l++) s += a[i][j][l];
            for (int64_t kk = k; kk < K; kk++) s += w[i * K + kk] * x[j * K + kk];
            out[i][j] = s;
        }
}
#endif

/* tile sizes as constants, so the accumulators stay in registers */
#define TILE_FN(A, B) \
    static void tile_##A##_##B(const float *x, const float *w, int64_t K, float o[NR][MR]) { tile(x, w, K, A, B, o); }
TILE_FN(4, 1) TILE_FN(4, 2) TILE_FN(4, 3) TILE_FN(4, 4)
TILE_FN(1, 1) TILE_FN(1, 2) TILE_FN(1, 3) TILE_FN(1, 4)

typedef void (*tile_fn)(const float *, const float *, int64_t, float[NR][MR]);
static const tile_fn TILES[2][MR] = {{tile_1_1, tile_1_2, tile_1_3, tile_1_4}, {tile_4_1, tile_4_2, tile_4_3, tile_4_4}};

void f32_matmul(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *bias, float *y) {
    const int64_t full = N / NR, tiles = full + (N % NR); /* full 4-row tiles, then single rows */
#pragma omp parallel for schedule(guided)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t < full ? t * NR : full * NR + (t - full);
        const int nr = t < full ? NR : 1;
        float out[NR][MR];
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int mr = M - m0 < MR ? (int)(M - m0) : MR;
            TILES[nr == NR][mr - 1](x + m0 * K, w + n0 * K, K, out);
            for (int i = 0; i < nr; i++)
                for (int j = 0; j < mr; j++) y[(m0 + j) * N + n0 + i] = out[i][j] + (bias ? bias[n0 + i] : 0.f);
        }
    }
}
