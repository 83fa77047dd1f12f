/* One whole decode step in one call: B rows, one new token each, through every layer to the logits.

   The same arithmetic as model/transformer.py's bf16 path, step for step (each tensor the Python
   path rounds to bf16 is rounded here too): embedding row → per layer [RMSNorm → q/k/v → RoPE →
   this token's key and value into the cache → attention over the row's cached positions → + o
   projection; RMSNorm → gate/up → silu(gate) · up → + down projection] → RMSNorm → head.

   Why: at batch 1 a small model's step is ~150 PyTorch ops of a few microseconds each, as long as
   its weight products; here the step costs its weight products and little more. One OpenMP
   parallel region covers the step; its phases are `omp for` loops, whose barriers order them.

   The KV cache is model/kv_cache.py's bf16 tensor (L, max_batch, 2, nkv, max_context, hs).
   Projections are bf16 (N, K) — on AMX tiles with `amx` — or, with `int8`, weight-only int8
   (N, K) + bf16 scales (N,).
   Optionally writes each asked-for layer's attention probabilities (float32) and its output. */

#include <stddef.h>
#include "amx.h"

typedef struct {
    const uint16_t *w;          /* (N, K) bf16 */
    const int8_t *q;            /* (N, K) int8, or NULL */
    const uint16_t *scales;     /* (N,) bf16, with q */
} Mat;

typedef struct {
    const uint16_t *attn_norm, *mlp_norm;   /* (C,) bf16 gains */
    Mat qkv, o, gate_up, down;
} Layer;

typedef struct {
    long dim, n_layers, n_heads, n_kv_heads, head_dim, intermediate, vocab;
    float eps;
    const uint16_t *embed;                  /* (V, C) */
    const uint16_t *final_norm;             /* (C,) */
    const uint16_t *rope_cos, *rope_sin;    /* (P, hs): (cos, cos) and (−sin, sin) */
    Mat head;                               /* (V, C) */
    const Layer *layers;
} Model;

typedef struct {
    long B;
    const int64_t *tokens, *positions, *slots;  /* (B,) each */
    uint16_t *kv;                               /* the cache, bf16 */
    long max_batch, max_context;
    int int8;                                   /* the int8 weights for every projection */
    int amx;                                    /* else the bf16 ones on AMX tiles where they fit (amx.h) */
    float *logits;                              /* (B, V) out */
    float *attn; long attn_len;                 /* (L, B, nh, attn_len) out where attn_layers[l], or NULL */
    const uint8_t *attn_layers;
    uint16_t *hidden;                           /* (L, B, C) out where hidden_layers[l], or NULL */
    const uint8_t *hidden_layers;
    uint16_t *x, *xn, *qkv, *att, *gu, *h, *out; /* scratch (B, ·) bf16 */
    float *scores;                              /* scratch: (B, nh, max_context) */
    int16_t *xq; float *xs;                     /* scratch: the int8 kernel's activations (B, max K), (B,) */
    uint16_t *xt;                               /* scratch: the AMX kernel's (amx_pack) */
} Step;

static void rmsnorm_rows(const uint16_t *x, const uint16_t *gain, uint16_t *out, long B, long C, float eps) {
    #pragma omp for schedule(static)
    for (long m = 0; m < B; m++) {
        const uint16_t *row = x + m * C;
        float ss = 0;
        for (long c = 0; c < C; c++) {
            const float v = bf16_f32(row[c]);
            ss += v * v;
        }
        const float inv = 1.0f / sqrtf(ss / (float)C + eps);
        for (long c = 0; c < C; c++)
            out[m * C + c] = f32_bf16(bf16_f32(row[c]) * inv * bf16_f32(gain[c]));
    }
}

/* y (B, N) = x (B, K) · matᵀ (+ r): must be called by every thread of the region. */
static void project(const Mat *mat, const Step *st, const uint16_t *x, const uint16_t *r, uint16_t *y,
                    long N, long K) {
    const long B = st->B;
    if (st->int8) {
        #pragma omp for schedule(static)
        for (long m = 0; m < B; m++)
            fixed16_row(x + m * K, st->xq + m * K, st->xs + m, K);
        #pragma omp for schedule(static)
        for (long n0 = 0; n0 < N; n0 += NB8)
            int8_channels(st->xq, st->xs, mat->q, mat->scales, r, y, B, N, K, n0);
#if HAVE_AMX
    } else if (st->amx && K % 32 == 0 && N % 16 == 0) {   /* whole tiles only */
        amx_pack(x, st->xt, B, K);
        amx_project(mat->w, st->xt, r, y, B, N, K);
#endif
    } else {
        #pragma omp for schedule(static)
        for (long n0 = 0; n0 < N; n0 += NB)
            bf16_block(x, mat->w, r, y, B, N, K, n0);
    }
}

/* Rotate one head vector in place: round(round(x · cos) + roll(x, hs/2) · sin), as apply_rope
   (hs a multiple of 32, so each half is whole 16-lane chunks). */
static void rope(uint16_t *x, const uint16_t *cos, const uint16_t *sin, long hs) {
    __m512 v[16];                                       /* hs ≤ 256: the input, before any chunk is written */
    for (long c = 0; c < hs / 16; c++)
        v[c] = load_bf16x16(x + 16 * c);
    for (long c = 0; c < hs / 16; c++) {
        const __m512 rolled = v[(c + hs / 32) % (hs / 16)];
        const __m512 scaled = round_bf16(_mm512_mul_ps(v[c], load_bf16x16(cos + 16 * c)));
        const __m512 out = _mm512_fmadd_ps(rolled, load_bf16x16(sin + 16 * c), scaled);
        _mm256_storeu_si256((__m256i *)(x + 16 * c), (__m256i)_mm512_cvtneps_pbh(out));
    }
}

void bf16_decode_step(const Model *md, const Step *st) {
    const long B = st->B, C = md->dim, nh = md->n_heads, nkv = md->n_kv_heads, hs = md->head_dim;
    const long I = md->intermediate, V = md->vocab, L = md->n_layers, group = nh / nkv;
    const long width = (nh + 2 * nkv) * hs;             /* one row of qkv */
    const long slot_stride = 2 * nkv * st->max_context * hs, layer_stride = st->max_batch * slot_stride;
    uint16_t *x = st->x, *xn = st->xn, *qkv = st->qkv, *att = st->att, *gu = st->gu, *h = st->h, *out = st->out;
    #pragma omp parallel
    {
#if HAVE_AMX
        if (st->amx)
            amx_configure();
#endif
        #pragma omp for schedule(static)
        for (long m = 0; m < B; m++)
            memcpy(x + m * C, md->embed + st->tokens[m] * C, C * sizeof(uint16_t));
        for (long l = 0; l < L; l++) {
            const Layer *ly = md->layers + l;
            uint16_t *cache = st->kv + l * layer_stride;
            rmsnorm_rows(x, ly->attn_norm, xn, B, C, md->eps);
            project(&ly->qkv, st, xn, NULL, qkv, width, C);
            /* RoPE on the q and k heads; this token's key and value into the row's slot */
            #pragma omp for schedule(static)
            for (long mh = 0; mh < B * (nh + nkv); mh++) {
                const long m = mh / (nh + nkv), head = mh % (nh + nkv), pos = st->positions[m];
                uint16_t *vec = qkv + m * width + head * hs;
                rope(vec, md->rope_cos + pos * hs, md->rope_sin + pos * hs, hs);
                if (head >= nh) {
                    uint16_t *slot = cache + st->slots[m] * slot_stride;
                    const long kvh = head - nh;
                    memcpy(slot + (kvh * st->max_context + pos) * hs, vec, hs * sizeof(uint16_t));
                    memcpy(slot + ((nkv + kvh) * st->max_context + pos) * hs, vec + nkv * hs, hs * sizeof(uint16_t));
                }
            }
            float *weights = st->attn && st->attn_layers[l] ? st->attn + l * B * nh * st->attn_len : NULL;
            #pragma omp for schedule(static)
            for (long mh = 0; mh < B * nh; mh++) {
                const long m = mh / nh, head = mh % nh, n = st->positions[m] + 1;
                const uint16_t *slot = cache + st->slots[m] * slot_stride;
                const long kvh = head / group;
                float *w = weights ? weights + mh * st->attn_len : NULL;
                attend(qkv + m * width + head * hs, slot + kvh * st->max_context * hs,
                       slot + (nkv + kvh) * st->max_context * hs, n, hs, st->scores + mh * st->max_context,
                       att + m * C + head * hs, w);
                if (w)
                    memset(w + n, 0, (st->attn_len - n) * sizeof(float));
            }
            project(&ly->o, st, att, x, x, C, C);             /* x += attention · o */
            rmsnorm_rows(x, ly->mlp_norm, xn, B, C, md->eps);
            project(&ly->gate_up, st, xn, NULL, gu, 2 * I, C);
            #pragma omp for schedule(static)
            for (long mi = 0; mi < B * I; mi += 16) {           /* silu(gate) · up, each rounded */
                const long m = mi / I, i = mi % I;              /* (I % 16 == 0: rows are whole chunks) */
                const __m512 g = load_bf16x16(gu + m * 2 * I + i), up = load_bf16x16(gu + m * 2 * I + I + i);
                const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
                const __m512 s = round_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
                _mm256_storeu_si256((__m256i *)(h + mi), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(s, up)));
            }
            project(&ly->down, st, h, x, x, C, I);            /* x += mlp */
            if (st->hidden && st->hidden_layers[l]) {
                #pragma omp for schedule(static)
                for (long m = 0; m < B; m++)
                    memcpy(st->hidden + (l * B + m) * C, x + m * C, C * sizeof(uint16_t));
            }
        }
        rmsnorm_rows(x, md->final_norm, xn, B, C, md->eps);
        project(&md->head, st, xn, NULL, out, V, C);          /* the logits in bf16, then float32 */
        #pragma omp for schedule(static)
        for (long i = 0; i < B * V; i++)
            st->logits[i] = bf16_f32(out[i]);
#if HAVE_AMX
        if (st->amx)
            _tile_release();
#endif
    }
}
