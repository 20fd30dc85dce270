/* AVX-512 VNNI q4 and q8 matmuls with one weight row per lane (qmatmul_vnni.c includes it on AVX-512 VNNI CPUs).
 *
 * Why: with a 64-input unit of one weight row per register, every vpdpbusd (or q4's pair) needs, per row of
 * x, an int32 -> fp32 conversion, a scale multiply and an FMA, q8 also a sign move onto x (5 instructions per
 * 64 products), and each output a lane sum. Here 16 weight rows are transposed into 16 registers of 4-byte
 * columns (lane j: row j), x's 4 inputs are broadcast, and a 32-input block is 8 vpdpbusd into one int32
 * register that holds 16 outputs' block dot products; then one conversion, multiply and FMA per block: ~1.5
 * instructions per 64 products, no lane sums. The transpose (64 shuffles per 16 x 64 bytes) and q4's nibble
 * split are shared by the rows of x. At 8-32 rows the layers took 0.45-0.6x the time of the one-row-per-
 * register kernels (git history, a1324c2); at 1 row from DRAM 1.03-1.13x for q8 (Qwen2.5-Coder's layers) and
 * ~1.1x for q4 (SmolLM2's), which q4l_one_row brings back to par (Xeon).
 * q8 signs: vpdpbusd takes unsigned weights, so they go in as w + 128 (one xor) and each block's accumulator
 * starts at -128 * (sum of its x): the same integer dot product. q4's nibbles are unsigned as they are.
 * Order: an output sums its blocks in order, one FMA each (q4: then its groups' min terms), whatever the
 * batch, so its bits do not depend on the batch.
 */

static inline int32_t ld32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* r[j] = 16 dwords of row j -> c[i], lane j = dword i of row j: a 16 x 16 transpose of 4-byte cells. */
static inline void transpose_dwords(const __m512i *r, __m512i *c) {
    __m512i a[16], b[16];
    for (int i = 0; i < 8; i++) { /* within 128-bit quarters: rows 2i, 2i+1 interleaved */
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* b[4i + q] quarter L: rows 4i..4i+3 of column 4L + q */
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int q = 0; q < 4; q++) { /* 4 x 4 transpose of quarters: column 4L + q = quarter L of b[q], b[4+q], ... */
        const __m512i e0 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0x44), e1 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0xEE);
        const __m512i e2 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0x44);
        const __m512i e3 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0xEE);
        c[q] = _mm512_shuffle_i32x4(e0, e2, 0x88);
        c[4 + q] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
        c[8 + q] = _mm512_shuffle_i32x4(e1, e3, 0x88);
        c[12 + q] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
    }
}

/* 16 rows (nr valid, the rest zero) of `bytes` (1..64) bytes at stride `stride` -> 16 registers of their
 * transposed dwords (transpose_dwords); bytes past `bytes` read as zero and no memory past them is touched. */
static inline void load_transposed(const uint8_t *p, int64_t stride, int64_t nr, int64_t bytes, __m512i *c) {
    const __mmask64 k = bytes >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << bytes) - 1);
    __m512i r[16];
    for (int j = 0; j < 16; j++) r[j] = j < nr ? _mm512_maskz_loadu_epi8(k, p + j * stride) : _mm512_setzero_si512();
    transpose_dwords(r, c);
}

/* 16 rows (nr valid, the rest zero) of `bytes` (64 or 32) bytes at stride K -> c[i], lane j = row j's bytes
 * 4i..4i+3 (as w + 128 with flip_signs). The 16 rows are 16 interleaved streams, which the hardware prefetcher left
 * at 1.55x the one-row kernel's time at 1 row of x from DRAM; the next 16 rows are contiguous, so they are
 * prefetched into L2 a line per row loaded (1.03-1.13x; into L1, or each row ahead, 1.15-1.35x; Xeon). */
static inline void load_columns(const int8_t *w, int64_t K, int64_t k0, int64_t nr, int64_t bytes, int flip_signs,
                                __m512i *c) {
    if (nr == 16 && bytes == 64) {
        __m512i r[16];
        for (int j = 0; j < 16; j++) {
            r[j] = _mm512_loadu_si512(w + j * K);
            _mm_prefetch((const char *)(w + 16 * K + 15 * k0 + j * 64), _MM_HINT_T1); /* the next 16 rows */
        }
        transpose_dwords(r, c);
    } else {
        load_transposed((const uint8_t *)w, K, nr, bytes, c);
    }
    if (flip_signs)
        for (int i = 0; i < 16; i++) c[i] = _mm512_xor_si512(c[i], _mm512_set1_epi8((char)0x80));
}

/* wsT[g * 16 + j] = scale g of weight row n0 + j (0 past nr rows). The 16 rows' scales are contiguous
 * (ng each), so 64 bytes of each row at a time are loaded and transposed in registers (dword i of a row:
 * fp16 groups 2i and 2i + 1, or fp32 group i). Per-row gathers here took 20-26% of the q4 / q5 one-row
 * matmul's time (Xeon); a scalar loop cost as much as the weights' dot products at 1 row of x. */
static inline void transpose_scales(const void *sc, int64_t f16, int64_t n0, int64_t nr, int64_t ng, float *wsT) {
    const int64_t esz = f16 ? 2 : 4, row = ng * esz;
    const uint8_t *base = (const uint8_t *)sc + n0 * row;
    for (int64_t c0 = 0; c0 < row; c0 += 64) {
        __m512i c[16];
        load_transposed(base + c0, row, nr, row - c0, c);
        const int64_t g0 = c0 / esz, gn = (row - c0 < 64 ? row - c0 : 64) / esz; /* groups in this chunk */
        for (int64_t i = 0; i < 16 && i * 4 / esz < gn; i++) {
            if (f16) {
                _mm512_storeu_ps(wsT + (g0 + 2 * i) * 16, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(c[i])));
                if (2 * i + 1 < gn)
                    _mm512_storeu_ps(wsT + (g0 + 2 * i + 1) * 16,
                                     _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(c[i], 16))));
            } else {
                _mm512_storeu_ps(wsT + (g0 + i) * 16, _mm512_castsi512_ps(c[i]));
            }
        }
    }
}

/* The next 16 rows' scales into L2 (the tile after n0's): load_columns prefetches the next tile's weights, and
 * Q6_K's group-16 scales are an eighth of its int8 bytes (q8 at one row, K = 4864, group 16: 0.97x the time
 * from DRAM, 0.92-0.96x from L3; Xeon). */
static inline void prefetch_scales(const void *sc, int64_t f16, int64_t n1, int64_t N, int64_t ng) {
    if (n1 >= N) return;
    const int64_t row = ng * (f16 ? 2 : 4), bytes = (N - n1 < 16 ? N - n1 : 16) * row;
    const char *s = (const char *)sc + n1 * row;
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(s + o, _MM_HINT_T1);
}

/* Rows 0..mb-1 of y (stride N), columns n0..n0+nr-1, from the kernels' 16-lane outputs, plus the bias. */
static inline void store_outputs(const __m512 *out, int64_t mb, const float *bias, float *y, int64_t N, int64_t n0,
                                 int64_t nr) {
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();
    for (int64_t mm = 0; mm < mb; mm++) _mm512_mask_storeu_ps(y + mm * N + n0, keep, _mm512_add_ps(out[mm], b));
}

/* MB rows of x against 16 weight rows; SB = inputs per integer block (32, or 16 for Q6_K's group 16).
 * xc: -128 * each block's sum of x; dxb: each 32-input block's dx; wsT[g * 16 + j]: row j's scale of group g. */
#define DEF_Q8L(MB, SB)                                                                                   \
static void q8l_rows_##MB##_##SB(const int8_t *xq, const float *dxb, const int32_t *xc, int64_t K,       \
                                 const int8_t *w, int64_t nr, const float *wsT, int64_t G, __m512 *out) {  \
    const int64_t nblk = K / (SB), nx = K / 32;                                                          \
    __m512 acc[MB];                                                                                      \
    for (int mm = 0; mm < MB; mm++) acc[mm] = _mm512_setzero_ps();                                       \
    for (int64_t k0 = 0; k0 < K; k0 += 64) {                                                             \
        const int64_t bytes = K - k0 >= 64 ? 64 : 32;                                                    \
        __m512i c[16];                                                                                   \
        load_columns(w + k0, K, k0, nr, bytes, 1, c);                                                    \
        for (int64_t s = 0; s < bytes / (SB); s++) {                                                     \
            const int64_t blk = k0 / (SB) + s, in0 = k0 + s * (SB);                                      \
            const __m512 ws = _mm512_loadu_ps(wsT + in0 / G * 16);                                       \
            for (int mm = 0; mm < MB; mm++) {                                                            \
                const int8_t *xr = xq + mm * K + in0;                                                    \
                __m512i d0 = _mm512_set1_epi32(xc[mm * nblk + blk]), d1 = _mm512_setzero_si512();         \
                for (int i = 0; i < (SB) / 4; i += 2) { /* two chains: shorter latency at 1 row */       \
                    d0 = _mm512_dpbusd_epi32(d0, c[s * (SB) / 4 + i], _mm512_set1_epi32(ld32(xr + 4 * i))); \
                    d1 = _mm512_dpbusd_epi32(d1, c[s * (SB) / 4 + i + 1], _mm512_set1_epi32(ld32(xr + 4 * i + 4))); \
                }                                                                                        \
                const __m512 sc = _mm512_mul_ps(ws, _mm512_set1_ps(dxb[mm * nx + in0 / 32]));            \
                acc[mm] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)), sc, acc[mm]);      \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    for (int mm = 0; mm < MB; mm++) out[mm] = acc[mm];                                                   \
}
DEF_Q8L(1, 32)
DEF_Q8L(2, 32)
DEF_Q8L(4, 32)
DEF_Q8L(8, 32)
DEF_Q8L(1, 16)
DEF_Q8L(2, 16)
DEF_Q8L(4, 16)
DEF_Q8L(8, 16)

static void q8l_rows(int64_t mb, int64_t sb, const int8_t *xq, const float *dxb, const int32_t *xc, int64_t K,
                     const int8_t *w, int64_t nr, const float *wsT, int64_t G, __m512 *out) {
    if (sb == 16) {
        switch (mb) {
            case 8: q8l_rows_8_16(xq, dxb, xc, K, w, nr, wsT, G, out); return;
            case 4: q8l_rows_4_16(xq, dxb, xc, K, w, nr, wsT, G, out); return;
            case 2: q8l_rows_2_16(xq, dxb, xc, K, w, nr, wsT, G, out); return;
            default: q8l_rows_1_16(xq, dxb, xc, K, w, nr, wsT, G, out); return;
        }
    }
    switch (mb) {
        case 8: q8l_rows_8_32(xq, dxb, xc, K, w, nr, wsT, G, out); return;
        case 4: q8l_rows_4_32(xq, dxb, xc, K, w, nr, wsT, G, out); return;
        case 2: q8l_rows_2_32(xq, dxb, xc, K, w, nr, wsT, G, out); return;
        default: q8l_rows_1_32(xq, dxb, xc, K, w, nr, wsT, G, out); return;
    }
}

/* y = x @ W^T for q8 W [N, K] (K % 32 == 0; group 16, 32 or a multiple of 32), x quantized per 32-block. */
void q8v_matmul(const float *x, int64_t M, int64_t K, const int8_t *qw, const void *sc, int64_t f16,
                int64_t N, int64_t G, const float *bias, float *y) {
    const int64_t sb = G < 32 ? 16 : 32, nblk = K / sb, nx = K / 32, ng = K / G;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *dxb = (float *)malloc(sizeof(float) * (size_t)(M * nx));
    int32_t *xc = (int32_t *)malloc(sizeof(int32_t) * (size_t)(M * nblk));
    for (int64_t m = 0; m < M; m++) {
        quant_row(x + m * K, K, 0, xq + m * K, NULL, dxb + m * nx, 1);
        for (int64_t b = 0; b < nblk; b++) {
            int32_t t = 0;
            for (int64_t j = 0; j < sb; j++) t += xq[m * K + b * sb + j];
            xc[m * nblk + b] = -128 * t;
        }
    }
    #pragma omp parallel
    {
        float *wsT = (float *)malloc(sizeof(float) * (size_t)(16 * ng));
        #pragma omp for schedule(guided)
        for (int64_t n0 = 0; n0 < N; n0 += 16) {
            const int64_t nr = N - n0 < 16 ? N - n0 : 16;
            transpose_scales(sc, f16, n0, nr, ng, wsT);
            prefetch_scales(sc, f16, n0 + 16, N, ng);
            for (int64_t m0 = 0, mb; m0 < M; m0 += mb) {
                mb = chunk(M - m0);
                __m512 out[8];
                q8l_rows(mb, sb, xq + m0 * K, dxb + m0 * nx, xc + m0 * nblk, K, qw + n0 * K, nr, wsT, G, out);
                store_outputs(out, mb, bias, y + m0 * N, N, n0, nr);
            }
        }
        free(wsT);
    }
    free(xq);
    free(dxb);
    free(xc);
}

/* q5's high bits onto the 16 rows' nibble columns of one block: lo[i] / hi[i] (lane j: row j's low / high
 * nibbles of bytes 4i..4i+3, i.e. inputs 4i + t and 16 + 4i + t) get 16 where bit 4i + t / 16 + 4i + t of row
 * j's word is set. A byte shuffle spreads the word's byte that holds those bits over the lane's 4 bytes, a
 * test picks each byte's bit. Rows past nr read no memory (their words are 0). */
static inline void add_high_bits(const uint32_t *qh, int64_t words, int64_t blk, int64_t nr, __m512i *lo, __m512i *hi) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)words));
    const __m512i h = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), (__mmask16)((1u << nr) - 1), rows,
                                                  (const void *)(qh + blk), 4);
    const __m512i dword = _mm512_set4_epi32(0x0c0c0c0c, 0x08080808, 0x04040404, 0);
    const __m512i sixteen = _mm512_set1_epi8(16);
    for (int i = 0; i < 4; i++) {
        const __m512i sel = _mm512_set1_epi32(i % 2 ? (int)0x80402010 : 0x08040201);
        const __m512i lob = _mm512_shuffle_epi8(h, _mm512_add_epi8(dword, _mm512_set1_epi8((char)(i / 2))));
        const __m512i hib = _mm512_shuffle_epi8(h, _mm512_add_epi8(dword, _mm512_set1_epi8((char)(2 + i / 2))));
        lo[i] = _mm512_mask_add_epi8(lo[i], _mm512_test_epi8_mask(lob, sel), lo[i], sixteen);
        hi[i] = _mm512_mask_add_epi8(hi[i], _mm512_test_epi8_mask(hib, sel), hi[i], sixteen);
    }
}

/* q4 (byte j of a 32-input block: input j in the low nibble, j + 16 in the high one): the columns' nibbles
 * are the unsigned operands as they are (q5: with add_high_bits); x in quant_row's q4 layout (xlo/xhi: each
 * block's first and last 16 inputs). dxv: q4 layout (each block's dx 4 times); xsum[g]: group g's sum of the rounded x times dx, for
 * the min term, added per group after the blocks. */
#define DEF_Q4L(MB)                                                                                       \
static void q4l_rows_##MB(const int8_t *xlo, const int8_t *xhi, const float *dxv, const float *xsum,     \
                          int64_t K, const uint8_t *w, const uint32_t *qh, int64_t nr, const float *wsT, \
                          const float *mnT, int64_t G, __m512 *out) {                                    \
    const int64_t kb = K / 2, ng = K / G;                                                                \
    const __m512i m4 = _mm512_set1_epi8(15);                                                             \
    __m512 acc[MB];                                                                                      \
    for (int mm = 0; mm < MB; mm++) acc[mm] = _mm512_setzero_ps();                                       \
    for (int64_t b0 = 0; b0 < kb; b0 += 64) {                                                            \
        const int64_t bytes = kb - b0 >= 64 ? 64 : 32;                                                   \
        __m512i c[16];                                                                                   \
        load_columns((const int8_t *)w + b0, kb, b0, nr, bytes, 0, c);                                   \
        for (int64_t s = 0; s < bytes / 16; s++) {                                                       \
            const int64_t blk = b0 / 16 + s;                                                             \
            __m512i lo[4], hi[4];                                                                        \
            for (int i = 0; i < 4; i++) {                                                                \
                lo[i] = _mm512_and_si512(c[4 * s + i], m4);                                              \
                hi[i] = _mm512_and_si512(_mm512_srli_epi16(c[4 * s + i], 4), m4);                        \
            }                                                                                            \
            if (qh) add_high_bits(qh, K / 32, blk, nr, lo, hi);                                          \
            const __m512 ws = _mm512_loadu_ps(wsT + blk * 32 / G * 16);                                  \
            for (int mm = 0; mm < MB; mm++) {                                                            \
                const int8_t *xl = xlo + mm * kb + blk * 16, *xh = xhi + mm * kb + blk * 16;             \
                __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();                        \
                for (int i = 0; i < 4; i++) {                                                            \
                    d0 = _mm512_dpbusd_epi32(d0, lo[i], _mm512_set1_epi32(ld32(xl + 4 * i)));            \
                    d1 = _mm512_dpbusd_epi32(d1, hi[i], _mm512_set1_epi32(ld32(xh + 4 * i)));            \
                }                                                                                        \
                const __m512 sc = _mm512_mul_ps(ws, _mm512_set1_ps(dxv[mm * (K / 8) + blk * 4]));        \
                acc[mm] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)), sc, acc[mm]);      \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    for (int64_t g = 0; g < ng; g++) {                                                                   \
        const __m512 mv = _mm512_loadu_ps(mnT + g * 16);                                                 \
        for (int mm = 0; mm < MB; mm++) acc[mm] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[mm * ng + g]), acc[mm]); \
    }                                                                                                    \
    for (int mm = 0; mm < MB; mm++) out[mm] = acc[mm];                                                   \
}
DEF_Q4L(1)
DEF_Q4L(2)
DEF_Q4L(4)
DEF_Q4L(8)

#include "q4_one_row.h" /* q4v_one_row_matmul: M == 1 */

/* y = x @ W^T for q4 / q5 W [N, K / 2 bytes] (K % 64 == 0; group 32, 64 or a multiple of 128). */
void q4v_matmul(const float *x, int64_t M, int64_t K, const uint8_t *qw, const uint32_t *qh, const void *sc,
                const void *mn, int64_t f16, int64_t N, int64_t G, const float *bias, float *y) {
    const int64_t ng = K / G, kb = K / 2;
    int8_t *xlo = (int8_t *)malloc((size_t)(M * K)), *xhi = xlo + M * kb;
    float *dxv = (float *)malloc(sizeof(float) * (size_t)(M * K / 8 + M * ng));
    float *xsum = dxv + M * K / 8;
    for (int64_t m = 0; m < M; m++) quant_row_q4(x + m * K, K, G, xlo + m * kb, xhi + m * kb, dxv + m * K / 8, xsum + m * ng);
    if (M == 1) {
        q4v_one_row_matmul(xlo, xhi, dxv, xsum, K, qw, qh, sc, mn, f16, N, G, bias, y);
    } else {
        #pragma omp parallel
        {
            float *wsT = (float *)malloc(sizeof(float) * (size_t)(32 * ng)), *mnT = wsT + 16 * ng;
            #pragma omp for schedule(guided)
            for (int64_t n0 = 0; n0 < N; n0 += 16) {
                const int64_t nr = N - n0 < 16 ? N - n0 : 16;
                transpose_scales(sc, f16, n0, nr, ng, wsT);
                transpose_scales(mn, f16, n0, nr, ng, mnT);
                for (int64_t m0 = 0, mb; m0 < M; m0 += mb) {
                    mb = chunk(M - m0);
                    const int8_t *lo = xlo + m0 * kb, *hi = xhi + m0 * kb;
                    const float *dv = dxv + m0 * K / 8, *xs = xsum + m0 * ng;
                    const uint8_t *w = qw + n0 * kb;
                    const uint32_t *h = qh ? qh + n0 * (K / 32) : NULL;
                    __m512 out[8];
                    switch (mb) {
                        case 8: q4l_rows_8(lo, hi, dv, xs, K, w, h, nr, wsT, mnT, G, out); break;
                        case 4: q4l_rows_4(lo, hi, dv, xs, K, w, h, nr, wsT, mnT, G, out); break;
                        case 2: q4l_rows_2(lo, hi, dv, xs, K, w, h, nr, wsT, mnT, G, out); break;
                        default: q4l_rows_1(lo, hi, dv, xs, K, w, h, nr, wsT, mnT, G, out); break;
                    }
                    store_outputs(out, mb, bias, y + m0 * N, N, n0, nr);
                }
            }
            free(wsT);
        }
    }
    free(xlo);
    free(dxv);
}
