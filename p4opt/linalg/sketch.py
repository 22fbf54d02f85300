r"""Randomized sketches: the leading directions of a matrix from a few products."""

from __future__ import annotations

import torch

from p4opt._typing import Tensor

__all__ = ["range_finder"]


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
