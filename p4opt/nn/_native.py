r"""Optional compiled loops for :mod:`p4opt.nn.fused` (plain C through :mod:`ctypes`).

The fused chain is bound by per-kernel dispatch (four tiny kernels per layer). When a C
compiler is available, the two sequential loops (forward states, backward recursion) in
``_chain.c`` (shipped with the package) are compiled once into a small shared library in the
user cache and called with raw pointers; everything else stays in torch. The cache key covers
the source, the compiler and its version, the flags, the machine and the torch version. Set
``P4OPT_NATIVE=0`` to use torch only; any other reason for falling back (no compiler, a failed
build) is reported once as a warning.
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
import warnings
from pathlib import Path

import torch

from p4opt._typing import Tensor
from p4opt.errors import P4ValueError, describe

__all__ = ["available", "forward_states", "backward_recursion"]

_SOURCE = Path(__file__).with_name("_chain.c")
_FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC")


def _fallback(reason: str) -> None:
    warnings.warn(
        f"p4opt.nn: compiled chain loops unavailable ({reason}); using torch kernels, which are "
        "slower for long stacks of small layers (set P4OPT_NATIVE=0 to silence this)",
        RuntimeWarning,
        stacklevel=3,
    )


def _cache_key(compiler: str) -> str:
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        version = "unknown"
    parts = [_SOURCE.read_text(), compiler, version, " ".join(_FLAGS), platform.machine(),
             torch.__version__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("P4OPT_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        _fallback("no C compiler found")
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "p4opt"
    lib_path = cache / f"chain_{_cache_key(compiler)}.so"
    try:
        if not lib_path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                built = Path(tmp) / "chain.so"
                subprocess.run(
                    [compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"],
                    check=True, capture_output=True, timeout=120,
                )
                os.replace(built, lib_path)  # atomic: concurrent builds never see half a file
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as error:
        _fallback(f"{type(error).__name__}: {error}")
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


def _check(shapes: dict[str, tuple[Tensor, tuple[int, ...]]], dtype: torch.dtype) -> None:
    """Contiguous CPU tensors of one dtype with the given shapes (the C code trusts them)."""
    for name, (t, shape) in shapes.items():
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
            raise P4ValueError(f"{name} must be a contiguous CPU {dtype} tensor, got {describe(t)}")
        if tuple(t.shape) != shape:
            raise P4ValueError(f"{name} must have shape {shape}, got {describe(t)}")


def forward_states(mt: Tensor, states: Tensor, ladj: Tensor) -> None:
    """Fill ``states[1:]`` and the activations' log-det ``ladj`` (B,) in place.

    ``mt``: (L, n, 2n + 1) layer matrices; ``states``: (L + 1, 2n + 1, B); ``ladj``: (B,).
    """
    lib = _library()
    if lib is None:
        raise P4ValueError("the compiled loops are not available; check available() first")
    n_layers, n, width = mt.shape
    batch = states.shape[-1]
    _check({"mt": (mt, (n_layers, n, 2 * n + 1)), "states": (states, (n_layers + 1, width, batch)),
            "ladj": (ladj, (batch,))}, mt.dtype)
    fn = getattr(lib, f"chain_forward_{_SUFFIX[mt.dtype]}")
    if fn(mt.data_ptr(), states.data_ptr(), ladj.data_ptr(), n_layers, n, batch):
        raise MemoryError("chain_forward could not allocate its scratch buffer")


def backward_recursion(w_t: Tensor, states: Tensor, grad_ladj: Tensor, grads: Tensor) -> None:
    """Fill ``grads[:-1]`` from ``grads[-1]`` in place.

    ``w_t``: (L, n, n); ``states``: (L + 1, 2n + 1, B); ``grad_ladj``: (B,); ``grads``: (L, n, B).
    """
    lib = _library()
    if lib is None:
        raise P4ValueError("the compiled loops are not available; check available() first")
    n_layers, n, _ = w_t.shape
    batch = grads.shape[-1]
    _check({"w_t": (w_t, (n_layers, n, n)), "states": (states, (n_layers + 1, 2 * n + 1, batch)),
            "grad_ladj": (grad_ladj, (batch,)), "grads": (grads, (n_layers, n, batch))}, w_t.dtype)
    fn = getattr(lib, f"chain_backward_{_SUFFIX[w_t.dtype]}")
    fn(w_t.data_ptr(), states.data_ptr(), grad_ladj.data_ptr(), grads.data_ptr(), n_layers, n,
       batch)
