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

__all__ = [
    "congruence",
    "congruence_capacitance",
    "congruence_inverse",
    "congruence_scale",
    "project_spd",
    "symmetrize",
]

Bounds = tuple[float, float]


def _eye_like(m: Tensor) -> Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)


def symmetrize(a: Tensor) -> Tensor:
    r""":math:`(A + A^T)/2`, exactly symmetric in floating point; shape (*, n, n)."""
    return (a + a.mT) / 2


def congruence(a: Tensor, u: Tensor, v: Tensor) -> Tensor:
    r"""The congruence :math:`(I + UV^T)\,A\,(I + UV^T)^T` of a symmetric ``a``, symmetrized.

    .. math:: MAM^T = A + E + E^T + U (V^TAV) U^T, \qquad E = U (AV)^T

    Parameters
    ----------
    a : Tensor, shape (*, n, n)
        Symmetric matrix.
    u, v : Tensor, shape (*, n, k)

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
    av = a @ v
    e = u @ av.mT
    inner = v.mT @ av
    return symmetrize(a + e + e.mT + u @ inner @ u.mT)


def congruence_capacitance(u: Tensor, v: Tensor) -> Tensor:
    r""":math:`C = I_k + V^TU`, so that :math:`\det(I + UV^T) = \det C`; shape (*, k, k)."""
    cap = v.mT @ u
    return cap + _eye_like(cap)


def congruence_inverse(inv: Tensor, u: Tensor, v: Tensor) -> Tensor:
    r"""Inverse of the congruence by Woodbury applied on both sides.

    .. math:: (MAM^T)^{-1} = M^{-T}A^{-1}M^{-1}, \qquad M^{-1} = I - U C^{-1} V^T

    Parameters
    ----------
    inv : Tensor, shape (*, n, n)
        :math:`A^{-1}` (symmetric).
    u, v : Tensor, shape (*, n, k)

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
    cap = congruence_capacitance(u, v)
    right = inv - (inv @ u) @ torch.linalg.solve(cap, v.mT)  # A^{-1} M^{-1}
    left = right - v @ torch.linalg.solve(cap.mT, u.mT @ right)  # M^{-T} A^{-1} M^{-1}
    return symmetrize(left)


def _condition(m: Tensor) -> Tensor:
    if m.shape[-1] == 1:
        return torch.ones(m.shape[:-2], dtype=m.dtype, device=m.device)
    s = torch.linalg.svdvals(torch.where(torch.isfinite(m), m, 0))
    return s[..., 0] / s[..., -1]


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


def project_spd(value: Tensor, floor: float = 1e-6) -> Tensor:
    r"""Nearest symmetric matrix with every eigenvalue at least ``floor`` times the largest.

    Symmetrizes :math:`(X + X^T)/2` and, when that is not already positive definite above the
    floor, clips its eigenvalues from below (the Frobenius-nearest such matrix).

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
    if bool((eigval >= low).all()):
        return sym
    clipped = torch.maximum(eigval, low)
    return symmetrize((eigvec * clipped[..., None, :]) @ eigvec.mT)
