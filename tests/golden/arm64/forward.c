// The decoder: one token at a time through embedding, 4 layers of attention + FFN, and the head.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__aarch64__)
#include <sys/auxv.h>
#include <asm/hwcap.h>
#endif

#include "model.h"

// ----------------------------------------------------------------------------
// Run state

int state_alloc(RunState *s, int max_seq) {
    memset(s, 0, sizeof(*s));
    s->max_seq = max_seq;
    size_t cache = (size_t)N_LAYERS * max_seq * KV_DIM;
    s->logits = calloc(VOCAB_SIZE, sizeof(float));
    s->att = calloc((size_t)N_HEADS * max_seq, sizeof(float));
    s->key_cache = calloc(cache, sizeof(float));
    s->value_cache = calloc(cache, sizeof(float));
    return !s->logits || !s->att || !s->key_cache || !s->value_cache;
}

void state_free(RunState *s) {
    free(s->logits);
    free(s->att);
    free(s->key_cache);
    free(s->value_cache);
    memset(s, 0, sizeof(*s));
}

// ----------------------------------------------------------------------------
// Kernel dispatch

const Kernels *pick_kernels(void) {
#if defined(__aarch64__)
    if (WEIGHT_DTYPE == 0) return &kernels_neon_f32;
    // fp16 arithmetic only where the CPU has it: elsewhere those instructions are SIGILL
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDHP) ? &kernels_neon_f16_arith : &kernels_neon_f16;
#else
    return WEIGHT_DTYPE == 0 ? &kernels_scalar_f32 : &kernels_scalar_f16;
#endif
}

const Kernels *pick_float32_kernels(void) {
#if defined(__aarch64__)
    return &kernels_neon_f32;
#else
    return &kernels_scalar_f32;
#endif
}

// ----------------------------------------------------------------------------
// Parallel products: each task runs one kernel over a slice of rows (or columns)

typedef struct {              // one product: a [rows, n] matrix, `count` slots of its rows (sparse kernels)
    const Kernels *k;
    float *out;               // matvec [rows]; rows_dot [count], one per slot; rows_axpy [n], accumulated
    const void *w;            // [rows, n] in the kernels' weight dtype
    const float *x;           // [n] input (NULL for rows_axpy)
    const uint16_t *xh;       // [n] x as fp16 for fp16-arithmetic kernels, else NULL
    const int32_t *idx;       // [count] the matrix row of each slot (rows_dot, rows_axpy)
    const float *coef;        // [count] the factor of each slot's row (rows_axpy)
    int count, n;
} ProductTask;

static void matvec_task(void *ctx, int begin, int end) {
    ProductTask *t = (ProductTask *)ctx;
    t->k->matvec(t->out, t->w, t->x, t->xh, begin, end, t->n);
}

static void rows_dot_task(void *ctx, int begin, int end) {
    ProductTask *t = (ProductTask *)ctx;
    t->k->rows_dot(t->out, t->w, t->x, t->xh, t->idx, begin, end, t->n);
}

static void rows_axpy_task(void *ctx, int begin, int end) {
    ProductTask *t = (ProductTask *)ctx;
    t->k->rows_axpy(t->out, t->w, t->coef, t->idx, t->count, begin, end, t->n);
}

// fp16-arithmetic kernels read their input as fp16: convert it once per product
static const uint16_t *half_input(Model *m, const Kernels *k, const float *x, int n) {
    if (!k->to_half) return NULL;
    k->to_half(m->s->xh, x, n);
    return m->s->xh;
}

void matvec(Model *m, const Kernels *k, float *out, const void *w, const float *x, int rows, int n) {
    ProductTask t = {k, out, w, x, half_input(m, k, x, n), NULL, NULL, 0, n};
    pool_run(m->pool, matvec_task, &t, rows, ROW_UNROLL);
}

void rows_dot(Model *m, float *out, const void *w, const float *x, const int32_t *idx, int count, int n) {
    ProductTask t = {m->k, out, w, x, half_input(m, m->k, x, n), idx, NULL, count, n};
    pool_run(m->pool, rows_dot_task, &t, count, ROW_UNROLL);
}

void rows_axpy(Model *m, float *y, const void *w, const float *coef, const int32_t *idx, int count, int n) {
    ProductTask t = {m->k, y, w, NULL, NULL, idx, coef, count, n};
    pool_run(m->pool, rows_axpy_task, &t, n, 16);   // split columns in whole vector blocks
}

// ----------------------------------------------------------------------------
// Layers

static void rmsnorm(float *out, const float *x, const float *weight, int n) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / n + (float)RMS_EPS);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * weight[i];
}

// Rotates each head of v [n_heads * HEAD_DIM] by pos (HF rotate-half: pairs (i, i + HEAD_DIM/2)).
static void rope(float *v, int n_heads, int pos, const float *inv_freq) {
    for (int i = 0; i < HEAD_DIM / 2; i++) {
        double angle = (double)pos * (double)inv_freq[i];
        float c = (float)cos(angle), s = (float)sin(angle);
        for (int h = 0; h < n_heads; h++) {
            float *head = v + h * HEAD_DIM;
            float a = head[i], b = head[i + HEAD_DIM / 2];
            head[i] = a * c - b * s;
            head[i + HEAD_DIM / 2] = b * c + a * s;
        }
    }
}

typedef struct {
    RunState *s;
    int layer, pos, first;    // attend to positions [first, pos]
} AttentionTask;

// Heads [begin, end): softmax(q k^T / sqrt(HEAD_DIM)) v over the cached positions.
static void attention_task(void *ctx, int begin, int end) {
    AttentionTask *t = (AttentionTask *)ctx;
    RunState *s = t->s;
    const float *keys = s->key_cache + (size_t)t->layer * s->max_seq * KV_DIM;
    const float *values = s->value_cache + (size_t)t->layer * s->max_seq * KV_DIM;
    const float scale = 1.0f / sqrtf((float)HEAD_DIM);
    for (int h = begin; h < end; h++) {
        const float *q = s->q + h * HEAD_DIM;
        int kv_head = h / (N_HEADS / N_KV_HEADS);          // grouped-query attention
        float *att = s->att + (size_t)h * s->max_seq;
        float max = -INFINITY;
        for (int p = t->first; p <= t->pos; p++) {
            const float *k = keys + (size_t)p * KV_DIM + kv_head * HEAD_DIM;
            float score = 0.0f;
            for (int i = 0; i < HEAD_DIM; i++) score += q[i] * k[i];
            att[p] = score * scale;
            if (att[p] > max) max = att[p];
        }
        float sum = 0.0f;
        for (int p = t->first; p <= t->pos; p++) {
            att[p] = expf(att[p] - max);
            sum += att[p];
        }
        float *out = s->att_out + h * HEAD_DIM;
        memset(out, 0, HEAD_DIM * sizeof(float));
        for (int p = t->first; p <= t->pos; p++) {
            const float *v = values + (size_t)p * KV_DIM + kv_head * HEAD_DIM;
            float a = att[p] / sum;
            for (int i = 0; i < HEAD_DIM; i++) out[i] += a * v[i];
        }
    }
}

static void attention(Model *m, int l, int pos) {
    const LayerWeights *L = &m->w->layers[l];
    RunState *s = m->s;
    float *k = s->key_cache + ((size_t)l * s->max_seq + pos) * KV_DIM;    // [KV_DIM] of this token
    float *v = s->value_cache + ((size_t)l * s->max_seq + pos) * KV_DIM;  // [KV_DIM] of this token

    rmsnorm(s->xb, s->x, L->attn_norm, DIM);
    matvec(m, m->k, s->q, L->wq, s->xb, Q_DIM, DIM);
    matvec(m, m->k, k, L->wk, s->xb, KV_DIM, DIM);
    matvec(m, m->k, v, L->wv, s->xb, KV_DIM, DIM);
    for (int i = 0; i < Q_DIM; i++) s->q[i] += L->bq[i];
    for (int i = 0; i < KV_DIM; i++) { k[i] += L->bk[i]; v[i] += L->bv[i]; }
    rope(s->q, N_HEADS, pos, m->w->rope_inv_freq);
    rope(k, N_KV_HEADS, pos, m->w->rope_inv_freq);
    int first = pos - SLIDING_WINDOW + 1 > 0 ? pos - SLIDING_WINDOW + 1 : 0;   // sliding window
    AttentionTask task = {s, l, pos, first};
    pool_run(m->pool, attention_task, &task, N_HEADS, 1);

    matvec(m, m->k, s->xb2, L->wo, s->att_out, DIM, Q_DIM);
    for (int i = 0; i < DIM; i++) s->x[i] += s->xb2[i];
}

// ----------------------------------------------------------------------------
// Forward pass of one token

void forward(Model *m, int token, int pos) {
    const Weights *w = m->w;
    RunState *s = m->s;
    m->k->row_to_float(s->x, w->embed, token, DIM);
    for (int l = 0; l < N_LAYERS; l++) {
        attention(m, l, pos);
        rmsnorm(s->xb, s->x, w->layers[l].ffn_norm, DIM);
        ffn_forward(m, &w->layers[l].ffn, &FFN_SPECS[l], s->xb, s->xb2);
        for (int i = 0; i < DIM; i++) s->x[i] += s->xb2[i];
    }
    rmsnorm(s->x, s->x, w->final_norm, DIM);
    matvec(m, m->k, s->logits, w->lm_head, s->x, VOCAB_SIZE, DIM);
}
