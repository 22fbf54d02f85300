r"""RealNVP affine coupling layers (the comparison flow for P⁴Inv)."""

from __future__ import annotations

import torch
from torch import nn

from p4opt._typing import Tensor
from p4opt.errors import P4ValueError, ShapeError, describe
from p4opt.nn.base import Bijection, Flow

__all__ = ["AffineCoupling", "realnvp", "realnvp_with_params"]


class AffineCoupling(Bijection):
    r"""Affine coupling: half the coordinates scale and shift the other half.

    With ``a`` the conditioning coordinates (index parity ``parity``) and ``b``
    the others,

    .. math:: y_a = x_a, \qquad y_b = x_b \odot e^{s(x_a)} + t(x_a), \qquad
              s = c \tanh(\tilde s / c)

    where :math:`(\tilde s, t)` is a small MLP of :math:`x_a` and the bound
    :math:`c` keeps every scale in :math:`(e^{-c}, e^{c})`. The MLP's last
    layer starts at zero, so a fresh coupling is the identity.
    Per-sample log-det :math:`\sum_b s_b(x_a)`; cost :math:`O(B h^2)` for width ``h``.

    Parameters
    ----------
    n : int
        Number of features (>= 2).
    parity : int
        0 conditions on even indices, 1 on odd ones; alternate it in a stack.
    hidden : int
        Width of the MLP's hidden layers.
    depth : int
        Number of hidden layers (>= 1).
    scale_bound : float
        The bound :math:`c`.

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> layer = AffineCoupling(2, parity=1, hidden=8).double()
    >>> _ = torch.nn.init.normal_(layer.net[-1].weight)
    >>> x = torch.randn(4, 2, dtype=torch.float64)
    >>> y, ladj = layer.forward_and_log_det(x)
    >>> x_back, ladj_inv = layer.inverse_and_log_det(y)
    >>> torch.allclose(x_back, x), torch.allclose(ladj_inv, -ladj)
    (True, True)
    """

    def __init__(
        self, n: int, parity: int = 0, hidden: int = 32, depth: int = 2, scale_bound: float = 2.0
    ) -> None:
        super().__init__()
        if not isinstance(n, int) or n < 2:
            raise P4ValueError(f"n must be an int >= 2, got {n!r}")
        if parity not in (0, 1):
            raise P4ValueError(f"parity must be 0 or 1, got {parity!r}")
        if not isinstance(depth, int) or depth < 1:
            raise P4ValueError(f"depth must be an int >= 1, got {depth!r}")
        idx = torch.arange(n)
        cond, trans = idx[idx % 2 == parity], idx[idx % 2 != parity]
        self.n, self.parity, self.scale_bound = n, parity, float(scale_bound)
        self.register_buffer("cond", cond, persistent=False)
        self.register_buffer("trans", trans, persistent=False)
        self.register_buffer("unperm", torch.argsort(torch.cat([cond, trans])), persistent=False)
        sizes = [len(cond)] + [hidden] * depth
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.SiLU()]
        layers.append(nn.Linear(hidden, 2 * len(trans)))
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if x.ndim == 0 or x.shape[-1] != self.n:
            raise ShapeError(f"input must have shape (..., {self.n}), got {describe(x)}")
        xa, xb = x[..., self.cond], x[..., self.trans]
        raw_s, t = self.net(xa).chunk(2, dim=-1)
        s = self.scale_bound * torch.tanh(raw_s / self.scale_bound)
        return xa, xb, s, t

    def _join(self, xa: Tensor, xb: Tensor) -> Tensor:
        return torch.cat([xa, xb], dim=-1)[..., self.unperm]

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xa, xb, s, t = self._split(x)
        return self._join(xa, xb * torch.exp(s) + t), s.sum(-1)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        ya, yb, s, t = self._split(y)
        return self._join(ya, (yb - t) * torch.exp(-s)), -s.sum(-1)


def realnvp(n: int, layers: int, hidden: int, depth: int = 2, scale_bound: float = 2.0) -> Flow:
    """A RealNVP flow: ``layers`` affine couplings with alternating parity.

    Examples
    --------
    >>> flow = realnvp(2, layers=4, hidden=16)
    >>> len(flow), sum(p.numel() for p in flow.parameters())
    (4, 1352)
    """
    return Flow(
        AffineCoupling(n, parity=i % 2, hidden=hidden, depth=depth, scale_bound=scale_bound)
        for i in range(layers)
    )


def realnvp_with_params(n: int, n_params: int, layers: int = 4, depth: int = 2) -> Flow:
    """The :func:`realnvp` flow whose trainable-parameter count is closest to ``n_params``.

    Only the hidden width is searched; used to compare flows at equal size.

    Examples
    --------
    >>> flow = realnvp_with_params(2, 1200)
    >>> sum(p.numel() for p in flow.parameters())
    1208
    """
    def size(h: int) -> int:  # per coupling: (c->h), depth-1 times (h->h), (h->2t)
        c, t = (n + 1) // 2, n // 2
        return layers * (c * h + h + (depth - 1) * (h * h + h) + h * 2 * t + 2 * t)

    best = min(range(1, 1025), key=lambda h: abs(size(h) - n_params))
    return realnvp(n, layers, best, depth)
