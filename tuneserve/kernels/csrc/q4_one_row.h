/* q4 / q5 matmul at one row of x (AVX-512 VNNI; row_lanes.h includes it after its tile helpers).
 *
 * Same integers and the same float steps per output as q4l_rows_1 (so the same bits), but each weight row is
 * read whole, one after another, prefetched ahead, as one stream instead of 16 interleaved ones: SmolLM2
 * decoding alone took 1.08x the time per token with q4l_rows_1, 0.95x with this (alternating processes, Xeon).
 * Four rows at a time share x's loads and one transposing sum of their lanes; the rows' block dot products go
 * to dots[block * 16 + row] of their tile; then the FMA chains run 16 rows per register, several tiles side by
 * side. Against the kernel before (one row at a time, a chain per tile, scales gathered): 0.81-0.83x the time
 * from L3, 0.94x for Qwen2.5-Coder's batch-1 decode (in-process A/B, Xeon).
 */

/* bytes: the one-row kernels' measured best before the row lanes (2-8 KB all helped) */
enum { ONE_ROW_PF_AHEAD = 8192 };

/* One 64-byte chunk (4 blocks; 2 where `full` is 0) of row r's nibbles against x: 16 int32 lanes, quarter q
 * holding block q's 4 partial dot products. */
static inline __m512i q4_chunk_dots(const uint8_t *qr, const uint32_t *hr, int64_t b0, int full, __m512i xl,
                                    __m512i xh, int64_t pf) {
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512i raw = full ? _mm512_loadu_si512(qr + b0)
                             : _mm512_maskz_loadu_epi8((__mmask64)0xffffffffu, qr + b0);
    _mm_prefetch((const char *)(qr + b0 + pf), _MM_HINT_T0);
    __m512i lo = _mm512_and_si512(raw, m4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
    if (hr) { /* q5: the 2 or 4 blocks' words -> masks of their low halves (lo) and high halves (hi) */
        const __m128i hw = full ? _mm_loadu_si128((const __m128i *)(hr + b0 / 16))
                                : _mm_loadl_epi64((const __m128i *)(hr + b0 / 16));
        const __m128i pk = _mm_shuffle_epi8(hw, _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
        lo = _mm512_mask_add_epi8(lo, (__mmask64)_mm_cvtsi128_si64(pk), lo, _mm512_set1_epi8(16));
        hi = _mm512_mask_add_epi8(hi, (__mmask64)_mm_extract_epi64(pk, 1), hi, _mm512_set1_epi8(16));
    }
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
}

/* dots[blk * 16 + j] = the integer dot product of block blk of weight row j (of nr; 0 past it) with x's. Four rows
 * at a time share x's loads and one transposing sum of their lanes. */
static void q4_tile_dots(const int8_t *xlo, const int8_t *xhi, int64_t K, const uint8_t *w, const uint32_t *qh,
                         int64_t nr, int32_t *dots) {
    const int64_t kb = K / 2, nblk = K / 32;
    /* prefetch distance: whole groups of 4 rows, at least ONE_ROW_PF_AHEAD, so that it runs ahead of the furthest
     * of the 4 rows read together (8 KB past each row's own position was 0.9 KB past the group's frontier at
     * K = 4864, Qwen2.5-Coder's down projection) */
    const int64_t group = 4 * kb, pf = group * ((ONE_ROW_PF_AHEAD + group - 1) / group);
    for (int64_t j = 0; j < 16; j += 4) {
        if (j >= nr) {
            for (int64_t b = 0; b < nblk; b++) _mm_storeu_si128((__m128i *)(dots + b * 16 + j), _mm_setzero_si128());
            continue;
        }
        for (int64_t b0 = 0; b0 < kb; b0 += 64) {
            const int full = kb - b0 >= 64;
            const __mmask64 k = full ? ~(__mmask64)0 : (__mmask64)0xffffffffu;
            const __m512i xl = _mm512_maskz_loadu_epi8(k, xlo + b0), xh = _mm512_maskz_loadu_epi8(k, xhi + b0);
            __m512i d[4];
            for (int64_t r = 0; r < 4; r++) {
                const uint32_t *hr = qh ? qh + (j + r) * nblk : NULL;
                d[r] = j + r < nr ? q4_chunk_dots(w + (j + r) * kb, hr, b0, full, xl, xh, pf) : _mm512_setzero_si512();
            }
            /* sum each quarter's 4 lanes, the 4 rows side by side: quarter q = block b0 / 16 + q, rows j..j+3 */
            const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(d[0], d[1]), _mm512_unpackhi_epi32(d[0], d[1]));
            const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(d[2], d[3]), _mm512_unpackhi_epi32(d[2], d[3]));
            const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
            int32_t *dq = dots + (b0 / 16) * 16 + j;
            _mm_storeu_si128((__m128i *)dq, _mm512_castsi512_si128(u));
            _mm_storeu_si128((__m128i *)(dq + 16), _mm512_extracti32x4_epi32(u, 1));
            if (full) {
                _mm_storeu_si128((__m128i *)(dq + 32), _mm512_extracti32x4_epi32(u, 2));
                _mm_storeu_si128((__m128i *)(dq + 48), _mm512_extracti32x4_epi32(u, 3));
            }
        }
    }
}

/* One row of x against ONE_ROW_TILES tiles of 16 weight rows. The tiles' block dot products come first
 * (q4_tile_dots); then each output's chain of FMAs (a block's, then a group's min term, in order, as
 * q4l_rows_1's) runs for the tiles side by side: one tile's chain alone is 2 x K / 32 dependent FMAs,
 * latency-bound (15% of the kernel's time in L2, Xeon). */
enum { ONE_ROW_TILES = 4 };

static void q4l_one_row(const int8_t *xlo, const int8_t *xhi, const float *dxv, const float *xsum, int64_t K,
                        const uint8_t *w, const uint32_t *qh, int64_t nr, const float *wsT, const float *mnT,
                        int64_t G, int32_t *dots, __m512 *out) {
    const int64_t ng = K / G, nblk = K / 32, nt = (nr + 15) / 16;
    for (int64_t t = 0; t < ONE_ROW_TILES; t++) /* tiles past nr: zeros (their chains run, unstored) */
        q4_tile_dots(xlo, xhi, K, w + t * 16 * (K / 2), qh ? qh + t * 16 * nblk : NULL, nr - 16 * t,
                     dots + t * 16 * nblk);
    __m512 acc[ONE_ROW_TILES];
    for (int t = 0; t < ONE_ROW_TILES; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < nblk; blk++) {
        const __m512 dx = _mm512_set1_ps(dxv[blk * 4]);
        for (int t = 0; t < ONE_ROW_TILES; t++) {
            const __m512 sc = _mm512_mul_ps(_mm512_loadu_ps(wsT + t * 16 * ng + blk * 32 / G * 16), dx);
            const __m512i d = _mm512_loadu_si512(dots + t * 16 * nblk + blk * 16);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[t]);
        }
    }
    for (int64_t g = 0; g < ng; g++)
        for (int t = 0; t < ONE_ROW_TILES; t++)
            acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(mnT + t * 16 * ng + g * 16), _mm512_set1_ps(xsum[g]), acc[t]);
    for (int64_t t = 0; t < nt; t++) out[t] = acc[t];
}

/* q4v_matmul at one row of x: ONE_ROW_TILES tiles of 16 weight rows per step (q4l_one_row). */
static void q4v_one_row_matmul(const int8_t *xlo, const int8_t *xhi, const float *dxv, const float *xsum, int64_t K,
                               const uint8_t *qw, const uint32_t *qh, const void *sc, const void *mn, int64_t f16,
                               int64_t N, int64_t G, const float *bias, float *y) {
    const int64_t ng = K / G, kb = K / 2, nblk = K / 32, step = 16 * ONE_ROW_TILES;
    #pragma omp parallel
    {
        float *wsT = (float *)malloc(sizeof(float) * (size_t)(2 * step * ng)), *mnT = wsT + step * ng;
        int32_t *dots = (int32_t *)malloc(sizeof(int32_t) * (size_t)(step * nblk));
        #pragma omp for schedule(guided)
        for (int64_t n0 = 0; n0 < N; n0 += step) {
            const int64_t nr = N - n0 < step ? N - n0 : step;
            for (int64_t t = 0; t < ONE_ROW_TILES; t++) { /* zeros past nr */
                const int64_t tr = nr - 16 * t < 0 ? 0 : nr - 16 * t < 16 ? nr - 16 * t : 16;
                transpose_scales(sc, f16, n0 + 16 * t, tr, ng, wsT + t * 16 * ng);
                transpose_scales(mn, f16, n0 + 16 * t, tr, ng, mnT + t * 16 * ng);
            }
            __m512 out[ONE_ROW_TILES];
            q4l_one_row(xlo, xhi, dxv, xsum, K, qw + n0 * kb, qh ? qh + n0 * nblk : NULL, nr, wsT, mnT, G, dots, out);
            for (int64_t t = 0; t * 16 < nr; t++)
                store_outputs(out + t, 1, bias, y, N, n0 + 16 * t, nr - 16 * t < 16 ? nr - 16 * t : 16);
        }
        free(wsT);
        free(dots);
    }
}
