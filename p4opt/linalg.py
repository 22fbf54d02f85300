r"""Pure linear-algebra kernels behind the P⁴ families (no state, no modules).

Every function accepts leading batch dimensions ``(*, n, n)`` so that stacks of
equally shaped layers are handled by one kernel, and is differentiable where
that makes sense. Row-vector convention: a batch of vectors is ``y[..., n]``
and "applying :math:`M^{-1}` to ``y``" returns ``y @ M^{-T}``, matching
``torch.nn.Linear`` (``y = x W^T + b``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from p4opt._typing import Tensor

__all__ = [
    "capacitance",
    "woodbury_inverse",
    "woodbury_solve",
    "lemma_slogdet",
    "inverse_residual",
    "newton_schulz_step",
    "hyperpower_step",
    "refine_inverse",
    "low_rank_merge",
    "LowRankMerge",
    "MERGE_REJECTIONS",
]


def _eye_like(m: Tensor) -> Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)


def capacitance(inv: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    r"""Capacitance matrix of the low-rank update :math:`A + U V^T`.

    .. math:: C = I_k + V^T A^{-1} U

    Parameters
    ----------
    inv : Tensor, shape (*, n, n)
        :math:`A^{-1}`.
    u, v : Tensor, shape (*, n, k)
        Factors of the update.

    Returns
    -------
    inv_u : Tensor, shape (*, n, k)
        :math:`A^{-1} U` (reused by callers).
    cap : Tensor, shape (*, k, k)
        :math:`C`. Cost :math:`O(n^2 k)`.

    Examples
    --------
    >>> import torch
    >>> a = torch.eye(3, dtype=torch.float64)
    >>> u = torch.ones(3, 1, dtype=torch.float64)
    >>> capacitance(a, u, u)[1]
    tensor([[4.]], dtype=torch.float64)
    """
    inv_u = inv @ u
    cap = v.mT @ inv_u
    return inv_u, cap + _eye_like(cap)


def woodbury_inverse(inv: Tensor, u: Tensor, v: Tensor) -> Tensor:
    r"""Inverse of a low-rank update by the Woodbury identity.

    .. math:: (A + U V^T)^{-1} = A^{-1} - A^{-1} U (I_k + V^T A^{-1} U)^{-1} V^T A^{-1}

    Parameters
    ----------
    inv : Tensor, shape (*, n, n)
        :math:`A^{-1}`.
    u, v : Tensor, shape (*, n, k)

    Returns
    -------
    Tensor, shape (*, n, n)
        Cost :math:`O(n^2 k)`; differentiable in all inputs.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.eye(4, dtype=torch.float64) * 2
    >>> u, v = torch.randn(2, 4, 1, generator=g, dtype=torch.float64)
    >>> w = woodbury_inverse(a.inverse(), u, v)
    >>> torch.allclose(w, torch.linalg.inv(a + u @ v.mT))
    True
    """
    inv_u, cap = capacitance(inv, u, v)
    return inv - inv_u @ torch.linalg.solve(cap, v.mT @ inv)


def woodbury_solve(inv: Tensor, u: Tensor, v: Tensor, y: Tensor) -> Tensor:
    r"""Apply :math:`(A + U V^T)^{-1}` to a batch of vectors without forming it.

    Parameters
    ----------
    inv : Tensor, shape (n, n)
        :math:`A^{-1}`.
    u, v : Tensor, shape (n, k)
    y : Tensor, shape (..., n)

    Returns
    -------
    Tensor, shape (..., n)
        ``x`` with :math:`(A + U V^T) x = y` for every vector. One product
        with ``inv`` serves both :math:`A^{-1} y` and :math:`A^{-1} U`, so the
        cost is :math:`O((m + k) n^2)` for ``m`` vectors, the same as one
        forward matrix product.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.randn(5, 5, generator=g, dtype=torch.float64) + 5 * torch.eye(5)
    >>> u, v = torch.randn(2, 5, 2, generator=g, dtype=torch.float64)
    >>> y = torch.randn(3, 5, generator=g, dtype=torch.float64)
    >>> x = woodbury_solve(torch.linalg.inv(a), u, v, y)
    >>> torch.allclose(x @ (a + u @ v.mT).mT, y)
    True
    """
    k = u.shape[-1]
    flat = y.reshape(-1, y.shape[-1])
    both = inv @ torch.cat([u, flat.mT], dim=-1)
    inv_u, z = both[:, :k], both[:, k:].mT
    cap = v.mT @ inv_u + _eye_like(v.mT @ v)
    s = torch.linalg.solve(cap, v.mT @ z.mT).mT
    return (z - s @ inv_u.mT).reshape(y.shape)


def lemma_slogdet(
    inv: Tensor, u: Tensor, v: Tensor, sign: Tensor, logabsdet: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Sign and log|det| of :math:`A + U V^T` by the matrix determinant lemma.

    .. math:: \det(A + U V^T) = \det(I_k + V^T A^{-1} U)\,\det A

    Parameters
    ----------
    inv : Tensor, shape (*, n, n)
    u, v : Tensor, shape (*, n, k)
    sign, logabsdet : Tensor, shape (*)
        Sign and :math:`\log|\det A|` of the base matrix.

    Returns
    -------
    sign, logabsdet : Tensor, shape (*)
        Cost :math:`O(n^2 k)`; differentiable in ``u`` and ``v``.

    Examples
    --------
    >>> import torch
    >>> a = torch.diag(torch.tensor([2.0, 3.0], dtype=torch.float64))
    >>> u = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    >>> s, l = lemma_slogdet(a.inverse(), u, u, torch.tensor(1.0), a.det().log())
    >>> round(float(l.exp()), 12)  # det(diag(3, 3))
    9.0
    """
    _, cap = capacitance(inv, u, v)
    cap_sign, cap_logabsdet = torch.linalg.slogdet(cap)
    return sign * cap_sign, logabsdet + cap_logabsdet


def inverse_residual(a: Tensor, x: Tensor) -> Tensor:
    r"""Residual :math:`R = I - A X` of an approximate inverse ``x`` of ``a``.

    Cost :math:`O(n^3)`. ``R.abs().amax()`` is the error figure
    :math:`\lVert A X - I \rVert_{\max}` reported by ``validate``.
    """
    return _eye_like(a) - a @ x


def newton_schulz_step(a: Tensor, x: Tensor) -> Tensor:
    r"""One Newton–Schulz step towards :math:`A^{-1}`.

    .. math:: X \leftarrow X (2I - A X) = X (I + R), \qquad R = I - A X

    The residual squares: :math:`I - A X_{new} = R^2`, so the step converges
    quadratically when :math:`\rho(R) < 1`. Cost: two :math:`n^3` products.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[4.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    >>> x = torch.linalg.inv(a) + 1e-4
    >>> err = lambda x: float((a @ x - torch.eye(2)).abs().max())
    >>> err(newton_schulz_step(a, x)) < err(x) ** 2 * 10
    True
    """
    return x + x @ inverse_residual(a, x)


def hyperpower_step(a: Tensor, x: Tensor, order: int = 3) -> Tensor:
    r"""One hyperpower step of order ``p`` towards :math:`A^{-1}`.

    .. math:: X \leftarrow X \sum_{i=0}^{p-1} R^i, \qquad R = I - A X

    so that :math:`I - A X_{new} = R^p`: order 2 is Newton–Schulz; the
    higher-order Schulz-type schemes of Soleymani and others are factorized
    members of this family that save products. Evaluated in Horner form with
    ``p`` products of cost :math:`n^3`.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[4.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    >>> x = torch.linalg.inv(a) + 1e-4
    >>> float((a @ hyperpower_step(a, x, 3) - torch.eye(2)).abs().max()) < 1e-9
    True
    """
    if not isinstance(order, int) or order < 2:
        raise ValueError(f"order must be an int >= 2, got {order!r}")
    r = inverse_residual(a, x)
    eye = _eye_like(r)
    s = eye + r
    for _ in range(order - 2):
        s = eye + r @ s
    return x @ s


def refine_inverse(
    a: Tensor, x: Tensor, order: int = 2, max_steps: int = 3, tol: float | None = None
) -> tuple[Tensor, float]:
    r"""Refine an approximate inverse by hyperpower steps; fall back to LU when it diverges.

    Parameters
    ----------
    a : Tensor, shape (*, n, n)
        The matrix (use float64 for bookkeeping accuracy).
    x : Tensor, shape (*, n, n)
        Current approximation of :math:`A^{-1}`.
    order : int
        2 for Newton–Schulz, larger for a higher-order step.
    max_steps : int
        Upper bound on steps; stops early once the residual is below ``tol``.
    tol : float, optional
        Target :math:`\lVert I - AX \rVert_{\max}`; default ``100 n`` machine epsilons.

    Returns
    -------
    x : Tensor, shape (*, n, n)
        The refined inverse.
    residual : float
        :math:`\lVert I - AX \rVert_{\max}` of the returned inverse. Cost
        :math:`O(p\, n^3)` per step.
    """
    n = a.shape[-1]
    tol = 100 * n * torch.finfo(a.dtype).eps if tol is None else tol
    res = float(inverse_residual(a, x).abs().amax())
    if not res < 0.5:  # also catches NaN: the iteration would not contract
        x = torch.linalg.inv(a)
        res = float(inverse_residual(a, x).abs().amax())
    for _ in range(max_steps):
        if res <= tol:
            break
        x_new = newton_schulz_step(a, x) if order == 2 else hyperpower_step(a, x, order)
        res_new = float(inverse_residual(a, x_new).abs().amax())
        if not res_new < res:
            break
        x, res = x_new, res_new
    return x, res


#: Reasons a low-rank merge is rejected, indexed by :attr:`LowRankMerge.code` (0 = accepted).
MERGE_REJECTIONS = (
    "ok",
    "non-finite update",
    "singular update",
    "update log|det| outside bounds",
    "log|det| outside bounds",
    "non-finite merged matrix",
)


class LowRankMerge(NamedTuple):
    """Outcome of :func:`low_rank_merge`, elementwise over the batch shape ``(*)``."""

    matrix: Tensor  #: (*, n, n) merged matrix (the old one where rejected)
    inv: Tensor  #: (*, n, n) its inverse
    sign: Tensor  #: (*) sign of its determinant
    logabsdet: Tensor  #: (*) its log|det|
    code: Tensor  #: (*) int64, index into MERGE_REJECTIONS
    update_logabsdet: Tensor  #: (*) log|det(I + VᵀA⁻¹U)|


def low_rank_merge(
    matrix: Tensor,
    inv: Tensor,
    sign: Tensor,
    logabsdet: Tensor,
    u: Tensor,
    v: Tensor,
    update_bounds: tuple[float, float] = (-math.inf, math.inf),
    logdet_bounds: tuple[float, float] = (-math.inf, math.inf),
    out_dtype: torch.dtype | None = None,
) -> LowRankMerge:
    r"""Validate and apply :math:`A \leftarrow A + UV^T` with its inverse and log-determinant.

    Each batch element is accepted only if ``u`` and ``v`` are finite, the
    capacitance :math:`C = I + V^T A^{-1} U` is non-singular with
    :math:`\log|\det C|` inside ``update_bounds``, the new :math:`\log|\det A|`
    lies inside ``logdet_bounds``, and the merged matrix (also after a cast to
    ``out_dtype``) and inverse are finite. Rejected elements keep their old
    values bit for bit (selected with :func:`torch.where`).

    Parameters
    ----------
    matrix, inv : Tensor, shape (*, n, n)
        :math:`A` and :math:`A^{-1}`.
    sign, logabsdet : Tensor, shape (*)
    u, v : Tensor, shape (*, n, k)
    update_bounds, logdet_bounds : (float, float)
    out_dtype : torch.dtype, optional
        Dtype the merged matrix will be stored in (checked for overflow).

    Returns
    -------
    LowRankMerge
        Cost :math:`O(n^2 k)` per element.

    Examples
    --------
    >>> import torch
    >>> a = torch.eye(2, dtype=torch.float64)
    >>> u = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    >>> out = low_rank_merge(a, a, torch.tensor(1.0), torch.tensor(0.0), u, u)
    >>> out.matrix.diagonal().tolist(), round(float(out.logabsdet.exp()), 12), int(out.code)
    ([2.0, 1.0], 2.0, 0)
    """
    batch = matrix.shape[:-2]
    finite_uv = torch.isfinite(u).all(-1).all(-1) & torch.isfinite(v).all(-1).all(-1)
    keep = finite_uv[..., None, None]
    u, v = torch.where(keep, u, 0), torch.where(keep, v, 0)
    inv_u, cap = capacitance(inv, u, v)
    cap_sign, cap_logabsdet = torch.linalg.slogdet(cap)
    new_logabsdet = logabsdet + cap_logabsdet
    code = torch.zeros(batch, dtype=torch.long, device=matrix.device)
    checks = [
        ~finite_uv,
        (cap_sign == 0) | ~torch.isfinite(cap_logabsdet),
        (cap_logabsdet < update_bounds[0]) | (cap_logabsdet > update_bounds[1]),
        (new_logabsdet < logdet_bounds[0]) | (new_logabsdet > logdet_bounds[1]),
    ]
    for index, failed in enumerate(checks, start=1):
        code = torch.where((code == 0) & failed, index, code)
    ok = (code == 0)[..., None, None]
    safe_cap = torch.where(ok, cap, _eye_like(cap))
    new_inv = inv - inv_u @ torch.linalg.solve(safe_cap, v.mT @ inv)
    new_matrix = matrix + u @ v.mT
    stored = new_matrix.to(out_dtype or matrix.dtype)
    finite_new = torch.isfinite(new_inv).all(-1).all(-1) & torch.isfinite(stored).all(-1).all(-1)
    code = torch.where((code == 0) & ~finite_new, len(checks) + 1, code)
    ok_b = code == 0
    ok = ok_b[..., None, None]
    return LowRankMerge(
        matrix=torch.where(ok, new_matrix, matrix),
        inv=torch.where(ok, new_inv, inv),
        sign=torch.where(ok_b, sign * cap_sign, sign),
        logabsdet=torch.where(ok_b, new_logabsdet, logabsdet),
        code=code,
        update_logabsdet=cap_logabsdet,
    )
