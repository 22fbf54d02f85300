r"""Hand-written weights: plain ``nn.Linear``, the LU weight of flows, a Cholesky SPD weight."""

from __future__ import annotations

import torch
from torch import nn

from p4opt._typing import Tensor
from p4opt.errors import ShapeError, describe
from p4opt.studies.baselines.base import Constrained, _as_linear

__all__ = ["Dense", "Plain", "LU", "Cholesky"]


class Dense(Constrained):
    r"""A plain ``nn.Linear`` weight; log|det| by ``slogdet`` and inverse by ``solve``.

    Nothing keeps it feasible: it is the reference step (:math:`O(Bn^2)`) of
    the comparisons and, with its :math:`O(n^3)` log-determinant, the dense
    invertible baseline.

    Examples
    --------
    >>> holder = Dense(torch.eye(3))
    >>> float(holder.logabsdet().detach())
    0.0
    """

    def __init__(self, init: Tensor, seed: int = 0) -> None:
        super().__init__()
        self.linear = _as_linear(init)

    def weight(self) -> Tensor:
        return self.linear.weight


class Plain(Dense):
    r"""The reference step: a plain ``nn.Linear`` weight whose log|det| is taken as 0 (no cost).

    Used to time what an unconstrained layer costs on a task; its losses on
    tasks that need log|det| are not meaningful.
    """

    def logabsdet(self) -> Tensor:
        return torch.zeros((), dtype=self.linear.weight.dtype)


class LU(Constrained):
    r"""LU-parametrized invertible weight, as in Glow-style flows.

    .. math:: W = P\,L\,(U + \mathrm{diag}(\sigma\, e^{s})), \qquad
              \log|\det W| = \textstyle\sum_i s_i

    with a fixed permutation :math:`P`, unit lower-triangular :math:`L`,
    strictly upper-triangular :math:`U`, fixed signs :math:`\sigma` and
    trainable :math:`L, U, s`. Forming :math:`W` costs :math:`O(n^3)` (one
    triangular product), log|det| :math:`O(n)`, :meth:`solve` :math:`O(Bn^2)`.

    Parameters
    ----------
    init : Tensor, shape (n, n)
        Invertible starting matrix, factored once by ``torch.linalg.lu``.

    Examples
    --------
    >>> a = torch.tensor([[0., 2.], [3., 1.]], dtype=torch.float64)
    >>> holder = LU(a)
    >>> torch.allclose(holder.weight(), a), round(float(holder.logabsdet().detach()), 6)
    (True, 1.791759)
    """

    def __init__(self, init: Tensor, seed: int = 0) -> None:
        super().__init__()
        perm, lower, upper = torch.linalg.lu(init.detach())
        diag = upper.diagonal()
        self.register_buffer("perm", perm)
        self.register_buffer("signs", diag.sign())
        self.lower = nn.Parameter(lower.tril(-1).clone())
        self.upper = nn.Parameter(upper.triu(1).clone())
        self.log_scale = nn.Parameter(diag.abs().log().clone())

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.signs * self.log_scale.exp())
        return lower, upper

    def weight(self) -> Tensor:
        lower, upper = self._factors()
        return self.perm @ (lower @ upper)

    def logabsdet(self) -> Tensor:
        return self.log_scale.sum()

    def solve(self, y: Tensor) -> Tensor:
        lower, upper = self._factors()
        rhs = (y @ self.perm).mT  # P^T y for every vector, as columns
        z = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, z, upper=True).mT


class Cholesky(Constrained):
    r"""Symmetric positive-definite weight :math:`P = LL^T` from a Cholesky-style factor.

    .. math:: L = \mathrm{tril}(Z, -1) + \mathrm{diag}(e^{d}), \qquad
              \log\det P = 2 \textstyle\sum_i d_i,

    with trainable :math:`Z` (only its strictly lower triangle is used) and :math:`d`, so
    :math:`P` is SPD for every value of them. Forming :math:`P` costs :math:`O(n^3)` (one
    triangular product), log det :math:`O(n)`, :meth:`solve` :math:`O(Bn^2)` (two
    triangular solves).

    Parameters
    ----------
    init : Tensor, shape (n, n)
        Symmetric positive-definite start, factored once by ``torch.linalg.cholesky``
        (its dtype is kept).
    seed : int
        Unused (the construction is deterministic).

    Raises
    ------
    ValueError
        When ``init`` is not a square matrix or not symmetric positive definite.

    Examples
    --------
    >>> a = torch.tensor([[4., 2.], [2., 3.]], dtype=torch.float64)
    >>> holder = Cholesky(a)
    >>> torch.allclose(holder.weight(), a), round(float(holder.logabsdet().detach()), 6)
    (True, 2.079442)
    """

    def __init__(self, init: Tensor, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(init, Tensor) or init.ndim != 2 or init.shape[0] != init.shape[1]:
            raise ShapeError(f"init must be a square matrix, got {describe(init)}")
        factor, info = torch.linalg.cholesky_ex(init.detach())
        if int(info) != 0 or not torch.allclose(init, init.mT):
            raise ValueError("init must be symmetric positive definite for the Cholesky weight")
        self.lower = nn.Parameter(factor.tril(-1).clone())
        self.log_diag = nn.Parameter(factor.diagonal().log().clone())

    def factor(self) -> Tensor:
        """The lower-triangular factor :math:`L`, shape (n, n), positive diagonal."""
        return self.lower.tril(-1) + torch.diag(self.log_diag.exp())

    def weight(self) -> Tensor:
        low = self.factor()
        return low @ low.mT

    def logabsdet(self) -> Tensor:
        return 2 * self.log_diag.sum()

    def solve(self, y: Tensor) -> Tensor:
        low = self.factor()
        z = torch.linalg.solve_triangular(low, y.mT, upper=False)
        return torch.linalg.solve_triangular(low.mT, z, upper=True).mT
