r""":class:`InvertibleLinear`: a square linear layer trained by P⁴Inv (exact inverse, log-det)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from p4opt import linalg
from p4opt._typing import Tensor
from p4opt.errors import P4ValueError, ShapeError, describe
from p4opt.families.invertible import Invertible
from p4opt.nn.base import Bijection
from p4opt.registry import register

__all__ = ["InvertibleLinear", "random_orthogonal"]


def random_orthogonal(
    *shape: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Haar-random orthogonal matrices ``(*, n, n)`` (:func:`p4opt.linalg.random_orthogonal`).

    Examples
    --------
    >>> import torch
    >>> q = random_orthogonal(3, 4, 4, dtype=torch.float64)
    >>> torch.allclose(q @ q.mT, torch.eye(4, dtype=torch.float64).expand(3, 4, 4))
    True
    """
    *batch, n, m = shape
    if n != m:
        raise ShapeError(f"random_orthogonal needs a square shape (*, n, n), got {tuple(shape)}")
    return linalg.random_orthogonal(
        n, generator=generator, dtype=dtype or torch.get_default_dtype(), batch=tuple(batch)
    )


class InvertibleLinear(Bijection):
    r"""Square linear layer :math:`y = x W^T + b` whose weight is trained by P⁴Inv.

    The weight is registered with :class:`p4opt.Invertible`, so :math:`W^{-1}`
    and :math:`\log|\det W|` are tracked exactly and cheaply through the
    low-rank updates :math:`W = A + UV^T`; train with :class:`p4opt.P4Optimizer`.

    Costs (``B`` vectors): :meth:`forward` :math:`O(Bn^2)`, :meth:`inverse`
    :math:`O(Bn^2)`, :meth:`log_det` :math:`O(n^2 k)`.

    Parameters
    ----------
    n : int
        Number of features (in and out).
    bias : bool
        Learn an additive bias :math:`b`.
    rank : int, optional
        Rank ``k`` of each merged update (default: :func:`p4opt.families.invertible.default_rank`).
    dtype, device : optional
        Of the layer's tensors (the Invertible bookkeeping stays float64).
    **options
        Passed to :class:`p4opt.Invertible` (``correct_every``, bounds, ``seed``...).

    Attributes
    ----------
    weight : Tensor, shape (n, n)
        The current matrix :math:`A + UV^T` (a parametrized tensor).
    bias : nn.Parameter, shape (n,) or None
    perturbation : p4opt.Invertible

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> layer = InvertibleLinear(3, dtype=torch.float64)
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> torch.allclose(layer.inverse(layer(x)), x)
    True
    >>> torch.allclose(layer.log_det(), torch.linalg.slogdet(layer.weight)[1])
    True
    """

    def __init__(
        self,
        n: int,
        bias: bool = True,
        rank: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise P4ValueError(f"n must be a positive int, got {n!r}")
        self.n = n
        self.weight = nn.Parameter(random_orthogonal(n, n, dtype=dtype).to(device))
        like = {"dtype": self.weight.dtype, "device": self.weight.device}
        self.bias = nn.Parameter(torch.zeros(n, **like)) if bias else None
        self.perturbation = register(self, "weight", Invertible(rank=rank, **options))

    def _check(self, t: Tensor, name: str) -> None:
        if t.ndim == 0 or t.shape[-1] != self.n:
            raise ShapeError(f"{name} must have shape (..., {self.n}), got {describe(t)}")

    def forward(self, x: Tensor) -> Tensor:
        """:math:`x W^T + b` for ``x[..., n]``, exactly like ``torch.nn.Linear``."""
        return F.linear(x, self.weight, self.bias)

    def inverse(self, y: Tensor) -> Tensor:
        r""":math:`W^{-1}(y - b)` by the perturbation's Woodbury solve, shape ``(..., n)``."""
        self._check(y, "y")
        return self.perturbation.solve(y - self.bias if self.bias is not None else y)

    def log_det(self) -> Tensor:
        r""":math:`\log|\det W|` (0-dim, float64, differentiable in the update)."""
        return self.perturbation.logabsdet()

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "x")
        return self.forward(x), self.log_det().to(x.dtype).expand(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.inverse(y), (-self.log_det()).to(y.dtype).expand(y.shape[:-1])

    def extra_repr(self) -> str:
        return f"n={self.n}, bias={self.bias is not None}, rank={self.perturbation.rank}"
