r"""Haar-random orthogonal matrices (QR of a Gaussian matrix with the sign fix)."""

from __future__ import annotations

import torch

from p4opt._typing import Tensor
from p4opt.errors import P4ValueError

__all__ = ["random_orthogonal"]


def random_orthogonal(
    n: int,
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float64,
    det: float | None = None,
    batch: tuple[int, ...] = (),
) -> Tensor:
    r"""Haar-distributed orthogonal matrices, optionally with a prescribed determinant.

    With :math:`G = QR` the QR factorization of a standard Gaussian matrix,

    .. math:: Q' = Q\,\mathrm{diag}(\mathrm{sign}\, r_{ii})

    is Haar-distributed on :math:`O(n)`. With ``det`` given, the first column
    of every matrix whose determinant has the other sign is negated (Haar on
    :math:`SO(n)` for ``det=1``).

    Parameters
    ----------
    n : int
        Size.
    generator : torch.Generator or None
        Source of randomness (``None``: the global generator, for callers that want it).
    dtype : torch.dtype
        Dtype of the result; the factorization always runs in float64.
    det : {1.0, -1.0}, optional
        Sign of the determinant.
    batch : tuple of int
        Leading batch shape.

    Returns
    -------
    Tensor, shape (*batch, n, n)
        Cost :math:`O(n^3)` per matrix.

    Examples
    --------
    >>> import torch
    >>> q = random_orthogonal(4, generator=torch.Generator().manual_seed(0), det=1.0, batch=(2,))
    >>> torch.allclose(q.mT @ q, torch.eye(4, dtype=q.dtype)), torch.linalg.det(q).round().tolist()
    (True, [1.0, 1.0])
    """
    if det is not None and det not in (1, -1):
        raise P4ValueError(f"det must be 1, -1 or None, got {det!r}")
    gauss = torch.randn(*batch, n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * r.diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-2)
    if det is not None:
        flip = torch.linalg.det(q).sign() * det < 0
        q[..., :, 0] = torch.where(flip[..., None], -q[..., :, 0], q[..., :, 0])
    return q.to(dtype)
