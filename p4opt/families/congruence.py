r"""Pure kernels of the congruence :math:`A \mapsto (I + UV^T)\,A\,(I + UV^T)^T` (no state).

The congruence by :math:`M = I + UV^T` maps symmetric positive-definite matrices onto
themselves whenever :math:`M` is invertible, and :math:`M` is invertible exactly when the
:math:`k \times k` capacitance :math:`C = I_k + V^TU` is (the nonzero eigenvalues of
:math:`UV^T` and :math:`V^TU` coincide). Everything below is :math:`O(n^2k)` and batched over
leading dimensions ``(*, n, n)``.
"""

from __future__ import annotations

import math

import torch

from p4opt._typing import Tensor
from p4opt.errors import SingularMatrixError
from p4opt.linalg._checks import _condition
from p4opt.linalg._common import _eye_like
from p4opt.records import Reason

__all__ = [
    "boundary_limit",
    "boundary_warning",
    "capacitance_codes",
    "congruence",
    "congruence_capacitance",
    "congruence_inverse",
    "congruence_scale",
    "factor_update",
    "project_spd",
    "spd_buffers",
    "symmetrize",
]

Bounds = tuple[float, float]


def symmetrize(a: Tensor) -> Tensor:
    r""":math:`(A + A^T)/2`, exactly symmetric in floating point; shape (*, n, n)."""
    return (a + a.mT) / 2


def congruence(a: Tensor, u: Tensor, v: Tensor, av: Tensor | None = None,
               inner: Tensor | None = None) -> Tensor:
    r"""The congruence :math:`(I + UV^T)\,A\,(I + UV^T)^T` of a symmetric ``a``, symmetrized.

    .. math:: MAM^T = A + E + E^T + U (V^TAV) U^T, \qquad E = U (AV)^T

    Parameters
    ----------
    a : Tensor, shape (*, n, n)
        Symmetric matrix.
    u, v : Tensor, shape (*, n, k)
    av, inner : Tensor, optional
        :math:`AV` (*, n, k) and :math:`V^TAV` (*, k, k) when the caller knows them (with
        :math:`A = FF^T` and :math:`V = F^{-T}B`: :math:`FB` and :math:`B^TB`); each saves
        an :math:`O(n^2k)` product.

    Returns
    -------
    Tensor, shape (*, n, n)
        Exactly symmetric; differentiable. Cost :math:`O(n^2k)`.

    Examples
    --------
    >>> import torch
    >>> a = torch.eye(2, dtype=torch.float64)
    >>> u = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    >>> congruence(a, u, u).diagonal().tolist()   # M = diag(2, 1)
    [4.0, 1.0]
    """
    av = a @ v if av is None else av
    e = u @ av.mT
    inner = v.mT @ av if inner is None else inner
    return symmetrize(a + e + e.mT + u @ inner @ u.mT)


def congruence_capacitance(u: Tensor, v: Tensor) -> Tensor:
    r""":math:`C = I_k + V^TU`, so that :math:`\det(I + UV^T) = \det C`; shape (*, k, k)."""
    cap = v.mT @ u
    return cap + _eye_like(cap)


def congruence_inverse(inv: Tensor, u: Tensor, v: Tensor, cap: Tensor | None = None) -> Tensor:
    r"""Inverse of the congruence by Woodbury applied on both sides.

    .. math:: (MAM^T)^{-1} = M^{-T}A^{-1}M^{-1}, \qquad M^{-1} = I - U C^{-1} V^T

    Parameters
    ----------
    inv : Tensor, shape (*, n, n)
        :math:`A^{-1}` (symmetric).
    u, v : Tensor, shape (*, n, k)
    cap : Tensor, shape (*, k, k), optional
        :math:`C` from :func:`congruence_capacitance`, when already computed.

    Returns
    -------
    Tensor, shape (*, n, n)
        Exactly symmetric; differentiable. Cost :math:`O(n^2k + k^3)`.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.eye(4, dtype=torch.float64) * 2
    >>> u, v = 0.3 * torch.randn(2, 4, 2, generator=g, dtype=torch.float64)
    >>> ref = torch.linalg.inv(congruence(a, u, v))
    >>> torch.allclose(congruence_inverse(a.inverse(), u, v), ref)
    True
    """
    cap = congruence_capacitance(u, v) if cap is None else cap
    # solve_ex: a singular capacitance (refused by the merge's codes) must not raise here
    right = inv - (inv @ u) @ torch.linalg.solve_ex(cap, v.mT)[0]  # A^{-1} M^{-1}
    left = right - v @ torch.linalg.solve_ex(cap.mT, u.mT @ right)[0]  # M^{-T} A^{-1} M^{-1}
    return symmetrize(left)


def factor_update(
    factor: Tensor, factor_inv: Tensor, u: Tensor, v: Tensor, a: Tensor, b: Tensor | None,
    cap: Tensor,
) -> tuple[Tensor, Tensor]:
    r"""The factor :math:`F` of :math:`A = FF^T` and its inverse after the congruence by :math:`M`.

    With a whitened change :math:`ab^T` (:math:`U = Fa`, :math:`V = F^{-T}b`,
    :math:`M = I + UV^T = F(I + ab^T)F^{-1}`):

    .. math:: F \leftarrow MF = F + Ub^T, \qquad
              F^{-1} \leftarrow F^{-1} - a\,C^{-1}V^T, \quad C = I + V^TU

    (Woodbury, using :math:`F^{-1}U = a`), so that :math:`MAM^T = (MF)(MF)^T`.

    Parameters
    ----------
    factor, factor_inv : Tensor, shape (*, n, n)
    u, v, a : Tensor, shape (*, n, k)
    b : Tensor, shape (*, n, k), or None
        ``None`` stands for the identity (``k = n``, the whole change :math:`a = \Delta`).
    cap : Tensor, shape (*, k, k)
        :math:`C` from :func:`congruence_capacitance`.

    Returns
    -------
    (Tensor, Tensor)
        The new :math:`F` and :math:`F^{-1}`. Cost :math:`O(n^2k + k^3)`.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> f = torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(3, 3, generator=g,
    ...                                                         dtype=torch.float64)
    >>> a = 0.2 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    >>> u, v = f @ a, torch.linalg.inv(f).mT
    >>> new, new_inv = factor_update(f, torch.linalg.inv(f), u, v, a, None,
    ...                              congruence_capacitance(u, v))
    >>> eye = torch.eye(3, dtype=torch.float64)
    >>> bool(torch.allclose(new, f @ (eye + a))), bool(torch.allclose(new @ new_inv, eye))
    (True, True)
    """
    step = u if b is None else u @ b.mT
    return factor + step, factor_inv - a @ torch.linalg.solve_ex(cap, v.mT)[0]


def capacitance_codes(
    cap: Tensor, bounds: Bounds, max_condition: float
) -> tuple[Tensor, Tensor]:
    r"""Per element, the :class:`~p4opt.Reason` code of the first failed check of :math:`C`.

    Checks, in order: :math:`C` singular, :math:`\log|\det C|` outside ``bounds``, 2-norm
    condition number above ``max_condition`` (0 = all passed).

    Returns
    -------
    (Tensor, Tensor)
        Codes (long) and :math:`\log|\det C|`, shape (*) each. Cost :math:`O(k^3)`.
    """
    sign, lad = torch.linalg.slogdet(cap)
    checks = [
        (sign == 0) | ~torch.isfinite(lad),
        (lad < bounds[0]) | (lad > bounds[1]),
        _condition(cap) > max_condition,
    ]
    reasons = (Reason.SINGULAR_UPDATE, Reason.UPDATE_BOUNDS, Reason.ILL_CONDITIONED_UPDATE)
    code = torch.zeros(sign.shape, dtype=torch.long, device=cap.device)
    for reason, failed in zip(reasons, checks, strict=True):
        code = torch.where((code == 0) & failed, reason.code, code)
    return code, lad


def congruence_scale(
    u: Tensor, v: Tensor, bounds: Bounds, max_condition: float, steps: int = 24
) -> Tensor:
    r"""Largest :math:`t = 2^{-j/2}` (``j < steps``) for which :math:`I + tV^TU` passes the checks.

    A scaled update :math:`tUV^T` has capacitance :math:`C(t) = I + tV^TU`; it passes when
    :math:`C(t)` is non-singular, :math:`\log|\det C(t)|` lies in ``bounds`` and its 2-norm
    condition number is at most ``max_condition``. Cost :math:`O(nk^2 + \text{steps}\cdot k^3)`.

    Returns
    -------
    Tensor, shape (*), float64
        The scale per stack element; 0 where no grid point passes.
    """
    m = v.mT @ u
    t = 2.0 ** (-torch.arange(steps, dtype=torch.float64, device=m.device) / 2)
    cap = _eye_like(m) + t.reshape(-1, *([1] * m.ndim)).to(m.dtype) * m
    sign, lad = torch.linalg.slogdet(cap)
    ok = (sign != 0) & torch.isfinite(lad) & (lad >= bounds[0]) & (lad <= bounds[1])
    if math.isfinite(max_condition):
        ok &= _condition(cap) <= max_condition
    first = torch.where(ok.any(0), ok.to(torch.uint8).argmax(0), steps)
    return torch.where(first < steps, t[first.clamp_max(steps - 1)], 0.0)


def spd_buffers(matrix: Tensor, whitened: bool, chol: Tensor | None = None) -> dict[str, Tensor]:
    r"""The tracked quantities of SPD matrices, from their Cholesky factors :math:`A = LL^T`.

    Returns ``inv`` (:math:`A^{-1}`, exactly symmetric), ``logabsdet_base`` (:math:`\log\det A`)
    and, when ``whitened``, ``factor`` (:math:`F = L`) and ``factor_inv`` (:math:`L^{-1}`), all
    in ``matrix``'s dtype; pass ``chol`` when the factors are already known. Raises
    :class:`~p4opt.SingularMatrixError` when a factorization fails. Cost :math:`O(n^3)`.
    """
    if chol is None:
        chol, info = torch.linalg.cholesky_ex(matrix)
        if bool((info != 0).any()):
            raise SingularMatrixError("the matrix is not numerically positive definite")
    out = {
        "inv": symmetrize(torch.cholesky_inverse(chol)),
        "logabsdet_base": 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1),
    }
    if whitened:
        out["factor"] = chol
        out["factor_inv"] = torch.linalg.solve_triangular(chol, _eye_like(chol), upper=False)
    return out


def boundary_limit(dtype: torch.dtype) -> float:
    r"""Condition number past which a positive-definite matrix is near the cone's boundary.

    :math:`0.1/\varepsilon` of ``dtype`` (about 8.4e5 in float32, 4.5e14 in float64): beyond
    it the smallest eigenvalue is within ten roundings of the largest, so storing the matrix
    in ``dtype`` (or one more product in it) can leave it indefinite.
    """
    return 0.1 / torch.finfo(dtype).eps


def boundary_warning(where: str, condition: float, dtype: torch.dtype) -> str:
    """The warning for a matrix of condition number ``condition`` stored in ``dtype``, or ``""``."""
    limit = boundary_limit(dtype)
    if not condition > limit:
        return ""
    name = str(dtype).removeprefix("torch.")
    return (
        f"{where}: the positive-definite matrix has condition number {condition:.2g}, past "
        f"{limit:.2g} (0.1 / eps of {name}): its smallest eigenvalue is near the rounding "
        f"of its largest, and the layer's {name} matrix can stop being positive definite. "
        "Keep it away from the boundary (a penalty on its smallest eigenvalues or log det), "
        "or train the layer in float64; validate() reports the layer's own eigenvalues"
    )


def project_spd(value: Tensor, floor: float = 1e-6) -> Tensor:
    r"""Nearest symmetric matrix with every eigenvalue at least ``floor`` times the largest.

    Symmetrizes :math:`(X + X^T)/2` and, for each matrix of the stack that is not already
    positive definite above the floor, clips its eigenvalues from below (the Frobenius-nearest
    such matrix); the other matrices are returned symmetrized, bit for bit.

    Parameters
    ----------
    value : Tensor, shape (*, n, n)
    floor : float
        Relative eigenvalue floor, in (0, 1).

    Returns
    -------
    Tensor, shape (*, n, n), float64
        Cost :math:`O(n^3)`.

    Raises
    ------
    SingularMatrixError
        A matrix of the stack has no positive eigenvalue.

    Examples
    --------
    >>> import torch
    >>> project_spd(torch.tensor([[1.0, 3.0], [1.0, 1.0]])).tolist()   # eigenvalues 3, -1
    [[1.5, 1.5], [1.5, 1.5]]
    """
    sym = symmetrize(value.detach().to(torch.float64))
    eigval, eigvec = torch.linalg.eigh(sym)
    top = eigval[..., -1]
    if not bool((top > 0).all()):
        raise SingularMatrixError("a matrix with no positive eigenvalue has no SPD projection")
    low = (floor * top)[..., None]
    below = (eigval < low).any(-1)
    if not bool(below.any()):
        return sym
    clipped = torch.maximum(eigval, low)
    rebuilt = symmetrize((eigvec * clipped[..., None, :]) @ eigvec.mT)
    return torch.where(below[..., None, None], rebuilt, sym)  # the others stay bit for bit
