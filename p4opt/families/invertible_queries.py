"""User queries of a tracked inverse and log-determinant, shared by the invertible families."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from p4opt import linalg
from p4opt._typing import Tensor
from p4opt.errors import P4TypeError, ShapeError, describe
from p4opt.families.deferred_inverse import DeferredInverse
from p4opt.records import ValidationReport

if TYPE_CHECKING:
    from p4opt.families.invertible_updates import UpdateRule

__all__ = ["TrackedInverse", "bookkeeping_tolerance", "tracked_report"]


class TrackedInverse(DeferredInverse):
    """Queries on the current matrix :math:`W` of a family keeping :math:`A^{-1}` and log|det A|.

    The family provides ``rule`` (an :class:`~p4opt.families.invertible_updates.UpdateRule`),
    the buffers ``inv``, ``sign_base``, ``logabsdet_base``, ``update``, ``where`` and
    ``update_logdet_bounds``, ``_matrix()`` and ``correct()``.
    """

    rule: UpdateRule
    inv: Tensor
    dtype: torch.dtype
    sign_base: Tensor
    logabsdet_base: Tensor
    update: str
    where: str
    update_logdet_bounds: tuple[float, float]
    _cast_cache: dict[Any, tuple[int, Tensor]]

    def _correct_if_drifted(self, matrix: Tensor, inv: Tensor) -> None:
        """Correct now (the family's ``correct()``, :math:`O(n^3)`) when the tracked inverse
        misses :math:`A` by more than a hundredth of ``validate()``'s tolerance on the probe
        of :func:`~p4opt.linalg.probe_inverse_residual` (two matrix-vector products per
        merge): Woodbury errors add up between scheduled corrections and are amplified as
        :math:`A` loses condition, which partial merges towards a singular matrix do."""
        if linalg.inverse_drifted(matrix, inv, bookkeeping_tolerance(inv.dtype, inv.shape[-1])):
            self.correct()  # type: ignore[attr-defined]

    def _matrix(self) -> Tensor:
        raise NotImplementedError

    def logabsdet(self) -> Tensor:
        r""":math:`\log|\det W|` of the current matrix :math:`W`, differentiable; shape (*)."""
        return self.rule.logabsdet()

    def sign(self) -> Tensor:
        r"""Sign of :math:`\det W` (``+1.`` or ``-1.``), shape (*)."""
        with torch.no_grad():
            if self.update == "factored":
                u, v = self.rule.factors()
                return linalg.lemma_slogdet(self.inv, u, v, self.sign_base, self.logabsdet_base)[0]
            if not bool(self.delta.any()):
                return self.sign_base.clone()
            return torch.linalg.slogdet(self._matrix() + self.rule.pending())[0]

    def inverse(self) -> Tensor:
        r""":math:`W^{-1}`, differentiable; shape (*, n, n), bookkeeping dtype."""
        return self.rule.inverse()

    def solve(self, y: Tensor) -> Tensor:
        r"""Apply :math:`W^{-1}` to every vector ``y[..., n]`` without forming it.

        Computed in ``y``'s dtype; differentiable. Cost :math:`O(Bn^2)` for ``B`` vectors.
        For a stack ``(*, n, n)``, ``y`` has shape ``(..., *, n)``.
        """
        n = self._inverse_shape[-1]
        stack = self._inverse_shape[:-2]
        if not isinstance(y, Tensor) or not y.is_floating_point():
            raise P4TypeError(f"y must be a floating-point tensor, got {describe(y)}")
        if y.ndim < 1 + len(stack) or y.shape[y.ndim - 1 - len(stack):] != (*stack, n):
            want = ", ".join(str(d) for d in (*stack, n))
            raise ShapeError(f"y must have shape (..., {want}) for {self.where}, got {describe(y)}")
        if stack:
            return (self.inverse().to(y.dtype) @ y.unsqueeze(-1)).squeeze(-1)
        return self.rule.solve(y)

    def _inverse_transposed(self, dtype: torch.dtype) -> Tensor:
        """Contiguous :math:`A^{-T}` in ``dtype``, cached until the bookkeeping changes."""
        if self._inverse_pending:
            if dtype != self.dtype:  # a training step's gradient: solve in dtype, keep deferring
                key = ("lu", dtype, self._lu_generation)
                hit = self._cast_cache.get(key)
                if hit is None:
                    hit = (0, self._pending_inverse_transposed(dtype))
                    self._cast_cache.clear()
                    self._cast_cache[key] = hit
                return hit[1]
            self._settle_inverse()  # wanted at bookkeeping precision: solve for it exactly
        inv = self.inv
        key = (dtype, inv.device, inv.data_ptr())
        version = inv._version
        hit = self._cast_cache.get(key)
        if hit is None or hit[0] != version:
            hit = (version, inv.mT.to(dtype).contiguous())
            self._cast_cache.clear()
            self._cast_cache[key] = hit
        return hit[1]

    def logdet_penalty(self, margin: float = 0.5) -> Tensor:
        r"""Soft penalty keeping the pending update's :math:`\log|\det C|` inside the bounds.

        Zero while the update is ``margin`` inside the bounds; add it (scaled) to the loss.
        """
        cap_logabsdet = self.logabsdet() - self.logabsdet_base
        lo, hi = self.update_logdet_bounds
        below = torch.relu(lo + margin - cap_logabsdet) if math.isfinite(lo) else 0
        above = torch.relu(cap_logabsdet - hi + margin) if math.isfinite(hi) else 0
        return below**2 + above**2


def bookkeeping_tolerance(dtype: torch.dtype, n: int) -> float:
    r"""``validate()``'s tolerance of the inverse and log-determinant errors.

    :math:`10^{-6}`, or :math:`10\, n\, \varepsilon` of a lower bookkeeping precision when that
    is larger (a backward-stable inverse in float32 has a residual of order
    :math:`n\varepsilon`, over :math:`10^{-6}` from :math:`n \approx 10`).

    Examples
    --------
    >>> bookkeeping_tolerance(torch.float64, 256)
    1e-06
    >>> round(bookkeeping_tolerance(torch.float32, 256), 6)
    0.000305
    """
    return max(1e-6, 10 * n * torch.finfo(dtype).eps)


def tracked_report(pert: Any) -> ValidationReport:
    """:meth:`p4opt.Invertible.validate`'s figures for a family keeping :math:`A^{-1}` (O(n³))."""
    base = pert._matrix()
    w = base + pert.rule.pending()
    ref_sign, ref_logabsdet = torch.linalg.slogdet(w)
    scale = float(base.abs().amax())
    layer = pert.base.reshape(base.shape).to(pert.dtype)
    figures = {"base_rounding": float((layer - base).abs().amax()) / scale}
    tolerance = bookkeeping_tolerance(pert.dtype, base.shape[-1])
    tolerances = {"inverse_error": tolerance, "logabsdet_error": tolerance}
    tolerances["base_rounding"] = 2 * torch.finfo(pert.base.dtype).eps
    if bool((ref_sign == 0).any()) or not bool(torch.isfinite(ref_logabsdet).all()):
        figures.update(inverse_error=math.inf, logabsdet_error=math.inf)
        problem = "the pending update makes the matrix singular (a merge will not fold it)"
        return ValidationReport(pert.where, figures, tolerances, problem=problem)
    inverse_error = float(linalg.inverse_residual(w, pert.inverse()).abs().amax())
    logabsdet = pert.logabsdet()
    logdet_error = float((logabsdet - ref_logabsdet).abs().amax())
    if bool((pert.sign() != ref_sign).any()):
        logdet_error = math.inf
    figures.update(inverse_error=inverse_error, logabsdet_error=logdet_error)
    figures["update_logabsdet"] = float((ref_logabsdet - pert.logabsdet_base).abs().amax())
    return ValidationReport(where=pert.where, figures=figures, tolerances=tolerances)
