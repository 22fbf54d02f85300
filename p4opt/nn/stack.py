r""":class:`InvertibleLinearStack`: the paper's P⁴Inv flow, one batched Invertible for L layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from p4opt._typing import Tensor
from p4opt.errors import P4ValueError, ShapeError, describe
from p4opt.families.invertible import Invertible
from p4opt.nn import functional as BF
from p4opt.nn.base import Bijection
from p4opt.nn.fused import linear_bent_chain
from p4opt.nn.linear import random_orthogonal
from p4opt.registry import register

__all__ = ["InvertibleLinearStack"]


class InvertibleLinearStack(Bijection):
    r"""``L`` invertible ``n×n`` linear layers with bent identities between them (P⁴Inv flow).

    .. math:: f = \ell_{L-1} \circ \sigma \circ \dots \circ \sigma \circ \ell_0,
              \qquad \ell_l(x) = x W_l^T + b_l

    with :math:`\sigma` the bent identity (:class:`~p4opt.nn.BentIdentity`).
    The weights form one ``(L, n, n)`` tensor registered with one
    :class:`p4opt.Invertible`, so merges, log-determinants, inverses and
    corrections run as one batched kernel over the stack; the forward pass is
    the fused :func:`~p4opt.nn.fused.linear_bent_chain`. It computes the same
    map as ``Flow([InvertibleLinear(n), BentIdentity(), ..., InvertibleLinear(n)])``.

    Costs (``B`` vectors): forward and backward :math:`O(L B n^2)` (two compiled
    loops, or :math:`4L` small kernels); :meth:`log_det` :math:`O(L n^2 k)` in one.

    Parameters
    ----------
    n : int
        Features per layer (2 in the paper's density experiments).
    layers : int
        Number of linear layers ``L`` (200 in the paper).
    rank : int, optional
        Rank of each layer's merged update (default: the whole change for small ``n``).
    bias : bool
        Learn the biases :math:`b_l`.
    dtype, device : optional
        Of the layer tensors (Invertible bookkeeping stays float64).
    native : bool, optional
        Passed to :func:`~p4opt.nn.fused.linear_bent_chain` (compiled loops when
        available by default).
    **options
        Passed to :class:`p4opt.Invertible`.

    Attributes
    ----------
    weight : Tensor, shape (L, n, n)
    bias : nn.Parameter, shape (L, n) or None
    perturbation : p4opt.Invertible

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> flow = InvertibleLinearStack(2, layers=5, dtype=torch.float64)
    >>> x = torch.randn(4, 2, dtype=torch.float64)
    >>> y, ladj = flow.forward_and_log_det(x)
    >>> x_back, ladj_inv = flow.inverse_and_log_det(y)
    >>> torch.allclose(x_back, x), torch.allclose(ladj_inv, -ladj)
    (True, True)
    >>> sum(p.numel() for p in flow.parameters() if p.requires_grad)   # pending changes, biases
    30
    """

    def __init__(
        self,
        n: int,
        layers: int,
        rank: int | None = None,
        bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        native: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        for name, value in (("n", n), ("layers", layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise P4ValueError(f"{name} must be a positive int, got {value!r}")
        self.n, self.layers, self.native = n, layers, native
        self.weight = nn.Parameter(random_orthogonal(layers, n, n, dtype=dtype).to(device))
        like = {"dtype": self.weight.dtype, "device": self.weight.device}
        self.bias = nn.Parameter(torch.zeros(layers, n, **like)) if bias else None
        self.perturbation = register(self, "weight", Invertible(rank=rank, **options))

    def _bias(self) -> Tensor:
        if self.bias is not None:
            return self.bias
        return self.weight.new_zeros(self.layers, self.n)

    def _flat(self, t: Tensor, name: str) -> Tensor:
        if t.ndim == 0 or t.shape[-1] != self.n:
            raise ShapeError(f"{name} must have shape (..., {self.n}), got {describe(t)}")
        return t.reshape(-1, self.n)

    def log_det(self) -> Tensor:
        r""":math:`\log|\det W_l|` for every layer, shape (L,), float64, differentiable."""
        return self.perturbation.logabsdet()

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat = self._flat(x, "x")
        y, ladj = linear_bent_chain(flat, self.weight, self._bias(), native=self.native)
        ladj = ladj + self.log_det().sum().to(ladj.dtype)
        return y.reshape(x.shape), ladj.reshape(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        flat = self._flat(y, "y")
        inv = self.perturbation.inverse().to(y.dtype).mT  # (L, n, n), one batched Woodbury
        bias = self._bias()
        ladj = flat.new_zeros(flat.shape[0])
        z = flat
        for i in range(self.layers - 1, -1, -1):
            a = (z - bias[i]) @ inv[i]
            if i == 0:
                break
            z = BF.bent_identity_inverse(a)
            ladj = ladj - BF.bent_identity_log_derivative(z).sum(-1)
        ladj = ladj - self.log_det().sum().to(ladj.dtype)
        return a.reshape(y.shape), ladj.reshape(y.shape[:-1])

    def extra_repr(self) -> str:
        return f"n={self.n}, layers={self.layers}, rank={self.perturbation.rank}"
