r"""Partial merges: the largest fraction of an update that passes a merge's checks."""

from __future__ import annotations

import math

import torch

from p4opt._typing import Tensor
from p4opt.linalg._checks import _condition_exceeds, _slogdet_lu
from p4opt.linalg._common import _eye_like

__all__ = ["feasible_scale", "SCALABLE"]

Bounds = tuple[float, float]

#: Codes (positions in :class:`p4opt.Reason`) of checks that a smaller step can satisfy.
SCALABLE = (2, 3, 4, 5)


def feasible_scale(
    inv: Tensor,
    logabsdet: Tensor,
    u: Tensor,
    v: Tensor | None,
    update_bounds: Bounds,
    logdet_bounds: Bounds,
    max_condition: float,
    steps: int = 24,
    positive: bool = False,
) -> Tensor:
    r"""Largest :math:`t \in (0, 1]` on a geometric grid for which :math:`tUV^T` passes the checks.

    With :math:`M = V^TA^{-1}U`, the capacitance of the scaled update is
    :math:`C(t) = I + tM` (for rank one it is linear in ``t``). The grid is
    :math:`t_j = 2^{-j/2}`, ``j < steps`` (down to about ``2.4e-4`` by default); every
    candidate is evaluated in one batched call. Cost :math:`O(n^2k + \text{steps}\cdot k^3)`.

    ``positive`` also requires :math:`\det C(t) > 0` (the determinant keeps its sign).

    Returns
    -------
    Tensor, shape (*), float64
        The scale per stack element, 0 where no grid point passes.
    """
    m = inv @ u if v is None else v.mT @ ((u.mT @ inv.mT).mT)  # v=None: C(t) = I + t A^{-1} U
    t = 2.0 ** (-torch.arange(steps, dtype=torch.float64, device=m.device) / 2)
    shaped = t.reshape(-1, *([1] * m.ndim))
    cap = _eye_like(m) + shaped * m  # (steps, *, k, k)
    factors, pivots, _ = torch.linalg.lu_factor_ex(cap)
    sign, lad = _slogdet_lu(factors, pivots)
    new = logabsdet + lad
    ok = ((sign > 0) if positive else (sign != 0)) & torch.isfinite(lad)
    ok &= (lad >= update_bounds[0]) & (lad <= update_bounds[1])
    ok &= (new >= logdet_bounds[0]) & (new <= logdet_bounds[1])
    if math.isfinite(max_condition) and v is not None:  # (no capacitance for v=None)
        exceeds = _condition_exceeds(cap, max_condition, lu=(factors, pivots))
        if exceeds is not None:
            ok &= ~exceeds
    first = torch.where(ok.any(0), ok.to(torch.uint8).argmax(0), steps)
    return torch.where(first < steps, t[first.clamp_max(steps - 1)], 0.0)
