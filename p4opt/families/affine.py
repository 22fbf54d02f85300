r"""Affine sets for the linear-structure family: the strategy interface, dense C, pure helpers."""

from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import nn

from p4opt._typing import Tensor
from p4opt.errors import P4ValueError, ShapeError
from p4opt.linalg.metrics import sum_complement

__all__ = ["AffineSpace", "DenseSpace", "sum_complement"]


class AffineSpace(nn.Module, abc.ABC):
    r"""Strategy describing one affine set :math:`S = \{\theta : C\,\mathrm{vec}(\theta) = d\}`.

    A space is built for one tensor shape. It owns whatever index/basis
    buffers it needs (so they follow ``.to(device)`` and ``state_dict``) and
    implements three operations; :class:`LinearStructure` does the rest:

    ``lift(z)``
        :math:`\mathrm{reshape}(N z)` for the flat coordinates ``z`` of shape
        ``(dim,)`` in an orthonormal basis :math:`N` of :math:`\mathrm{null}(C)`;
        differentiable, in ``z``'s dtype.
    ``project(theta)``
        The orthogonal projection onto :math:`S` (``theta`` in float64).
    ``violation(theta)``
        :math:`C\,\mathrm{vec}(\theta) - d` as a flat vector (rows may be
        redundant); from it follow :meth:`residual` and the dense :meth:`constraints`.

    Optionally ``finish(w)`` re-rounds a low-precision tensor so that the
    constraint holds to more than its rounding level (e.g. a zero-sum fiber's
    last entry recomputed from the others in float64); it must be the
    identity in exact arithmetic on :math:`S`, so gradients are unchanged.
    ``tolerance_scale`` widens :meth:`LinearStructure.validate`'s tolerance for
    rows of :math:`C` with large norms (rounding errors grow with them).
    """

    tolerance_scale: float = 1.0

    dim: int
    shape: tuple[int, ...]

    @abc.abstractmethod
    def lift(self, z: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def project(self, theta: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def violation(self, theta: Tensor) -> Tensor: ...

    def finish(self, w: Tensor) -> Tensor:
        return w

    def residual(self, theta: Tensor) -> Tensor:
        r""":math:`\lVert C\,\mathrm{vec}(\theta) - d\rVert_{\max}` (0-dim; 0 if unconstrained)."""
        gap = self.violation(theta).abs()
        return gap.max() if gap.numel() else gap.sum()

    def constraints(self) -> tuple[Tensor, Tensor]:
        """Dense ``(C, d)`` in float64 (Jacobian of :meth:`violation`); cost :math:`O(m p^2)`."""
        zero = torch.zeros(self.shape, dtype=torch.float64, device=self._device())
        jac = torch.func.jacrev(self.violation)(zero)
        return jac.reshape(jac.shape[0], -1), -self.violation(zero)

    def _device(self) -> torch.device:
        buf = next(iter(self.buffers()), None)
        return torch.device("cpu") if buf is None else buf.device


class DenseSpace(AffineSpace):
    r"""The affine set of a dense :math:`C \in \mathbb{R}^{m \times p}` and :math:`d`.

    One SVD of :math:`C` in float64 (cost :math:`O(m p \min(m, p))`) gives the
    rank :math:`r`, an orthonormal null-space basis :math:`N \in \mathbb{R}^{p\times k}`
    (:math:`k = p - r`) and the minimum-norm point :math:`\theta_0 = C^+ d`.
    ``lift`` costs :math:`O(pk)`; ``project``
    (:math:`\theta \mapsto \theta_0 + N N^T(\theta - \theta_0)`) costs :math:`O(pk)`;
    ``residual`` :math:`O(mp)`. Memory :math:`O(p(k + m))`.
    """

    def __init__(self, C: Tensor, d: Tensor, shape: torch.Size, where: str) -> None:
        super().__init__()
        p = math.prod(shape)
        if C.shape[1] != p:
            raise ShapeError(
                f"C has {C.shape[1]} columns but {where} has {p} entries "
                f"(shape {tuple(shape)}); C must be (m, {p})"
            )
        _, s, vh = torch.linalg.svd(C, full_matrices=True)
        tol = max(C.shape) * torch.finfo(torch.float64).eps * _amax(s)
        r = int((s > tol).sum())
        if r == p:
            raise P4ValueError(
                f"the constraint C vec(θ) = d fixes every entry of {where} (rank of C = {p} "
                "= number of entries): nothing is left to train"
            )
        theta0 = torch.linalg.lstsq(C, d.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
        gap = _amax((C @ theta0 - d).abs())
        if gap > 1e-8 * (1.0 + _amax(d.abs())):
            raise P4ValueError(
                f"the constraint C vec(θ) = d on {where} is inconsistent (empty feasible set): "
                f"the least-squares residual is {gap:.2e}"
            )
        self.shape = tuple(shape)
        self.dim = p - r
        self.tolerance_scale = max(1.0, _amax(torch.linalg.vector_norm(C, dim=1)))
        self.register_buffer("C", C)
        self.register_buffer("d", d)
        self.register_buffer("N", vh[r:].mT.contiguous())
        self.register_buffer("theta0", theta0)
        self._cast: dict[Any, Tensor] = {}

    def _apply(self, fn: Any, recurse: bool = True) -> DenseSpace:
        # Keep the float64 basis under ``model.float()``: follow device moves only.
        saved = {k: self._buffers.pop(k) for k in ("C", "d", "N", "theta0")}
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, dtype=torch.float64, device=saved["N"].device)).device
        self._buffers.update({k: v.to(device) for k, v in saved.items()})
        self._cast.clear()
        return self

    def _basis(self, dtype: torch.dtype) -> Tensor:
        if dtype == self.N.dtype:
            return self.N
        key = (dtype, self.N.device)
        if key not in self._cast:
            self._cast.clear()
            self._cast[key] = self.N.to(dtype)
        return self._cast[key]

    def lift(self, z: Tensor) -> Tensor:
        return (self._basis(z.dtype) @ z).reshape(self.shape)

    def project(self, theta: Tensor) -> Tensor:
        offset = theta.reshape(-1) - self.theta0
        return (self.theta0 + self.N @ (self.N.mT @ offset)).reshape(self.shape)

    def violation(self, theta: Tensor) -> Tensor:
        return self.C @ theta.reshape(-1).to(self.C) - self.d

    def constraints(self) -> tuple[Tensor, Tensor]:
        return self.C, self.d


def _amax(t: Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0
