// Compute kernels of tsrun: one table per (instruction set, weight dtype), picked at run time.
//
// Every kernel works on a slice [begin, end) so the thread pool can split the work.
// Weights are row-major; a "row" has n elements of the weight dtype (float32 or IEEE fp16 bits).
// Kernel files include only <arm_neon.h>, <stdint.h>, <stddef.h> and this header.
#ifndef TSRUN_KERNELS_H
#define TSRUN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *name;         // "scalar-f32", "neon-f16-arith", ...
    // x -> xh as fp16 for kernels that read their input in fp16 (converted once per product); NULL: they
    // read the float32 x
    void (*to_half)(uint16_t *xh, const float *x, int n);
    // out[r] = W[r, :] . x for rows r in [begin, end)
    void (*matvec)(float *out, const void *w, const float *x, const uint16_t *xh,
                   int begin, int end, int n);
    // out[k] = W[idx[k], :] . x for slots k in [begin, end)
    void (*rows_dot)(float *out, const void *w, const float *x, const uint16_t *xh,
                     const int32_t *idx, int begin, int end, int n);
    // y[c] += sum_k coef[k] * W[idx[k], c] for k in [0, count) and columns c in [begin, end)
    void (*rows_axpy)(float *y, const void *w, const float *coef, const int32_t *idx, int count,
                      int begin, int end, int n);
    // out[c] = W[row, c] as float, c in [0, n) (embedding lookup)
    void (*row_to_float)(float *out, const void *w, int row, int n);
} Kernels;

// float -> fp16 bits for n values, rounding to nearest even (portable; tools convert weights with it)
void half_from_float(uint16_t *out, const float *x, int n);

extern const Kernels kernels_scalar_f32;
extern const Kernels kernels_scalar_f16;
#if defined(__aarch64__)
extern const Kernels kernels_neon_f32;
extern const Kernels kernels_neon_f16;        // fp16 storage, float32 arithmetic (any ARMv8-A)
extern const Kernels kernels_neon_f16_arith;  // fp16 arithmetic (ARMv8.2-A FP16, HWCAP_ASIMDHP)
#endif

#endif
