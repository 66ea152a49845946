// ffn_bench: calls tsrun's ffn_forward() on random weights, for instruction counts and host timing.
//
//   ffn_bench dense|sparse CALLS [THREADS]
//
// Linked with the generated sources of a one-layer model (everything but main.c), float32 or float16 weights.
// Layer 0 must be in predictor mode: "sparse" runs it as compiled, "dense" forces MODE_DENSE. Each call gets its own
// input, so the active set rotates (a fixed set would stay in cache). Setup lives in bench_* functions
// so per-symbol counts can leave it out; prints the fraction of neurons computed and a checksum.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model.h"

static uint64_t bench_rng = 0x853c49e6748fea9bull;

static float bench_normal(void) {   // sum of 4 uniforms, scaled to unit variance
    float s = 0.0f;
    for (int i = 0; i < 4; i++) {
        bench_rng = bench_rng * 6364136223846793005ull + 1442695040888963407ull;
        s += (float)(bench_rng >> 40) / 16777216.0f - 0.5f;
    }
    return s * 1.7320508f;
}

static float *bench_matrix(size_t rows, size_t cols, float scale) {
    float *m = malloc(rows * cols * sizeof(float));
    for (size_t i = 0; i < rows * cols; i++) m[i] = bench_normal() * scale;
    return m;
}

// A weight matrix in the compiled dtype (fp16 bits when WEIGHT_DTYPE is 1).
static const void *bench_weights(size_t rows, size_t cols, float scale) {
    float *m = bench_matrix(rows, cols, scale);
    if (WEIGHT_DTYPE == 0) return m;
    uint16_t *h = malloc(rows * cols * sizeof(uint16_t));
    half_from_float(h, m, (int)(rows * cols));
    free(m);
    return h;
}

static void bench_input(float *x, int call) {
    bench_rng = 0x9E3779B97F4A7C15ull * (uint64_t)(call + 1);
    for (int i = 0; i < DIM; i++) x[i] = bench_normal();
}

static double bench_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 3 || (strcmp(argv[1], "dense") && strcmp(argv[1], "sparse"))) {
        fprintf(stderr, "usage: ffn_bench dense|sparse CALLS [THREADS]\n");
        return 2;
    }
    int calls = atoi(argv[2]), threads = argc > 3 ? atoi(argv[3]) : 1;
    int rank = FFN_SPECS[0].predictor_rank;
    if (FFN_SPECS[0].mode != MODE_PREDICTOR || rank == 0) {
        fprintf(stderr, "ffn_bench: layer 0 must be a predictor-mode FFN\n");
        return 2;
    }
    static Weights w;
    FFNWeights *f = &w.layers[0].ffn;
    f->w_gate = bench_weights(HIDDEN_DIM, DIM, 1.0f / 24.0f);
    f->w_up = bench_weights(HIDDEN_DIM, DIM, 1.0f / 24.0f);
    f->w_down_t = bench_weights(HIDDEN_DIM, DIM, 1.0f / 40.0f);
    f->pred_fc1 = bench_matrix((size_t)rank, DIM, 1.0f / 24.0f);     // z ~ N(0, 1)
    f->pred_fc2 = bench_matrix(HIDDEN_DIM, (size_t)rank, 1.4142f / 8.4853f); // score ~ N(0, ~1)
    static RunState s;
    if (state_alloc(&s, 1)) return 1;
    Model m = {&w, &s, pick_kernels(), pick_float32_kernels(), pool_create(threads),
               strcmp(argv[1], "dense") ? -1 : MODE_DENSE};
    float x[DIM], y[DIM], checksum = 0.0f;
    double seconds = 0.0;
    for (int c = 0; c < calls; c++) {
        bench_input(x, c);
        double t0 = bench_seconds();
        ffn_forward(&m, f, &FFN_SPECS[0], x, y);
        seconds += bench_seconds() - t0;
        checksum += y[c % DIM];
    }
    printf("mode %s calls %d computed %.4f us_per_call %.2f checksum %.6g\n", argv[1], calls,
           s.total_neurons ? (double)s.active_neurons / s.total_neurons : 0.0, 1e6 * seconds / calls,
           (double)checksum);
    return 0;
}
