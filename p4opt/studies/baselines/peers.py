r"""Peer libraries behind :class:`~p4opt.studies.baselines.Constrained`: geoopt, geotorch, torch."""

from __future__ import annotations

import importlib
from typing import Literal

import torch
from torch.nn.utils import parametrizations

from p4opt._typing import Tensor
from p4opt.studies.baselines.base import Constrained, _as_linear

__all__ = ["GeooptStiefel", "GeooptSPD", "Geotorch", "TorchOrthogonal"]


class GeooptStiefel(Constrained):
    r"""A ``geoopt.ManifoldParameter`` on ``geoopt.Stiefel()`` trained by a Riemannian optimizer.

    Every step projects the gradient on the tangent space and retracts
    (:math:`O(n^3)` per step for square matrices). geoopt's Stiefel points have
    orthonormal columns; a wide weight (orthonormal rows) is kept as its transpose.

    Parameters
    ----------
    init : Tensor, shape (n, p)
        Orthogonal starting matrix, or orthonormal columns or rows.
    optimizer : {"adam", "sgd"}
        ``geoopt.optim.RiemannianAdam`` or ``geoopt.optim.RiemannianSGD``.
    """

    def __init__(self, init: Tensor, seed: int = 0, optimizer: Literal["adam", "sgd"] = "adam"):
        super().__init__()
        geoopt = importlib.import_module("geoopt")
        self.kind = optimizer
        self.wide = init.shape[-2] < init.shape[-1]
        start = init.detach().mT if self.wide else init.detach()
        self.q = geoopt.ManifoldParameter(start.clone(), manifold=geoopt.Stiefel())

    def weight(self) -> Tensor:
        return self.q.mT if self.wide else self.q

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        optim = importlib.import_module("geoopt.optim")
        if self.kind == "adam":
            return optim.RiemannianAdam([self.q], lr=lr)
        return optim.RiemannianSGD([self.q], lr=lr, momentum=0.9)


class GeooptSPD(Constrained):
    r"""A ``geoopt.ManifoldParameter`` on ``geoopt.SymmetricPositiveDefinite()``, RiemannianAdam.

    Each step turns the Euclidean gradient :math:`G` into the Riemannian one of the
    affine-invariant metric (:math:`P\,\mathrm{sym}(G)\,P`), retracts by
    :math:`P + U + \tfrac12 U P^{-1} U` and transports Adam's moment with matrix square
    roots, logarithm and exponential (eigendecompositions): :math:`O(n^3)` per step. Log det
    and solves are dense (``slogdet`` and ``solve``, :math:`O(n^3)`).

    Parameters
    ----------
    init : Tensor, shape (n, n)
        Symmetric positive-definite starting matrix (its dtype is kept).
    seed : int
        Unused (the construction is deterministic).
    """

    def __init__(self, init: Tensor, seed: int = 0) -> None:
        super().__init__()
        geoopt = importlib.import_module("geoopt")
        self.p = geoopt.ManifoldParameter(
            init.detach().clone(), manifold=geoopt.SymmetricPositiveDefinite()
        )

    def weight(self) -> Tensor:
        return self.p

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        optim = importlib.import_module("geoopt.optim")
        return optim.RiemannianAdam([self.p], lr=lr)


class Geotorch(Constrained):
    r"""An ``nn.Linear`` weight constrained by ``geotorch.orthogonal`` or ``geotorch.invertible``.

    geotorch evaluates the matrix exponential of a trivialization every step
    (:math:`O(n^3)`); ``invertible`` is an SVD-style parametrization with
    positive determinant, whose log|det| is taken by dense ``slogdet``.

    Parameters
    ----------
    init : Tensor, shape (n, p)
        Feasible starting matrix (orthogonal, or with positive determinant).
    constraint : {"orthogonal", "invertible"}
    """

    def __init__(
        self,
        init: Tensor,
        seed: int = 0,
        constraint: Literal["orthogonal", "invertible"] = "orthogonal",
    ) -> None:
        super().__init__()
        geotorch = importlib.import_module("geotorch")
        self.linear = _as_linear(init)
        getattr(geotorch, constraint)(self.linear, "weight")
        with torch.no_grad():
            self.linear.weight = init.detach().clone()

    def weight(self) -> Tensor:
        return self.linear.weight


class TorchOrthogonal(Constrained):
    r"""``torch.nn.utils.parametrizations.orthogonal`` on an ``nn.Linear`` weight.

    Parameters
    ----------
    init : Tensor, shape (n, p)
        Orthogonal starting matrix (kept as the trivialization's base).
    orthogonal_map : {"matrix_exp", "cayley", "householder"}
        The map from the unconstrained tensor to the orthogonal group
        (:math:`O(n^3)` per step for all three).
    """

    def __init__(
        self,
        init: Tensor,
        seed: int = 0,
        orthogonal_map: Literal["matrix_exp", "cayley", "householder"] = "matrix_exp",
    ) -> None:
        super().__init__()
        self.linear = _as_linear(init)
        parametrizations.orthogonal(self.linear, "weight", orthogonal_map=orthogonal_map)
        with torch.no_grad():
            self.linear.weight = init.detach().clone()

    def weight(self) -> Tensor:
        return self.linear.weight
