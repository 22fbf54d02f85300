r"""Optional compiled loops for :mod:`p4opt.nn.fused` (plain C through :mod:`ctypes`).

The fused chain is bound by per-kernel dispatch (four tiny kernels per layer).
When a C compiler is available, the two sequential loops (forward states,
backward recursion) are compiled once into a small shared library in the user
cache and called with raw pointers; everything else stays in torch. Set
``P4OPT_NATIVE=0`` to disable; any build failure falls back to torch silently.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from p4opt._typing import Tensor

__all__ = ["available", "forward_states", "backward_recursion"]

_SOURCE = r"""
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
"""


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("P4OPT_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.sha256((_SOURCE + platform.machine()).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "p4opt"
    lib_path = cache / f"chain_{key}.so"
    try:
        if not lib_path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "chain.c"
                src.write_text(_SOURCE)
                built = Path(tmp) / "chain.so"
                flags = ["-O3", "-fno-math-errno", "-shared", "-fPIC"]
                subprocess.run(
                    [compiler, *flags, str(src), "-o", str(built), "-lm"],
                    check=True, capture_output=True, timeout=120,
                )
                os.replace(built, lib_path)  # atomic: concurrent builds never see half a file
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError):
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_long
    for suffix in ("f32", "f64"):
        getattr(lib, f"chain_forward_{suffix}").argtypes = [pointer] * 3 + [size] * 3
        getattr(lib, f"chain_forward_{suffix}").restype = ctypes.c_int
        getattr(lib, f"chain_backward_{suffix}").argtypes = [pointer] * 4 + [size] * 3
    return lib


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def available(t: Tensor) -> bool:
    """Whether the compiled loops can run on tensors like ``t`` (CPU, float32/64)."""
    return t.device.type == "cpu" and t.dtype in _SUFFIX and _library() is not None


def forward_states(mt: Tensor, states: Tensor, ladj: Tensor) -> None:
    """Fill ``states[1:]`` and the activations' log-det ``ladj`` (B,) in place (contiguous)."""
    lib = _library()
    assert lib is not None and all(t.is_contiguous() for t in (mt, states, ladj))
    n_layers, n, _ = mt.shape
    fn = getattr(lib, f"chain_forward_{_SUFFIX[mt.dtype]}")
    if fn(mt.data_ptr(), states.data_ptr(), ladj.data_ptr(), n_layers, n, states.shape[-1]):
        raise MemoryError("chain_forward could not allocate its scratch buffer")


def backward_recursion(w_t: Tensor, states: Tensor, grad_ladj: Tensor, grads: Tensor) -> None:
    """Fill ``grads[:-1]`` from ``grads[-1]`` in place (all contiguous)."""
    lib = _library()
    assert lib is not None
    assert all(t.is_contiguous() for t in (w_t, states, grad_ladj, grads))
    n_layers, n, _ = w_t.shape
    fn = getattr(lib, f"chain_backward_{_SUFFIX[w_t.dtype]}")
    fn(w_t.data_ptr(), states.data_ptr(), grad_ladj.data_ptr(), grads.data_ptr(), n_layers, n,
       grads.shape[-1])
