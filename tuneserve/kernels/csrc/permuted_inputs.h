/* Shared by qmatmul.c and qmatmul_vnni.c: matmuls whose inputs are permuted and/or scaled first,
 * x'[k] = x[perm[k]] * iscale[perm[k]] (GPTQ act-order, AWQ scales the model could not fold); perm or
 * iscale may be NULL. DEF_PERMUTED_MATMULS(Q4, Q8) defines Q4##_px and Q8##_px over the file's
 * own 4-bit and 8-bit matmuls Q4 and Q8. */
#ifndef TUNESERVE_PERMUTED_INPUTS_H
#define TUNESERVE_PERMUTED_INPUTS_H

#include <stdint.h>
#include <stdlib.h>

static float *prep_x(const float *x, int64_t M, int64_t K, const int64_t *perm, const float *is) {
    float *xp = (float *)malloc(sizeof(float) * (size_t)(M * K));
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) {
            const int64_t j = perm ? perm[k] : k;
            xp[m * K + k] = x[m * K + j] * (is ? is[j] : 1.f);
        }
    return xp;
}

#define DEF_PERMUTED_MATMULS(Q4, Q8)                                                                           \
void Q4##_px(const float *x, int64_t M, int64_t K, const uint8_t *qw, const uint32_t *qh, const void *sc, \
                    const void *mn, int64_t f16, int64_t N, int64_t G, const float *bias,                 \
                    const int64_t *perm, const float *is, float *y) {                                     \
    float *xp = prep_x(x, M, K, perm, is);                                                                \
    Q4(xp, M, K, qw, qh, sc, mn, f16, N, G, bias, y);                                                     \
    free(xp);                                                                                             \
}                                                                                                         \
void Q8##_px(const float *x, int64_t M, int64_t K, const int8_t *qw, const void *sc, int64_t f16,  \
                    int64_t N, int64_t G, const float *bias, const int64_t *perm, const float *is,        \
                    float *y) {                                                                           \
    float *xp = prep_x(x, M, K, perm, is);                                                                \
    Q8(xp, M, K, qw, sc, f16, N, G, bias, y);                                                    \
    free(xp);                                                                                             \
}

#endif
