r"""The :class:`Bijection` convention shared by every flow layer, and the :class:`Flow` container.

Convention (the one place it is written down)
---------------------------------------------
Every layer is an :class:`torch.nn.Module` acting on vectors ``x[..., n]``:

``forward(x) -> y`` and ``inverse(y) -> x``
    The plain maps (``InvertibleLinear.forward`` is exactly ``torch.nn.Linear``'s).
``forward_and_log_det(x) -> (y, ladj)``
    ``ladj`` is the per-sample :math:`\log|\det \partial y / \partial x|`, shape ``x.shape[:-1]``.
``inverse_and_log_det(y) -> (x, ladj)``
    ``ladj`` is :math:`\log|\det \partial x / \partial y|` of the *inverse* map, so it is the
    negative of ``forward_and_log_det(x)[1]`` at the same point.

For density estimation the forward direction is the *normalizing* one (data to latent):
:math:`\log p(x) = \log p_Z(f(x)) + \log|\det J_f(x)|`. :meth:`Bijection.transform` wraps
any layer as a :class:`torch.distributions.Transform` (see :mod:`p4opt.nn.distributions`).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from p4opt._typing import Tensor
from p4opt.errors import P4TypeError

__all__ = ["Bijection", "Flow"]


class Bijection(nn.Module, abc.ABC):
    """Abstract base of every invertible layer (see the module docstring for the convention)."""

    @abc.abstractmethod
    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log|det dy/dx|)`` for ``x[..., n]``; the log-det has shape ``x.shape[:-1]``."""

    @abc.abstractmethod
    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dy|)`` for ``y[..., n]``; the log-det has shape ``y.shape[:-1]``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_and_log_det(x)[0]

    def inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_log_det(y)[0]

    def transform(self, cache_size: int = 1) -> torch.distributions.Transform:
        """This layer as a :class:`torch.distributions.Transform` (same forward direction)."""
        from p4opt.nn.distributions import BijectionTransform

        return BijectionTransform(self, cache_size=cache_size)


class Flow(Bijection):
    r"""A sequence of bijections applied in order; log-determinants add.

    .. math:: f = f_L \circ \dots \circ f_1, \qquad
              \log|\det J_f(x)| = \sum_l \log|\det J_{f_l}(x_{l-1})|

    Parameters
    ----------
    layers : iterable of Bijection
        Applied first to last by :meth:`forward_and_log_det`, last to first by
        :meth:`inverse_and_log_det`. Cost: the sum of the layers' costs.

    Examples
    --------
    >>> import torch
    >>> from p4opt.nn import BentIdentity, Flow, InvertibleLinear
    >>> _ = torch.manual_seed(0)
    >>> flow = Flow([InvertibleLinear(2), BentIdentity(), InvertibleLinear(2)]).double()
    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> y, ladj = flow.forward_and_log_det(x)
    >>> x_back, ladj_inv = flow.inverse_and_log_det(y)
    >>> torch.allclose(x_back, x), torch.allclose(ladj_inv, -ladj), tuple(ladj.shape)
    (True, True, (5,))
    """

    def __init__(self, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        for i, layer in enumerate(self.layers):
            needed = ("forward_and_log_det", "inverse_and_log_det")
            if not all(hasattr(layer, name) for name in needed):
                raise P4TypeError(
                    f"layer {i} ({type(layer).__name__}) needs forward_and_log_det and "
                    "inverse_and_log_det (see p4opt.nn.base)"
                )

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[:-1])
        for layer in self.layers:
            x, ladj = layer.forward_and_log_det(x)
            total = total + ladj
        return x, total

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        total = y.new_zeros(y.shape[:-1])
        for layer in reversed(self.layers):
            y, ladj = layer.inverse_and_log_det(y)
            total = total + ladj
        return y, total
