r"""Stiefel Procrustes: recover a rectangular weight with orthonormal columns or rows."""

from __future__ import annotations

from typing import ClassVar

import torch

from p4opt._typing import Tensor
from p4opt.studies.tasks.base import Task
from p4opt.studies.types import Family

__all__ = ["StiefelTall", "StiefelWide", "random_stiefel"]


def random_stiefel(n: int, p: int, generator: torch.Generator) -> Tensor:
    r"""A Haar-random float64 (n, p) matrix with orthonormal columns (``n >= p``) or rows.

    The Q factor of a Gaussian matrix, signs fixed by the diagonal of R, is uniformly
    distributed on the Stiefel manifold.

    Examples
    --------
    >>> q = random_stiefel(2, 5, torch.Generator().manual_seed(0))
    >>> q.shape, torch.allclose(q @ q.T, torch.eye(2, dtype=q.dtype))
    (torch.Size([2, 5]), True)
    """
    long, short = max(n, p), min(n, p)
    a = torch.randn(long, short, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
    return q if n >= p else q.T


class _StiefelProcrustes(Task):
    """Shared data and loss of :class:`StiefelTall` and :class:`StiefelWide`."""

    family: ClassVar[Family] = "orthogonal"
    target: ClassVar[float] = 1e-4
    default_steps: ClassVar[int] = 500
    #: Long side over short side of the weight.
    ratio: ClassVar[int] = 4
    tall: ClassVar[bool]

    def __init__(self, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n, seed, dtype)
        short = max(1, n // self.ratio)
        self.shape = (n, short) if self.tall else (short, n)
        self.batch = 4 * n
        out_features, in_features = self.shape
        self.truth = random_stiefel(*self.shape, self.generator)
        self.start = random_stiefel(*self.shape, self.generator)
        x = torch.randn(self.batch, in_features, generator=self.generator, dtype=torch.float64)
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


class StiefelTall(_StiefelProcrustes):
    r"""Stiefel Procrustes with a tall weight :math:`W` ``(n, n // 4)``, orthonormal columns.

    See :class:`StiefelWide` for the wide case; both share the loss

    .. math:: L(W) = \lVert XW^T - Y\rVert_F^2 / \lVert Y\rVert_F^2, \qquad Y = XW_*^T,

    with ``batch = 4 n`` Gaussian samples (so :math:`W_*` is the unique minimizer) and
    Haar-random :math:`W_*` and start point. Cost per evaluation :math:`O(n^3)`.

    Examples
    --------
    >>> task = StiefelTall(16, dtype=torch.float64)
    >>> task.shape, float(task.objective(task.solution()))
    ((16, 4), 0.0)
    """

    name: ClassVar[str] = "stiefel-tall"
    description: ClassVar[str] = "Stiefel Procrustes, W (n, n/4) with orthonormal columns"
    tall: ClassVar[bool] = True


class StiefelWide(_StiefelProcrustes):
    r"""The wide case of :class:`StiefelTall`: :math:`W` is ``(n // 4, n)``, orthonormal rows.

    Examples
    --------
    >>> task = StiefelWide(16, dtype=torch.float64)
    >>> task.shape, float(task.objective(task.solution()))
    ((4, 16), 0.0)
    """

    name: ClassVar[str] = "stiefel-wide"
    description: ClassVar[str] = "Stiefel Procrustes, W (n/4, n) with orthonormal rows"
    tall: ClassVar[bool] = False
