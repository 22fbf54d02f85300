r"""Model-level structure checks: additivity, homogeneity, conservation and symmetry errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from p4opt._typing import Tensor
from p4opt.errors import ShapeError, describe

__all__ = ["additivity_error", "homogeneity_error", "conservation_error", "symmetry_error"]

Map = Callable[[Tensor], Tensor]


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    tiny = torch.finfo(num.dtype).tiny if num.is_floating_point() else 1e-300
    return num / den.clamp_min(tiny)


def additivity_error(f: Map, x: Tensor, y: Tensor) -> Tensor:
    r"""Relative additivity error of ``f`` on the pair ``(x, y)``.

    .. math:: \frac{\lVert f(x+y) - f(x) - f(y)\rVert}{\lVert f(x) + f(y)\rVert}

    with Frobenius norms over the whole batch. Zero (up to rounding) for a
    linear ``f``. Differentiable (usable as a penalty). Cost: three calls of ``f``.

    Parameters
    ----------
    f : callable
        The model, mapping ``(*, n_in)`` to ``(*, n_out)``.
    x, y : Tensor, shape (*, n_in)
        Inputs of equal shape.

    Returns
    -------
    Tensor
        0-dim, in ``f``'s output dtype.

    Examples
    --------
    >>> import torch
    >>> a = torch.randn(4, 4, dtype=torch.float64)
    >>> x, y = torch.randn(2, 8, 4, dtype=torch.float64)
    >>> float(additivity_error(lambda v: v @ a.T, x, y)) < 1e-12
    True
    >>> float(additivity_error(torch.relu, x, -x)) > 0.1
    True
    """
    if x.shape != y.shape:
        raise ShapeError(f"x and y must have equal shapes, got {describe(x)} and {describe(y)}")
    fx, fy = f(x), f(y)
    return _ratio(torch.linalg.vector_norm(f(x + y) - fx - fy), torch.linalg.vector_norm(fx + fy))


def homogeneity_error(f: Map, x: Tensor, lambdas: Sequence[float] | Tensor) -> Tensor:
    r"""Relative homogeneity error of ``f`` at ``x`` for every scale :math:`\lambda`.

    .. math::

        e(\lambda) = \frac{\lVert f(\lambda x) - \lambda f(x)\rVert}{\lVert \lambda f(x)\rVert}

    (Frobenius norms over the batch; for :math:`\lambda = 0` the denominator
    is :math:`\lVert f(x)\rVert`, so :math:`e(0) = \lVert f(0)\rVert/\lVert f(x)\rVert`).
    Zero for a linear ``f``; a ReLU network without biases is only positively
    homogeneous (:math:`e(\lambda) = 0` for :math:`\lambda > 0`). Differentiable.
    Cost: ``len(lambdas) + 1`` calls of ``f``.

    Parameters
    ----------
    f : callable
        The model.
    x : Tensor, shape (*, n_in)
        Inputs.
    lambdas : sequence of float or Tensor, shape (L,)
        Scales.

    Returns
    -------
    Tensor, shape (L,)
        One error per scale.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(16, 3, dtype=torch.float64)
    >>> err = homogeneity_error(torch.relu, x, [-2.0, 0.5, 3.0])
    >>> bool(err[0] > 0.5), bool(err[1:].max() < 1e-12)
    (True, True)
    """
    lam = torch.as_tensor(lambdas, dtype=x.dtype, device=x.device).reshape(-1)
    fx = f(x)
    ref = torch.linalg.vector_norm(fx)
    errors = []
    for value in lam:
        gap = torch.linalg.vector_norm(f(value * x) - value * fx)
        errors.append(_ratio(gap, ref * value.abs() if value != 0 else ref))
    return torch.stack(errors)


def conservation_error(f: Map, x: Tensor, dim: int = -1) -> Tensor:
    r"""Worst relative change of the total :math:`\sum_i x_i` under ``f``.

    .. math:: \max_{\text{samples}}
              \frac{\bigl|\sum_i f(x)_i - \sum_i x_i\bigr|}{\sum_i |x_i|}

    (normalized by the total absolute mass, so a zero-mean ``x`` is fine).
    Zero for a mass-conserving map (e.g. columns of ``W`` summing to one).
    Cost: one call of ``f``.

    Parameters
    ----------
    f : callable
        Map from ``(*, n)`` to ``(*, m)`` (the sums are compared, so ``m`` may differ from ``n``).
    x : Tensor, shape (*, n)
        States.
    dim : int
        Dimension summed over.

    Returns
    -------
    Tensor
        0-dim.

    Examples
    --------
    >>> import torch
    >>> x = torch.rand(5, 8, dtype=torch.float64)
    >>> float(conservation_error(lambda u: u.roll(1, -1), x)) < 1e-15
    True
    >>> round(float(conservation_error(lambda u: 2 * u, x)), 6)
    1.0
    """
    gap = (f(x).sum(dim) - x.sum(dim)).abs()
    return _ratio(gap, x.abs().sum(dim)).max()


def symmetry_error(w: Tensor) -> Tensor:
    r"""Relative asymmetry :math:`\lVert W - W^T\rVert_F / \lVert W\rVert_F` (batched).

    Returns a tensor of shape ``(*)``. Cost :math:`O(n^2)` per matrix.

    Examples
    --------
    >>> import torch
    >>> a = torch.randn(3, 3)
    >>> float(symmetry_error(a + a.T))
    0.0
    >>> round(float(symmetry_error(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))), 4)
    1.4142
    """
    if w.ndim < 2 or w.shape[-1] != w.shape[-2]:
        raise ShapeError(f"w must be square matrices (*, n, n), got {describe(w)}")
    num = torch.linalg.matrix_norm(w - w.mT)
    return _ratio(num, torch.linalg.matrix_norm(w))
