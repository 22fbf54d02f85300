/* Compiled loops of p4opt.nn.fused (loaded by p4opt/nn/_native.py through ctypes). */
#include <math.h>
#include <stdlib.h>
/* Forward: states[l+1] = [z; sqrt(z^2+1); 1] with z = mt[l] @ states[l]; ladj[b] accumulates
   sum log f'(z) = log prod (1 + z/(2h)): the log of a double product every 256 factors. */
#define CHAIN(T, SQRT, SUFFIX)                                                        \
int chain_forward_##SUFFIX(const T* mt, T* states, T* ladj, long L, long n, long B) { \
    long w = 2 * n + 1, count = 0;                                                    \
    double* prod = (double*)malloc(sizeof(double) * B);                               \
    if (!prod) return 1;                                                              \
    for (long b = 0; b < B; ++b) { prod[b] = 1.0; ladj[b] = 0; }                      \
    for (long l = 0; l < L; ++l) {                                                    \
        const T* m = mt + l * n * w;                                                  \
        const T* s = states + l * w * B;                                              \
        T* out = states + (l + 1) * w * B;                                            \
        for (long i = 0; i < n; ++i) {                                                \
            T* z = out + i * B;                                                       \
            for (long b = 0; b < B; ++b) z[b] = 0;                                    \
            for (long j = 0; j < w; ++j) {                                            \
                const T c = m[i * w + j];                                             \
                const T* sj = s + j * B;                                              \
                for (long b = 0; b < B; ++b) z[b] += c * sj[b];                       \
            }                                                                         \
            if (l < L - 1) {                                                          \
                T* h = out + (n + i) * B;                                             \
                for (long b = 0; b < B; ++b) h[b] = SQRT(z[b] * z[b] + 1);            \
                for (long b = 0; b < B; ++b) prod[b] *= 1.0 + 0.5 * z[b] / h[b];      \
                if (++count == 256) {                                                 \
                    for (long b = 0; b < B; ++b) { ladj[b] += log(prod[b]); prod[b] = 1.0; } \
                    count = 0;                                                        \
                }                                                                     \
            }                                                                         \
        }                                                                             \
    }                                                                                 \
    for (long b = 0; b < B; ++b) ladj[b] += log(prod[b]);                             \
    free(prod);                                                                       \
    return 0;                                                                         \
}                                                                                     \
/* Backward: dz_{l-1} = f'(z_{l-1}) * (W_l^T dz_l) + gl * f''/f'(z_{l-1}), with          \
   f' = 1 + z/(2h) and f''/f' = 1/(h^2 (2h + z)) read from the saved states. */          \
void chain_backward_##SUFFIX(const T* wt, const T* states, const T* gl, T* grads,     \
                             long L, long n, long B) {                                \
    long w = 2 * n + 1;                                                               \
    for (long l = L - 1; l > 0; --l) {                                                \
        const T* wl = wt + l * n * n;                                                 \
        const T* g = grads + l * n * B;                                               \
        T* o = grads + (l - 1) * n * B;                                               \
        const T* s = states + l * w * B;                                              \
        for (long i = 0; i < n; ++i) {                                                \
            T* oi = o + i * B;                                                        \
            const T* z = s + i * B;                                                   \
            const T* h = s + (n + i) * B;                                             \
            for (long b = 0; b < B; ++b) oi[b] = 0;                                   \
            for (long j = 0; j < n; ++j) {                                            \
                const T c = wl[i * n + j];                                            \
                const T* gj = g + j * B;                                              \
                for (long b = 0; b < B; ++b) oi[b] += c * gj[b];                      \
            }                                                                         \
            for (long b = 0; b < B; ++b)                                              \
                oi[b] = oi[b] * (1 + (T)0.5 * z[b] / h[b])                            \
                        + gl[b] / (h[b] * h[b] * (2 * h[b] + z[b]));                  \
        }                                                                             \
    }                                                                                 \
}
CHAIN(float, sqrtf, f32)
CHAIN(double, sqrt, f64)
