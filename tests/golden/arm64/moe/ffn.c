// The FFN of each expert, computed densely or only for its active neurons,
// and the mixture-of-experts block that routes each token to TOP_K of them.
//
//   h = act(x Wg^T) * (x Wu^T)        swiglu: silu(g) u   geglu: gelu_tanh(g) u
//                                     relu: relu(g) u     drelu: relu(g) relu(u)
//   h_j = 0 where |h_j| <= threshold
//   mode predictor: h_j = 0 where fc2(relu(fc1 x))_j < predictor_threshold (only those j are computed)
//   mode exact:     g computed densely, u and the down row only where act(g_j) != 0
//   y = sum_j h_j Wd^T[j]             (Wd^T [HIDDEN_DIM, DIM]: one contiguous row per neuron)
//
// Mixture of experts (moe_forward): p = softmax(x Wr^T) over the N_EXPERTS experts, the TOP_K most probable
// experts chosen and their p renormalised to sum to 1, y = sum over the chosen e of p_e * ffn_e(x).
#include <math.h>
#include <string.h>

#include "model.h"

// ----------------------------------------------------------------------------
// Sparsity of each FFN (must match the header of weights.bin)

const FFNSpec FFN_SPECS[N_FFNS] = {
    // layer 0 expert 0: drelu, predictor, threshold 0, predictor rank 6 >= 0.1
    { ACT_DRELU, MODE_PREDICTOR, 6, 1, 0.0f, 0.100000001f },
    // layer 0 expert 1: drelu, exact, threshold 0.01
    { ACT_DRELU, MODE_EXACT, 0, 0, 0.00999999978f, 0.0f },
    // layer 0 expert 2: drelu, dense, threshold 0
    { ACT_DRELU, MODE_DENSE, 0, 0, 0.0f, 0.0f },
    // layer 1 expert 0: drelu, predictor, threshold 0, predictor rank 6 >= 0.1
    { ACT_DRELU, MODE_PREDICTOR, 6, 1, 0.0f, 0.100000001f },
    // layer 1 expert 1: drelu, exact, threshold 0.01
    { ACT_DRELU, MODE_EXACT, 0, 0, 0.00999999978f, 0.0f },
    // layer 1 expert 2: drelu, dense, threshold 0
    { ACT_DRELU, MODE_DENSE, 0, 0, 0.0f, 0.0f },
};

// ----------------------------------------------------------------------------
// Activations

// The gate half of the activation: silu(g), gelu_tanh(g) or relu(g).
static float gate_act(int kind, float g) {
    switch (kind) {
    case ACT_SWIGLU: return g / (1.0f + expf(-g));
    case ACT_GEGLU: return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    default: return g > 0.0f ? g : 0.0f;                   // relu, drelu
    }
}

// h from the activated gate a and the up projection u, zeroed at or below the threshold.
static float combine(int kind, float a, float u, float threshold) {
    float h = a * (kind == ACT_DRELU ? (u > 0.0f ? u : 0.0f) : u);
    return fabsf(h) > threshold ? h : 0.0f;
}

// Pads an index list (and its coefficients) to a multiple of ROW_UNROLL with zero-weight copies.
static int pad_to_unroll(int32_t *idx, float *coef, int n) {
    int32_t fill = n > 0 ? idx[n - 1] : 0;
    while (n % ROW_UNROLL) {
        idx[n] = fill;
        if (coef) coef[n] = 0.0f;
        n++;
    }
    return n;
}

// ----------------------------------------------------------------------------
// Picking the neurons to compute: fills s->active [n] and, per slot, s->h with act(g)

// Predictor: score = fc2 (relu) (fc1 x); neurons with score >= threshold.
// Kept out of line so instruction profiles show the predictor's cost apart from the FFN's.
__attribute__((noinline))
static int predict_active(Model *m, const FFNWeights *f, const FFNSpec *spec, const float *x) {
    RunState *s = m->s;
    int rank = spec->predictor_rank;
    matvec(m, m->k32, s->z, f->pred_fc1, x, rank, DIM);
    if (spec->predictor_relu)
        for (int r = 0; r < rank; r++) s->z[r] = s->z[r] > 0.0f ? s->z[r] : 0.0f;
    matvec(m, m->k32, s->score, f->pred_fc2, s->z, HIDDEN_DIM, rank);
    int n = 0;
    for (int j = 0; j < HIDDEN_DIM; j++)
        if (s->score[j] >= spec->predictor_threshold) s->active[n++] = j;
    return n;
}

// ----------------------------------------------------------------------------
// The FFN

void ffn_forward(Model *m, const FFNWeights *f, const FFNSpec *spec, const float *x, float *y) {
    RunState *s = m->s;
    int kind = spec->activation;
    int mode = m->force_mode >= 0 ? m->force_mode : spec->mode;
    if (mode == MODE_PREDICTOR && f->pred_fc1 == NULL) mode = MODE_EXACT;

    int n;            // neurons computed
    int nz = 0;       // neurons with h != 0: s->nonzero / s->coef
    if (mode == MODE_DENSE) {
        matvec(m, m->k, s->gate, f->w_gate, x, HIDDEN_DIM, DIM);
        matvec(m, m->k, s->up, f->w_up, x, HIDDEN_DIM, DIM);
        for (int j = 0; j < HIDDEN_DIM; j++) {
            s->nonzero[j] = j;
            s->coef[j] = combine(kind, gate_act(kind, s->gate[j]), s->up[j], spec->threshold);
        }
        n = nz = HIDDEN_DIM;  // the down projection runs over every row, zeros included
    } else {
        if (mode == MODE_EXACT) {
            matvec(m, m->k, s->gate, f->w_gate, x, HIDDEN_DIM, DIM);
            n = 0;
            for (int j = 0; j < HIDDEN_DIM; j++) {
                float a = gate_act(kind, s->gate[j]);
                if (a != 0.0f) { s->active[n] = j; s->h[n] = a; n++; }
            }
            rows_dot(m, s->up, f->w_up, x, s->active, pad_to_unroll(s->active, NULL, n), DIM);
        } else {
            n = predict_active(m, f, spec, x);
            int padded = pad_to_unroll(s->active, NULL, n);
            rows_dot(m, s->gate, f->w_gate, x, s->active, padded, DIM);
            rows_dot(m, s->up, f->w_up, x, s->active, padded, DIM);
            for (int k = 0; k < n; k++) s->h[k] = gate_act(kind, s->gate[k]);
        }
        for (int k = 0; k < n; k++) {
            float h = combine(kind, s->h[k], s->up[k], spec->threshold);
            if (h != 0.0f) { s->nonzero[nz] = s->active[k]; s->coef[nz] = h; nz++; }
        }
    }
    s->active_neurons += n;
    s->total_neurons += HIDDEN_DIM;

    memset(y, 0, DIM * sizeof(float));
    rows_axpy(m, y, f->w_down_t, s->coef, s->nonzero, pad_to_unroll(s->nonzero, s->coef, nz), DIM);
}

// ----------------------------------------------------------------------------
// Mixture of experts

// s->route: softmax of the router logits, then each expert's weight (0 for the experts not chosen).
static void route_token(Model *m, const LayerWeights *L, const float *x) {
    RunState *s = m->s;
    float *p = s->route;
    matvec(m, m->k32, p, L->router, x, N_EXPERTS, DIM);
    float max = p[0], sum = 0.0f;
    for (int e = 1; e < N_EXPERTS; e++) max = p[e] > max ? p[e] : max;
    for (int e = 0; e < N_EXPERTS; e++) {
        p[e] = expf(p[e] - max);
        sum += p[e];
    }
    for (int e = 0; e < N_EXPERTS; e++) p[e] /= sum;
    // the TOP_K largest probabilities (ties: the lower expert index), renormalised over the chosen ones
    int chosen[N_EXPERTS] = {0};
    float total = 0.0f;
    for (int k = 0; k < TOP_K; k++) {
        int best = -1;
        for (int e = 0; e < N_EXPERTS; e++)
            if (!chosen[e] && (best < 0 || p[e] > p[best])) best = e;
        chosen[best] = 1;
        total += p[best];
    }
    for (int e = 0; e < N_EXPERTS; e++) p[e] = chosen[e] ? p[e] / total : 0.0f;
}

void moe_forward(Model *m, int layer, const float *x, float *y) {
    const LayerWeights *L = &m->w->layers[layer];
    RunState *s = m->s;
    route_token(m, L, x);
    memset(y, 0, DIM * sizeof(float));
    for (int e = 0; e < N_EXPERTS; e++) {      // only the routed experts run
        if (s->route[e] == 0.0f) continue;
        ffn_forward(m, &L->experts[e], &FFN_SPECS[layer * N_EXPERTS + e], x, s->expert_out);
        for (int i = 0; i < DIM; i++) y[i] += s->route[e] * s->expert_out[i];
    }
}
