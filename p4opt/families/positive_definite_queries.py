r"""User queries of :class:`~p4opt.PositiveDefinite`: log det, inverse, solve, validate."""

from __future__ import annotations

import math

import torch

from p4opt import linalg
from p4opt._typing import Tensor
from p4opt.errors import P4TypeError, ShapeError, describe
from p4opt.families import congruence as cg
from p4opt.linalg._common import _eye_like
from p4opt.perturbation import ValidationReport

__all__ = ["PositiveDefiniteQueries"]


#: ``validate()``'s tolerance of the inverse and log-determinant errors (float64 bookkeeping).
INVERSE_TOLERANCE = 1e-6


class PositiveDefiniteQueries:
    r"""Queries on the current SPD matrix :math:`W` of a :class:`~p4opt.PositiveDefinite`.

    The family provides the buffers ``master``, ``inv``, ``logabsdet_base`` (and ``factor``,
    ``factor_inv`` in whitened coordinates), the trainable ``delta`` (or ``U``, ``V``),
    ``update``, ``whitened``, ``where``, ``base``, ``current()``, ``_at_zero()`` and
    ``_factors()``.
    """

    master: Tensor
    inv: Tensor
    logabsdet_base: Tensor
    factor: Tensor
    factor_inv: Tensor
    delta: Tensor
    update: str
    whitened: bool
    where: str
    base: Tensor

    # provided by the family: _at_zero(), _factors(); by Perturbation: current()

    def logabsdet(self) -> Tensor:
        r""":math:`\log\det W` of the current matrix :math:`W`, differentiable; shape (*)."""
        if self._at_zero():  # exact value, exact gradient 2I
            return self.logabsdet_base + 2 * self.delta.to(torch.float64).diagonal(
                dim1=-2, dim2=-1
            ).sum(-1)
        if self.update == "projected":  # det M = det(I + delta) in either coordinates
            delta = self.delta.to(torch.float64)
            return self.logabsdet_base + 2 * torch.linalg.slogdet(delta + _eye_like(delta))[1]
        u, v = self._factors()
        return self.logabsdet_base + 2 * torch.linalg.slogdet(cg.congruence_capacitance(u, v))[1]

    def sign(self) -> Tensor:
        r"""Sign of :math:`\det W`: always ``+1.``; shape (*)."""
        return torch.ones_like(self.logabsdet_base)

    def inverse(self) -> Tensor:
        r""":math:`W^{-1}` (symmetric), float64, differentiable; shape (*, n, n)."""
        if self._at_zero():  # first-order expansion, exact at delta = 0 with its gradient
            delta = self.delta.to(torch.float64)
            if self.whitened:  # W^{-1} = F^{-T} (I + D)^{-T} (I + D)^{-1} F^{-1}
                fi = self.factor_inv
                return self.inv - fi.mT @ (delta + delta.mT) @ fi
            return self.inv - self.inv @ delta - delta.mT @ self.inv
        return cg.congruence_inverse(self.inv, *self._factors())

    def solve(self, y: Tensor) -> Tensor:
        r"""Apply :math:`W^{-1}` to every vector ``y[..., *, n]``; differentiable, ``y``'s dtype.

        Cost :math:`O(Bn^2)` right after a merge, plus :meth:`inverse` otherwise.
        """
        n, stack = self.inv.shape[-1], self.inv.shape[:-2]
        if not isinstance(y, Tensor) or not y.is_floating_point():
            raise P4TypeError(f"y must be a floating-point tensor, got {describe(y)}")
        if y.ndim < 1 + len(stack) or y.shape[y.ndim - 1 - len(stack):] != (*stack, n):
            want = ", ".join(str(d) for d in (*stack, n))
            raise ShapeError(f"y must have shape (..., {want}) for {self.where}, got {describe(y)}")

        def times(m: Tensor, x: Tensor) -> Tensor:
            return (m.to(y.dtype) @ x.unsqueeze(-1)).squeeze(-1)

        if self._at_zero():
            z = times(self.inv, y)
            if self.whitened:
                fy = times(self.factor_inv, y)
                return z - times(self.factor_inv.mT, times(self.delta + self.delta.mT, fy))
            return z - times(self.inv, times(self.delta, y)) - times(self.delta.mT, z)
        return times(self.inverse(), y)

    @torch.no_grad()
    def validate(self) -> ValidationReport:
        r"""Measure the current matrix :math:`W` (float64) against dense linear algebra.

        Figures: ``symmetry_error`` :math:`\max|W - W^T|` of the layer's matrix,
        ``min_eigenvalue`` (relative to the largest), ``inverse_error``
        :math:`\lVert W W^{-1} - I\rVert_{\max}`, ``logdet_error`` against
        ``torch.linalg.slogdet``, ``base_rounding`` (layer base against the float64 master),
        ``condition`` (2-norm condition number of :math:`W`), ``layer_min_eigenvalue`` (of the
        layer's matrix as stored in its dtype, relative to the largest) and, in
        whitened coordinates, ``factor_error`` (:math:`FF^T` against the master, relative) and
        ``factor_inverse_error`` (:math:`\lVert I - FF^{-1}\rVert_{\max}`).
        A matrix that is not positive definite, in float64 or in the layer's dtype, gives a
        FAILED report. Cost :math:`O(n^3)`.
        """
        layer = self.current()
        w = cg.congruence(self.master, *self._factors())
        eig = torch.linalg.eigvalsh(w)
        stored = eig if layer.dtype == torch.float64 else torch.linalg.eigvalsh(layer.double())
        scale = float(self.master.abs().amax())
        condition = (eig[..., -1] / eig[..., 0]).where(eig[..., 0] > 0, math.inf)
        figures = {
            "symmetry_error": float((layer - layer.mT).abs().amax()),
            "min_eigenvalue": float((eig[..., 0] / eig[..., -1]).amin()),
            "condition": float(condition.amax()),
            "layer_min_eigenvalue": float((stored[..., 0] / stored[..., -1]).amin()),
            "base_rounding": float((self.base.double() - self.master).abs().amax()) / scale,
        }
        tol = INVERSE_TOLERANCE
        tolerances = {"symmetry_error": 0.0, "inverse_error": tol, "logdet_error": tol}
        if self.whitened:  # the tracked factor against the master copy, and its inverse
            drift = (self.factor @ self.factor.mT - self.master).abs().amax((-2, -1))
            figures["factor_error"] = float((drift / self.master.abs().amax((-2, -1))).amax())
            residual = linalg.inverse_residual(self.factor, self.factor_inv)
            figures["factor_inverse_error"] = float(residual.abs().amax())
            tolerances.update(factor_error=1e-6, factor_inverse_error=1e-6)
        tolerances["base_rounding"] = 2 * torch.finfo(self.base.dtype).eps
        sign, ref = torch.linalg.slogdet(w)
        if not bool((eig[..., 0] > 0).all() & (sign > 0).all()):
            figures.update(inverse_error=math.inf, logdet_error=math.inf)
            return ValidationReport(self.where, figures, tolerances, "not positive definite")
        problem = ""
        if not bool((stored[..., 0] > 0).all()):  # rounding into the layer's dtype broke it
            dtype = str(layer.dtype).removeprefix("torch.")
            problem = (
                f"the layer's {dtype} matrix is not positive definite (condition number "
                f"{figures['condition']:.2g} of the float64 matrix, past what {dtype} resolves)"
            )
        figures["inverse_error"] = float(linalg.inverse_residual(w, self.inverse()).abs().amax())
        figures["logdet_error"] = float((self.logabsdet() - ref).abs().amax())
        return ValidationReport(self.where, figures, tolerances, problem)
