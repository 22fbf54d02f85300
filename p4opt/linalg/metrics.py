r"""Error figures and small bases: orthogonality error, condition numbers, basis of sums-to-zero."""

from __future__ import annotations

import functools
import math

import torch

from p4opt._typing import Tensor
from p4opt.linalg._common import _eye_like

__all__ = [
    "inverse_drifted",
    "orthogonality_error",
    "spd_condition",
    "condition_estimate",
    "sum_complement",
    "probe_inverse_residual",
    "spectral_norm_estimate",
]


def orthogonality_error(q: Tensor) -> Tensor:
    r"""Largest entry of :math:`Q^T Q - I` (or :math:`QQ^T - I`), one figure per matrix.

    .. math:: e(Q) = \lVert Q^T Q - I_p \rVert_{\max} \ (n \ge p), \qquad
              e(Q) = \lVert Q Q^T - I_n \rVert_{\max} \ (n < p)

    The smaller Gram matrix is used, so a tall matrix is measured on its columns and a
    wide one on its rows (a point of the Stiefel manifold either way).

    Parameters
    ----------
    q : Tensor, shape (*, n, p)
        Any floating dtype.

    Returns
    -------
    Tensor, shape (*)
        Same dtype as ``q``. Cost :math:`O(n p \min(n, p))` (one product).

    Examples
    --------
    >>> import torch
    >>> float(orthogonality_error(torch.eye(3, dtype=torch.float64)))
    0.0
    >>> orthogonality_error(2 * torch.eye(2, dtype=torch.float64).expand(3, 2, 2))
    tensor([3., 3., 3.], dtype=torch.float64)
    >>> float(orthogonality_error(torch.eye(5, dtype=torch.float64)[:2]))   # orthonormal rows
    0.0
    """
    gram = q @ q.mT if q.shape[-2] < q.shape[-1] else q.mT @ q
    return (gram - _eye_like(gram)).abs().amax(dim=(-2, -1))


def spd_condition(matrix: Tensor, inverse: Tensor, steps: int = 12) -> Tensor:
    r"""Estimate the 2-norm condition number of symmetric positive-definite matrices.

    .. math:: \kappa(A) = \lambda_{\max}(A)\,\lambda_{\max}(A^{-1})

    with each largest eigenvalue estimated by ``steps`` power iterations (Rayleigh quotient)
    from a fixed start vector. For symmetric positive-definite input every estimate is at most
    the true value, so the result is a lower bound that tightens as
    :math:`(\lambda_2/\lambda_1)^{2\,\text{steps}}`: cheap enough to run at every
    correction, where :func:`torch.linalg.eigvalsh` would cost :math:`O(n^3)`.

    Parameters
    ----------
    matrix, inverse : Tensor, shape (*, n, n)
        :math:`A` and :math:`A^{-1}` (only matrix-vector products are taken).
    steps : int
        Power iterations per matrix (at least 1).

    Returns
    -------
    Tensor, shape (*)
        In the input's dtype; ``inf`` where either estimate is not positive and finite (an
        indefinite input). Cost :math:`O(\text{steps}\cdot n^2)` per matrix.

    Examples
    --------
    >>> import torch
    >>> a = torch.diag(torch.tensor([4.0, 2.0, 0.5], dtype=torch.float64))
    >>> round(float(spd_condition(a, torch.linalg.inv(a))), 6)
    8.0
    """
    n = matrix.shape[-1]
    start = torch.linspace(1.0, 2.0, n, dtype=matrix.dtype, device=matrix.device)
    start = start.expand(*matrix.shape[:-1]).unsqueeze(-1)

    def largest(m: Tensor) -> Tensor:
        x = start / start.norm(dim=-2, keepdim=True)
        for _ in range(max(1, steps)):
            y = m @ x
            x = y / y.norm(dim=-2, keepdim=True)
        return (x.mT @ (m @ x))[..., 0, 0]

    top, bottom = largest(matrix), largest(inverse)
    estimate = top * bottom
    usable = (top > 0) & (bottom > 0) & torch.isfinite(estimate)
    return torch.where(usable, estimate, math.inf)


def spectral_norm_estimate(matrix: Tensor, steps: int = 4) -> Tensor:
    r"""A lower bound of the spectral norm :math:`\lVert M\rVert_2` by power iteration.

    ``steps`` power iterations on :math:`M^TM` from a fixed start vector, then
    :math:`\lVert Mx\rVert` for the last unit vector :math:`x`: never above the true norm; how
    close it comes depends on the gap between the two largest singular values (a rule built
    on it must leave a margin; the unit tests check at least 0.8 of the norm for Gaussian
    and skew-symmetric matrices of size 1 to 256). :math:`O(\text{steps}\cdot n^2)` where
    :func:`torch.linalg.matrix_norm` with ``ord=2`` costs an SVD.

    Parameters
    ----------
    matrix : Tensor, shape (*, n, n)
        Square matrices (only matrix-vector products are taken).
    steps : int
        Power iterations (at least 1).

    Returns
    -------
    Tensor, shape (*)
        In the input's dtype; NaN where the input is not finite, 0 for a zero matrix.

    Examples
    --------
    >>> import torch
    >>> s = torch.tensor([[0.0, -3.0], [3.0, 0.0]], dtype=torch.float64)
    >>> round(float(spectral_norm_estimate(s)), 12)
    3.0
    """
    x = _probe(matrix.shape[-1], matrix.dtype, matrix.device)
    x = (x / x.norm()).expand(*matrix.shape[:-1]).unsqueeze(-1)
    for _ in range(max(1, steps)):
        y = matrix.mT @ (matrix @ x)
        x = y / y.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(matrix.dtype).tiny)
    return (matrix @ x).norm(dim=(-2, -1))


def condition_estimate(
    matrix: Tensor, lu: tuple[Tensor, Tensor] | None = None, iters: int = 8
) -> Tensor:
    r"""A lower bound of the 2-norm condition number of square matrices by power iteration.

    :math:`\lVert Cx\rVert \cdot \lVert C^{-T}y\rVert` for unit vectors :math:`x`, :math:`y`
    after ``iters`` power steps on :math:`C^TC` and on :math:`(C^TC)^{-1}` (solves with the
    LU factorization), from a fixed start: every value is a lower bound of
    :math:`\sigma_{\max}(C)/\sigma_{\min}(C)`, close to it when the extreme singular values
    are separated. NaN for a singular matrix.

    Parameters
    ----------
    matrix : Tensor, shape (*, k, k)
    lu : (Tensor, Tensor), optional
        ``matrix``'s LU factors and pivots (:func:`torch.linalg.lu_factor`), if known.
    iters : int
        Power steps for each extreme singular value.

    Returns
    -------
    Tensor, shape (*)
        Cost :math:`O(k^3)` for the factorization if not given, then :math:`O(\text{iters}\,k^2)`.

    Examples
    --------
    >>> import torch
    >>> c = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))
    >>> round(float(condition_estimate(c)), 6)
    100.0
    """
    if lu is None:
        factors, pivots, _ = torch.linalg.lu_factor_ex(matrix)
    else:
        factors, pivots = lu
    k = matrix.shape[-1]
    start = torch.cos(torch.arange(1, k + 1, dtype=matrix.dtype, device=matrix.device) * 2.399)
    big = small = (start / start.norm()).expand(*matrix.shape[:-1]).unsqueeze(-1)
    for _ in range(iters):
        big = matrix.mT @ (matrix @ big)
        big = big / torch.linalg.vector_norm(big, dim=-2, keepdim=True)
        small = torch.linalg.lu_solve(factors, pivots, small, adjoint=True)
        small = torch.linalg.lu_solve(factors, pivots, small)
        small = small / torch.linalg.vector_norm(small, dim=-2, keepdim=True)
    top = torch.linalg.vector_norm(matrix @ big, dim=(-2, -1))
    inverse_top = torch.linalg.vector_norm(
        torch.linalg.lu_solve(factors, pivots, small, adjoint=True), dim=(-2, -1)
    )
    return top * inverse_top


def sum_complement(z: Tensor) -> Tensor:
    r"""Map ``z[..., m-1]`` to ``[..., m]`` through an orthonormal basis of :math:`\mathbf 1^\perp`.

    The basis is the first :math:`m-1` columns of the Householder reflection
    :math:`H` that swaps :math:`e_m` and :math:`\mathbf 1/\sqrt m`, so

    .. math:: (Hz)_i = z_i - \frac{s}{m - \sqrt m}\ (i < m), \qquad
              (Hz)_m = \frac{s}{\sqrt m}, \qquad s = \textstyle\sum_i z_i .

    The output sums to zero and has the norm of ``z``. Cost :math:`O(m)` per row.

    Examples
    --------
    >>> import torch
    >>> z = torch.randn(4, 5, dtype=torch.float64)
    >>> y = sum_complement(z)
    >>> y.shape, bool(y.sum(-1).abs().max() < 1e-12)
    (torch.Size([4, 6]), True)
    >>> torch.allclose(y.norm(dim=-1), z.norm(dim=-1))
    True
    """
    m = z.shape[-1] + 1
    root = math.sqrt(m)
    s = z.sum(-1, keepdim=True)
    return torch.cat([z - s / (m - root), s / root], dim=-1)


def probe_inverse_residual(a: Tensor, x: Tensor) -> Tensor:
    r"""Cheap estimate of :math:`\lVert AX - I\rVert`: the residual on one fixed random vector.

    .. math:: r = \lVert A(Xz) - z\rVert_\infty / \lVert z\rVert_\infty

    with :math:`z` a Gaussian vector drawn once per size from a fixed seed. Two matrix-vector
    products instead of the :math:`O(n^3)` product :func:`~p4opt.linalg.inverse_residual`
    needs; a lower bound of :math:`\lVert AX - I\rVert_\infty` that tracks it within a factor
    of about :math:`\sqrt n` for the errors rounding leaves, which have no preferred direction.

    Parameters
    ----------
    a, x : Tensor, shape (*, n, n)
        A matrix and an approximate inverse, same dtype.

    Returns
    -------
    Tensor, shape (*)
        One figure per matrix. Cost :math:`O(n^2)`.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[4.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    >>> float(probe_inverse_residual(a, torch.linalg.inv(a))) < 1e-15
    True
    >>> float(probe_inverse_residual(a, torch.linalg.inv(a) + 1e-3)) > 1e-4
    True
    """
    z = _probe(a.shape[-1], a.dtype, a.device)[:, None]  # a column: stacks broadcast
    r = a @ (x @ z) - z
    return r.abs().amax((-2, -1)) / z.abs().amax()


def inverse_drifted(a: Tensor, x: Tensor, tolerance: float) -> bool:
    r"""Whether the tracked inverse ``x`` of ``a`` misses by more than a hundredth of
    ``tolerance`` on the probe of :func:`probe_inverse_residual` (the largest over a stack).

    The rule by which families correct their tracked inverse at once after a merge, before
    errors that add up between scheduled corrections reach ``validate()``'s ``tolerance``.
    Cost :math:`O(n^2)` per matrix and one host synchronization.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[4.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    >>> inverse_drifted(a, torch.linalg.inv(a), 1e-6), inverse_drifted(a, a, 1e-6)
    (False, True)
    """
    return not float(probe_inverse_residual(a, x).amax()) <= 0.01 * tolerance


@functools.lru_cache(maxsize=16)
def _probe(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The fixed probe vector of :func:`probe_inverse_residual` (shared, read-only)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(
        dtype=dtype, device=device
    )
