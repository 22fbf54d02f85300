"""Helper shared by the modules of :mod:`p4opt.linalg` (private)."""

from __future__ import annotations

import torch

from p4opt._typing import Tensor

__all__: list[str] = []


def _eye_like(m: Tensor) -> Tensor:
    """Identity of the shape ``(*, n, n)``, dtype and device of ``m`` (an expanded view)."""
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)


#: Dtypes without LU, Cholesky or triangular-solve kernels on CPU.
_HALF = (torch.float16, torch.bfloat16)


def _solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a factorization or solve runs in for tensors of ``dtype`` (float32 for half)."""
    return torch.float32 if dtype in _HALF else dtype
