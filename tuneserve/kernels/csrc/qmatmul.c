/* Matmuls that read packed low-bit weights and dequantize inside the dot products (fp32 activations).
 *
 * Weight formats (struct of arrays, one row per output feature n, groups of G inputs along k):
 *   q4: qw uint8 [N, K/2]. Every 32 inputs form a block of 16 bytes: byte j holds input j in its low
 *       nibble and input j + 16 in its high nibble (GGUF Q4_0/Q4_1's layout). w = q * scale + min.
 *   q5: q4 plus qh uint32 [N, K/32], one word per block: bit j adds 16 to input j's code (GGUF Q5_0 / Q5_1's
 *       high bits, as they lie in the file), so q is in [0, 31]. Every q4 function takes qh (NULL: q4).
 *   q8: qw int8 [N, K]. w = q * scale.
 *   scale / min: [N, K/G], fp32 or fp16 (`f16`).
 * y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]). For q4, sum_k x q s + min * sum_k x: the group sums of x
 * are computed once, so the inner loop is one multiply-add per weight. Rows of W are split over the
 * OpenMP threads in guided chunks (large first, small at the end, so a descheduled thread's rows are
 * taken over by the others; 8-row dynamic chunks cost 1-2 ms per SmolLM2 step in scheduling, measured:
 * int4 at M = 1 8.6 -> 7.6 ms, M = 4 15.0 -> 9.7 ms); up to 8 rows of x share each dequantized block. Plain C loops over 16 lanes that the
 * compiler vectorizes (AVX-512, AVX2 or NEON). Large batches do not come here: callers dequantize tiles
 * with q*_dequant (fp32) or q*_dequant_bf16 (for a bf16 GEMM) and multiply with torch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "bf16_rows.h"

/* One 32-weight q4 block times MB rows of x, into 16-lane accumulators: explicit AVX-512 / AVX2 code
 * where the compiler targets them, plain C otherwise (which compilers vectorize less reliably). */
#if defined(__AVX512F__)
typedef struct { __m512 a, b; } vacc_t; /* two independent FMA chains */
static inline vacc_t VZERO(void) { vacc_t v = {_mm512_setzero_ps(), _mm512_setzero_ps()}; return v; }
static inline void q4_block(const uint8_t *qb, uint32_t h, float s, const float *x, int64_t K, int mb, vacc_t *acc) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)qb), m4 = _mm_set1_epi8(15);
    const __m512 sv = _mm512_set1_ps(s);
    const __m512i sixteen = _mm512_set1_epi32(16);
    const __m512i l = _mm512_cvtepu8_epi32(_mm_and_si128(raw, m4));
    const __m512i u = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), m4));
    const __m512i l5 = _mm512_mask_add_epi32(l, (__mmask16)h, l, sixteen);  /* q5: inputs 0-15's bits */
    const __m512i u5 = _mm512_mask_add_epi32(u, (__mmask16)(h >> 16), u, sixteen);  /* and 16-31's */
    const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(l5), sv), hi = _mm512_mul_ps(_mm512_cvtepi32_ps(u5), sv);
    for (int mm = 0; mm < mb; mm++) {
        acc[mm].a = _mm512_fmadd_ps(_mm512_loadu_ps(x + mm * K), lo, acc[mm].a);
        acc[mm].b = _mm512_fmadd_ps(_mm512_loadu_ps(x + mm * K + 16), hi, acc[mm].b);
    }
}
/* 16 int8 weights; consecutive blocks alternate between the two chains (par) */
static inline void q8_block(const int8_t *qb, float s, const float *x, int64_t K, int mb, vacc_t *acc, int par) {
    const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qb))),
                                   _mm512_set1_ps(s));
    for (int mm = 0; mm < mb; mm++) {
        if (par) acc[mm].b = _mm512_fmadd_ps(_mm512_loadu_ps(x + mm * K), w, acc[mm].b);
        else acc[mm].a = _mm512_fmadd_ps(_mm512_loadu_ps(x + mm * K), w, acc[mm].a);
    }
}
static inline float vsum(vacc_t v) { return _mm512_reduce_add_ps(_mm512_add_ps(v.a, v.b)); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef struct { __m256 a, b; } vacc_t;
static inline vacc_t VZERO(void) { vacc_t v = {_mm256_setzero_ps(), _mm256_setzero_ps()}; return v; }
static inline void q4_block(const uint8_t *qb, uint32_t hw, float s, const float *x, int64_t K, int mb, vacc_t *acc) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)qb), m4 = _mm_set1_epi8(15);
    __m128i l = _mm_and_si128(raw, m4), h = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
    if (hw) { /* inputs 0-15 are l's bytes, 16-31 h's */
        const __m256i add = hb32(hw);
        l = _mm_or_si128(l, _mm256_castsi256_si128(add));
        h = _mm_or_si128(h, _mm256_extracti128_si256(add, 1));
    }
    const __m256 sv = _mm256_set1_ps(s);
    const __m256 l0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(l)), sv);
    const __m256 l1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(l, 8))), sv);
    const __m256 h0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(h)), sv);
    const __m256 h1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(h, 8))), sv);
    if (mb >= 8) { /* one chain per row: 16 ymm registers hold 8 accumulators, not 16 (they spilled) */
        for (int mm = 0; mm < mb; mm++) {
            const float *xm = x + mm * K;
            __m256 a = _mm256_fmadd_ps(_mm256_loadu_ps(xm), l0, acc[mm].a);
            a = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8), l1, a);
            a = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 16), h0, a);
            acc[mm].a = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 24), h1, a);
        }
        return;
    }
    for (int mm = 0; mm < mb; mm++) {
        const float *xm = x + mm * K;
        acc[mm].a = _mm256_fmadd_ps(_mm256_loadu_ps(xm), l0, acc[mm].a);
        acc[mm].b = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8), l1, acc[mm].b);
        acc[mm].a = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 16), h0, acc[mm].a);
        acc[mm].b = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 24), h1, acc[mm].b);
    }
}
static inline void q8_block(const int8_t *qb, float s, const float *x, int64_t K, int mb, vacc_t *acc, int par) {
    (void)par;
    const __m128i raw = _mm_loadu_si128((const __m128i *)qb);
    const __m256 sv = _mm256_set1_ps(s);
    const __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), sv);
    const __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8))), sv);
    if (mb >= 8) { /* one chain per row, as q4_block */
        for (int mm = 0; mm < mb; mm++) {
            const __m256 a = _mm256_fmadd_ps(_mm256_loadu_ps(x + mm * K), w0, acc[mm].a);
            acc[mm].a = _mm256_fmadd_ps(_mm256_loadu_ps(x + mm * K + 8), w1, a);
        }
        return;
    }
    for (int mm = 0; mm < mb; mm++) {
        acc[mm].a = _mm256_fmadd_ps(_mm256_loadu_ps(x + mm * K), w0, acc[mm].a);
        acc[mm].b = _mm256_fmadd_ps(_mm256_loadu_ps(x + mm * K + 8), w1, acc[mm].b);
    }
}
static inline float vsum(vacc_t v) {
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(v.a, v.b));
    return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}
#else
typedef struct { float v[16]; } vacc_t;
static inline vacc_t VZERO(void) { vacc_t z; memset(&z, 0, sizeof z); return z; }
static inline void q4_block(const uint8_t *qb, uint32_t h, float s, const float *x, int64_t K, int mb, vacc_t *acc) {
    float lo[16], hi[16];
    for (int j = 0; j < 16; j++) {
        lo[j] = (float)((qb[j] & 15) | hbit(h, j)) * s;
        hi[j] = (float)((qb[j] >> 4) | hbit(h, j + 16)) * s;
    }
    for (int mm = 0; mm < mb; mm++)
        for (int j = 0; j < 16; j++) acc[mm].v[j] += x[mm * K + j] * lo[j] + x[mm * K + 16 + j] * hi[j];
}
static inline void q8_block(const int8_t *qb, float s, const float *x, int64_t K, int mb, vacc_t *acc, int par) {
    (void)par;
    float w[16];
    for (int j = 0; j < 16; j++) w[j] = (float)qb[j] * s;
    for (int mm = 0; mm < mb; mm++)
        for (int j = 0; j < 16; j++) acc[mm].v[j] += x[mm * K + j] * w[j];
}
static inline float vsum(vacc_t v) { float t = 0.f; for (int j = 0; j < 16; j++) t += v.v[j]; return t; }
#endif

/* ----- 4-bit ------------------------------------------------------------------------------------- */
#define DEF_Q4(MB)                                                                                       \
static void q4_rows_##MB(const float *x, int64_t K, const uint8_t *qr, const uint32_t *qh, const void *sc, \
                         const void *mn, int64_t f16, int64_t G, const float *xsum, int64_t ng, int64_t sidx, \
                         float *ys) {                                                                    \
    vacc_t acc[MB];                                                                                      \
    float omin[MB];                                                                                      \
    for (int mm = 0; mm < MB; mm++) { acc[mm] = VZERO(); omin[mm] = 0.f; }                               \
    const int64_t bpg = G / 32;                                                                          \
    for (int64_t g = 0; g < ng; g++) {                                                                   \
        const float s = ld(sc, f16, sidx + g), m = ld(mn, f16, sidx + g);                                \
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++)                                               \
            q4_block(qr + b * 16, qh ? qh[b] : 0u, s, x + b * 32, K, MB, acc);                           \
        for (int mm = 0; mm < MB; mm++) omin[mm] += m * xsum[mm * ng + g];                               \
    }                                                                                                    \
    for (int mm = 0; mm < MB; mm++) ys[mm] = vsum(acc[mm]) + omin[mm];                                   \
}
DEF_Q4(1)
DEF_Q4(2)
DEF_Q4(4)
DEF_Q4(8)

/* rows of x taken together: 8, 4, 2 or 1 */
static inline int64_t chunk(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

void q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *qw, const uint32_t *qh, const void *sc,
               const void *mn, int64_t f16, int64_t N, int64_t G, const float *bias, float *y) {
    const int64_t ng = K / G;
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(M * ng));
    for (int64_t i = 0; i < M * ng; i++) {
        const float *xg = x + i * G; /* rows are contiguous, groups tile them exactly */
        float t = 0.f;
        for (int64_t j = 0; j < G; j++) t += xg[j];
        xsum[i] = t;
    }
    #pragma omp parallel for schedule(guided)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qr = qw + n * (K / 2);
        const uint32_t *qhr = qh ? qh + n * (K / 32) : NULL;
        const float b = bias ? bias[n] : 0.f;
        float ys[8];
        for (int64_t m0 = 0, mb; m0 < M; m0 += mb) {
            mb = chunk(M - m0);
            const float *xm = x + m0 * K, *xs = xsum + m0 * ng;
            switch (mb) {
                case 8: q4_rows_8(xm, K, qr, qhr, sc, mn, f16, G, xs, ng, n * ng, ys); break;
                case 4: q4_rows_4(xm, K, qr, qhr, sc, mn, f16, G, xs, ng, n * ng, ys); break;
                case 2: q4_rows_2(xm, K, qr, qhr, sc, mn, f16, G, xs, ng, n * ng, ys); break;
                default: q4_rows_1(xm, K, qr, qhr, sc, mn, f16, G, xs, ng, n * ng, ys); break;
            }
            for (int64_t mm = 0; mm < mb; mm++) y[(m0 + mm) * N + n] = ys[mm] + b;
        }
    }
    free(xsum);
}

/* A bf16 row goes through the functions in bf16_rows.h (a `continue` to the next row); elsewhere nothing here. */
#ifdef HAVE_BF16_ROWS
#define BF16_ROW_Q4(OUT_T, qr, qhr, sidx, o)                                                             \
    if (sizeof(OUT_T) == 2) { q4_row_bf16(qr, qhr, sc, mn, f16, K, G, sidx, (uint16_t *)(o)); continue; }
#define BF16_ROW_Q8(OUT_T, qr, sidx, o)                                                                  \
    if (sizeof(OUT_T) == 2) { q8_row_bf16(qr, sc, f16, K, G, sidx, (uint16_t *)(o)); continue; }
#else
#define BF16_ROW_Q4(OUT_T, qr, qhr, sidx, o)
#define BF16_ROW_Q8(OUT_T, qr, sidx, o)
#endif

/* Rows `rows[r]` (or row0 + r when rows is NULL) of a q4 / q5 matrix as fp32 or bf16 (OUT_T) [R, K]. */
#define DEF_Q4_DEQUANT(NAME, OUT_T, CONV)                                                                 \
void NAME(const uint8_t *qw, const uint32_t *qh, const void *sc, const void *mn, int64_t f16, int64_t K, \
          int64_t G, const int64_t *rows, int64_t R, int64_t row0, OUT_T *out) {                         \
    const int64_t ng = K / G;                                                                            \
    _Pragma("omp parallel for schedule(guided)")                                                          \
    for (int64_t r = 0; r < R; r++) {                                                                    \
        const int64_t n = rows ? rows[r] : row0 + r;                                                     \
        const uint8_t *qr = qw + n * (K / 2);                                                            \
        const uint32_t *qhr = qh ? qh + n * (K / 32) : NULL;                                             \
        OUT_T *o = out + r * K;                                                                          \
        BF16_ROW_Q4(OUT_T, qr, qhr, n * ng, o)                                                           \
        for (int64_t g = 0; g < ng; g++) {                                                               \
            const float s = ld(sc, f16, n * ng + g), m = ld(mn, f16, n * ng + g);                        \
            for (int64_t b = g * (G / 32); b < (g + 1) * (G / 32); b++) {                                \
                const uint8_t *qb = qr + b * 16;                                                         \
                const uint32_t hw = qhr ? qhr[b] : 0u;                                                   \
                OUT_T *ob = o + b * 32;                                                                  \
                for (int j = 0; j < 16; j++) {                                                           \
                    ob[j] = CONV((float)((qb[j] & 15) | hbit(hw, j)) * s + m);                           \
                    ob[16 + j] = CONV((float)((qb[j] >> 4) | hbit(hw, j + 16)) * s + m);                 \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
}
#define AS_F32(v) (v)
DEF_Q4_DEQUANT(q4_dequant, float, AS_F32)
DEF_Q4_DEQUANT(q4_dequant_bf16, uint16_t, f2bf)

/* ----- 8-bit ------------------------------------------------------------------------------------- */
#define DEF_Q8(MB)                                                                                       \
static void q8_rows_##MB(const float *x, int64_t K, const int8_t *qr, const void *sc, int64_t f16,      \
                         int64_t G, int64_t ng, int64_t sidx, float *ys) {                               \
    vacc_t acc[MB];                                                                                      \
    for (int mm = 0; mm < MB; mm++) acc[mm] = VZERO();                                                   \
    for (int64_t g = 0; g < ng; g++) {                                                                   \
        const float s = ld(sc, f16, sidx + g);                                                           \
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {                                           \
            q8_block(qr + k, s, x + k, K, MB, acc, 0);                                                   \
            if (k + 16 < (g + 1) * G) q8_block(qr + k + 16, s, x + k + 16, K, MB, acc, 1);               \
        }                                                                                                \
    }                                                                                                    \
    for (int mm = 0; mm < MB; mm++) ys[mm] = vsum(acc[mm]);                                              \
}
DEF_Q8(1)
DEF_Q8(2)
DEF_Q8(4)
DEF_Q8(8)

/* G must be a multiple of 16 (callers check). */
void q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *qw, const void *sc, int64_t f16,
               int64_t N, int64_t G, const float *bias, float *y) {
    const int64_t ng = K / G;
    #pragma omp parallel for schedule(guided)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *qr = qw + n * K;
        const float b = bias ? bias[n] : 0.f;
        float ys[8];
        for (int64_t m0 = 0, mb; m0 < M; m0 += mb) {
            mb = chunk(M - m0);
            const float *xm = x + m0 * K;
            switch (mb) {
                case 8: q8_rows_8(xm, K, qr, sc, f16, G, ng, n * ng, ys); break;
                case 4: q8_rows_4(xm, K, qr, sc, f16, G, ng, n * ng, ys); break;
                case 2: q8_rows_2(xm, K, qr, sc, f16, G, ng, n * ng, ys); break;
                default: q8_rows_1(xm, K, qr, sc, f16, G, ng, n * ng, ys); break;
            }
            for (int64_t mm = 0; mm < mb; mm++) y[(m0 + mm) * N + n] = ys[mm] + b;
        }
    }
}

#define DEF_Q8_DEQUANT(NAME, OUT_T, CONV)                                                                 \
void NAME(const int8_t *qw, const void *sc, int64_t f16, int64_t K, int64_t G, const int64_t *rows,     \
          int64_t R, int64_t row0, OUT_T *out) {                                                         \
    const int64_t ng = K / G;                                                                            \
    _Pragma("omp parallel for schedule(guided)")                                                          \
    for (int64_t r = 0; r < R; r++) {                                                                    \
        const int64_t n = rows ? rows[r] : row0 + r;                                                     \
        const int8_t *qr = qw + n * K;                                                                   \
        OUT_T *o = out + r * K;                                                                          \
        BF16_ROW_Q8(OUT_T, qr, n * ng, o)                                                                \
        for (int64_t g = 0; g < ng; g++) {                                                               \
            const float s = ld(sc, f16, n * ng + g);                                                     \
            for (int64_t k = g * G; k < (g + 1) * G; k++) o[k] = CONV((float)qr[k] * s);                 \
        }                                                                                                \
    }                                                                                                    \
}
DEF_Q8_DEQUANT(q8_dequant, float, AS_F32)
DEF_Q8_DEQUANT(q8_dequant_bf16, uint16_t, f2bf)

#include "permuted_inputs.h"
DEF_PERMUTED_MATMULS(q4_matmul, q8_matmul)
