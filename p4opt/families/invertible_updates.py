r"""The update rules of :class:`~p4opt.Invertible`: projected dense steps, factored :math:`UV^T`.

Each rule owns the trainable tensors of one :class:`~p4opt.Invertible` and answers the same
questions: the pending update as rank-k factors (for the merge), the current matrix's
log-determinant, inverse and solve (differentiable), and how to restart after a merge.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import torch
from torch import nn

from p4opt import linalg
from p4opt._autograd import Function
from p4opt._typing import Tensor

if TYPE_CHECKING:
    from p4opt.families.invertible import Invertible

__all__ = ["UpdateRule", "Projected", "Factored", "default_rank"]


def default_rank(n: int) -> int:
    r"""Default rank of :class:`Invertible`'s merged updates for matrices of size ``n``: ``n``.

    The whole change: the merge folds the optimizer's whole step, so the layer takes exactly
    a dense weight's steps, at an :math:`O(n^3)` merge (a float64 LU of :math:`A + \Delta`,
    the inverse solved from it only when read) that costs less per step than rank ``n/4``'s
    eight :math:`O(n^2 k)` products at every size measured, 64 to 2048 (measurements: "How
    fast invertible weights learn"). Lower ranks remain available (``Invertible(rank=k)``).

    Examples
    --------
    >>> [default_rank(n) for n in (2, 64, 1024)]
    [2, 64, 1024]
    """
    return n



class UpdateRule(abc.ABC):
    """How an :class:`~p4opt.Invertible` is perturbed between merges (a strategy object)."""

    #: Steps between merges when the optimizer does not set one.
    merge_every: int = 10

    def __init__(self, pert: Invertible) -> None:
        self.pert = pert

    @abc.abstractmethod
    def create(self, like: Tensor, stack: torch.Size, n: int) -> None:
        """Create the trainable tensors (on ``pert``) for matrices of size ``n`` in ``stack``."""

    @abc.abstractmethod
    def apply(self, base: Tensor) -> Tensor:
        """The perturbed matrix, shape (*, n, n), in the base's dtype (differentiable)."""

    @abc.abstractmethod
    def factors(self) -> tuple[Tensor, Tensor | None]:
        """The pending update as (U, V), shape (*, n, k), in the bookkeeping dtype; ``V`` is
        ``None`` for the identity (``U`` is then the whole change, (*, n, n), in the layer's
        dtype: the merge adds it to the float64 base without a float64 copy)."""

    @abc.abstractmethod
    def restart(self, mask: Tensor, folded: bool) -> None:
        """Return the selected stack elements to the identity."""

    @abc.abstractmethod
    def keep_remainder(self, mask: Tensor, scale: Tensor) -> None:
        """After a partial merge of a fraction ``scale``, deal with the rest of the update."""

    @abc.abstractmethod
    def pending(self) -> Tensor:
        """The pending update as a dense (*, n, n) tensor in the bookkeeping dtype."""

    @abc.abstractmethod
    def logabsdet(self) -> Tensor:
        """log|det| of the current matrix, differentiable."""

    @abc.abstractmethod
    def inverse(self) -> Tensor:
        """Inverse of the current matrix, differentiable."""

    @abc.abstractmethod
    def solve(self, y: Tensor) -> Tensor:
        """``y`` times the inverse transposed (row vectors), one matrix, differentiable."""


class Factored(UpdateRule):
    r"""Low-memory rule: :math:`A + UV^T` with trainable ``U`` (zero at the identity) and ``V``.

    ``V`` restarts from the perturbation's random draws (``restart="random"``) or along the
    last gradient of ``V`` (``restart="gradient"``). The optimizer keeps only :math:`2nk`
    numbers of state per matrix; each merge cycle moves the matrix in ``k`` directions.
    """

    def create(self, like: Tensor, stack: torch.Size, n: int) -> None:
        pert = self.pert
        shape = (*stack, n, pert.rank)
        if "U" not in pert._parameters:
            pert.U = nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device))
            pert.V = nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device))

    def apply(self, base: Tensor) -> Tensor:
        u, v = self.pert.U, self.pert.V
        if base.ndim == 2:
            return torch.addmm(base, u, v.mT)
        return base + u @ v.mT

    def factors(self) -> tuple[Tensor, Tensor]:
        dtype = self.pert.dtype
        return self.pert.U.to(dtype), self.pert.V.to(dtype)

    @torch.no_grad()
    def restart(self, mask: Tensor, folded: bool) -> None:
        pert = self.pert
        fresh = torch.randn(pert.V.shape, generator=pert.rng(), dtype=torch.float64)
        fresh = fresh.mul_(pert.init_scale)
        along = pert._last_grads.get("V") if folded and pert.restart_rule == "gradient" else None
        if along is not None:
            along = along.detach().to(torch.float64).cpu()
            usable = torch.isfinite(along).all(-1).all(-1) & (along.abs().amax((-2, -1)) > 0)
            basis = torch.linalg.qr(torch.where(usable[..., None, None], along, fresh)).Q
            scaled = basis * (pert.init_scale * along.shape[-2] ** 0.5)
            fresh = torch.where(usable[..., None, None], scaled, fresh)
        mask = mask.to(pert.V.device)[..., None, None]
        pert.U.copy_(torch.where(mask, torch.zeros_like(pert.U), pert.U))
        pert.V.copy_(torch.where(mask, fresh.to(pert.V), pert.V))

    @torch.no_grad()
    def keep_remainder(self, mask: Tensor, scale: Tensor) -> None:
        u = self.pert.U
        keep = torch.where(mask, 1 - scale, 1.0).to(u)[..., None, None]
        u.mul_(keep)

    def pending(self) -> Tensor:
        u, v = self.factors()
        return u @ v.mT

    def logabsdet(self) -> Tensor:
        pert = self.pert
        u, v = self.factors()
        return linalg.lemma_slogdet(pert.inv, u, v, pert.sign_base, pert.logabsdet_base)[1]

    def inverse(self) -> Tensor:
        u, v = self.factors()
        return linalg.woodbury_inverse(self.pert.inv, u, v)

    def solve(self, y: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # an inference pass: one product with a cached inverse
            current = self._current_inverse_transposed(y.dtype)
            if current is not None:
                return y @ current
        inv_t = self.pert._inverse_transposed(y.dtype)
        return linalg.woodbury_solve(inv_t, self.pert.U.to(y.dtype), self.pert.V.to(y.dtype), y)

    def _current_inverse_transposed(self, dtype: torch.dtype) -> Tensor | None:
        """:math:`(A + UV^T)^{-T}` in ``dtype`` (:math:`O(n^2k)` once), kept until ``U``,
        ``V`` or the bookkeeping change; ``None`` for tensors without storage."""
        pert = self.pert
        keys = [_identity_key(t) for t in (pert.U, pert.V, pert.inv)]
        if any(key is None for key in keys):
            return None
        key = (dtype, *keys)
        hit = getattr(self, "_solve_cache", None)
        if hit is None or hit[0] != key:
            u, v = self.factors()
            current = linalg.woodbury_inverse(pert.inv, u, v).mT.to(dtype).contiguous()
            hit = self._solve_cache = (key, current)
        return hit[1]


class Projected(UpdateRule):
    r"""Default rule: a dense pending change :math:`\Delta`, folded as its best rank-k part.

    The wrapped optimizer updates a zero-initialized ``delta`` (shape of the matrix) with its
    usual state; every merge (by default after every step) folds the best rank-k
    approximation :math:`UV^T` of :math:`\Delta` found by a randomized range finder with one
    power iteration (:math:`O(n^2k)`) into :math:`A` and :math:`A^{-1}` by Woodbury (for
    ``rank >= n`` the whole :math:`\Delta`, by a factorization of :math:`A + \Delta`), and sets
    :math:`\Delta = 0`: the rest of the change is discarded, so each step is the optimizer's
    step projected on its ``k`` leading directions. The optimizer's moments keep their meaning
    because ``delta`` keeps its coordinates. Between merges the forward pass sees exactly the
    tracked matrix; at :math:`\Delta = 0` the log-determinant, inverse and solve are exact and
    their gradients with respect to :math:`\Delta` too (:math:`A^{-T}` for the log-det), at
    :math:`O(n^2)` cost. If :math:`\Delta \neq 0` when they are called (a longer merge
    interval), they fall back to dense :math:`O(n^3)` linear algebra.
    """

    merge_every = 1

    def create(self, like: Tensor, stack: torch.Size, n: int) -> None:
        pert = self.pert
        if "delta" not in pert._parameters:
            pert.delta = nn.Parameter(
                torch.zeros((*stack, n, n), dtype=like.dtype, device=like.device)
            )

    def apply(self, base: Tensor) -> Tensor:
        return base + self.pert.delta

    @torch.no_grad()
    def factors(self) -> tuple[Tensor, Tensor | None]:
        pert = self.pert
        delta = pert.delta.detach()
        n = delta.shape[-1]
        if pert.rank >= n:  # the whole change, exactly (V = I)
            return delta, None
        # a fresh Gaussian start at every merge (in the layer's dtype): measured faster to
        # converge than warm starts, which keep folding the same leading directions
        shape = (*delta.shape[:-1], pert.rank)
        start = torch.randn(shape, generator=pert.rng(), dtype=delta.dtype).to(delta.device)
        u, v = linalg.range_finder(delta, start, pert.power_iters)
        return u.to(pert.dtype), v.to(pert.dtype)

    @torch.no_grad()
    def restart(self, mask: Tensor, folded: bool) -> None:
        delta = self.pert.delta
        if bool(mask.all()):
            delta.zero_()
        else:
            delta.copy_(torch.where(mask.to(delta.device)[..., None, None], 0, delta))
        self._zero_version = _identity_key(delta)

    @torch.no_grad()
    def keep_remainder(self, mask: Tensor, scale: Tensor) -> None:
        self.restart(mask, folded=True)  # the step was cut back; the rest is discarded

    def pending(self) -> Tensor:
        return self.pert.delta.to(self.pert.dtype)

    def _at_zero(self) -> bool:
        """Whether ``delta`` is zero; free while it is untouched since the last restart."""
        delta = self.pert.delta
        key = _identity_key(delta)
        if key is not None and getattr(self, "_zero_version", None) == key:
            return True
        return not bool(delta.detach().any())

    def logabsdet(self) -> Tensor:
        pert = self.pert
        if self._at_zero():  # exact value, and the exact gradient A^{-T}
            if not torch.is_grad_enabled():
                return pert.logabsdet_base.clone()
            inv_t = pert._inverse_transposed(pert.delta.dtype)
            return _LogAbsDetAtZero.apply(pert.logabsdet_base, pert.delta, inv_t)
        return torch.linalg.slogdet(pert._matrix() + pert.delta.to(pert.dtype))[1]

    def inverse(self) -> Tensor:
        pert = self.pert
        delta = pert.delta.to(pert.dtype)
        if self._at_zero():
            if not torch.is_grad_enabled():
                return pert.inv.clone()
            return _InverseAtZero.apply(pert.inv, delta)
        return torch.linalg.inv(pert._matrix() + delta)

    def solve(self, y: Tensor) -> Tensor:
        pert = self.pert
        if self._at_zero():
            inv_t = pert._inverse_transposed(y.dtype)
            if not torch.is_grad_enabled():  # an inference pass: one product, no graph
                return y @ inv_t
            return _SolveAtZero.apply(y, pert.delta.to(y.dtype), inv_t)
        w = (pert._matrix() + pert.delta.to(pert.dtype)).to(y.dtype)
        return torch.linalg.solve(w, y.unsqueeze(-1)).squeeze(-1)


def _identity_key(t: Tensor) -> tuple[int, int] | None:
    """(storage address, version counter): equal keys mean ``t`` was not written in between."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # tensors without storage (torch.func transforms)
        return None


class _LogAbsDetAtZero(Function):
    r""":math:`\log|\det(A + \Delta)|` at :math:`\Delta = 0`: value :math:`\log|\det A|`,
    gradient :math:`A^{-T}` (no :math:`n^2` work in the forward pass)."""

    @staticmethod
    def forward(logabsdet: Tensor, delta: Tensor, inv_t: Tensor) -> Tensor:
        return logabsdet.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
        (inv_t,) = ctx.saved_tensors
        return None, grad.to(inv_t.dtype)[..., None, None] * inv_t, None


class _InverseAtZero(Function):
    r""":math:`(A + \Delta)^{-1}` at :math:`\Delta = 0`: value :math:`A^{-1}`, exact gradient."""

    @staticmethod
    def forward(inv: Tensor, delta: Tensor) -> Tensor:
        return inv.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
        (inv,) = ctx.saved_tensors  # d(A+D)^{-1} = -A^{-1} dD A^{-1}
        return None, -(inv.mT @ grad @ inv.mT)


class _SolveAtZero(Function):
    r"""Rows ``y`` times :math:`(A + \Delta)^{-T}` at :math:`\Delta = 0`, with exact gradients."""

    @staticmethod
    def forward(y: Tensor, delta: Tensor, inv_t: Tensor) -> Tensor:
        return y @ inv_t

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(inputs[2], output)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
        inv_t, x = ctx.saved_tensors  # x = y M with M = A^{-T}; dM = -M dD^T M
        grad_y = grad @ inv_t.mT
        flat_g, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_delta = -(inv_t @ flat_g.mT @ flat_x)
        return grad_y, grad_delta, None
