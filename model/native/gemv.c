/* y = x · wᵀ (+ r) for a few rows of activations: the decode step's projections, in bf16 or with
   int8 weights (kernels.h has the arithmetic).

   bf16_gemv: x (M, K), w (N, K), r and y (M, N), all bf16 and row-major; any K and N.
   int8_gemv: the same with w int8 (N, K) and per-output-channel bf16 scales (N,): weight-only
   int8, the bf16 activations taken as 16-bit fixed point per row (kernels.h), into xq (M, K) and
   xs (M,).

   Why: for one to a few rows the product is a matrix-vector one, bound by reading w once; the
   library GEMM measured ~3× below that on some CPUs. Output channels are split between the
   OpenMP threads (torch's own runtime: libgomp is shared by soname); each thread streams its
   rows of w once for all M rows of x. */

#include "kernels.h"

void bf16_gemv(const uint16_t *restrict x, const uint16_t *restrict w, const uint16_t *restrict r,
               uint16_t *restrict y, long M, long N, long K) {
    #pragma omp parallel for schedule(static)
    for (long n0 = 0; n0 < N; n0 += NB)
        bf16_block(x, w, r, y, M, N, K, n0);
}

void int8_gemv(const int8_t *restrict q, const uint16_t *restrict scales, const uint16_t *restrict x,
               const uint16_t *restrict r, uint16_t *restrict y, int16_t *restrict xq, float *restrict xs,
               long M, long N, long K) {
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (long m = 0; m < M; m++)
            fixed16_row(x + m * K, xq + m * K, xs + m, K);
        #pragma omp for schedule(static)
        for (long n0 = 0; n0 < N; n0 += NB8)
            int8_channels(xq, xs, q, scales, r, y, M, N, K, n0);
    }
}
