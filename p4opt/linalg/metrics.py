r"""Error figures and small bases: orthogonality error, orthonormal basis of sums-to-zero."""

from __future__ import annotations

import math

import torch

from p4opt._typing import Tensor
from p4opt.linalg._common import _eye_like

__all__ = ["orthogonality_error", "sum_complement"]


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
