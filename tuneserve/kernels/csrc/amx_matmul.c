/* y = x W^T (+ bias) on AMX tiles, W packed q4 / q5 / q8 (qmatmul.c's formats), x bf16 (M, K), y fp32 or bf16.
 *
 * The bf16 tile path without the tiles: torch's bf16 GEMM (oneDNN) is handed a dequantized (N, K) matrix and
 * reorders it into its own blocked layout on every call, which made it run at ~2/3 of what it reaches on a
 * (K, N) matrix (Qwen2.5 gate|up at 512 rows, Xeon with AMX: 9.8 against 6.4 ms). Here each thread takes a
 * panel of output features (32 to 256), dequantizes it (bf16_rows.h) straight into the layout the AMX B
 * operand wants, in a buffer that stays in its L2 cache, and multiplies every row of x by it: the weights are
 * read once, never written out at full size, never reordered by a library.
 *
 * AMX: TDPBF16PS C[16 x 16] += A[16 x 32] . B, fp32 accumulation; A is 16 rows of x (32 inputs each, read
 * in place); B holds 32 inputs of 16 features as 16 rows of input pairs ("VNNI" layout: row r = inputs
 * 2r, 2r+1 of feature 0, then of feature 1, ...). Two A and two B tiles make four C tiles: 32 rows by 32
 * features per pass over K; a panel (panel_features) is several such pairs of B groups. Same products as
 * the GEMM on bf16 tiles, fp32 sums in another order.
 * Needs AMX-TILE, AMX-BF16 and AVX-512 BF16 in the build (-march=native) and the kernel's permission to
 * use the tile data (Linux >= 5.16, arch_prctl); amx_available() says whether both hold.
 * Shapes: K % 32 == 0 (the q4 / q8 group rules of qmatmul.c), N % 16 == 0.
 */
#define _GNU_SOURCE  /* syscall() */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_rows.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(HAVE_BF16_ROWS) && defined(__linux__)
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int amx_available(void) {
    static int ok = -1;
    if (ok < 0) ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return ok;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* tiles 0-3: C (16 x 16 fp32), 4-5: A (16 rows x 32 bf16), 6-7: B (16 rows x 16 pairs): all 16 x 64 bytes */
static void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

typedef struct {
    const void *qw, *sc, *mn;  /* mn NULL: q8 */
    const uint32_t *qh;        /* q5's high bits, or NULL */
    int64_t f16, K, G;
} packed_matrix;

/* r[i] = column i of the 16 x 16 matrix of 32-bit lanes whose row j was r[j] */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

/* Features n0 .. n0 + 15 as one B operand per 32 inputs: dequantize the 16 rows (rows: 16 x K bf16),
 * then transpose each 32-input block's 16 x 16 input pairs (vnni: K / 32 tiles of 16 x 32 bf16). */
static void dequant_b(const packed_matrix *w, int64_t n0, uint16_t *rows, uint16_t *vnni) {
    const int64_t K = w->K, ng = K / w->G;
    for (int r = 0; r < 16; r++) {
        const int64_t n = n0 + r;
        if (w->mn)
            q4_row_bf16((const uint8_t *)w->qw + n * (K / 2), w->qh ? w->qh + n * (K / 32) : NULL, w->sc, w->mn,
                        w->f16, K, w->G, n * ng, rows + r * K);
        else
            q8_row_bf16((const int8_t *)w->qw + n * K, w->sc, w->f16, K, w->G, n * ng, rows + r * K);
    }
    for (int64_t k = 0; k < K; k += 32) {
        __m512i r[16];
        for (int j = 0; j < 16; j++) r[j] = _mm512_loadu_si512(rows + j * K + k);
        transpose16(r);
        for (int p = 0; p < 16; p++) _mm512_store_si512(vnni + k * 16 + p * 32, r[p]);
    }
}

/* The 32 x 32 (or 32 x 16: nb == 1) fp32 block of 32 rows of x (K apart) times B groups b0, b1 into acc. */
static void block(const uint16_t *x, int64_t K, const uint16_t *b0, const uint16_t *b1, int nb, float *acc) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int64_t stride = K * 2;
    for (int64_t k = 0; k < K; k += 32) {
        _tile_loadd(4, x + k, stride);
        _tile_loadd(5, x + 16 * K + k, stride);
        _tile_loadd(6, b0 + k * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (nb == 2) {
            _tile_loadd(7, b1 + k * 16, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, acc, 128);
    _tile_stored(2, acc + 16 * 32, 128);
    if (nb == 2) {
        _tile_stored(1, acc + 16, 128);
        _tile_stored(3, acc + 16 * 32 + 16, 128);
    }
}

/* rows x cols (cols 16 or 32) of acc (+ bias) into y's columns n0 .. n0 + cols - 1 */
static void store(const float *acc, int64_t rows, int cols, const float *bias, int64_t n0, int64_t N,
                  int out_bf16, void *y, int64_t m0) {
    for (int64_t i = 0; i < rows; i++)
        for (int j = 0; j < cols; j += 16) {
            __m512 v = _mm512_loadu_ps(acc + i * 32 + j);
            if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n0 + j));
            const int64_t at = (m0 + i) * N + n0 + j;
            if (out_bf16)
                st_bf16((uint16_t *)y + at, v);
            else
                _mm512_storeu_ps((float *)y + at, v);
        }
}

/* Features per panel: as many as fit PANEL_BYTES of bf16 (each block of x is read once per panel, from
 * L3 or memory; the panel itself is re-read from L2 for every block), 32 to 256, and at least 4 panels per
 * thread. Qwen2.5 shapes at 512 rows, against panels of 64: gate|up (K = 896: 256 features) 1.2x, down
 * (K = 4864: 64) the same; 128 at K = 4864 was 1.1x slower (the panel, 1.2 MB, no longer stays in L2). */
#define PANEL_BYTES (640 * 1024)
static int64_t panel_features(int64_t K, int64_t N) {
    int64_t p = PANEL_BYTES / (2 * K) / 32 * 32;
    const int64_t spread = N / (4 * omp_get_max_threads()) / 32 * 32;
    p = p < spread ? p : spread;
    return p < 32 ? 32 : p > 256 ? 256 : p;
}

static void amx_matmul(const uint16_t *x, int64_t M, const packed_matrix *w, int64_t N, const float *bias,
                       int out_bf16, void *y) {
    const int64_t K = w->K, full = M / 32 * 32;
    uint16_t *tail = NULL;  /* the last M % 32 rows of x, zero-padded to 32 */
    if (full < M) {
        tail = (uint16_t *)calloc((size_t)(32 * K), sizeof(uint16_t));
        memcpy(tail, x + full * K, (size_t)((M - full) * K) * sizeof(uint16_t));
    }
    const int64_t panel = panel_features(K, N);
    #pragma omp parallel
    {
        configure_tiles();
        uint16_t *rows = (uint16_t *)malloc((size_t)(16 * K) * sizeof(uint16_t));
        uint16_t *vnni = (uint16_t *)aligned_alloc(64, (size_t)(panel * K) * sizeof(uint16_t));
        float acc[32 * 32];
        #pragma omp for schedule(dynamic, 1)
        for (int64_t n0 = 0; n0 < N; n0 += panel) {
            const int groups = (int)((N - n0 < panel ? N - n0 : panel) / 16);
            for (int g = 0; g < groups; g++) dequant_b(w, n0 + 16 * g, rows, vnni + g * 16 * K);
            for (int64_t m0 = 0; m0 < M; m0 += 32) {
                const uint16_t *a = m0 < full ? x + m0 * K : tail;
                for (int g = 0; g < groups; g += 2) {
                    const int nb = groups - g >= 2 ? 2 : 1;
                    block(a, K, vnni + g * 16 * K, vnni + (g + 1) * 16 * K, nb, acc);
                    store(acc, m0 < full ? 32 : M - full, 16 * nb, bias, n0 + 16 * g, N, out_bf16, y, m0);
                }
            }
        }
        free(rows);
        free(vnni);
        _tile_release();
    }
    free(tail);
}

void q4_amx_matmul(const uint16_t *x, int64_t M, int64_t K, const uint8_t *qw, const uint32_t *qh, const void *sc,
                   const void *mn, int64_t f16, int64_t N, int64_t G, const float *bias, int64_t out_bf16, void *y) {
    const packed_matrix w = {qw, sc, mn, qh, f16, K, G};
    amx_matmul(x, M, &w, N, bias, (int)out_bf16, y);
}

void q8_amx_matmul(const uint16_t *x, int64_t M, int64_t K, const int8_t *qw, const void *sc, int64_t f16,
                   int64_t N, int64_t G, const float *bias, int64_t out_bf16, void *y) {
    const packed_matrix w = {qw, sc, NULL, NULL, f16, K, G};
    amx_matmul(x, M, &w, N, bias, (int)out_bf16, y);
}

#else
/* Built without AMX: nothing runs here, callers keep torch's GEMM on bf16 tiles. */
int amx_available(void) { return 0; }
void q4_amx_matmul(void) {}
void q8_amx_matmul(void) {}
#endif
