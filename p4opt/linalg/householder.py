r"""Products of Householder reflections in compact WY form, with a hand-written backward.

Row-vector convention: ``x[..., n]`` is a batch of vectors and
:func:`householder_apply` returns :math:`x\,G`, so the same call right-multiplies
a matrix :math:`Q` (its rows are vectors) or a batch.

References
----------
- The compact WY representation of products of Householder matrices
   (SIAM J. Sci. Stat. Comput. 10(1), 1989): :math:`H_1 \cdots H_k = I - W T W^T`
   with :math:`T` upper triangular.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from p4opt._autograd import Function
from p4opt._typing import Tensor
from p4opt.errors import ShapeError
from p4opt.linalg._common import _HALF, _eye_like

__all__ = ["householder_wy", "householder_wy_inverse", "householder_apply"]


@functools.lru_cache(maxsize=32)
def _wy_mask(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Upper triangular ``(k, k)`` mask: 1 above the diagonal, 1/2 on it (read-only use)."""
    mask = torch.ones(k, k, dtype=dtype, device=device).triu_()
    mask.diagonal().mul_(0.5)
    return mask


def householder_wy_inverse(w: Tensor) -> Tensor:
    r"""The inverse :math:`S = T^{-1}` of the compact WY factor, read off the Gram matrix.

    .. math:: S = \mathrm{striu}(W^T W) + \tfrac{1}{2}\mathrm{diag}(W^T W)
              = M \circ (W^T W), \qquad M_{ij} = [i < j] + \tfrac{1}{2}[i = j]

    (one product and one entrywise mask; the identity
    :math:`H(w_1)\cdots H(w_k) = I - W S^{-1} W^T` is checked against the
    explicit product in the tests).

    Parameters
    ----------
    w : Tensor, shape (*, n, k)
        Reflection vectors as columns (any nonzero norms).

    Returns
    -------
    Tensor, shape (*, k, k)
        Upper triangular :math:`S`; differentiable. Cost :math:`O(n k^2)`.

    Examples
    --------
    >>> import torch
    >>> householder_wy_inverse(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    tensor([[0.5000, 1.0000],
            [0.0000, 1.0000]])
    """
    return (w.mT @ w) * _wy_mask(w.shape[-1], w.dtype, w.device)


def householder_wy(w: Tensor) -> Tensor:
    r"""Triangular factor :math:`T` of the compact WY form of a product of reflections.

    .. math:: H(w_1) H(w_2) \cdots H(w_k) = I - W T W^T, \qquad
              H(w) = I - \frac{2 w w^T}{\lVert w \rVert^2},

    with :math:`T = S^{-1}` and :math:`S` from :func:`householder_wy_inverse`.
    :func:`householder_apply` never forms :math:`T`: it solves with :math:`S`.

    Parameters
    ----------
    w : Tensor, shape (*, n, k)
        Reflection vectors as columns (any nonzero norms).

    Returns
    -------
    Tensor, shape (*, k, k)
        Upper triangular :math:`T`; differentiable. Cost :math:`O(n k^2 + k^3)`.

    Examples
    --------
    >>> import torch
    >>> w = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    >>> torch.eye(2, dtype=torch.float64) - w @ householder_wy(w) @ w.mT
    tensor([[ 0., -1.],
            [-1.,  0.]], dtype=torch.float64)
    """
    s = householder_wy_inverse(w)
    return torch.linalg.solve_triangular(s, _eye_like(s), upper=True)


def householder_apply(x: Tensor, w: Tensor, precision: torch.dtype | None = None) -> Tensor:
    r"""Right-multiply vectors by a product of reflections without forming it.

    .. math:: x \, H(w_1) \cdots H(w_k) = x - \big((x W) S^{-1}\big) W^T

    with :math:`S` from :func:`householder_wy_inverse`: one Gram product, one
    triangular solve with the rows of :math:`xW` as right-hand sides, and two
    products, with no explicit factor :math:`T = S^{-1}` (forming it costs an
    identity right-hand side and one more product).

    Parameters
    ----------
    x : Tensor, shape (..., n), or (*, B, n) when ``w`` is a stack
        Vectors, or the rows of a matrix :math:`Q` (then the result is :math:`QG`).
    w : Tensor, shape (n, k) or (*, n, k)
        Reflection vectors as columns; a stack (*, n, k) gives one product per element,
        applied to the matching element of ``x`` (same leading shape ``*``).
    precision : torch.dtype, optional
        Compute the Gram matrix, :math:`xW` and the triangular solve in this dtype (for
        example float64 for float32 tensors: with many reflections the solve is
        ill-conditioned and a float32 product loses orthogonality); the last product and the
        backward pass run in ``x``'s dtype, where they need no more.

    Returns
    -------
    Tensor, same shape as ``x``
        Cost :math:`O(B n k + n k^2)` for ``B`` vectors (:math:`O(n^2 k)` for a
        square :math:`Q`); differentiable in ``x`` and ``w``.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> w = torch.randn(5, 2, generator=g, dtype=torch.float64)
    >>> h = [torch.eye(5, dtype=torch.float64) - 2 * c[:, None] * c / c.dot(c) for c in w.mT]
    >>> torch.allclose(householder_apply(torch.eye(5, dtype=torch.float64), w), h[0] @ h[1])
    True
    """
    if w.ndim > 2:  # a stack: one product per element, batched into one (S, B, n) call
        stack = w.shape[:-2]
        if x.ndim != w.ndim or x.shape[:-2] != stack:
            raise ShapeError(
                f"householder_apply: x must have shape (*, B, n) with * = {tuple(stack)} "
                f"matching w, got {tuple(x.shape)}"
            )
        if w.ndim > 3:
            flat = householder_apply(x.flatten(0, -3), w.flatten(0, -3), precision)
            return flat.reshape(x.shape)
    elif x.ndim != 2:
        return householder_apply(x.reshape(-1, x.shape[-1]), w, precision).reshape(x.shape)
    low = x.dtype in _HALF or w.dtype in _HALF
    autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    if low or autocast:
        # the triangular solve has no half-precision kernels: run the product in float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32, w32 = (x.float(), w.float()) if low else (x, w)
            mask = _wy_mask(w32.shape[-1], w32.dtype, w.device)
            out = _HouseholderApply.apply(x32, w32, mask, precision)[0]
        return out.to(x.dtype)
    return _HouseholderApply.apply(x, w, _wy_mask(w.shape[-1], w.dtype, w.device), precision)[0]


class _HouseholderApply(Function):
    r"""Forward and hand-written backward of :func:`householder_apply` for ``x`` (B, n).

    Also takes a stack: ``x`` (S, B, n) with ``w`` (S, n, k), one product per element.

    With :math:`S = M\circ W^TW`, :math:`Z = (xW)S^{-1}`, output :math:`x - ZW^T`
    and incoming gradient :math:`\bar G`: :math:`P = \bar G W S^{-T}`,
    :math:`\bar S = M \circ (Z^T P)`,
    :math:`\bar W = W(\bar S + \bar S^T) - \bar G^T Z - x^T P`,
    :math:`\bar x = \bar G - P W^T`. Five products and one solve where
    autograd's graph takes six products, a solve and triangular copies.
    """

    @staticmethod
    def forward(
        x: Tensor, w: Tensor, mask: Tensor, precision: torch.dtype | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if precision is not None and precision != x.dtype:
            # the Gram matrix, xW and the ill-conditioned triangular solve carry the error;
            # the last product, of well-scaled factors, adds only rounding in x's dtype
            wp = w.to(precision)
            s = (wp.mT @ wp) * _wy_mask(w.shape[-1], precision, w.device)
            z = torch.linalg.solve_triangular(s, x.to(precision) @ wp, upper=True, left=False)
            s, z = s.to(x.dtype), z.to(x.dtype)
        else:
            s = (w.mT @ w) * mask
            z = torch.linalg.solve_triangular(s, x @ w, upper=True, left=False)
        return _addmm(x, z, w.mT, alpha=-1), s, z

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, w, mask, _ = inputs
        _, s, z = output
        ctx.mark_non_differentiable(s, z)
        ctx.save_for_backward(x, w, mask, s, z)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad: Tensor, _grad_s: Tensor, _grad_z: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, w, mask, s, z = ctx.saved_tensors
        p = torch.linalg.solve_triangular(s.mT, grad @ w, upper=False, left=False)
        grad_x = _addmm(grad, p, w.mT, alpha=-1) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            sbar = (z.mT @ p).mul_(mask)
            grad_w = _addmm(w @ (sbar + sbar.mT), grad.mT, z, alpha=-1)
            grad_w = _addmm(grad_w, x.mT, p, alpha=-1)
        return grad_x, grad_w, None, None


def _addmm(c: Tensor, a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``c + alpha * a @ b`` for matrices or stacks (S, ., .) of matrices."""
    if c.ndim == 2:
        return torch.addmm(c, a, b, alpha=alpha)
    return torch.baddbmm(c, a, b, alpha=alpha)
