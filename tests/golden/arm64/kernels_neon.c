// NEON kernels for any ARMv8-A CPU: float32 weights, and fp16 weights widened to float32 on load.
//
// Products run four rows at a time so each load of x feeds four FMAs; the sparse kernels get
// active-neuron lists padded to a multiple of four (ROW_UNROLL), so the one-row tails stay cold.
#include <arm_neon.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

// ----------------------------------------------------------------------------
// float32 weights

// out[0..3] = w0..w3 . x, each row [n]
static inline void dot4_f32(const float *w0, const float *w1, const float *w2, const float *w3,
                            const float *x, int n, float *out) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        float32x4_t xa = vld1q_f32(x + i), xb = vld1q_f32(x + i + 4);
        a0 = vfmaq_f32(vfmaq_f32(a0, vld1q_f32(w0 + i), xa), vld1q_f32(w0 + i + 4), xb);
        a1 = vfmaq_f32(vfmaq_f32(a1, vld1q_f32(w1 + i), xa), vld1q_f32(w1 + i + 4), xb);
        a2 = vfmaq_f32(vfmaq_f32(a2, vld1q_f32(w2 + i), xa), vld1q_f32(w2 + i + 4), xb);
        a3 = vfmaq_f32(vfmaq_f32(a3, vld1q_f32(w3 + i), xa), vld1q_f32(w3 + i + 4), xb);
    }
    float s0 = vaddvq_f32(a0), s1 = vaddvq_f32(a1), s2 = vaddvq_f32(a2), s3 = vaddvq_f32(a3);
    for (; i < n; i++) {
        s0 += w0[i] * x[i];
        s1 += w1[i] * x[i];
        s2 += w2[i] * x[i];
        s3 += w3[i] * x[i];
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

static inline float dot1_f32(const float *w, const float *x, int n) {
    float32x4_t a = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= n; i += 4) a = vfmaq_f32(a, vld1q_f32(w + i), vld1q_f32(x + i));
    float s = vaddvq_f32(a);
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

static void matvec_f32(float *out, const void *w, const float *x, const uint16_t *xh,
                       int begin, int end, int n) {
    (void)xh;
    const float *W = (const float *)w;
    int r = begin;
    for (; r + 4 <= end; r += 4) {
        const float *w0 = W + (size_t)r * n;
        dot4_f32(w0, w0 + n, w0 + 2 * (size_t)n, w0 + 3 * (size_t)n, x, n, out + r);
    }
    for (; r < end; r++) out[r] = dot1_f32(W + (size_t)r * n, x, n);
}

static void rows_dot_f32(float *out, const void *w, const float *x, const uint16_t *xh,
                         const int32_t *idx, int begin, int end, int n) {
    (void)xh;
    const float *W = (const float *)w;
    int k = begin;
    for (; k + 4 <= end; k += 4)
        dot4_f32(W + (size_t)idx[k] * n, W + (size_t)idx[k + 1] * n, W + (size_t)idx[k + 2] * n,
                 W + (size_t)idx[k + 3] * n, x, n, out + k);
    for (; k < end; k++) out[k] = dot1_f32(W + (size_t)idx[k] * n, x, n);
}

static void rows_axpy_f32(float *y, const void *w, const float *coef, const int32_t *idx, int count,
                          int begin, int end, int n) {
    const float *W = (const float *)w;
    int k = 0;
    for (; k + 4 <= count; k += 4) {
        const float *r0 = W + (size_t)idx[k] * n, *r1 = W + (size_t)idx[k + 1] * n;
        const float *r2 = W + (size_t)idx[k + 2] * n, *r3 = W + (size_t)idx[k + 3] * n;
        float c0 = coef[k], c1 = coef[k + 1], c2 = coef[k + 2], c3 = coef[k + 3];
        int i = begin;
        for (; i + 8 <= end; i += 8) {
            float32x4_t ya = vld1q_f32(y + i), yb = vld1q_f32(y + i + 4);
            ya = vfmaq_n_f32(ya, vld1q_f32(r0 + i), c0);
            yb = vfmaq_n_f32(yb, vld1q_f32(r0 + i + 4), c0);
            ya = vfmaq_n_f32(ya, vld1q_f32(r1 + i), c1);
            yb = vfmaq_n_f32(yb, vld1q_f32(r1 + i + 4), c1);
            ya = vfmaq_n_f32(ya, vld1q_f32(r2 + i), c2);
            yb = vfmaq_n_f32(yb, vld1q_f32(r2 + i + 4), c2);
            ya = vfmaq_n_f32(ya, vld1q_f32(r3 + i), c3);
            yb = vfmaq_n_f32(yb, vld1q_f32(r3 + i + 4), c3);
            vst1q_f32(y + i, ya);
            vst1q_f32(y + i + 4, yb);
        }
        for (; i < end; i++) y[i] += c0 * r0[i] + c1 * r1[i] + c2 * r2[i] + c3 * r3[i];
    }
    for (; k < count; k++) {
        const float *r0 = W + (size_t)idx[k] * n;
        float c0 = coef[k];
        for (int i = begin; i < end; i++) y[i] += c0 * r0[i];
    }
}

static void row_to_float_f32(float *out, const void *w, int row, int n) {
    const float *src = (const float *)w + (size_t)row * n;
    for (int i = 0; i < n; i++) out[i] = src[i];
}

const Kernels kernels_neon_f32 = {
    "neon-f32", NULL, matvec_f32, rows_dot_f32, rows_axpy_f32, row_to_float_f32,
};

// ----------------------------------------------------------------------------
// fp16 weights, float32 arithmetic (FCVTL widening is in every ARMv8-A NEON unit)

static inline float32x4_t load_lo(const uint16_t *p) {   // 4 fp16 -> float32x4
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}

static inline float half_bits_to_float(uint16_t h) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

static inline void dot4_f16(const uint16_t *w0, const uint16_t *w1, const uint16_t *w2,
                            const uint16_t *w3, const float *x, int n, float *out) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t xv = vld1q_f32(x + i);
        a0 = vfmaq_f32(a0, load_lo(w0 + i), xv);
        a1 = vfmaq_f32(a1, load_lo(w1 + i), xv);
        a2 = vfmaq_f32(a2, load_lo(w2 + i), xv);
        a3 = vfmaq_f32(a3, load_lo(w3 + i), xv);
    }
    float s0 = vaddvq_f32(a0), s1 = vaddvq_f32(a1), s2 = vaddvq_f32(a2), s3 = vaddvq_f32(a3);
    for (; i < n; i++) {
        s0 += half_bits_to_float(w0[i]) * x[i];
        s1 += half_bits_to_float(w1[i]) * x[i];
        s2 += half_bits_to_float(w2[i]) * x[i];
        s3 += half_bits_to_float(w3[i]) * x[i];
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

static inline float dot1_f16(const uint16_t *w, const float *x, int n) {
    float32x4_t a = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= n; i += 4) a = vfmaq_f32(a, load_lo(w + i), vld1q_f32(x + i));
    float s = vaddvq_f32(a);
    for (; i < n; i++) s += half_bits_to_float(w[i]) * x[i];
    return s;
}

static void matvec_f16(float *out, const void *w, const float *x, const uint16_t *xh,
                       int begin, int end, int n) {
    (void)xh;
    const uint16_t *W = (const uint16_t *)w;
    int r = begin;
    for (; r + 4 <= end; r += 4) {
        const uint16_t *w0 = W + (size_t)r * n;
        dot4_f16(w0, w0 + n, w0 + 2 * (size_t)n, w0 + 3 * (size_t)n, x, n, out + r);
    }
    for (; r < end; r++) out[r] = dot1_f16(W + (size_t)r * n, x, n);
}

static void rows_dot_f16(float *out, const void *w, const float *x, const uint16_t *xh,
                         const int32_t *idx, int begin, int end, int n) {
    (void)xh;
    const uint16_t *W = (const uint16_t *)w;
    int k = begin;
    for (; k + 4 <= end; k += 4)
        dot4_f16(W + (size_t)idx[k] * n, W + (size_t)idx[k + 1] * n, W + (size_t)idx[k + 2] * n,
                 W + (size_t)idx[k + 3] * n, x, n, out + k);
    for (; k < end; k++) out[k] = dot1_f16(W + (size_t)idx[k] * n, x, n);
}

static void rows_axpy_f16(float *y, const void *w, const float *coef, const int32_t *idx, int count,
                          int begin, int end, int n) {
    const uint16_t *W = (const uint16_t *)w;
    int k = 0;
    for (; k + 4 <= count; k += 4) {
        const uint16_t *r0 = W + (size_t)idx[k] * n, *r1 = W + (size_t)idx[k + 1] * n;
        const uint16_t *r2 = W + (size_t)idx[k + 2] * n, *r3 = W + (size_t)idx[k + 3] * n;
        float c0 = coef[k], c1 = coef[k + 1], c2 = coef[k + 2], c3 = coef[k + 3];
        int i = begin;
        for (; i + 4 <= end; i += 4) {
            float32x4_t yv = vld1q_f32(y + i);
            yv = vfmaq_n_f32(yv, load_lo(r0 + i), c0);
            yv = vfmaq_n_f32(yv, load_lo(r1 + i), c1);
            yv = vfmaq_n_f32(yv, load_lo(r2 + i), c2);
            yv = vfmaq_n_f32(yv, load_lo(r3 + i), c3);
            vst1q_f32(y + i, yv);
        }
        for (; i < end; i++)
            y[i] += c0 * half_bits_to_float(r0[i]) + c1 * half_bits_to_float(r1[i]) +
                    c2 * half_bits_to_float(r2[i]) + c3 * half_bits_to_float(r3[i]);
    }
    for (; k < count; k++) {
        const uint16_t *r0 = W + (size_t)idx[k] * n;
        float c0 = coef[k];
        for (int i = begin; i < end; i++) y[i] += c0 * half_bits_to_float(r0[i]);
    }
}

static void row_to_float_f16(float *out, const void *w, int row, int n) {
    const uint16_t *src = (const uint16_t *)w + (size_t)row * n;
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, load_lo(src + i));
    for (; i < n; i++) out[i] = half_bits_to_float(src[i]);
}

const Kernels kernels_neon_f16 = {
    "neon-f16", NULL, matvec_f16, rows_dot_f16, rows_axpy_f16, row_to_float_f16,
};
