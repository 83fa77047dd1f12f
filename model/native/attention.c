/* One decode step's attention: one bf16 query per row and head against that row's cached keys.

   q (B, nh, hs), k and v (B, nkv, S, hs) with head dimension contiguous and positions hs apart
   (a view into the KV cache: batch and head strides are arguments), lengths (B,) int64: row b
   attends to its keys 0 … lengths[b]-1. out (B, nh, hs) bf16, contiguous. Query head h reads
   key/value head h / (nh / nkv) (grouped-query attention).

   The math of model/attention.py's explicit path: scores q·k / √hs, softmax and the mix of the
   values in float32, rounded once to bf16. Why: PyTorch's bf16 SDPA measured 2–5× slower than
   this arithmetic needs for one query per row (a Zen 4 EPYC, 8–32 rows). Rows × heads are split
   between the OpenMP threads. hs must be a multiple of 32 (vdpbf16ps takes 32 bf16 at a time). */

#include "kernels.h"

void bf16_decode_attention(const uint16_t *restrict q, const uint16_t *restrict k, const uint16_t *restrict v,
                           const int64_t *restrict lengths, uint16_t *restrict out, float *restrict work,
                           long B, long nh, long nkv, long S, long hs,
                           long q_batch, long q_head, long kv_batch, long kv_head) {
    const long group = nh / nkv;
    #pragma omp parallel for schedule(static)
    for (long bh = 0; bh < B * nh; bh++) {
        const long b = bh / nh, h = bh % nh, kvh = h / group;
        attend(q + b * q_batch + h * q_head, k + b * kv_batch + kvh * kv_head, v + b * kv_batch + kvh * kv_head,
               lengths[b], hs, work + bh * S, out + bh * hs, NULL, 0);
    }
}
