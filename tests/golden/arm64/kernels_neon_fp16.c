// NEON kernels with fp16 arithmetic (ARMv8.2-A FP16: built with -march=armv8.2-a+fp16).
//
// Only called when the CPU reports HWCAP_ASIMDHP; anything else would die with SIGILL.
// Products accumulate in fp16 over blocks of FP16_BLOCK elements (16 per lane), then in float32: the
// rounding error of a 64-long dot product stays near float16's own (about 1e-3 relative), and the
// widening costs little next to the FMAs.
#include <arm_neon.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

// ----------------------------------------------------------------------------
// Dot products

#define FP16_BLOCK 128  // elements summed in fp16 before widening to float32

static inline float32x4_t widen_sum(float32x4_t acc, float16x8_t h) {
    return vaddq_f32(acc, vaddq_f32(vcvt_f32_f16(vget_low_f16(h)), vcvt_high_f32_f16(h)));
}

// out[0..3] = w0..w3 . x with w rows and x (xh) in fp16, each [n]
static inline void dot4_f16(const __fp16 *w0, const __fp16 *w1, const __fp16 *w2, const __fp16 *w3,
                            const __fp16 *x, int n, float *out) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int i = 0;
    while (i + 8 <= n) {
        float16x8_t a0 = vdupq_n_f16(0), a1 = a0, a2 = a0, a3 = a0;
        int stop = i + FP16_BLOCK < n ? i + FP16_BLOCK : n;
        for (; i + 16 <= stop; i += 16) {
            float16x8_t xa = vld1q_f16(x + i), xb = vld1q_f16(x + i + 8);
            a0 = vfmaq_f16(vfmaq_f16(a0, vld1q_f16(w0 + i), xa), vld1q_f16(w0 + i + 8), xb);
            a1 = vfmaq_f16(vfmaq_f16(a1, vld1q_f16(w1 + i), xa), vld1q_f16(w1 + i + 8), xb);
            a2 = vfmaq_f16(vfmaq_f16(a2, vld1q_f16(w2 + i), xa), vld1q_f16(w2 + i + 8), xb);
            a3 = vfmaq_f16(vfmaq_f16(a3, vld1q_f16(w3 + i), xa), vld1q_f16(w3 + i + 8), xb);
        }
        for (; i + 8 <= stop; i += 8) {
            float16x8_t xv = vld1q_f16(x + i);
            a0 = vfmaq_f16(a0, vld1q_f16(w0 + i), xv);
            a1 = vfmaq_f16(a1, vld1q_f16(w1 + i), xv);
            a2 = vfmaq_f16(a2, vld1q_f16(w2 + i), xv);
            a3 = vfmaq_f16(a3, vld1q_f16(w3 + i), xv);
        }
        s0 = widen_sum(s0, a0); s1 = widen_sum(s1, a1); s2 = widen_sum(s2, a2); s3 = widen_sum(s3, a3);
    }
    float r0 = vaddvq_f32(s0), r1 = vaddvq_f32(s1), r2 = vaddvq_f32(s2), r3 = vaddvq_f32(s3);
    for (; i < n; i++) {
        float xi = (float)x[i];
        r0 += (float)w0[i] * xi; r1 += (float)w1[i] * xi; r2 += (float)w2[i] * xi; r3 += (float)w3[i] * xi;
    }
    out[0] = r0; out[1] = r1; out[2] = r2; out[3] = r3;
}

static inline float dot1_f16(const __fp16 *w, const __fp16 *x, int n) {
    float32x4_t s = vdupq_n_f32(0.0f);
    int i = 0;
    while (i + 8 <= n) {
        float16x8_t a = vdupq_n_f16(0);
        int stop = i + FP16_BLOCK < n ? i + FP16_BLOCK : n;
        for (; i + 8 <= stop; i += 8) a = vfmaq_f16(a, vld1q_f16(w + i), vld1q_f16(x + i));
        s = widen_sum(s, a);
    }
    float r = vaddvq_f32(s);
    for (; i < n; i++) r += (float)w[i] * (float)x[i];
    return r;
}

// ----------------------------------------------------------------------------
// Kernels

static void matvec_f16_arith(float *out, const void *w, const float *x, const uint16_t *xh,
                   int begin, int end, int n) {
    (void)x;
    const __fp16 *W = (const __fp16 *)w, *X = (const __fp16 *)xh;
    int r = begin;
    for (; r + 4 <= end; r += 4) {
        const __fp16 *w0 = W + (size_t)r * n;
        dot4_f16(w0, w0 + n, w0 + 2 * (size_t)n, w0 + 3 * (size_t)n, X, n, out + r);
    }
    for (; r < end; r++) out[r] = dot1_f16(W + (size_t)r * n, X, n);
}

static void rows_dot_f16_arith(float *out, const void *w, const float *x, const uint16_t *xh,
                     const int32_t *idx, int begin, int end, int n) {
    (void)x;
    const __fp16 *W = (const __fp16 *)w, *X = (const __fp16 *)xh;
    int k = begin;
    for (; k + 4 <= end; k += 4)
        dot4_f16(W + (size_t)idx[k] * n, W + (size_t)idx[k + 1] * n, W + (size_t)idx[k + 2] * n,
                 W + (size_t)idx[k + 3] * n, X, n, out + k);
    for (; k < end; k++) out[k] = dot1_f16(W + (size_t)idx[k] * n, X, n);
}

// Four rows are combined in fp16, then added to the float32 y.
static void rows_axpy_f16_arith(float *y, const void *w, const float *coef, const int32_t *idx, int count,
                      int begin, int end, int n) {
    const __fp16 *W = (const __fp16 *)w;
    int k = 0;
    for (; k + 4 <= count; k += 4) {
        const __fp16 *r0 = W + (size_t)idx[k] * n, *r1 = W + (size_t)idx[k + 1] * n;
        const __fp16 *r2 = W + (size_t)idx[k + 2] * n, *r3 = W + (size_t)idx[k + 3] * n;
        float16x8_t c0 = vdupq_n_f16((__fp16)coef[k]), c1 = vdupq_n_f16((__fp16)coef[k + 1]);
        float16x8_t c2 = vdupq_n_f16((__fp16)coef[k + 2]), c3 = vdupq_n_f16((__fp16)coef[k + 3]);
        int i = begin;
        for (; i + 8 <= end; i += 8) {
            float16x8_t t = vmulq_f16(vld1q_f16(r0 + i), c0);
            t = vfmaq_f16(t, vld1q_f16(r1 + i), c1);
            t = vfmaq_f16(t, vld1q_f16(r2 + i), c2);
            t = vfmaq_f16(t, vld1q_f16(r3 + i), c3);
            vst1q_f32(y + i, vaddq_f32(vld1q_f32(y + i), vcvt_f32_f16(vget_low_f16(t))));
            vst1q_f32(y + i + 4, vaddq_f32(vld1q_f32(y + i + 4), vcvt_high_f32_f16(t)));
        }
        for (; i < end; i++)
            y[i] += coef[k] * (float)r0[i] + coef[k + 1] * (float)r1[i] +
                    coef[k + 2] * (float)r2[i] + coef[k + 3] * (float)r3[i];
    }
    for (; k < count; k++) {
        const __fp16 *r0 = W + (size_t)idx[k] * n;
        for (int i = begin; i < end; i++) y[i] += coef[k] * (float)r0[i];
    }
}

static void to_half_f16_arith(uint16_t *xh, const float *x, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1_f16((__fp16 *)(xh + i), vcvt_f16_f32(vld1q_f32(x + i)));
    for (; i < n; i++) ((__fp16 *)xh)[i] = (__fp16)x[i];
}

static void row_to_float_f16_arith(float *out, const void *w, int row, int n) {
    const __fp16 *src = (const __fp16 *)w + (size_t)row * n;
    for (int i = 0; i < n; i++) out[i] = (float)src[i];
}

const Kernels kernels_neon_f16_arith = {
    "neon-f16-arith", to_half_f16_arith, matvec_f16_arith, rows_dot_f16_arith, rows_axpy_f16_arith,
    row_to_float_f16_arith,
};
