/* act(gate) * up for a gated MLP whose gate|up matmul gave bf16 rows, or fp32 ones (the AMX GEMM's exact
 * sums; models/layers.py, GatedMLP): each value is widened to fp32, act and the product are computed in fp32,
 * and the result is rounded to bf16 once, as the fp32 path rounds it for the down matmul's bf16 tiles. One
 * pass over the bytes instead of torch's separate act and multiply, each of which would round to bf16 again
 * (bf16 ops) or write fp32 (fp32 ops).
 *   gu: (M, 2I) bf16 (gated_act_bf16) or fp32 (gated_act_f32), gate then up per row; out: (M, I) bf16;
 *   act 0: silu, 1: gelu (tanh approximation).
 * expf / tanhf vectorize through glibc's vector math library (-O3 -ffast-math). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16_rows.h"  /* f2bf */

static inline float bf2f(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* GATED_ACT(NAME, IN_T, LOAD): the pass over rows of IN_T (bf16 or fp32 sums of the gate|up matmul) */
#define GATED_ACT(NAME, IN_T, LOAD)                                                                       \
void NAME(const IN_T *gu, int64_t M, int64_t I, int64_t act, uint16_t *out) {                              \
    _Pragma("omp parallel for schedule(static)")                                                          \
    for (int64_t m = 0; m < M; m++) {                                                                    \
        const IN_T *g = gu + m * 2 * I, *u = g + I;                                                      \
        uint16_t *o = out + m * I;                                                                       \
        if (act == 0) {                                                                                  \
            _Pragma("omp simd")                                                                           \
            for (int64_t i = 0; i < I; i++) {                                                            \
                const float x = LOAD(g[i]);                                                              \
                o[i] = f2bf(x / (1.f + expf(-x)) * LOAD(u[i]));                                          \
            }                                                                                            \
        } else {                                                                                         \
            _Pragma("omp simd")                                                                           \
            for (int64_t i = 0; i < I; i++) {                                                            \
                const float x = LOAD(g[i]);                                                              \
                const float t = tanhf(0.7978845608f * (x + 0.044715f * x * x * x));                      \
                o[i] = f2bf(0.5f * x * (1.f + t) * LOAD(u[i]));                                          \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
}
#define AS_F32(v) (v)
GATED_ACT(gated_act_bf16, uint16_t, bf2f)
GATED_ACT(gated_act_f32, float, AS_F32)
