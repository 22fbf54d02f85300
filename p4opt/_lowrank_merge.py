r"""Validated low-rank merges in two halves (check, then fold in place) and partial merges."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from p4opt._typing import Tensor

__all__ = [
    "LowRankCheck",
    "low_rank_check",
    "low_rank_fold_",
    "feasible_scale",
    "range_finder",
    "SCALABLE",
]

Bounds = tuple[float, float]
#: Codes (positions in :class:`p4opt.Reason`) of checks that a smaller step can satisfy.
SCALABLE = (2, 3, 4, 5)


def _eye_like(m: Tensor) -> Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)


def _max_abs(x: Tensor) -> Tensor:
    low, high = torch.aminmax(x.flatten(-2), dim=-1)
    return torch.maximum(high, -low)


def _condition(m: Tensor) -> Tensor:
    """2-norm condition number of small matrices ``(*, k, k)`` (1 for k = 1)."""
    if m.shape[-1] == 1:
        return torch.ones(m.shape[:-2], dtype=m.dtype, device=m.device)
    s = torch.linalg.svdvals(torch.where(torch.isfinite(m), m, 0))
    return s[..., 0] / s[..., -1]


@dataclass
class LowRankCheck:
    """Everything :func:`low_rank_fold_` needs, computed once by :func:`low_rank_check`.

    ``codes`` holds, per stack element, the position in :class:`p4opt.Reason` of the first
    failed check (0 = accepted).
    """

    codes: Tensor
    inv_u: Tensor
    correction: Tensor
    cap_sign: Tensor
    cap_logabsdet: Tensor


def low_rank_check(
    matrix: Tensor,
    inv: Tensor,
    logabsdet: Tensor,
    u: Tensor,
    v: Tensor,
    update_bounds: Bounds = (-math.inf, math.inf),
    logdet_bounds: Bounds = (-math.inf, math.inf),
    max_condition: float = math.inf,
    out_dtype: torch.dtype | None = None,
) -> LowRankCheck:
    r"""Check the update :math:`A \leftarrow A + UV^T` of every stack element; change nothing.

    An element passes when ``u`` and ``v`` are finite, :math:`C = I + V^TA^{-1}U` is
    non-singular with :math:`\log|\det C|` inside ``update_bounds`` and 2-norm condition at
    most ``max_condition``, the new :math:`\log|\det A|` lies in ``logdet_bounds``, and entry
    bounds show that neither :math:`A + UV^T` (in ``out_dtype``) nor its inverse can overflow.
    All checks use :math:`O(nk)` quantities after two :math:`O(n^2k)` products.

    Parameters
    ----------
    matrix, inv : Tensor, shape (*, n, n)
        :math:`A` and :math:`A^{-1}`.
    logabsdet : Tensor, shape (*)
    u, v : Tensor, shape (*, n, k)

    Returns
    -------
    LowRankCheck
    """
    finite_uv = torch.isfinite(u).all(-1).all(-1) & torch.isfinite(v).all(-1).all(-1)
    all_finite = bool(finite_uv.all())
    if not all_finite:
        u = torch.where(finite_uv[..., None, None], u, 0)
        v = torch.where(finite_uv[..., None, None], v, 0)
    inv_u = (u.mT @ inv.mT).mT  # CPU BLAS is several times faster in this layout for k > 1
    cap = v.mT @ inv_u
    cap = cap + _eye_like(cap)
    cap_sign, cap_logabsdet = torch.linalg.slogdet(cap)
    new_logabsdet = logabsdet + cap_logabsdet
    checks = [
        ~finite_uv,
        (cap_sign == 0) | ~torch.isfinite(cap_logabsdet),
        (cap_logabsdet < update_bounds[0]) | (cap_logabsdet > update_bounds[1]),
        _condition(cap) > max_condition,
        (new_logabsdet < logdet_bounds[0]) | (new_logabsdet > logdet_bounds[1]),
    ]
    code = torch.zeros(cap_sign.shape, dtype=torch.long, device=inv.device)
    for index, failed in enumerate(checks, start=1):
        code = torch.where((code == 0) & failed, index, code)
    all_ok = bool((code == 0).all())
    ok = (code == 0)[..., None, None]
    if not all_ok:
        cap = torch.where(ok, cap, _eye_like(cap))
        inv_u, u = torch.where(ok, inv_u, 0), torch.where(ok, u, 0)
    correction = torch.linalg.solve(cap, v.mT @ inv)
    k = u.shape[-1]  # entrywise bounds: |X + a b^T| <= max|X| + k max|a| max|b|
    inv_bound = _max_abs(inv) + k * _max_abs(inv_u) * _max_abs(correction)
    mat_bound = _max_abs(matrix) + k * _max_abs(u) * _max_abs(v)
    limit = torch.finfo(out_dtype or matrix.dtype).max
    overflow = ~(inv_bound < torch.finfo(inv.dtype).max) | ~(mat_bound < limit)
    code = torch.where((code == 0) & overflow, len(checks) + 1, code)
    return LowRankCheck(code, inv_u, correction, cap_sign, cap_logabsdet)


def _addmm_(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> None:
    """``out += alpha * a @ b`` in place, without an (n, n) temporary for 2-D and 3-D ``out``."""
    if out.ndim == 2:
        out.addmm_(a, b, alpha=alpha)
    elif out.ndim == 3:
        out.baddbmm_(a, b, alpha=alpha)
    else:
        out.add_(a @ b, alpha=alpha)


def low_rank_fold_(
    matrix: Tensor,
    inv: Tensor,
    sign: Tensor,
    logabsdet: Tensor,
    u: Tensor,
    v: Tensor,
    check: LowRankCheck,
) -> None:
    r"""Apply the checked update to the elements with code 0, in place (Woodbury and the lemma).

    .. math:: A \leftarrow A + UV^T, \quad A^{-1} \leftarrow A^{-1} - A^{-1}U C^{-1} V^TA^{-1},
              \quad \log|\det A| \mathrel{+}= \log|\det C|

    Rejected elements receive a zero update. Cost :math:`O(n^2 k)`, no :math:`n \times n`
    temporary for 2-D and 3-D inputs.
    """
    ok_b = check.codes == 0
    if bool(ok_b.all()):
        _addmm_(inv, check.inv_u, check.correction, alpha=-1.0)
        _addmm_(matrix, u.to(matrix.dtype), v.mT.to(matrix.dtype))
        sign.mul_(check.cap_sign)
        logabsdet.add_(check.cap_logabsdet)
        return
    ok = ok_b[..., None, None]
    _addmm_(inv, torch.where(ok, check.inv_u, 0), check.correction, alpha=-1.0)
    _addmm_(matrix, torch.where(ok, u, 0).to(matrix.dtype), v.mT.to(matrix.dtype))
    sign.copy_(torch.where(ok_b, sign * check.cap_sign, sign))
    logabsdet.copy_(torch.where(ok_b, logabsdet + check.cap_logabsdet, logabsdet))


def feasible_scale(
    inv: Tensor,
    logabsdet: Tensor,
    u: Tensor,
    v: Tensor,
    update_bounds: Bounds,
    logdet_bounds: Bounds,
    max_condition: float,
    steps: int = 24,
) -> Tensor:
    r"""Largest :math:`t \in (0, 1]` on a geometric grid for which :math:`tUV^T` passes the checks.

    With :math:`M = V^TA^{-1}U`, the capacitance of the scaled update is
    :math:`C(t) = I + tM` (for rank one it is linear in ``t``). The grid is
    :math:`t_j = 2^{-j/2}`, ``j < steps`` (down to about ``2.4e-4`` by default); every
    candidate is evaluated in one batched call. Cost :math:`O(n^2k + \text{steps}\cdot k^3)`.

    Returns
    -------
    Tensor, shape (*), float64
        The scale per stack element, 0 where no grid point passes.
    """
    m = v.mT @ ((u.mT @ inv.mT).mT)
    t = 2.0 ** (-torch.arange(steps, dtype=torch.float64, device=m.device) / 2)
    shaped = t.reshape(-1, *([1] * m.ndim))
    cap = _eye_like(m) + shaped * m  # (steps, *, k, k)
    sign, lad = torch.linalg.slogdet(cap)
    new = logabsdet + lad
    ok = (sign != 0) & torch.isfinite(lad)
    ok &= (lad >= update_bounds[0]) & (lad <= update_bounds[1])
    ok &= (new >= logdet_bounds[0]) & (new <= logdet_bounds[1])
    if math.isfinite(max_condition):
        ok &= _condition(cap) <= max_condition
    first = torch.where(ok.any(0), ok.to(torch.uint8).argmax(0), steps)
    return torch.where(first < steps, t[first.clamp_max(steps - 1)], 0.0)


def range_finder(
    delta: Tensor, basis: Tensor, power_iters: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Best rank-k factors of ``delta`` by a warm-started randomized range finder.

    .. math:: Q = \mathrm{orth}(\Delta\,\Omega), \quad
              (Z = \mathrm{orth}(\Delta^T Q),\ Q = \mathrm{orth}(\Delta Z))^{p}, \quad
              \Delta \approx Q\,(Q^T\Delta) = U V^T

    with :math:`\Omega` = ``basis`` (the previous call's right basis: consecutive optimizer
    updates share their leading directions, so a warm start needs fewer power iterations).

    Parameters
    ----------
    delta : Tensor, shape (*, n, n)
    basis : Tensor, shape (*, n, k)
        Start basis :math:`\Omega` (any full-rank matrix; random the first time).
    power_iters : int
        Power iterations ``p`` (each costs two :math:`O(n^2k)` products and two QRs).

    Returns
    -------
    u : Tensor, shape (*, n, k)
        Orthonormal basis :math:`Q` of the approximate range.
    v : Tensor, shape (*, n, k)
        :math:`\Delta^T Q`, so that :math:`UV^T = QQ^T\Delta`.
    right : Tensor, shape (*, n, k)
        Orthonormal right basis, the warm start of the next call.
        Cost :math:`O((2p + 2)\,n^2 k + n k^2)`.

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness:
    probabilistic algorithms for constructing approximate matrix decompositions",
    SIAM Review 53 (2011), Algorithm 4.4.
    """
    q = torch.linalg.qr(delta @ basis).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(delta @ torch.linalg.qr(delta.mT @ q).Q).Q
    v = delta.mT @ q
    return q, v, torch.linalg.qr(v).Q
