r"""Givens rotations on disjoint coordinate pairs, and permutation inverses.

Row-vector convention: :func:`givens_apply` returns :math:`x\,G` for vectors ``x[..., n]``.
"""

from __future__ import annotations

import torch

from p4opt._typing import Tensor

__all__ = ["givens_apply", "invert_permutation"]


def invert_permutation(perm: Tensor) -> Tensor:
    r"""Inverse of a permutation given as an index tensor: its ``argsort``.

    ``x[..., perm][..., invert_permutation(perm)]`` equals ``x``. Cost :math:`O(n \log n)`.

    Examples
    --------
    >>> import torch
    >>> invert_permutation(torch.tensor([2, 0, 3, 1]))
    tensor([1, 3, 0, 2])
    """
    return torch.argsort(perm)


def givens_apply(x: Tensor, angles: Tensor, perm: Tensor, inverse: Tensor | None = None) -> Tensor:
    r"""Right-multiply vectors by rotations on disjoint coordinate pairs.

    The pairs are :math:`(a_i, b_i) = (p_{2i}, p_{2i+1})` for the permutation
    :math:`p` = ``perm``; the rotation by :math:`\theta_i` maps

    .. math:: (x G)_{a_i} = x_{a_i}\cos\theta_i + x_{b_i}\sin\theta_i, \qquad
              (x G)_{b_i} = x_{b_i}\cos\theta_i - x_{a_i}\sin\theta_i,

    and leaves the last coordinate alone when ``n`` is odd.

    Parameters
    ----------
    x : Tensor, shape (..., n)
    angles : Tensor, shape (m,)
        With ``m = n // 2``.
    perm : Tensor, shape (n,), long
        A permutation of ``0..n-1``.
    inverse : Tensor, shape (n,), long, optional
        ``invert_permutation(perm)`` if already known.

    Returns
    -------
    Tensor, shape (..., n)
        Cost :math:`O(B n)`; differentiable in ``x`` and ``angles``. ``angles = 0``
        returns ``x`` exactly.

    Examples
    --------
    >>> import torch, math
    >>> x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    >>> givens_apply(x, torch.tensor([math.pi / 2], dtype=torch.float64), torch.tensor([2, 0, 1]))
    tensor([-3.,  2.,  1.], dtype=torch.float64)
    """
    m = angles.shape[-1]
    inverse = invert_permutation(perm) if inverse is None else inverse
    xp = x[..., perm]
    a, b, rest = xp[..., 0 : 2 * m : 2], xp[..., 1 : 2 * m : 2], xp[..., 2 * m :]
    c, s = torch.cos(angles), torch.sin(angles)
    rotated = torch.stack([a * c + b * s, b * c - a * s], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)[..., inverse]
