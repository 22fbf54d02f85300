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

import math
from typing import Any

import torch

from p4opt._autograd import Function
from p4opt._typing import Tensor
from p4opt.errors import ShapeError
from p4opt.linalg._common import _HALF

__all__ = [
    "cayley_apply",
    "cayley_apply_at_zero",
    "cayley_stiefel_apply",
    "cayley_stiefel_apply_at_zero",
]


def _check(x: Tensor, generator: Tensor, name: str) -> None:
    n = generator.shape[-1]
    if generator.ndim < 2 or generator.shape[-2] != n or x.shape[-1] != n:
        raise ShapeError(
            f"{name}: generator must be square (*, n, n) and x (..., n) with the same n, got "
            f"x {tuple(x.shape)} and generator {tuple(generator.shape)}"
        )


def _check_stiefel(x: Tensor, rows: Tensor, tangent: Tensor, name: str) -> None:
    if rows.ndim < 2 or tangent.shape != rows.shape or x.shape[-1] != rows.shape[-1]:
        raise ShapeError(
            f"{name}: rows and tangent must have one shape (*, k, m) and x (..., m), got x "
            f"{tuple(x.shape)}, rows {tuple(rows.shape)} and tangent {tuple(tangent.shape)}"
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


def cayley_stiefel_apply(x: Tensor, rows: Tensor, tangent: Tensor) -> Tensor:
    r"""Right-multiply vectors by the Cayley rotation of a rank-:math:`2k` generator.

    For a point :math:`V` of the Stiefel manifold written as :math:`k` orthonormal rows
    (:math:`VV^T = I_k`, :math:`V \in \mathbb{R}^{k\times m}`) and a trainable
    :math:`Z` of the same shape,

    .. math:: S = V^TZ - Z^TV = UJU^T, \quad U = [V^T, Z^T], \quad
              J = \begin{pmatrix} 0 & I_k \\ -I_k & 0 \end{pmatrix},

    and :math:`G = (I + S/2)(I - S/2)^{-1} \in SO(m)`. By the push-through identity
    :math:`G - I = S(I - S/2)^{-1} = U M^{-1} J U^T` with the :math:`2k \times 2k` matrix
    :math:`M = I - \tfrac12 J U^TU`, so

    .. math:: xG = x + (xU)\,M^{-1} J\,U^T

    costs :math:`O(Bmk + mk^2 + k^3)` instead of the :math:`O(m^3)` of
    :func:`cayley_apply`. The generators :math:`V^TZ - Z^TV` span every tangent direction
    :math:`VS` of the manifold at :math:`V` (the construction of Wen and Yin), and at
    :math:`Z = 0` the gradient of :math:`VG` with respect to :math:`Z` is
    :math:`\bar Y - V\bar Y^TV` for an incoming gradient :math:`\bar Y`: the Riemannian
    gradient of the canonical metric. As in :func:`cayley_apply`, only the increment goes
    through the solve.

    Parameters
    ----------
    x : Tensor, shape (*, B, m)
        Vectors, or the rows :math:`V` themselves (then the result is :math:`VG`).
    rows : Tensor, shape (*, k, m)
        :math:`V`, with orthonormal rows (not checked; the rotation is orthogonal only for
        such :math:`V`).
    tangent : Tensor, shape (*, k, m)
        :math:`Z`. Same dtype as ``x``; half precision is computed in float32.

    Returns
    -------
    Tensor, same shape as ``x``
        Differentiable in ``x`` and ``tangent`` (and ``rows``) by autograd. NaN for the
        elements of a stack whose :math:`M` is singular in floating point (a huge
        :math:`Z`, :math:`\lVert Z\rVert^2` beyond the inverse machine epsilon).

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> v = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))[0].mT
    >>> z = torch.randn(2, 6, generator=g, dtype=torch.float64)
    >>> s = v.mT @ z - z.mT @ v
    >>> eye = torch.eye(6, dtype=torch.float64)
    >>> dense = cayley_apply(eye, s / 2)   # the same rotation, O(m^3)
    >>> bool(torch.allclose(cayley_stiefel_apply(eye, v, z), dense))
    True
    """
    _check_stiefel(x, rows, tangent, "cayley_stiefel_apply")
    k = rows.shape[-2]
    if x.dtype in _HALF or tangent.dtype in _HALF:  # the solve has no half-precision kernels
        return cayley_stiefel_apply(x.float(), rows.float(), tangent.float()).to(x.dtype)
    u_t = torch.cat([rows, tangent], dim=-2)  # U^T, shape (*, 2k, m)
    gram = u_t @ u_t.mT  # U^T U
    # M = I - J U^T U / 2, with J [A; B] = [B; -A] on row blocks
    m_mat = torch.cat([gram[..., k:, :], -gram[..., :k, :]], dim=-2).mul_(-0.5)
    m_mat.diagonal(dim1=-2, dim2=-1).add_(1.0)
    j_u_t = torch.cat([u_t[..., k:, :], -u_t[..., :k, :]], dim=-2)  # J U^T
    # M is invertible in exact arithmetic, but for a huge Z (|Z|^2 beyond 1 / eps) it can be
    # singular in floating point: the elements whose factorization failed come out NaN (a
    # merge then refuses them) instead of raising
    solved, info = torch.linalg.solve_ex(m_mat, j_u_t)
    if bool((info != 0).any()):
        solved = torch.where((info == 0)[..., None, None], solved, math.nan)
    return x + (x @ u_t.mT) @ solved


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


def cayley_stiefel_apply_at_zero(x: Tensor, rows: Tensor, tangent: Tensor) -> Tensor:
    r""":func:`cayley_stiefel_apply` at a tangent known to be zero: value ``x``, exact gradient.

    At :math:`Z = 0`, :math:`d(xG) = x\,dS = x(V^T dZ - dZ^T V)`, so for an incoming gradient
    :math:`\bar Y` the gradient of :math:`Z` is :math:`(xV^T)^T\bar Y - (\bar YV^T)^Tx`
    (:math:`\bar Y - V\bar Y^TV` for :math:`x = V`), and ``x``'s gradient is :math:`\bar Y`.
    The caller must know that ``tangent`` is zero; its values are not read.

    Parameters
    ----------
    x : Tensor, shape (*, B, m)
        Vectors, or the rows :math:`V` themselves.
    rows : Tensor, shape (*, k, m)
        :math:`V` (orthonormal rows). No gradient is returned for it.
    tangent : Tensor, shape (*, k, m)
        The zero tangent whose gradient is wanted.

    Returns
    -------
    Tensor, same shape as ``x``
        A copy of ``x``. Cost :math:`O(Bm)` forward, :math:`O(Bmk)` backward; works under
        :mod:`torch.func`.

    Examples
    --------
    >>> import torch
    >>> v = torch.eye(2, 5, dtype=torch.float64)
    >>> z = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    >>> cayley_stiefel_apply_at_zero(v, v, z).square().sum().backward()
    >>> z.grad.shape
    torch.Size([2, 5])
    """
    _check_stiefel(x, rows, tangent, "cayley_stiefel_apply_at_zero")
    return _CayleyStiefelAtZero.apply(x, rows, tangent)


class _CayleyStiefelAtZero(Function):
    """Forward and backward of :func:`cayley_stiefel_apply_at_zero`."""

    @staticmethod
    def forward(x: Tensor, rows: Tensor, tangent: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, rows, tangent = inputs
        ctx.save_for_backward(x, rows)
        ctx.tangent_dtype = tangent.dtype

    @staticmethod
    @torch.autograd.function.once_differentiable  # the value's second derivative is not G's
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        x, rows = ctx.saved_tensors
        grad_tangent = None
        if ctx.needs_input_grad[2]:
            v = rows.to(grad.dtype)
            if rows.ndim > 2 or x.ndim == rows.ndim:  # (..., *, B, m) against a stack (*, k, m)
                grad_tangent = (x @ v.mT).mT @ grad - (grad @ v.mT).mT @ x
                extra = grad_tangent.ndim - rows.ndim  # leading batch dims beyond the stack
                if extra > 0:
                    grad_tangent = grad_tangent.sum(tuple(range(extra)))
            else:  # plain vectors (..., m) against one (k, m): every leading dim is a batch
                xs, gs = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
                grad_tangent = (xs @ v.mT).mT @ gs - (gs @ v.mT).mT @ xs
            grad_tangent = grad_tangent.to(ctx.tangent_dtype)
        return (grad if ctx.needs_input_grad[0] else None), None, grad_tangent
