/* bf16 projections on AMX tiles (Sapphire Rapids and later): y (M, N) = x (M, K) · wᵀ (+ r),
   w (N, K) bf16 row-major, for the fused decode step (decode.c) where several rows share each
   weight: one tile multiply takes 16 channels × 32 k against 16 rows, so up to 32 rows cost about
   what one does (measured: the bench model's matrices, 2 threads, 1.06 ms at 1 row, 1.23 at 16,
   1.80 at 32, where the vector kernels take ~1, ~8 and ~16).

   Tiles: C0/C1 (tiles 0, 1) accumulate 16 channels × 16 rows in float32 (rows m0 … m0+31);
   A (tile 2) is 16 channels × 32 k of w, loaded straight from the weights (row stride 2K bytes);
   B0/B1 (tiles 3, 4) are the same 32 k of 16 rows of x, in the tile's pair layout: row r holds
   (x[m][2r], x[m][2r+1]) for each m — made once per projection by `amx_pack`. Products are exact
   in float32 and summed there, as the other kernels do. Needs K % 32 == 0 and N % 16 == 0
   (decode.c checks, per matrix) and the process's permission to use tile data (`amx_init`). */

#ifndef ATTNSERVE_AMX_H
#define ATTNSERVE_AMX_H

#include "kernels.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static inline void amx_configure(void) { /* per thread: 8 tiles of 16 rows × 64 bytes */
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    _tile_loadconfig(&c);
}

/* x (M, K) bf16 → xt: for each k-block of 32 and block of 16 rows, 16 tile rows of 16 (k, k+1)
   pairs; rows past M are zeros. A 16 × 16 transpose of 32-bit pairs, by gathers. */
static inline void amx_pack(const uint16_t *x, uint16_t *xt, long M, long K) {
    const long mblocks = (M + 15) / 16;
    #pragma omp for schedule(static)
    for (long kb = 0; kb < K / 32; kb++)
        for (long mb = 0; mb < mblocks; mb++) {
            const long rows = M - 16 * mb < 16 ? M - 16 * mb : 16;
            const __mmask16 live = (__mmask16)((1u << rows) - 1);
            const __m512i index = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                     _mm512_set1_epi32((int)(K / 2)));
            const int *base = (const int *)(x + 16 * mb * K + 32 * kb);
            uint16_t *tile = xt + (kb * mblocks + mb) * 512;
            for (int r = 0; r < 16; r++)
                _mm512_store_si512(tile + 32 * r, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, index, base + r, 4));
        }
}

/* The projection, all threads sharing its output channels; xt from amx_pack (its barrier passed). */
static inline void amx_project(const uint16_t *w, const uint16_t *xt, const uint16_t *r, uint16_t *y,
                               long M, long N, long K) {
    const long mblocks = (M + 15) / 16;
    float c[2][256] __attribute__((aligned(64)));
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    #pragma omp for schedule(static)
    for (long n0 = 0; n0 < N; n0 += 16)
        for (long mb0 = 0; mb0 < mblocks; mb0 += 2) {
            const int two = mb0 + 1 < mblocks;
            _tile_zero(0);
            _tile_zero(1);
            for (long kb = 0; kb < K / 32; kb++) {
                _tile_loadd(2, w + n0 * K + 32 * kb, 2 * K);
                _tile_loadd(3, xt + (kb * mblocks + mb0) * 512, 64);
                _tile_dpbf16ps(0, 2, 3);
                if (two) {
                    _tile_loadd(4, xt + (kb * mblocks + mb0 + 1) * 512, 64);
                    _tile_dpbf16ps(1, 2, 4);
                }
            }
            _tile_stored(0, c[0], 64);
            if (two)
                _tile_stored(1, c[1], 64);
            __asm__ volatile("" : : "r"(c) : "memory");        /* c is written by the tile stores */
            for (long m = 16 * mb0; m < M && m < 16 * (mb0 + 2); m++) { /* row m: column m % 16 of c */
                __m512 v = _mm512_i32gather_ps(column, c[m / 16 - mb0] + m % 16, 4);
                if (r)
                    v = _mm512_add_ps(v, load_bf16x16(r + m * N + n0));
                _mm256_storeu_si256((__m256i *)(y + m * N + n0), (__m256i)_mm512_cvtneps_pbh(v));
            }
        }
}

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 0 where this process may use AMX tile data (Linux asks each process to request it), else -1. */
int amx_init(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1; }

#else
#define HAVE_AMX 0
int amx_init(void) { return -1; }
#endif

#endif
