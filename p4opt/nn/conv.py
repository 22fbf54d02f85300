r""":class:`InvertibleConv1x1`: Glow's invertible 1x1 convolution with a P⁴Inv-tracked weight."""

from __future__ import annotations

from typing import Any

import torch

from p4opt._typing import Tensor
from p4opt._validate import check_int
from p4opt.errors import ShapeError, describe
from p4opt.families.invertible import Invertible
from p4opt.nn.base import Bijection
from p4opt.nn.linear import random_orthogonal
from p4opt.registry import register

__all__ = ["InvertibleConv1x1"]


class InvertibleConv1x1(Bijection):
    r"""Channel mixing :math:`y_{b,:,s} = W x_{b,:,s}` at every position ``s`` (Glow's 1x1 conv).

    The ``c × c`` weight is registered with :class:`p4opt.Invertible`, so its inverse and
    :math:`\log|\det W|` are tracked exactly; the log-determinant of the whole map is
    :math:`S \log|\det W|` per sample, with :math:`S` the number of positions (``H·W`` for
    images). Inputs have shape ``(B, c, *spatial)`` (1-D, 2-D or 3-D).

    Costs (``B`` samples, ``S`` positions): forward and inverse :math:`O(BSc^2)`;
    :meth:`log_det` :math:`O(c^2)`; the merge after each step :math:`O(c^2 k)`.

    Parameters
    ----------
    channels : int
        Number of channels ``c``.
    dtype, device : optional
        Of the layer's weight (the bookkeeping stays float64).
    **options
        Passed to :class:`p4opt.Invertible`.

    References
    ----------
    D. P. Kingma, P. Dhariwal, "Glow: generative flow with invertible 1x1 convolutions",
    NeurIPS 2018.

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> conv = InvertibleConv1x1(3, dtype=torch.float64)
    >>> x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    >>> y, ladj = conv.forward_and_log_det(x)
    >>> ladj.shape, torch.allclose(conv.inverse(y), x)
    (torch.Size([2]), True)
    >>> expected = 20 * torch.linalg.slogdet(conv.weight)[1]
    >>> torch.allclose(ladj, expected.expand(2))
    True
    """

    def __init__(
        self,
        channels: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.channels = check_int("channels", channels, minimum=1)
        weight = random_orthogonal(channels, channels, dtype=dtype).to(device)
        self.weight = torch.nn.Parameter(weight)
        self.perturbation = register(self, "weight", Invertible(**options))

    def _positions(self, x: Tensor, name: str) -> int:
        if x.ndim < 3 or x.shape[1] != self.channels:
            raise ShapeError(
                f"{name} must have shape (batch, {self.channels}, *spatial), got {describe(x)}"
            )
        return x[0, 0].numel()

    def log_det(self) -> Tensor:
        r""":math:`\log|\det W|` of the channel matrix (0-dim, float64, differentiable)."""
        return self.perturbation.logabsdet()

    def forward(self, x: Tensor) -> Tensor:
        self._positions(x, "x")
        return (x.movedim(1, -1) @ self.weight.mT).movedim(-1, 1)

    def inverse(self, y: Tensor) -> Tensor:
        self._positions(y, "y")
        return self.perturbation.solve(y.movedim(1, -1)).movedim(-1, 1)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        positions = self._positions(x, "x")
        ladj = (positions * self.log_det()).to(x.dtype).expand(x.shape[0])
        return self.forward(x), ladj

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        positions = self._positions(y, "y")
        ladj = (-positions * self.log_det()).to(y.dtype).expand(y.shape[0])
        return self.inverse(y), ladj

    def extra_repr(self) -> str:
        return f"channels={self.channels}, rank={self.perturbation.rank}"
