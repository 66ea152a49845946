// Portable scalar kernels: the reference path, and what the host (x86_64) build runs.
#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

// ----------------------------------------------------------------------------
// IEEE fp16 <-> float32 without compiler support for _Float16

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {                       // inf / nan
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {                   // normal
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {                  // zero
        bits = sign;
    } else {                                 // subnormal: renormalize
        exp = 113;
        while (!(mant & 0x400)) { mant <<= 1; exp--; }
        bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
    union { uint32_t u; float f; } v = { bits };
    return v.f;
}

static uint16_t float_to_half(float f) {     // round to nearest even, like the conversion instructions
    union { float f; uint32_t u; } v = { f };
    uint32_t sign = (v.u >> 16) & 0x8000;
    uint32_t abs = v.u & 0x7fffffff;
    if (abs >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (abs > 0x7f800000u ? 0x200 : 0));
    if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);          // overflows to inf
    if (abs < 0x38800000u) {                                           // subnormal or zero
        if (abs < 0x33000000u) return (uint16_t)sign;
        uint32_t shift = 126 - (abs >> 23);  // 14..24: value / 2^-24 = mant >> shift
        uint32_t mant = (abs & 0x7fffff) | 0x800000;
        uint32_t half = mant >> shift;
        uint32_t rest = mant & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rest > mid || (rest == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = ((abs >> 13) - (112 << 10));
    uint32_t rest = abs & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

void half_from_float(uint16_t *out, const float *x, int n) {
    for (int i = 0; i < n; i++) out[i] = float_to_half(x[i]);
}

// ----------------------------------------------------------------------------
// float32 weights

// Eight independent partial sums: the compiler may keep them in one vector register (no reassociation).
static float dot_f32(const float *w, const float *x, int n) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += w[i + k] * x[i + k];
    float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) sum += w[i] * x[i];
    return sum;
}

static void matvec_f32(float *out, const void *w, const float *x, const uint16_t *xh,
                       int begin, int end, int n) {
    (void)xh;
    const float *W = (const float *)w;
    for (int r = begin; r < end; r++) out[r] = dot_f32(W + (size_t)r * n, x, n);
}

static void rows_dot_f32(float *out, const void *w, const float *x, const uint16_t *xh,
                         const int32_t *idx, int begin, int end, int n) {
    (void)xh;
    const float *W = (const float *)w;
    for (int k = begin; k < end; k++) out[k] = dot_f32(W + (size_t)idx[k] * n, x, n);
}

static void rows_axpy_f32(float *y, const void *w, const float *coef, const int32_t *idx, int count,
                          int begin, int end, int n) {
    const float *W = (const float *)w;
    for (int k = 0; k < count; k++) {
        const float *row = W + (size_t)idx[k] * n;
        float c = coef[k];
        for (int i = begin; i < end; i++) y[i] += c * row[i];
    }
}

static void row_to_float_f32(float *out, const void *w, int row, int n) {
    const float *src = (const float *)w + (size_t)row * n;
    for (int i = 0; i < n; i++) out[i] = src[i];
}

const Kernels kernels_scalar_f32 = {
    "scalar-f32", NULL, matvec_f32, rows_dot_f32, rows_axpy_f32, row_to_float_f32,
};

// ----------------------------------------------------------------------------
// fp16 weights, float32 arithmetic

static float dot_f16(const uint16_t *w, const float *x, int n) {
    float acc = 0.0f;
    for (int i = 0; i < n; i++) acc += half_to_float(w[i]) * x[i];
    return acc;
}

static void matvec_f16(float *out, const void *w, const float *x, const uint16_t *xh,
                       int begin, int end, int n) {
    (void)xh;
    const uint16_t *W = (const uint16_t *)w;
    for (int r = begin; r < end; r++) out[r] = dot_f16(W + (size_t)r * n, x, n);
}

static void rows_dot_f16(float *out, const void *w, const float *x, const uint16_t *xh,
                         const int32_t *idx, int begin, int end, int n) {
    (void)xh;
    const uint16_t *W = (const uint16_t *)w;
    for (int k = begin; k < end; k++) out[k] = dot_f16(W + (size_t)idx[k] * n, x, n);
}

static void rows_axpy_f16(float *y, const void *w, const float *coef, const int32_t *idx, int count,
                          int begin, int end, int n) {
    const uint16_t *W = (const uint16_t *)w;
    for (int k = 0; k < count; k++) {
        const uint16_t *row = W + (size_t)idx[k] * n;
        float c = coef[k];
        for (int i = begin; i < end; i++) y[i] += c * half_to_float(row[i]);
    }
}

static void row_to_float_f16(float *out, const void *w, int row, int n) {
    const uint16_t *src = (const uint16_t *)w + (size_t)row * n;
    for (int i = 0; i < n; i++) out[i] = half_to_float(src[i]);
}

const Kernels kernels_scalar_f16 = {
    "scalar-f16", NULL, matvec_f16, rows_dot_f16, rows_axpy_f16, row_to_float_f16,
};
