r"""SL(n): matrices with determinant +1, on the invertible bookkeeping."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from p4opt import linalg
from p4opt._typing import Tensor
from p4opt.errors import SingularMatrixError
from p4opt.families.invertible import Invertible
from p4opt.families.invertible_queries import bookkeeping_tolerance
from p4opt.perturbation import Proposal, ValidationReport

__all__ = ["SpecialLinear"]


class SpecialLinear(Invertible):
    r"""Square matrices with :math:`\det W = +1` (the special linear group SL(n)), and stacks.

    The layer sees the :class:`~p4opt.Invertible` matrix normalized to unit determinant,

    .. math:: W = \widetilde W \, e^{-\log|\det \widetilde W| / n}, \qquad
              \widetilde W = A + \Delta \ (\text{or } A + UV^T),

    so :math:`\det W = 1` at every step (up to rounding), with gradients flowing through the
    normalization (the log-determinant is the tracked, differentiable one: :math:`O(n^2)` right
    after a merge). Every merge folds the update as :class:`~p4opt.Invertible` does and then
    rescales the base to :math:`\log|\det A| = 0` (its inverse and log-determinant follow
    exactly), which does not change the layer; so does every correction.

    Registration refuses a matrix with :math:`\det \le 0` (flip the sign of one row first) and
    scales one with :math:`\det > 0` to determinant 1. The parameters are those of
    :class:`~p4opt.Invertible`; :meth:`logabsdet` is 0 and :meth:`sign` is 1 by construction,
    :meth:`inverse` and :meth:`solve` act with :math:`W^{-1}`.

    Examples
    --------
    >>> import torch, p4opt
    >>> _ = torch.manual_seed(0)
    >>> lin = torch.nn.Linear(5, 5, dtype=torch.float64)
    >>> with torch.no_grad():
    ...     _ = lin.weight.add_(2 * torch.eye(5))
    >>> pert = p4opt.register(lin, "weight", p4opt.SpecialLinear(seed=0))
    >>> round(float(torch.linalg.det(lin.weight.detach())), 12)
    1.0
    >>> with torch.no_grad():
    ...     _ = pert.delta.normal_(std=0.1)
    >>> round(float(torch.linalg.det(lin.weight.detach())), 12), pert.merge().accepted
    (1.0, True)
    """

    #: det W = +1 cannot be reached from det < 0 by rescaling: a merge that would flip the
    #: sign is cut back to a fraction that keeps it, or refused
    keeps_determinant_sign: ClassVar[bool] = True

    def attach(self, value: Tensor) -> Tensor:
        """Refuse :math:`\\det \\le 0`; scale a matrix with :math:`\\det > 0` to determinant 1."""
        matrix = self._as_matrix(value.detach())
        if matrix.device.type != "meta":
            sign, logabsdet = torch.linalg.slogdet(matrix.to(self.dtype))
            if not bool((sign > 0).all()):
                raise SingularMatrixError(
                    f"{self.where} has a determinant <= 0; SpecialLinear needs det > 0 "
                    "(flip the sign of one row to reach det > 0)"
                )
            n = matrix.shape[-1]
            factor = torch.exp(-logabsdet / n)[..., None, None]
            value = (matrix.to(self.dtype) * factor).to(value.dtype).reshape(value.shape)
        return super().attach(value)

    def apply(self, base: Tensor) -> Tensor:
        r""":math:`\widetilde W e^{-\log|\det \widetilde W|/n}` in the layer's dtype."""
        wide = super().apply(base)
        n = self._inverse_shape[-1]
        factor = torch.exp(-super().logabsdet() / n).to(wide.dtype)
        if self._conv:
            return wide * factor
        return wide * factor[..., None, None]

    # ------------------------------------------------------------ user methods
    def logabsdet(self) -> Tensor:
        r""":math:`\log|\det W| = 0`, shape (*)."""
        return torch.zeros_like(self.logabsdet_base)

    def sign(self) -> Tensor:
        r"""Sign of :math:`\det W`: ``+1.``, shape (*)."""
        return torch.ones_like(self.logabsdet_base)

    def inverse(self) -> Tensor:
        r""":math:`W^{-1}`, differentiable; shape (*, n, n), bookkeeping dtype."""
        n = self._inverse_shape[-1]
        return super().inverse() * torch.exp(super().logabsdet() / n)[..., None, None]

    def solve(self, y: Tensor) -> Tensor:
        r"""Apply :math:`W^{-1}` to every vector ``y[..., n]`` without forming it."""
        n = self._inverse_shape[-1]
        factor = torch.exp(super().logabsdet() / n).to(y.dtype)
        if not self._inverse_shape[:-2]:
            return super().solve(y) * factor
        return super().solve(y) * factor[..., None]

    def logdet_penalty(self, margin: float = 0.5) -> Tensor:
        r"""Soft penalty on the pending update's :math:`\log|\det C|` (see :class:`Invertible`)."""
        cap_logabsdet = super().logabsdet() - self.logabsdet_base
        lo, hi = self.update_logdet_bounds
        below = torch.relu(lo + margin - cap_logabsdet)
        return below**2 + torch.relu(cap_logabsdet - hi + margin) ** 2

    # ------------------------------------------------------------------ merging
    def _normalize(self, mask: Tensor) -> None:
        """Scale the selected base matrices to :math:`\\log|\\det A| = 0`, inverse alongside."""
        n = self._inverse_shape[-1]
        lad = torch.where(mask, self.logabsdet_base, 0)
        factor = torch.exp(-lad / n)  # 1 where not selected
        matrix = self._matrix()
        matrix.mul_(factor[..., None, None].to(matrix.dtype))
        if self._inverse_pending:
            self._scale_pending_inverse(1 / factor)
        else:
            self.inv.div_(factor[..., None, None])
        self.logabsdet_base.copy_(
            torch.where(mask, lad + n * torch.log(factor), self.logabsdet_base)
        )
        if matrix is self.precise_base:
            self.base.copy_(self._as_weight(matrix))

    def fold(self, proposal: Proposal, ok: Tensor) -> None:
        super().fold(proposal, ok)
        self._normalize(ok)

    @torch.no_grad()
    def correct(self) -> dict[str, float]:
        """The :class:`Invertible` correction, then the base rescaled to determinant 1."""
        figures = super().correct()
        self._normalize(torch.ones(self.logabsdet_base.shape, dtype=torch.bool))
        return figures

    @torch.no_grad()
    def validate(self) -> ValidationReport:
        r"""Figures of the current matrix :math:`W` at bookkeeping precision; :math:`O(n^3)`.

        ``logdet_error`` :math:`|\log|\det W||` by ``torch.linalg.slogdet`` (``inf`` for a
        negative determinant), ``inverse_error`` :math:`\lVert W W^{-1} - I\rVert_{\max}`
        and ``base_rounding`` (the layer's base against the float64 master).
        """
        base = self._matrix()
        wide = base + self.rule.pending()
        sign, lad = torch.linalg.slogdet(wide)
        n = base.shape[-1]
        w = wide * torch.exp(-super().logabsdet() / n)[..., None, None]
        layer = self.base.reshape(base.shape).to(self.dtype)
        figures = {"base_rounding": float((layer - base).abs().amax() / base.abs().amax())}
        tolerance = bookkeeping_tolerance(self.dtype, n)
        tolerances = {"logdet_error": max(1e-10, 10 * n * torch.finfo(self.dtype).eps),
                      "inverse_error": tolerance}
        tolerances["base_rounding"] = 2 * torch.finfo(self.base.dtype).eps
        if not bool((sign > 0).all() & torch.isfinite(lad).all()):
            figures.update(logdet_error=math.inf, inverse_error=math.inf)
            problem = "the pending update makes the determinant non-positive"
            return ValidationReport(self.where, figures, tolerances, problem=problem)
        w_sign, w_lad = torch.linalg.slogdet(w)
        positive = bool((w_sign > 0).all())
        figures["logdet_error"] = float(w_lad.abs().amax()) if positive else math.inf
        figures["inverse_error"] = float(linalg.inverse_residual(w, self.inverse()).abs().amax())
        return ValidationReport(self.where, figures, tolerances)
