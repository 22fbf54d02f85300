r"""Orthogonal Procrustes: recover a rotation from paired samples."""

from __future__ import annotations

from typing import ClassVar

import torch

from p4opt._typing import Tensor
from p4opt.studies.tasks.base import Task, random_orthogonal
from p4opt.studies.types import Family

__all__ = ["Procrustes"]


class Procrustes(Task):
    r"""Orthogonal Procrustes :math:`\min_{Q^TQ = I} \lVert XQ^T - Y\rVert_F^2`, :math:`Y = XQ_*^T`.

    ``X`` holds ``batch = 4 n`` Gaussian samples (rows); :math:`Q_*` and the
    start point are Haar-random with the same determinant sign, so both lie
    in one connected component. The loss is normalized,

    .. math:: L(Q) = \lVert X Q^T - Y\rVert_F^2 / \lVert Y\rVert_F^2,

    so it is already the relative loss (optimum 0, scale 1). Cost per
    evaluation :math:`O(\text{batch}\; n^2)`.

    Examples
    --------
    >>> task = Procrustes(8, dtype=torch.float64)
    >>> float(task.objective(task.solution()))
    0.0
    >>> round(task.relative(float(task.objective(task.initial()))), 1) > 1.0
    True
    """

    name: ClassVar[str] = "procrustes"
    family: ClassVar[Family] = "orthogonal"
    description: ClassVar[str] = "orthogonal Procrustes, min ||X Q^T - Y||^2 over orthogonal Q"
    target: ClassVar[float] = 1e-4
    default_steps: ClassVar[int] = 300

    def __init__(self, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n, seed, dtype)
        self.batch = 4 * n
        self.truth = random_orthogonal(n, self.generator, det=1.0)
        self.start = random_orthogonal(n, self.generator, det=1.0)
        x = torch.randn(self.batch, n, generator=self.generator, dtype=torch.float64)
        self.x = x.to(dtype)
        self.y = (x @ self.truth.T).to(dtype)
        self.norm = float(self.y.double().square().sum())
        self.optimum = 0.0
        self.scale = 1.0

    def initial(self) -> Tensor:
        return self.start.to(self.dtype)

    def solution(self) -> Tensor:
        return self.truth.clone()

    def objective(self, weight: Tensor, logabsdet: Tensor | None = None) -> Tensor:
        x, y = self.x.to(weight.dtype), self.y.to(weight.dtype)
        return (x @ weight.mT - y).square().sum() / self.norm
