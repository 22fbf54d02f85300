r"""Adapters between p4opt flows and :mod:`torch.distributions`."""

from __future__ import annotations

import torch
from torch.distributions import Distribution, Transform, TransformedDistribution, constraints

from p4opt._typing import Tensor

__all__ = ["BijectionTransform", "flow_distribution"]


class BijectionTransform(Transform):
    r"""Any :class:`~p4opt.nn.Bijection` as a :class:`torch.distributions.Transform`.

    The transform's ``__call__`` is the layer's forward, its ``inv`` the
    layer's inverse; ``event_dim = 1`` (vectors). ``log_abs_det_jacobian(x, y)``
    reuses the log-det computed with the most recent call when ``x``/``y`` are
    that call's tensors, so :class:`~torch.distributions.TransformedDistribution`
    runs every layer once per ``log_prob``.

    Examples
    --------
    >>> import torch
    >>> from torch.distributions import MultivariateNormal, TransformedDistribution
    >>> from p4opt.nn import InvertibleLinear
    >>> _ = torch.manual_seed(0)
    >>> layer = InvertibleLinear(2, dtype=torch.float64)
    >>> eye = torch.eye(2, dtype=torch.float64)
    >>> base = MultivariateNormal(torch.zeros(2, dtype=torch.float64), eye)
    >>> dist = TransformedDistribution(base, [layer.transform()])
    >>> y = dist.sample((3,))
    >>> w = layer.weight.detach()
    >>> ref = MultivariateNormal(layer.bias.detach(), w @ w.mT).log_prob(y)
    >>> torch.allclose(dist.log_prob(y), ref)
    True
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, layer: torch.nn.Module, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.layer = layer
        self._last: tuple[Tensor, Tensor, Tensor] | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BijectionTransform) and other.layer is self.layer

    def __hash__(self) -> int:
        return id(self.layer)

    def _call(self, x: Tensor) -> Tensor:
        y, ladj = self.layer.forward_and_log_det(x)
        self._last = (x, y, ladj)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        x, ladj = self.layer.inverse_and_log_det(y)
        self._last = (x, y, -ladj)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        last = self._last
        if last is not None and last[0] is x and last[1] is y:
            return last[2]
        return self.layer.forward_and_log_det(x)[1]

    def with_cache(self, cache_size: int = 1) -> BijectionTransform:
        if self._cache_size == cache_size:
            return self
        return BijectionTransform(self.layer, cache_size)


def flow_distribution(flow: torch.nn.Module, base: Distribution) -> TransformedDistribution:
    r"""The density :math:`p(x) = p_Z(f(x))\,|\det J_f(x)|` of a normalizing flow ``f``.

    ``flow`` maps data to latent (the training direction); the returned
    distribution samples by the flow's inverse and scores by its forward.

    Examples
    --------
    >>> import torch
    >>> from torch.distributions import Independent, Normal
    >>> from p4opt.nn import BentIdentity
    >>> base = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    >>> dist = flow_distribution(BentIdentity(), base)
    >>> tuple(dist.sample((5,)).shape), tuple(dist.log_prob(torch.zeros(4, 2)).shape)
    ((5, 2), (4,))
    """
    return TransformedDistribution(base, [BijectionTransform(flow).inv])
