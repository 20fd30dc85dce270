/* Shared by qmatmul.c, qmatmul_vnni.c and amx_matmul.c: a packed row's scales (fp32 or fp16), q5's fifth bits
 * (as 16s, per input or, with AVX2, as a block's 32 bytes) and, with AVX-512 BF16, one q4 / q5 / q8 row
 * dequantized to bf16 (HAVE_BF16_ROWS). The formats are qmatmul.c's. */
#ifndef TUNESERVE_BF16_ROWS_H
#define TUNESERVE_BF16_ROWS_H

#include <stdint.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (e == 0) {
        float f = (float)man * (1.0f / 16777216.0f); /* subnormal: man * 2^-24 */
        return sign ? -f : f;
    }
    bits = e == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((e + 112) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

static inline float ld(const void *p, int64_t f16, int64_t i) {
    return f16 ? h2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* fp32 -> bf16, round to nearest even (finite inputs) */
static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* q5: what input j of a block adds to its 4-bit code, given the block's high-bit word (0 for q4) */
static inline int hbit(uint32_t word, int j) { return (int)((word >> j) & 1u) << 4; }

#if defined(__AVX2__)
/* byte j = hbit(word, j): a block's 32 inputs in order */
static inline __m256i hb32(uint32_t word) {
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)word),
                                          _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel), _mm256_set1_epi8(16));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_BF16_ROWS 1
/* One row of bf16 tiles with AVX-512 BF16: a 32-input block is 16 lanes twice, converted by vcvtneps2bf16
 * (round to nearest even, as f2bf). qmatmul.c's plain loops vectorize to 4 lanes only; this took SmolLM2 /
 * Qwen2.5 tiles' dequantization from ~2 cycles a weight to a fraction of one (Xeon with AMX). */
static inline void st_bf16(uint16_t *o, __m512 v) { _mm256_storeu_si256((__m256i *)o, (__m256i)_mm512_cvtneps_pbh(v)); }

/* qh: the row's q5 high-bit words, or NULL (q4) */
static inline void q4_row_bf16(const uint8_t *qr, const uint32_t *qh, const void *sc, const void *mn, int64_t f16,
                               int64_t K, int64_t G, int64_t sidx, uint16_t *o) {
    const __m512i sixteen = _mm512_set1_epi32(16);
    for (int64_t g = 0; g < K / G; g++) {
        const __m512 s = _mm512_set1_ps(ld(sc, f16, sidx + g)), m = _mm512_set1_ps(ld(mn, f16, sidx + g));
        for (int64_t b = g * (G / 32); b < (g + 1) * (G / 32); b++) {
            const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qr + b * 16)));
            __m512i lo = _mm512_and_si512(q, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(q, 4);
            if (qh) {
                lo = _mm512_mask_add_epi32(lo, (__mmask16)qh[b], lo, sixteen);
                hi = _mm512_mask_add_epi32(hi, (__mmask16)(qh[b] >> 16), hi, sixteen);
            }
            st_bf16(o + b * 32, _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), s, m));
            st_bf16(o + b * 32 + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), s, m));
        }
    }
}

static inline void q8_row_bf16(const int8_t *qr, const void *sc, int64_t f16, int64_t K, int64_t G, int64_t sidx,
                               uint16_t *o) {
    for (int64_t k = 0; k < K; k += 16) {  /* G is a multiple of 16 */
        const __m512 s = _mm512_set1_ps(ld(sc, f16, sidx + k / G));
        const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qr + k)));
        st_bf16(o + k, _mm512_mul_ps(_mm512_cvtepi32_ps(q), s));
    }
}
#endif

#endif
