/* The arithmetic the decode kernels share (gemv.c, attention.c, decode.c), inlined into each.

   Numbers: bf16 stored as uint16_t; every dot product accumulates in float32 (the int8 one in
   int32, then float32) and is rounded once to bf16 (round to nearest even, as torch), so a row's
   result does not depend on the other rows of its batch. */

#ifndef ATTNSERVE_KERNELS_H
#define ATTNSERVE_KERNELS_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define NB 8      /* output channels per block of the bf16 matrix-vector product */
#define NB8 8     /* … of the int8 one */

static inline float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_bf16(float f) { /* round to nearest even (inputs here are finite) */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static inline __m512 load_bf16x16(const uint16_t *p) { /* 16 bf16 → 16 float32: a 16-bit shift */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 round_bf16(__m512 v) { /* to the nearest bf16 (even), kept as float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

static inline __m512 load_bf16x16_masked(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* e^x for 16 floats: x = n ln2 + r (|r| ≤ ln2 / 2, ln2 in two parts), e^r by its degree-6 Taylor
   polynomial (relative error < 2.3e-7 over [-87, 88], measured), times 2^n; x below -87 is taken as
   -87 (e^-87 ≈ 1.6e-38). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The fused step's activations are bf16, or float32 for a float32 model (f32): 16 of them as
   float32, and back (bf16: rounded to nearest even). */
static inline __m512 act_load(const void *p, long i, int f32) {
    return f32 ? _mm512_loadu_ps((const float *)p + i) : load_bf16x16((const uint16_t *)p + i);
}

static inline void act_store(void *p, long i, __m512 v, int f32) {
    if (f32)
        _mm512_storeu_ps((float *)p + i, v);
    else
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __m512 act_round(__m512 v, int f32) { return f32 ? v : round_bf16(v); }

static inline __mmask16 tail16(long left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

/* Σ_k x[k] w[k] over K bf16 pairs, in float32 (vdpbf16ps: pairs of bf16 products into float32). */
static inline float dot_bf16(const uint16_t *x, const uint16_t *w, long K) {
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

/* y[m, n] = x[m] · w[n] (+ r[m, n]) for the NB (or fewer, at the end) channels from n0, all M rows:
   w (N, K) bf16 row-major, x (M, K), r and y (M, N). */
static inline void bf16_block(const uint16_t *x, const uint16_t *w, const uint16_t *r, uint16_t *y,
                              long M, long N, long K, long n0) {
    const int nb = N - n0 < NB ? (int)(N - n0) : NB;
    for (long m = 0; m < M; m++)
        for (int j = 0; j < nb; j++) {
            float v = dot_bf16(x + m * K, w + (n0 + j) * K, K);
            if (r)
                v += bf16_f32(r[m * N + n0 + j]);
            y[m * N + n0 + j] = f32_bf16(v);
        }
}

/* Activations for the int8 kernel: each bf16 row of x (M, K) as 16-bit fixed point, xq = round(x / s)
   with s = max |x| / 32767 per row (xs[m] = s). The error, ≤ s / 2 per element, is 2^-16 of the
   row's largest activation: ~128× below the bf16 rounding every projection's output gets. */
static inline void fixed16_row(const uint16_t *x, int16_t *xq, float *xs, long K) {
    __m512 top = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 16)
        top = _mm512_max_ps(top, _mm512_abs_ps(load_bf16x16_masked(x + k, tail16(K - k))));
    const float big = _mm512_reduce_max_ps(top), scale = big > 0 ? big / 32767.0f : 1.0f;
    const __m512 inv = _mm512_set1_ps(1.0f / scale);
    for (long k = 0; k < K; k += 16) {
        const __mmask16 m = tail16(K - k);
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load_bf16x16_masked(x + k, m), inv));
        _mm256_mask_storeu_epi16(xq + k, m, _mm512_cvtsepi32_epi16(v));
    }
    *xs = scale;
}

/* The int8 weight-only product for MB rows from m0 and NJ channels from n0 (MB · NJ ≤ 16 int32
   accumulators): y[m, n] = scale[n] · xs[m] · Σ_k xq[m, k] q[n, k] (+ r[m, n]), q (N, K) int8,
   scales (N,) bf16, xq/xs the activations (fixed16_row). AVX512-VNNI vpdpwssd: pairs of 16-bit
   products summed exactly into int32 lanes, in runs of at most 4096 per lane (no overflow), then
   float32. Channels past N and rows past M are computed on a stand-in and dropped. */
static inline __attribute__((always_inline)) void int8_block(
        const int16_t *xq, const float *xs, const int8_t *q, const uint16_t *scales, const uint16_t *r,
        uint16_t *y, long M, long N, long K, long m0, long n0, const int MB, const int NJ) {
    const int8_t *wp[NB8];
    const int16_t *xp[4];
    for (int j = 0; j < NJ; j++)
        wp[j] = q + (n0 + j < N ? n0 + j : n0) * K;
    for (int i = 0; i < MB; i++)
        xp[i] = xq + (m0 + i < M ? m0 + i : m0) * K;
    __m512 total[4][NB8];
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NJ; j++)
            total[i][j] = _mm512_setzero_ps();
    for (long k0 = 0; k0 < K; k0 += 4096) {
        const long k1 = K - k0 < 4096 ? K : k0 + 4096;
        __m512i acc[4][NB8];
        for (int i = 0; i < MB; i++)
            for (int j = 0; j < NJ; j++)
                acc[i][j] = _mm512_setzero_si512();
        long k = k0;
        for (; k + 32 <= k1; k += 32) {
            __m512i w[NB8];
            if (k % 64 == 0)        /* the same line of the next block's rows: the next 4 KB page for K = 512 */
                for (int j = 0; j < NJ; j++)
                    _mm_prefetch((const char *)(wp[j] + k + NJ * K), _MM_HINT_T0);
            for (int j = 0; j < NJ; j++)
                w[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wp[j] + k)));
            for (int i = 0; i < MB; i++) {
                const __m512i xv = _mm512_loadu_si512(xp[i] + k);
                for (int j = 0; j < NJ; j++)
                    acc[i][j] = _mm512_dpwssd_epi32(acc[i][j], w[j], xv);
            }
        }
        if (k < k1) {                                  /* the last K % 32, masked */
            const __mmask32 m = (__mmask32)((1u << (k1 - k)) - 1);
            for (int j = 0; j < NJ; j++) {
                const __m512i w = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, wp[j] + k));
                for (int i = 0; i < MB; i++)
                    acc[i][j] = _mm512_dpwssd_epi32(acc[i][j], w, _mm512_maskz_loadu_epi16(m, xp[i] + k));
            }
        }
        for (int i = 0; i < MB; i++)
            for (int j = 0; j < NJ; j++)
                total[i][j] = _mm512_add_ps(total[i][j], _mm512_cvtepi32_ps(acc[i][j]));
    }
    for (int i = 0; i < MB && m0 + i < M; i++)
        for (int j = 0; j < NJ && n0 + j < N; j++) {
            const long o = (m0 + i) * N + n0 + j;
            float v = _mm512_reduce_add_ps(total[i][j]) * xs[m0 + i] * bf16_f32(scales[n0 + j]);
            if (r)
                v += bf16_f32(r[o]);
            y[o] = f32_bf16(v);
        }
}

/* All M rows of NB8 channels from n0: blocks of 4 rows (two halves of the channels), then 2 and 1. */
static inline void int8_channels(const int16_t *xq, const float *xs, const int8_t *q, const uint16_t *scales,
                                 const uint16_t *r, uint16_t *y, long M, long N, long K, long n0) {
    long m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) {
        int8_block(xq, xs, q, scales, r, y, M, N, K, m0, n0, 4, NB8 / 2);
        if (n0 + NB8 / 2 < N)
            int8_block(xq, xs, q, scales, r, y, M, N, K, m0, n0 + NB8 / 2, 4, NB8 / 2);
    }
    if (M - m0 >= 2) {
        int8_block(xq, xs, q, scales, r, y, M, N, K, m0, n0, 2, NB8);
        m0 += 2;
    }
    if (m0 < M)
        int8_block(xq, xs, q, scales, r, y, M, N, K, m0, n0, 1, NB8);
}

/* One query (hs elements, bf16 or with f32 float32) against n cached keys and values (positions hs
   apart), GQA-agnostic: scores q·k / √hs, softmax and the mix of the values in float32
   (model/attention.py's explicit path), out in the query's dtype. p: n floats of scratch;
   weights (n floats) gets the probabilities where not NULL. hs must be a multiple of 32. */
static inline void attend(const void *q, const void *k, const void *v, long n, long hs, float *p, void *out,
                          float *weights, int f32) {
    const float scale = 1.0f / sqrtf((float)hs);
    float top = -INFINITY;
    for (long s = 0; s < n; s++) {
        __m512 acc = _mm512_setzero_ps();
        if (f32)
            for (long d = 0; d < hs; d += 16)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps((const float *)k + s * hs + d), _mm512_loadu_ps((const float *)q + d), acc);
        else
            for (long d = 0; d < hs; d += 32)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const uint16_t *)k + s * hs + d),
                                       (__m512bh)_mm512_loadu_si512((const uint16_t *)q + d));
        p[s] = _mm512_reduce_add_ps(acc) * scale;
        top = p[s] > top ? p[s] : top;
    }
    __m512 sum = _mm512_setzero_ps();
    for (long s = 0; s < n; s += 16) {
        const __mmask16 m = tail16(n - s);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + s), _mm512_set1_ps(top)));
        _mm512_mask_storeu_ps(p + s, m, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(sum);
    for (long d = 0; d < hs; d += 16) {          /* out[d:d+16] = Σ_s p[s] · v[s, d:d+16] / total */
        __m512 acc = _mm512_setzero_ps();
        for (long s = 0; s < n; s++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(p[s]), act_load(v, s * hs + d, f32), acc);
        act_store(out, d, _mm512_mul_ps(acc, _mm512_set1_ps(inv)), f32);
    }
    if (weights)
        for (long s = 0; s < n; s++)
            weights[s] = p[s] * inv;
}

#endif
