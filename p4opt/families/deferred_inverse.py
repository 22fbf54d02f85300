r"""An inverse buffer that may wait, as LU factors, until something reads it.

A whole-step merge of :class:`~p4opt.Invertible` factorizes the merged matrix :math:`A` in
float64 (LU, :math:`\tfrac23 n^3` flops) for its log-determinant. Forming :math:`A^{-1}`
from the factors takes a further :math:`2n^3`, yet a training step needs only the gradient
of :math:`\log|\det A|`, which is :math:`A^{-T}` in the layer's dtype. So the fold keeps the
factors and marks the ``inv`` buffer as pending; the buffer is solved for, in float64 and
exactly as the eager fold would have, the first time anything reads it (a user query,
``validate()``, ``state_dict()``, a device or dtype move, a low-rank merge). The gradient
meanwhile comes from the factors rounded into the layer's dtype, as accurate as the gradient
of a dense weight in that dtype.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from p4opt._typing import Tensor
from p4opt.linalg._common import _solver_dtype

__all__ = ["DeferredInverse"]


@lru_cache(maxsize=16)
def _identity(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A shared read-only identity, the right-hand side of the solves below."""
    return torch.eye(n, dtype=dtype, device=device)


class DeferredInverse:
    """Mixin for a module with an ``inv`` buffer (*, n, n) that a fold may leave pending.

    :meth:`_defer_inverse` records LU factors of the matrix whose inverse ``inv`` should
    hold; reading ``self.inv`` solves for it first. Paths that bypass attribute access
    (``state_dict``, ``load_state_dict``, ``_apply``) are covered by the hooks below; code
    that iterates ``module.buffers()`` directly sees the last solved inverse, so call
    :meth:`_settle_inverse` (or read ``pert.inv``) before copying buffers by hand.
    """

    _pending_lu: tuple[Tensor, Tensor, Tensor | None] | None = None
    #: Counts deferrals, so that caches of the layer-dtype inverse know when to recompute.
    _lu_generation: int = 0

    def __getattr__(self, name: str) -> Any:
        if name == "inv" and self.__dict__.get("_pending_lu") is not None:
            self._settle_inverse()
        return super().__getattr__(name)  # type: ignore[misc]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "inv":  # an assigned inverse replaces the pending one
            self.__dict__["_pending_lu"] = None
        super().__setattr__(name, value)  # type: ignore[misc]

    @property
    def _inverse_shape(self) -> torch.Size:
        """Shape of ``inv`` (*, n, n), known without solving for a pending inverse."""
        return self._buffers["inv"].shape  # type: ignore[attr-defined]

    @property
    def _inverse_pending(self) -> bool:
        return self.__dict__.get("_pending_lu") is not None

    def _defer_inverse(self, factors: Tensor, pivots: Tensor) -> None:
        """Make ``inv`` the inverse of the matrix :math:`A` whose transpose has the LU factors
        ``(factors, pivots)`` (as returned by ``torch.linalg.lu_factor(A.mT)``), solved for
        when first read."""
        self._pending_lu = (factors, pivots, None)
        self._lu_generation += 1

    def _scale_pending_inverse(self, factor: Tensor) -> None:
        """Multiply the pending inverse by ``factor`` (shape (*)), without solving for it."""
        factors, pivots, scale = self._pending_lu  # type: ignore[misc]
        self._pending_lu = (factors, pivots, factor if scale is None else scale * factor)
        self._lu_generation += 1

    def _settle_inverse(self) -> None:
        """Solve for a pending inverse into ``inv`` (float64 LU solve, :math:`O(n^3)`)."""
        pending = self.__dict__.get("_pending_lu")
        if pending is None:
            return
        self._pending_lu = None
        factors, pivots, scale = pending
        inv = self._buffers["inv"]  # type: ignore[attr-defined]
        with torch.no_grad():
            eye = _identity(factors.shape[-1], factors.dtype, factors.device)
            # the solve returns column-major A^{-T}: its transpose is a row-major A^{-1}
            inv.copy_(torch.linalg.lu_solve(factors, pivots, eye.expand_as(factors)).mT)
            if scale is not None:
                inv.mul_(scale[..., None, None])

    def _pending_inverse_transposed(self, dtype: torch.dtype) -> Tensor:
        r""":math:`A^{-T}` in ``dtype`` from the pending factors rounded into ``dtype``."""
        factors, pivots, scale = self._pending_lu  # type: ignore[misc]
        # LU solves have no half-precision kernels: float16 / bfloat16 layers solve in float32
        work = _solver_dtype(dtype)
        eye = _identity(factors.shape[-1], work, factors.device)
        with torch.no_grad():
            # column-major A^{-1}, whose transpose is a row-major A^{-T}
            out = torch.linalg.lu_solve(
                factors.to(work), pivots, eye.expand_as(factors), adjoint=True
            ).mT
            if scale is not None:
                out.mul_(scale.to(work)[..., None, None])
        return out.to(dtype)

    # hooks for the paths that reach ``_buffers`` without attribute access
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self._settle_inverse()
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._pending_lu = None  # the loaded inverse replaces the pending one
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]
