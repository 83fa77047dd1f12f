/* One whole decode step in one call: B rows, one new token each, through every layer to the logits.

   The same arithmetic as model/transformer.py's path, step for step (each tensor that path rounds
   to bf16 is rounded here too): embedding row → per layer [RMSNorm → q/k/v → RoPE →
   this token's key and value into the cache → attention over the row's cached positions → + o
   projection; RMSNorm → gate/up → silu(gate) · up → + down projection] → RMSNorm → head.

   Why: at batch 1 a small model's step is ~150 PyTorch ops of a few microseconds each, as long as
   its weight products; here the step costs its weight products and little more. One OpenMP
   parallel region covers the step; its phases are `omp for` loops, whose barriers order them.

   A bf16 model's activations, weights and KV cache are bf16; a float32 model's (`f32`) are float32,
   nothing rounded but where float32 rounds. The KV cache is model/kv_cache.py's tensor
   (L, max_batch, 2, nkv, max_context, hs). Projections are bf16 (N, K) — on AMX tiles with `amx` —
   or, with `int8`, weight-only int8 (N, K) + bf16 scales (N,), or float32 (K, N) (`kn`: the f32
   model's x @ w layout; its head is (N, K)). Optionally writes each asked-for layer's attention
   probabilities (float32), its output and the head's logits on that output (the logit lens). */

#include <omp.h>
#include <stddef.h>
#include "amx.h"

typedef struct {
    const void *w;              /* bf16 (N, K), or float32: (K, N) where kn, else (N, K) */
    const int8_t *q;            /* (N, K) int8, or NULL */
    const uint16_t *scales;     /* (N,) bf16, with q */
    int kn;
} Mat;

typedef struct {
    const void *attn_norm, *mlp_norm;       /* (C,) gains */
    Mat qkv, o, gate_up, down;
} Layer;

typedef struct {
    long dim, n_layers, n_heads, n_kv_heads, head_dim, intermediate, vocab;
    float eps;
    int f32;                                /* a float32 model: float32 activations, weights, cache */
    const void *embed;                      /* (V, C) */
    const void *final_norm;                 /* (C,) */
    const void *rope_cos, *rope_sin;        /* (P, hs): (cos, cos) and (−sin, sin) */
    Mat head;                               /* (V, C) */
    const Layer *layers;
} Model;

typedef struct {
    long B;
    const int64_t *tokens, *positions, *slots;  /* (B,) each */
    void *kv;                                   /* the cache */
    long max_batch, max_context;
    int int8;                                   /* the int8 weights for every projection */
    int amx;                                    /* else the bf16 ones on AMX tiles where they fit (amx.h) */
    int threads;                                /* OpenMP threads (the float32 kernel's partial sums) */
    float *logits;                              /* (B, V) out */
    float *attn; long attn_len;                 /* (L, B, nh, attn_len) out where attn_layers[l], or NULL */
    const uint8_t *attn_layers;
    void *hidden;                               /* (L, B, C) out where hidden_layers[l], or NULL */
    const uint8_t *hidden_layers;
    float *lens;                                /* (L, B, V) out: the head on those outputs, or NULL */
    void *x, *xn, *qkv, *att, *gu, *h, *out;    /* scratch (B, ·), the activations' dtype */
    float *scores;                              /* scratch: (B, nh, max_context) */
    int16_t *xq; float *xs;                     /* scratch: the int8 kernel's activations (B, max K), (B,) */
    uint16_t *xt;                               /* scratch: the AMX kernel's (amx_pack) */
    float *part;                                /* scratch: the float32 kernel's (threads, B, max N) */
} Step;

static inline void *at(const void *p, long i, int f32) { return (char *)p + i * (f32 ? 4 : 2); }

static void rmsnorm_rows(const void *x, const void *gain, void *out, long B, long C, float eps, int f32) {
    #pragma omp for schedule(static)
    for (long m = 0; m < B; m++) {                  /* (C % 16 == 0) */
        __m512 ss = _mm512_setzero_ps();
        for (long c = 0; c < C; c += 16) {
            const __m512 v = act_load(x, m * C + c, f32);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)C + eps));
        for (long c = 0; c < C; c += 16)
            act_store(out, m * C + c, _mm512_mul_ps(_mm512_mul_ps(act_load(x, m * C + c, f32), inv),
                                                   act_load(gain, c, f32)), f32);
    }
}

/* float32 y (M, N) = x (M, K) · w (K, N) (+ r), w row-major (in, out): each thread sums its share of
   the k rows (a contiguous run of w, streamed once) over all N, then the shares are added. */
static void f32_project_kn(const float *w, const float *x, const float *r, float *y, long M, long N, long K,
                           float *part) {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const long k0 = K * t / T, k1 = K * (t + 1) / T;
    float *p = part + t * M * N;
    memset(p, 0, M * N * sizeof(float));
    for (long k = k0; k < k1; k++)
        for (long m = 0; m < M; m++) {
            const __m512 xk = _mm512_set1_ps(x[m * K + k]);
            for (long n = 0; n < N; n += 16) {
                const __mmask16 live = tail16(N - n);
                _mm512_mask_storeu_ps(p + m * N + n, live, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, w + k * N + n), xk,
                                                                          _mm512_maskz_loadu_ps(live, p + m * N + n)));
            }
        }
    #pragma omp barrier
    #pragma omp for schedule(static)
    for (long i = 0; i < M * N; i++) {
        float v = r ? r[i] : 0.0f;
        for (int u = 0; u < T; u++)
            v += part[u * M * N + i];
        y[i] = v;
    }
}

/* float32 y (M, N) = x (M, K) · w (N, K)ᵀ: the float32 model's head (nn.Linear's layout). */
static void f32_project_nk(const float *w, const float *x, float *y, long M, long N, long K) {
    #pragma omp for schedule(static)
    for (long n = 0; n < N; n++)
        for (long m = 0; m < M; m++) {
            __m512 acc = _mm512_setzero_ps();
            for (long k = 0; k < K; k += 16) {
                const __mmask16 live = tail16(K - k);
                acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, w + n * K + k), _mm512_maskz_loadu_ps(live, x + m * K + k), acc);
            }
            y[m * N + n] = _mm512_reduce_add_ps(acc);
        }
}

/* y (B, N) = x (B, K) · matᵀ (+ r): must be called by every thread of the region. */
static void project(const Mat *mat, const Model *md, const Step *st, const void *x, const void *r, void *y,
                    long N, long K) {
    const long B = st->B;
    if (md->f32) {
        if (mat->kn)
            f32_project_kn(mat->w, x, r, y, B, N, K, st->part);
        else
            f32_project_nk(mat->w, x, y, B, N, K);          /* (the head: no residual) */
    } else if (st->int8) {
        #pragma omp for schedule(static)
        for (long m = 0; m < B; m++)
            fixed16_row((const uint16_t *)x + m * K, st->xq + m * K, st->xs + m, K);
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
static void rope(void *x, const void *cos, const void *sin, long hs, int f32) {
    __m512 v[16];                                       /* hs ≤ 256: the input, before any chunk is written */
    for (long c = 0; c < hs / 16; c++)
        v[c] = act_load(x, 16 * c, f32);
    for (long c = 0; c < hs / 16; c++) {
        const __m512 rolled = v[(c + hs / 32) % (hs / 16)];
        const __m512 scaled = act_round(_mm512_mul_ps(v[c], act_load(cos, 16 * c, f32)), f32);
        act_store(x, 16 * c, _mm512_fmadd_ps(rolled, act_load(sin, 16 * c, f32), scaled), f32);
    }
}

/* logits (B, V) float32 = head(final_norm(x)) for the B rows of x: must be called by every thread. */
static void head(const Model *md, const Step *st, const void *x, float *logits) {
    const long B = st->B, C = md->dim, V = md->vocab;
    rmsnorm_rows(x, md->final_norm, st->xn, B, C, md->eps, md->f32);
    if (md->f32) {
        project(&md->head, md, st, st->xn, NULL, logits, V, C);
    } else {
        project(&md->head, md, st, st->xn, NULL, st->out, V, C);   /* bf16, then float32 */
        #pragma omp for schedule(static)
        for (long i = 0; i < B * V; i++)
            logits[i] = bf16_f32(((const uint16_t *)st->out)[i]);
    }
}

void decode_step(const Model *md, const Step *st) {
    const long B = st->B, C = md->dim, nh = md->n_heads, nkv = md->n_kv_heads, hs = md->head_dim;
    const long I = md->intermediate, V = md->vocab, L = md->n_layers, group = nh / nkv;
    const long width = (nh + 2 * nkv) * hs;             /* one row of qkv */
    const long slot_stride = 2 * nkv * st->max_context * hs, layer_stride = st->max_batch * slot_stride;
    const int f32 = md->f32;
    const size_t es = f32 ? 4 : 2;
    void *x = st->x, *xn = st->xn, *qkv = st->qkv, *att = st->att, *gu = st->gu, *h = st->h;
    #pragma omp parallel num_threads(st->threads)
    {
#if HAVE_AMX
        if (st->amx)
            amx_configure();
#endif
        #pragma omp for schedule(static)
        for (long m = 0; m < B; m++)
            memcpy(at(x, m * C, f32), at(md->embed, st->tokens[m] * C, f32), C * es);
        for (long l = 0; l < L; l++) {
            const Layer *ly = md->layers + l;
            void *cache = at(st->kv, l * layer_stride, f32);
            rmsnorm_rows(x, ly->attn_norm, xn, B, C, md->eps, f32);
            project(&ly->qkv, md, st, xn, NULL, qkv, width, C);
            /* RoPE on the q and k heads; this token's key and value into the row's slot */
            #pragma omp for schedule(static)
            for (long mh = 0; mh < B * (nh + nkv); mh++) {
                const long m = mh / (nh + nkv), head = mh % (nh + nkv), pos = st->positions[m];
                void *vec = at(qkv, m * width + head * hs, f32);
                rope(vec, at(md->rope_cos, pos * hs, f32), at(md->rope_sin, pos * hs, f32), hs, f32);
                if (head >= nh) {
                    void *slot = at(cache, st->slots[m] * slot_stride, f32);
                    const long kvh = head - nh;
                    memcpy(at(slot, (kvh * st->max_context + pos) * hs, f32), vec, hs * es);
                    memcpy(at(slot, ((nkv + kvh) * st->max_context + pos) * hs, f32), at(vec, nkv * hs, f32), hs * es);
                }
            }
            float *weights = st->attn && st->attn_layers[l] ? st->attn + l * B * nh * st->attn_len : NULL;
            #pragma omp for schedule(static)
            for (long mh = 0; mh < B * nh; mh++) {
                const long m = mh / nh, head = mh % nh, n = st->positions[m] + 1;
                const void *slot = at(cache, st->slots[m] * slot_stride, f32);
                const long kvh = head / group;
                float *w = weights ? weights + mh * st->attn_len : NULL;
                attend(at(qkv, m * width + head * hs, f32), at(slot, kvh * st->max_context * hs, f32),
                       at(slot, (nkv + kvh) * st->max_context * hs, f32), n, hs, st->scores + mh * st->max_context,
                       at(att, m * C + head * hs, f32), w, f32);
                if (w)
                    memset(w + n, 0, (st->attn_len - n) * sizeof(float));
            }
            project(&ly->o, md, st, att, x, x, C, C);          /* x += attention · o */
            rmsnorm_rows(x, ly->mlp_norm, xn, B, C, md->eps, f32);
            project(&ly->gate_up, md, st, xn, NULL, gu, 2 * I, C);
            #pragma omp for schedule(static)
            for (long mi = 0; mi < B * I; mi += 16) {           /* silu(gate) · up, each rounded */
                const long m = mi / I, i = mi % I;              /* (I % 16 == 0: rows are whole chunks) */
                const __m512 g = act_load(gu, m * 2 * I + i, f32), up = act_load(gu, m * 2 * I + I + i, f32);
                const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
                const __m512 s = act_round(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), f32);
                act_store(h, mi, _mm512_mul_ps(s, up), f32);
            }
            project(&ly->down, md, st, h, x, x, C, I);         /* x += mlp */
            if (st->hidden && st->hidden_layers[l]) {
                #pragma omp for schedule(static)
                for (long m = 0; m < B; m++)
                    memcpy(at(st->hidden, (l * B + m) * C, f32), at(x, m * C, f32), C * es);
            }
        }
        head(md, st, x, st->logits);
        for (long l = 0; st->lens && l < L; l++)           /* the logit lens: the head on a layer's output */
            if (st->hidden_layers[l])
                head(md, st, at(st->hidden, l * B * C, f32), st->lens + l * B * V);
#if HAVE_AMX
        if (st->amx)
            _tile_release();
#endif
    }
}
