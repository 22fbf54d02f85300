r"""Channel mixing between couplings: a fixed :class:`Permutation` and its trainable P⁴Inv version.

Coupling flows (RealNVP) interleave their couplings with a fixed channel permutation, most
often the swap of the two halves, so that every coordinate gets transformed. :class:`P4InvMixing`
is a drop-in replacement for that permutation: a general invertible linear map that *starts* as
the permutation and is trained by P⁴Inv, so its inverse and log-determinant stay exact and cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import p4opt
from p4opt._typing import Tensor
from p4opt.errors import ShapeError, describe
from p4opt.nn.base import Bijection

__all__ = ["Permutation", "P4InvMixing", "swap_permutation"]


def swap_permutation(n: int) -> Tensor:
    """The permutation that exchanges even- and odd-indexed channels, shape ``(n,)``, int64.

    After it, an :class:`~p4opt.nn.AffineCoupling` with ``parity=0`` transforms the channels
    that the previous one conditioned on: a stack of ``parity=0`` couplings separated by this
    swap computes exactly :func:`~p4opt.nn.realnvp` (alternating parity).

    Examples
    --------
    >>> swap_permutation(5).tolist()
    [1, 0, 3, 2, 4]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    perm = torch.arange(n)
    pairs = n - n % 2
    perm[:pairs] = perm[:pairs].view(-1, 2).flip(-1).reshape(-1)
    return perm


def _as_permutation(perm: Sequence[int] | Tensor | int) -> Tensor:
    if isinstance(perm, int) and not isinstance(perm, bool):
        return swap_permutation(perm)
    p = torch.as_tensor(perm, dtype=torch.long)
    if p.ndim != 1 or p.numel() == 0 or not torch.equal(p.sort().values, torch.arange(p.numel())):
        raise ValueError(f"perm must be a permutation of 0..n-1 or an int n, got {describe(p)}")
    return p


class Permutation(Bijection):
    r"""A fixed channel permutation :math:`y_i = x_{\pi(i)}` (log|det| = 0).

    Parameters
    ----------
    perm : int or sequence of int
        The permutation :math:`\pi` of ``0..n-1``, or an int ``n`` for
        :func:`swap_permutation` ``(n)``. Cost: :math:`O(Bn)` for ``B`` vectors.

    Examples
    --------
    >>> import torch
    >>> layer = Permutation([2, 0, 1])
    >>> layer(torch.tensor([10.0, 11.0, 12.0])).tolist()
    [12.0, 10.0, 11.0]
    >>> layer.inverse(layer(torch.arange(3.0))).tolist()
    [0.0, 1.0, 2.0]
    """

    def __init__(self, perm: Sequence[int] | Tensor | int) -> None:
        super().__init__()
        p = _as_permutation(perm)
        self.n = p.numel()
        self.register_buffer("perm", p)
        self.register_buffer("inv_perm", torch.argsort(p))

    def _check(self, t: Tensor, name: str) -> None:
        if t.ndim == 0 or t.shape[-1] != self.n:
            raise ShapeError(f"{name} must have shape (..., {self.n}), got {describe(t)}")

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "x")
        return x[..., self.perm], x.new_zeros(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self._check(y, "y")
        return y[..., self.inv_perm], y.new_zeros(y.shape[:-1])

    def extra_repr(self) -> str:
        return f"n={self.n}"


class P4InvMixing(Bijection):
    r"""A P⁴Inv linear layer that starts as a channel permutation: :math:`y = x W^T + b`.

    At construction :math:`W = P_\pi` (the permutation matrix of ``perm``) and :math:`b = 0`,
    so the layer computes exactly what :class:`Permutation` ``(perm)`` computes; training then
    moves :math:`W` through :math:`GL(n)` by P⁴Inv rank-``k`` updates
    (register-time options go to :class:`p4opt.Invertible`; train with
    :class:`p4opt.P4Optimizer`). Replace each swap between the couplings of a flow by one
    of these to let the flow learn how channels mix.

    Costs (``B`` vectors): forward :math:`O(Bn^2)`, inverse :math:`O(Bn^2)` (stored inverse,
    no solve), log-det :math:`O(n^2 k)` per call, independent of ``B``.

    Parameters
    ----------
    perm : int or sequence of int
        The starting permutation, or ``n`` for :func:`swap_permutation` ``(n)``.
    rank : int, optional
        Rank ``k`` of each merged P⁴Inv update; default
        :func:`p4opt.families.invertible.default_rank` of ``n``. The paper's layer is
        ``rank=1, update="factored"`` (:math:`2n` trainable numbers); the default
        ``update="projected"`` trains a dense pending change.
    bias : bool
        Learn an additive bias :math:`b` (``n`` more parameters).
    dtype, device : optional
        Of the layer's tensors (the P⁴Inv bookkeeping keeps its own precision).
    **options
        Passed to :class:`p4opt.Invertible` (``seed``, ``correct_every``, bounds...).

    Attributes
    ----------
    weight : Tensor, shape (n, n)
        The current matrix :math:`A + UV^T`.
    bias : nn.Parameter, shape (n,), or None
    perturbation : p4opt.Invertible

    Examples
    --------
    >>> import torch
    >>> layer = P4InvMixing(4, dtype=torch.float64, seed=0)
    >>> x = torch.randn(3, 4, dtype=torch.float64)
    >>> torch.equal(layer(x), Permutation(4)(x))
    True
    >>> y, ladj = layer.forward_and_log_det(x)
    >>> x_back, ladj_inv = layer.inverse_and_log_det(y)
    >>> torch.allclose(x_back, x), torch.allclose(ladj_inv, -ladj)
    (True, True)
    """

    def __init__(
        self,
        perm: Sequence[int] | Tensor | int,
        rank: int | None = None,
        bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        p = _as_permutation(perm)
        self.n = p.numel()
        eye = torch.eye(self.n, dtype=dtype or torch.get_default_dtype(), device=device)
        self.weight = nn.Parameter(eye[p].clone())
        like = {"dtype": self.weight.dtype, "device": self.weight.device}
        self.bias = nn.Parameter(torch.zeros(self.n, **like)) if bias else None
        self.perturbation = p4opt.register(self, "weight", p4opt.Invertible(rank=rank, **options))

    def _check(self, t: Tensor, name: str) -> None:
        if t.ndim == 0 or t.shape[-1] != self.n:
            raise ShapeError(f"{name} must have shape (..., {self.n}), got {describe(t)}")

    def log_det(self) -> Tensor:
        r""":math:`\log|\det W|` (0-dim, differentiable in the update)."""
        return self.perturbation.logabsdet()

    def inverse_error(self) -> float:
        r""":math:`\|W W^{-1} - I\|_\max` of the tracked inverse, in float64 (cost :math:`O(n^3)`).

        A diagnostic of the P⁴Inv bookkeeping after training; 0 up to rounding when intact.
        """
        with torch.no_grad():
            w = self.weight.to(torch.float64)
            w_inv = self.perturbation.inverse().to(torch.float64)
            eye = torch.eye(self.n, dtype=torch.float64, device=w.device)
            return float((w @ w_inv - eye).abs().max())

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "x")
        ladj = self.log_det().to(x.dtype).expand(x.shape[:-1])
        return F.linear(x, self.weight, self.bias), ladj

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self._check(y, "y")
        x = self.perturbation.solve(y - self.bias if self.bias is not None else y)
        return x, (-self.log_det()).to(y.dtype).expand(y.shape[:-1])

    def extra_repr(self) -> str:
        return f"n={self.n}, bias={self.bias is not None}, rank={self.perturbation.rank}"
