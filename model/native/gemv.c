/* y = x · wᵀ (+ r) for a few rows of bf16 activations: the decode step's projections.

   x (M, K), w (N, K), r and y (M, N), all bf16 stored as uint16 and row-major; any K and N.
   Each output is a float32 dot product (AVX512-BF16 vdpbf16ps: pairs of bf16 products added
   into float32 lanes), plus r in float32, rounded once to bf16 (round to nearest even, as torch).

   Why: for one to a few rows the product is a matrix-vector one, bound by reading w once; the
   library GEMM measured ~3× below that on some CPUs. Output channels are split between the
   OpenMP threads (torch's own runtime: libgomp is shared by soname); each thread streams its
   rows of w once for all M rows of x. A row's result does not depend on M (batch invariant). */

#include <immintrin.h>
#include <stdint.h>

#define NB 8 /* output channels per block, stored together */

static inline float dot(const uint16_t *x, const uint16_t *w, long K) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();   /* two chains: vdpbf16ps latency */
    long k = 0;
    for (; k + 64 <= K; k += 64) {
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
        b = _mm512_dpbf16_ps(b, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    for (; k < K; k += 32) { /* the last K % 64: masked loads read nothing past the row */
        __mmask32 m = K - k >= 32 ? (__mmask32)~0u : (__mmask32)((1u << (K - k)) - 1);
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi16(m, w + k), (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}

void bf16_gemv(const uint16_t *restrict x, const uint16_t *restrict w, const uint16_t *restrict r,
               uint16_t *restrict y, long M, long N, long K) {
    #pragma omp parallel for schedule(static)
    for (long n0 = 0; n0 < N; n0 += NB) {
        const int nb = N - n0 < NB ? (int)(N - n0) : NB;
        const __mmask16 valid = (__mmask16)((1u << nb) - 1);
        for (long m = 0; m < M; m++) {
            float out[16] __attribute__((aligned(64))) = {0};
            for (int j = 0; j < nb; j++)
                out[j] = dot(x + m * K, w + (n0 + j) * K, K);
            __m512 v = _mm512_load_ps(out);
            if (r) { /* bf16 → float32 is a 16-bit shift */
                __m256i rb = _mm256_maskz_loadu_epi16(valid, r + m * N + n0);
                v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rb), 16)));
            }
            _mm256_mask_storeu_epi16(y + m * N + n0, valid, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}
