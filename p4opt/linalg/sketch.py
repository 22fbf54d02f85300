r"""Randomized sketches: the leading directions of a matrix from a few products."""

from __future__ import annotations

import torch

from p4opt._typing import Tensor
from p4opt.linalg._common import _HALF

__all__ = ["range_finder", "orthonormalize"]


def orthonormalize(y: Tensor) -> Tensor:
    r"""An orthonormal basis of the columns of tall matrices ``y`` (*, n, k), ``n >= k``.

    One Cholesky QR step, :math:`Q = Y R^{-1}` with :math:`R^TR = Y^TY` (two BLAS-3 products,
    about half the time of a Householder QR on CPU), whose loss of orthogonality grows like
    :math:`\kappa(Y)^2` machine epsilons; when the Cholesky factorization fails or the
    diagonal of :math:`R` shows :math:`\kappa(Y)^2\varepsilon > 10^{-3}`, a Householder QR
    (:func:`torch.linalg.qr`) is used instead.

    Parameters
    ----------
    y : Tensor, shape (*, n, k)
        float16 and bfloat16 are computed in float32 and rounded back.

    Returns
    -------
    Tensor, shape (*, n, k)
        Same span as ``y`` (when ``y`` has full column rank), orthonormal columns. Cost
        :math:`O(nk^2)`.

    Examples
    --------
    >>> import torch
    >>> y = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> q = orthonormalize(y)
    >>> bool((q.T @ q - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-12)
    True
    """
    if y.dtype in _HALF:  # no half-precision factorizations
        return orthonormalize(y.float()).to(y.dtype)
    r, info = torch.linalg.cholesky_ex(y.mT @ y, upper=True)
    # the diagonal of a successful factorization is positive: spread^2 eps < 1e-3 reads
    # max < min * sqrt(1e-3 / eps), a test that NaN fails too (few calls: this runs every merge)
    low, high = torch.aminmax(torch.diagonal(r, dim1=-2, dim2=-1), dim=-1)
    if bool(((info == 0) & (high < low * (1e-3 / torch.finfo(y.dtype).eps) ** 0.5)).all()):
        return torch.linalg.solve_triangular(r, y, upper=True, left=False)
    return torch.linalg.qr(y).Q


def range_finder(delta: Tensor, start: Tensor, power_iters: int = 1) -> tuple[Tensor, Tensor]:
    r"""Rank-k factors :math:`UV^T \approx \Delta` by a randomized range finder.

    .. math:: Q = \mathrm{orth}(\Delta\,\Omega), \quad
              \big(Q \leftarrow \mathrm{orth}(\Delta\,\Delta^T Q)\big)^{p},
              \quad \Delta \approx Q\,(Q^T\Delta) = U V^T

    With a Gaussian start :math:`\Omega` and ``p`` power iterations, :math:`QQ^T\Delta` is
    close to the best rank-k approximation of :math:`\Delta` when its singular values decay.

    Parameters
    ----------
    delta : Tensor, shape (*, n, m)
    start : Tensor, shape (*, m, k)
        The test matrix :math:`\Omega` (e.g. Gaussian).
    power_iters : int
        Power iterations ``p`` (each costs two :math:`O(nmk)` products and one
        :func:`orthonormalize`; the
        basis is re-orthonormalized once per iteration, which keeps the amplification of
        rounding errors to :math:`(\sigma_1/\sigma_k)^2` per iteration).

    Returns
    -------
    u : Tensor, shape (*, n, k)
        Orthonormal basis :math:`Q` of the approximate range.
    v : Tensor, shape (*, m, k)
        :math:`\Delta^T Q`, so that :math:`UV^T = QQ^T\Delta`.
        Cost :math:`O((2p + 2)\,nmk + (p + 1)\,nk^2)`.

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness:
    probabilistic algorithms for constructing approximate matrix decompositions",
    SIAM Review 53 (2011), Algorithms 4.3 and 4.4.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = torch.randn(2, 30, 3, generator=g, dtype=torch.float64)
    >>> omega = torch.randn(30, 3, generator=g, dtype=torch.float64)
    >>> u, v = range_finder(a @ b.T, omega)
    >>> bool((u @ v.T - a @ b.T).abs().max() < 1e-10)
    True
    """
    q = orthonormalize(delta @ start)
    for _ in range(power_iters):
        q = orthonormalize(delta @ (delta.mT @ q))
    return q, delta.mT @ q
