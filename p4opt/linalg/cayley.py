r"""Rotations by the Cayley transform of a skew-symmetric generator.

Row-vector convention, as in :mod:`~p4opt.linalg.householder`: ``x[..., n]`` is a batch of
vectors and the functions return :math:`x\,G`.

.. math:: G(X) = \big(I + \tfrac12 S\big)\big(I - \tfrac12 S\big)^{-1}, \qquad S = X - X^T,

is orthogonal with :math:`\det G = +1` for every real square :math:`X` (the eigenvalues of
:math:`S` are imaginary, so :math:`I - S/2` is invertible), :math:`G(0) = I`, and
:math:`G(X) = I + S + O(\lVert S\rVert^2)`.

References
----------
- N. J. Higham, "Functions of Matrices", SIAM 2008 (the Cayley transform).
- Z. Wen, W. Yin, "A feasible method for optimization with orthogonality constraints",
  Math. Program. 142 (2013).
"""

from __future__ import annotations

from typing import Any

import torch

from p4opt._autograd import Function
from p4opt._typing import Tensor
from p4opt.errors import ShapeError
from p4opt.linalg._common import _HALF

__all__ = ["cayley_apply", "cayley_apply_at_zero"]


def _check(x: Tensor, generator: Tensor, name: str) -> None:
    n = generator.shape[-1]
    if generator.ndim < 2 or generator.shape[-2] != n or x.shape[-1] != n:
        raise ShapeError(
            f"{name}: generator must be square (*, n, n) and x (..., n) with the same n, got "
            f"x {tuple(x.shape)} and generator {tuple(generator.shape)}"
        )


def cayley_apply(x: Tensor, generator: Tensor) -> Tensor:
    r"""Right-multiply vectors by the Cayley rotation :math:`G(X)` of a generator :math:`X`.

    .. math:: x\,G(X) = x + xS\,\big(I - \tfrac12 S\big)^{-1},
              \qquad S = X - X^T

    (:math:`G - I = S(I - S/2)^{-1}`): one product and one LU solve. Only the increment
    :math:`x(G - I)` goes through the solve, so its rounding error is relative to
    :math:`\lVert xS\rVert` rather than to :math:`\lVert x\rVert`: for a small generator (one
    optimizer step) the result in float32 is as close to orthogonal as float32 rounding of
    :math:`x` itself allows, without float64 products.

    Parameters
    ----------
    x : Tensor, shape (*, B, n)
        Vectors, or the rows of a matrix :math:`Q` (then the result is :math:`QG`). With a
        stack of generators the leading shape ``*`` must match it.
    generator : Tensor, shape (n, n) or (*, n, n)
        :math:`X`; only its skew-symmetric part acts. Same dtype as ``x``; float16 and
        bfloat16 are computed in float32 (LU has no half-precision kernels) and rounded back.

    Returns
    -------
    Tensor, same shape as ``x``
        Differentiable in ``x`` and ``generator`` (through :func:`torch.linalg.solve`).
        Cost :math:`O(n^3 + Bn^2)` per generator.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q = cayley_apply(torch.eye(4, dtype=torch.float64),
    ...                  torch.randn(4, 4, generator=g, dtype=torch.float64))
    >>> bool(torch.allclose(q @ q.mT, torch.eye(4, dtype=torch.float64)))
    True
    >>> round(float(torch.linalg.det(q)), 12)
    1.0
    """
    _check(x, generator, "cayley_apply")
    if x.dtype in _HALF or generator.dtype in _HALF:  # LU has no half-precision kernels
        return cayley_apply(x.float(), generator.float()).to(x.dtype)
    skew = generator - generator.mT
    right = skew.mul(-0.5)  # I - S/2, written on the diagonal in place (no identity built)
    right.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return x + torch.linalg.solve(right, x @ skew, left=False)


def cayley_apply_at_zero(x: Tensor, generator: Tensor) -> Tensor:
    r""":func:`cayley_apply` at a generator known to be zero: value ``x``, exact gradient.

    At :math:`X = 0` the rotation is the identity and its derivative is
    :math:`dG = dX - dX^T`, so for an incoming gradient :math:`\bar Y` of the output
    the generator's gradient is :math:`M - M^T` with :math:`M = x^T\bar Y` (summed over a
    batch of vectors), and ``x``'s gradient is :math:`\bar Y`: the gradient of
    :func:`cayley_apply` at zero, without its LU solve. The caller must know that
    ``generator`` is zero; its values are not read.

    Parameters
    ----------
    x : Tensor, shape (*, B, n)
        Vectors (a stack of generators needs the matching leading shape ``*``).
    generator : Tensor, shape (n, n) or (*, n, n)
        The zero generator whose gradient is wanted.

    Returns
    -------
    Tensor, same shape as ``x``
        A copy of ``x`` (never a view: writing to it cannot change ``x``). Cost
        :math:`O(Bn)` forward, :math:`O(Bn^2)` backward; works under :mod:`torch.func`.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(3, 4, dtype=torch.float64)
    >>> gen = torch.zeros(4, 4, dtype=torch.float64, requires_grad=True)
    >>> cayley_apply_at_zero(x, gen).square().sum().backward()
    >>> gen.grad.shape
    torch.Size([4, 4])
    """
    _check(x, generator, "cayley_apply_at_zero")
    return _CayleyAtZero.apply(x, generator)


class _CayleyAtZero(Function):
    """Forward and backward of :func:`cayley_apply_at_zero`."""

    @staticmethod
    def forward(x: Tensor, generator: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, generator = inputs
        ctx.save_for_backward(x)
        ctx.stacked = generator.ndim > 2
        ctx.generator_dtype = generator.dtype

    @staticmethod
    @torch.autograd.function.once_differentiable  # the value's second derivative is not G's
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        (x,) = ctx.saved_tensors
        grad_gen = None
        if ctx.needs_input_grad[1]:
            if ctx.stacked:
                m = x.mT @ grad
            else:  # every leading dimension of x is a batch of vectors
                m = x.reshape(-1, x.shape[-1]).mT @ grad.reshape(-1, grad.shape[-1])
            grad_gen = (m - m.mT).to(ctx.generator_dtype)
        return (grad if ctx.needs_input_grad[0] else None), grad_gen
