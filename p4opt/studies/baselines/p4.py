r"""The P⁴ families behind the comparison interface (``nn.Linear`` + registered perturbation)."""

from __future__ import annotations

from typing import Any

import torch

import p4opt
from p4opt._typing import Tensor
from p4opt.optimizer import P4Optimizer
from p4opt.studies.baselines.base import Constrained, _as_linear

__all__ = ["P4Weight"]


class P4Weight(Constrained):
    r"""An ``nn.Linear`` weight trained through a P⁴ perturbation.

    Trained with ``P4Optimizer(torch.optim.Adam(...))`` at the family's default
    merge interval. :meth:`logabsdet` and :meth:`solve` use the perturbation's
    own bookkeeping when it has them (:class:`~p4opt.Invertible`), else dense
    linear algebra.

    Parameters
    ----------
    init : Tensor, shape (n, p)
        Feasible starting matrix.
    seed : int
        Seed of the perturbation's generator.
    family : str
        Name of the family class in :mod:`p4opt` (``"Invertible"``, ``"Orthogonal"``).
    **options
        Keyword arguments of the family (e.g. ``rank``, ``method``).

    Examples
    --------
    >>> holder = P4Weight(torch.eye(4, dtype=torch.float64), 0, "Invertible", rank=1)
    >>> float(holder.logabsdet().detach())
    0.0
    """

    def __init__(self, init: Tensor, seed: int, family: str, **options: Any) -> None:
        super().__init__()
        self.linear = _as_linear(init)
        perturbation = getattr(p4opt, family)(seed=seed, **options)
        self.pert = p4opt.register(self.linear, "weight", perturbation)

    def weight(self) -> Tensor:
        return self.linear.weight

    def logabsdet(self) -> Tensor:
        if hasattr(self.pert, "logabsdet"):
            return self.pert.logabsdet()
        return super().logabsdet()

    def solve(self, y: Tensor) -> Tensor:
        if hasattr(self.pert, "solve"):
            return self.pert.solve(y)
        return super().solve(y)

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        return P4Optimizer(torch.optim.Adam(self.parameters(), lr=lr))
