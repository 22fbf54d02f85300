r"""Periodic correction of :class:`~p4opt.PositiveDefinite`: Cholesky, projection, boundary."""

from __future__ import annotations

import warnings

import torch

from p4opt import linalg
from p4opt._typing import Tensor
from p4opt.families import congruence as cg
from p4opt.families.congruence import project_spd

__all__ = ["PositiveDefiniteCorrection"]


class PositiveDefiniteCorrection:
    r"""The :math:`O(n^3)` corrections of a :class:`~p4opt.PositiveDefinite` (a mixin).

    The family provides the buffers ``master``, ``inv``, ``logabsdet_base`` (and ``factor``,
    ``factor_inv`` in whitened coordinates), ``whitened``, ``floor``, ``where``, ``base`` and
    the flag ``_warned_boundary``.
    """

    master: Tensor
    inv: Tensor
    logabsdet_base: Tensor
    factor: Tensor
    factor_inv: Tensor
    whitened: bool
    floor: float
    where: str
    base: Tensor
    _warned_boundary: bool

    @torch.no_grad()
    def correct(self) -> dict[str, float]:
        r"""Cholesky of the master copy: exact inverse and log-det, PD proven; :math:`O(n^3)`.

        Whitened: the master is first recomputed as :math:`FF^T` and :math:`F^{-1}` by LU
        (backward stable however far the tracked one drifted; an iterative refinement diverges
        once :math:`\lVert I - FF^{-1}\rVert \ge 1`); :math:`F`, the coordinates of the
        pending change, stays as it is, unless the matrix had to be projected back: then the
        projected elements restart from their Cholesky factor.
        """
        figures = {}
        if self.whitened:
            factor, fi = self.factor, self.factor_inv
            figures["factor_residual"] = float(linalg.inverse_residual(factor, fi).abs().amax())
            fresh, info = torch.linalg.inv_ex(factor)
            self.factor_inv.copy_(torch.where((info == 0)[..., None, None], fresh, fi))
            self.master.copy_(cg.symmetrize(factor @ factor.mT))
            self.base.copy_(self.master)
        chol, info = torch.linalg.cholesky_ex(self.master)
        repaired = int((info != 0).sum())
        changed = None
        if repaired:  # rounding broke positive definiteness: project back, factorize again
            projected = project_spd(self.master, self.floor)
            changed = (projected != self.master).flatten(-2).any(-1)[..., None, None]
            self.master.copy_(projected)
            self.base.copy_(self.master)
            chol = None
        residual = float(linalg.inverse_residual(self.master, self.inv).abs().amax())
        tracked = cg.spd_buffers(self.master, self.whitened and changed is not None, chol)
        self.inv.copy_(tracked["inv"])
        self.logabsdet_base.copy_(tracked["logabsdet_base"])
        if "factor" in tracked:  # a projected matrix is no longer F F^T: restart F there
            self.factor.copy_(torch.where(changed, tracked["factor"], self.factor))
            self.factor_inv.copy_(torch.where(changed, tracked["factor_inv"], self.factor_inv))
        condition = self._check_boundary()
        return {"inverse_residual": residual, "repaired": float(repaired), "condition": condition,
                **figures}

    def _check_boundary(self) -> float:
        """Estimated condition number (the largest over a stack); warns once near the boundary
        for the layer's dtype (:func:`~p4opt.families.congruence.boundary_limit`)."""
        condition = float(linalg.spd_condition(self.master, self.inv).amax())
        message = cg.boundary_warning(self.where, condition, self.base.dtype)
        if message and not self._warned_boundary:
            self._warned_boundary = True
            warnings.warn(message, stacklevel=3)
        return condition

    def dtype_changed(self, old: torch.dtype, new: torch.dtype) -> None:
        with torch.no_grad():
            self.base.copy_(self.master)
            self._check_boundary()
