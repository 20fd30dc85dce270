/* Low-bit matmuls with int8 activations and integer dot products (llama.cpp's approach): AVX-512 VNNI or AVX2.
 *
 * Same weight formats as qmatmul.c (q5 is q4 with its high-bit words: every q4 function takes qh, NULL for
 * q4). Each row of x is quantized per block of 32 inputs:
 * dx = max|x| / 127, xq = round(x * 127 / max|x|) (ties to even). One vpdpbusd multiplies 64 unsigned
 * 4-bit (or |int8|) weights by 64 int8 activations and sums groups of 4 into 16 int32 lanes, so a block's
 * dot product is exact in integers; then y += scale_w * dx * dot, and for q4 y += min_w * sum(x) over the
 * group, summing the rounded x (so y is exactly the rounded x times the weights; with the exact sum, the
 * rounding error would meet q * scale = w - min, which is larger than w). Compared with dequantizing to
 * fp32 inside the loop this does ~3x fewer instructions per weight, which is what batch 1 needs here.
 * On AVX-512 the q4 and q8 kernels put one weight row per lane instead (row_lanes.h): at 8-32 rows of x
 * they need a third of the instructions.
 * The price is the rounding of x: on SmolLM2 it adds a KL divergence of ~0.003 nats to the next-token
 * distribution (TUNESERVE_QUANT_ACT=fp32 avoids it, at the float kernels' speed).
 * The portable path emulates the same activation rounding (kernels/quant_ops.py, act_int8=True).
 * Built with AVX-512 F/BW/VL + VNNI, or on AVX2 with vpmaddubsw (below); elsewhere qv_available() returns 0
 * and callers use qmatmul.c.
 * Shapes: q4 needs K % 64 == 0 and group 32, 64 or a multiple of 128; q8 needs K % 32 == 0 and group 16
 * (Q6_K's sub-blocks), 32 or a multiple of 64.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_rows.h" /* ld (a scale, fp16 or fp32) and hb32 (q5's high bits as bytes) */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAVE_QV 1

/* On AVX-512 the matmuls themselves are in row_lanes.h (included below, after the shared helpers). */
#define ROW_LANES 1

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* AVX2 without VNNI: vpmaddubsw multiplies 32 unsigned weights (4-bit, or |int8|) by 32 int8 activations
 * and adds pairs into int16 (at most 2 * 15 * 127 or 2 * 127 * 127: no overflow), vpmaddwd by ones sums
 * those into int32: a 32-input block's dot product, exact, in ~4 instructions; then one FMA by the block's
 * scale_w * dx. Against qmatmul.c's fp32 dequantization (~20 instructions a block) it is what batch-1
 * decode needs on AVX2-only CPUs; the numerics are the VNNI kernels' (the same rounded x). */
#include <immintrin.h>
#define HAVE_QV 1

static inline float hsum8(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

/* the int32 lanes of a 32-byte block's dot product: unsigned u by signed s */
static inline __m256 block_dot(__m256i u, __m256i s) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

#define DEF_Q4V(MB)                                                                                       \
static void q4v_rows_##MB(const int8_t *xlo, const int8_t *xhi, const float *dxv, const float *xsum,     \
                          int64_t K, const uint8_t *qr, const uint32_t *qh, const void *sc,              \
                          const void *mn, int64_t f16, int64_t G, int64_t sidx, float *ys) {             \
    const int64_t ng = K / G, bpg = G / 32, xs = K / 2, ds = K / 8;                                      \
    const __m128i m4 = _mm_set1_epi8(15);                                                                \
    __m256 acc[MB];                                                                                      \
    for (int mm = 0; mm < MB; mm++) acc[mm] = _mm256_setzero_ps();                                       \
    for (int64_t g = 0; g < ng; g++) {                                                                   \
        const float s = ld(sc, f16, sidx + g);                                                          \
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {                                              \
            const __m128i raw = _mm_loadu_si128((const __m128i *)(qr + b * 16));                         \
            __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), _mm_and_si128(raw, m4)); \
            if (qh) w = _mm256_or_si256(w, hb32(qh[b]));                                                 \
            for (int mm = 0; mm < MB; mm++) {                                                            \
                const __m256i x = _mm256_loadu2_m128i((const __m128i *)(xhi + mm * xs + b * 16),         \
                                                      (const __m128i *)(xlo + mm * xs + b * 16));        \
                acc[mm] = _mm256_fmadd_ps(block_dot(w, x), _mm256_set1_ps(s * dxv[mm * ds + b * 4]), acc[mm]); \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    for (int mm = 0; mm < MB; mm++) {                                                                    \
        float t = hsum8(acc[mm]);                                                                        \
        for (int64_t g = 0; g < ng; g++) t += ld(mn, f16, sidx + g) * xsum[mm * ng + g];                \
        ys[mm] = t;                                                                                      \
    }                                                                                                    \
}
DEF_Q4V(1)
DEF_Q4V(2)
DEF_Q4V(4)
DEF_Q4V(8)

/* Per-lane weight scales of 32-input block b (lane l: inputs 4l..4l+3, so group 16 splits the lanes 4 + 4). */
static inline __m256 wscale_q8(const void *sc, int64_t f16, int64_t sidx, int64_t G, int64_t b) {
    if (G == 16)
        return _mm256_set_m128(_mm_set1_ps(ld(sc, f16, sidx + 2 * b + 1)), _mm_set1_ps(ld(sc, f16, sidx + 2 * b)));
    return _mm256_set1_ps(ld(sc, f16, sidx + b * 32 / G));
}

#define DEF_Q8V(MB)                                                                                       \
static void q8v_rows_##MB(const int8_t *xq, const float *dxv, int64_t K, const int8_t *qr, const void *sc, \
                          int64_t f16, int64_t G, int64_t sidx, float *ys) {                             \
    const int64_t ds = K / 4;                                                                            \
    __m256 acc[MB];                                                                                      \
    for (int mm = 0; mm < MB; mm++) acc[mm] = _mm256_setzero_ps();                                       \
    for (int64_t b = 0; b < K / 32; b++) {                                                               \
        const __m256i w = _mm256_loadu_si256((const __m256i *)(qr + b * 32));                            \
        const __m256i aw = _mm256_sign_epi8(w, w);                                                       \
        const __m256 s = wscale_q8(sc, f16, sidx, G, b);                                                 \
        for (int mm = 0; mm < MB; mm++) {                                                                \
            const __m256i x = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq + mm * K + b * 32)), w); \
            acc[mm] = _mm256_fmadd_ps(block_dot(aw, x), _mm256_mul_ps(s, _mm256_set1_ps(dxv[mm * ds + b * 8])), \
                                      acc[mm]);                                                          \
        }                                                                                                \
    }                                                                                                    \
    for (int mm = 0; mm < MB; mm++) ys[mm] = hsum8(acc[mm]);                                             \
}
DEF_Q8V(1)
DEF_Q8V(2)
DEF_Q8V(4)
DEF_Q8V(8)

#endif

#ifdef HAVE_QV
int qv_available(void) { return 1; }

/* a / b rounded once, as the oracle divides (quant_ops.quantize_activations); -ffast-math would let the compiler
 * multiply by a reciprocal, and x * (127 / amax) could then land off an exact tie (-49.5 as -49.499996). */
static inline float div_exact(float a, float b) { return _mm_cvtss_f32(_mm_div_ss(_mm_set_ss(a), _mm_set_ss(b))); }

/* Quantize row x [K] per 32-block. q4 layout: lo[b*16 + j] = x[32b + j], hi[b*16 + j] = x[32b + 16 + j];
 * q8 layout: lo = x in order (hi unused). dxv: each block's dx repeated `rep` times. */
static void quant_row(const float *x, int64_t K, int q4, int8_t *lo, int8_t *hi, float *dxv, int rep) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float id = amax > 0.f ? div_exact(127.f, amax) : 0.f, d = div_exact(amax, 127.f);
        int8_t q[32];
        for (int j = 0; j < 32; j++) q[j] = (int8_t)nearbyintf(xb[j] * id);
        if (q4) {
            memcpy(lo + b * 16, q, 16);
            memcpy(hi + b * 16, q + 16, 16);
        } else {
            memcpy(lo + b * 32, q, 32);
        }
        for (int j = 0; j < rep; j++) dxv[b * rep + j] = d;
    }
}

/* Rows of x go in chunks of up to 8 (the kernels' register blocks) over NB weight rows at a time, so a chunk's
 * int8 x and its scales stay in L1 while the block's weight rows are reused across chunks: with every row of x
 * swept per weight row, 32 rows of a 896-input x (56 KB with the scales) spilled L1, and 32 rows took 1.2x the
 * time of 4 x 8 rows (Qwen2.5-Coder's layers, Xeon). Each output is still one call on the same data, so a row's
 * bits do not depend on the batch. */
enum { NB = 16 };
static inline int64_t chunk(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

/* Row x [K] for the q4 kernels: quant_row's q4 layout, and xsum[g] = group g's sum of the rounded x times dx
 * (y = sum x_rounded * w exactly, min term included). */
static void quant_row_q4(const float *x, int64_t K, int64_t G, int8_t *lo, int8_t *hi, float *dv, float *xsum) {
    quant_row(x, K, 1, lo, hi, dv, 4);
    for (int64_t g = 0; g < K / G; g++) {
        float t = 0.f;
        for (int64_t b = g * G / 32; b < (g + 1) * G / 32; b++) {
            int32_t qs = 0;
            for (int j = 0; j < 16; j++) qs += lo[b * 16 + j] + hi[b * 16 + j];
            t += dv[b * 4] * (float)qs;
        }
        xsum[g] = t;
    }
}

#ifdef ROW_LANES
#include "row_lanes.h" /* q4v_matmul and q8v_matmul, one weight row per lane */
#else
void q4v_matmul(const float *x, int64_t M, int64_t K, const uint8_t *qw, const uint32_t *qh, const void *sc,
                const void *mn, int64_t f16, int64_t N, int64_t G, const float *bias, float *y) {
    const int64_t ng = K / G;
    int8_t *xlo = (int8_t *)malloc((size_t)(M * K)), *xhi = xlo + M * K / 2;
    float *dxv = (float *)malloc(sizeof(float) * (size_t)(M * K / 8 + M * ng));
    float *xsum = dxv + M * K / 8;
    for (int64_t m = 0; m < M; m++)
        quant_row_q4(x + m * K, K, G, xlo + m * K / 2, xhi + m * K / 2, dxv + m * K / 8, xsum + m * ng);
    #pragma omp parallel for schedule(guided)
    for (int64_t n0 = 0; n0 < N; n0 += NB) {
        for (int64_t m0 = 0, mb; m0 < M; m0 += mb) {
            mb = chunk(M - m0);
            const int8_t *lo = xlo + m0 * K / 2, *hi = xhi + m0 * K / 2;
            const float *dv = dxv + m0 * K / 8, *xs = xsum + m0 * ng;
            for (int64_t n = n0; n < n0 + NB && n < N; n++) {
                const uint8_t *qr = qw + n * (K / 2);
                const uint32_t *qhr = qh ? qh + n * (K / 32) : NULL;
                const float b = bias ? bias[n] : 0.f;
                float ys[8];
                switch (mb) {
                    case 8: q4v_rows_8(lo, hi, dv, xs, K, qr, qhr, sc, mn, f16, G, n * ng, ys); break;
                    case 4: q4v_rows_4(lo, hi, dv, xs, K, qr, qhr, sc, mn, f16, G, n * ng, ys); break;
                    case 2: q4v_rows_2(lo, hi, dv, xs, K, qr, qhr, sc, mn, f16, G, n * ng, ys); break;
                    default: q4v_rows_1(lo, hi, dv, xs, K, qr, qhr, sc, mn, f16, G, n * ng, ys); break;
                }
                for (int64_t mm = 0; mm < mb; mm++) y[(m0 + mm) * N + n] = ys[mm] + b;
            }
        }
    }
    free(xlo);
    free(dxv);
}

void q8v_matmul(const float *x, int64_t M, int64_t K, const int8_t *qw, const void *sc, int64_t f16,
                int64_t N, int64_t G, const float *bias, float *y) {
    const int64_t ng = K / G;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *dxv = (float *)malloc(sizeof(float) * (size_t)(M * K / 4));
    for (int64_t m = 0; m < M; m++) quant_row(x + m * K, K, 0, xq + m * K, NULL, dxv + m * K / 4, 8);
    #pragma omp parallel for schedule(guided)
    for (int64_t n0 = 0; n0 < N; n0 += NB) {
        for (int64_t m0 = 0, mb; m0 < M; m0 += mb) {
            mb = chunk(M - m0);
            const int8_t *xm = xq + m0 * K;
            const float *dv = dxv + m0 * K / 4;
            for (int64_t n = n0; n < n0 + NB && n < N; n++) {
                const int8_t *qr = qw + n * K;
                const float b = bias ? bias[n] : 0.f;
                float ys[8];
                switch (mb) {
                    case 8: q8v_rows_8(xm, dv, K, qr, sc, f16, G, n * ng, ys); break;
                    case 4: q8v_rows_4(xm, dv, K, qr, sc, f16, G, n * ng, ys); break;
                    case 2: q8v_rows_2(xm, dv, K, qr, sc, f16, G, n * ng, ys); break;
                    default: q8v_rows_1(xm, dv, K, qr, sc, f16, G, n * ng, ys); break;
                }
                for (int64_t mm = 0; mm < mb; mm++) y[(m0 + mm) * N + n] = ys[mm] + b;
            }
        }
    }
    free(xq);
    free(dxv);
}
#endif


#include "permuted_inputs.h"
DEF_PERMUTED_MATMULS(q4v_matmul, q8v_matmul)

#else  /* neither AVX-512 VNNI nor AVX2: callers use qmatmul.c */

int qv_available(void) { return 0; }
void q4v_matmul(const float *x, int64_t M, int64_t K, const uint8_t *qw, const uint32_t *qh, const void *sc,
                const void *mn, int64_t f16, int64_t N, int64_t G, const float *bias, float *y) {
    (void)x; (void)M; (void)K; (void)qw; (void)qh; (void)sc; (void)mn; (void)f16; (void)N; (void)G; (void)bias; (void)y;
}
void q8v_matmul(const float *x, int64_t M, int64_t K, const int8_t *qw, const void *sc, int64_t f16,
                int64_t N, int64_t G, const float *bias, float *y) {
    (void)x; (void)M; (void)K; (void)qw; (void)sc; (void)f16; (void)N; (void)G; (void)bias; (void)y;
}
void q4v_matmul_px(void) {}
void q8v_matmul_px(void) {}

#endif
