r"""The :class:`Task` interface of the built-in comparison tasks and their shared helpers."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

import torch

from p4opt import linalg
from p4opt._typing import Tensor
from p4opt.studies.types import Family

if TYPE_CHECKING:
    from p4opt.studies.baselines import Constrained

__all__ = ["Task", "random_orthogonal"]


def random_orthogonal(n: int, generator: torch.Generator, det: float | None = None) -> Tensor:
    r"""A Haar-random orthogonal float64 matrix (:func:`p4opt.linalg.random_orthogonal`).

    Parameters
    ----------
    n : int
        Size.
    generator : torch.Generator
        Source of randomness.
    det : {1.0, -1.0}, optional
        Flip the first column when needed so that :math:`\det Q` has this sign.

    Examples
    --------
    >>> q = random_orthogonal(4, torch.Generator().manual_seed(0), det=1.0)
    >>> torch.allclose(q.T @ q, torch.eye(4, dtype=q.dtype)), round(float(torch.det(q)), 6)
    (True, 1.0)
    """
    return linalg.random_orthogonal(n, generator=generator, det=det)


class Task(abc.ABC):
    r"""A seeded, full-batch training problem on one weight :math:`W` of shape ``shape``.

    The weight is square (n, n) unless a subclass sets ``shape`` (the Stiefel tasks).

    Subclasses set ``name``, ``family`` (which methods apply), ``target`` (the
    relative loss to reach) and implement :meth:`initial`, :meth:`solution`,
    :meth:`objective`; they compute ``optimum`` and ``scale`` so that
    :meth:`relative` is :math:`(L - L^*) / \text{scale}`.

    Parameters
    ----------
    n : int
        Size of the weight.
    seed : int
        Seed of the data, the true solution and the start point.
    dtype : torch.dtype
        Dtype of the data and of the start point (the weight's dtype).
    """

    name: ClassVar[str]
    family: ClassVar[Family]
    description: ClassVar[str]
    target: ClassVar[float] = 1e-4
    default_steps: ClassVar[int] = 300
    needs_logdet: ClassVar[bool] = False

    optimum: float
    scale: float
    batch: int

    def __init__(self, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an int >= 2, got {n!r}")
        self.n = n
        self.seed = seed
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)
        self.shape: tuple[int, int] = (n, n)

    @abc.abstractmethod
    def initial(self) -> Tensor:
        """The feasible start point, shape ``shape``, in ``dtype`` (the same for every method)."""

    @abc.abstractmethod
    def solution(self) -> Tensor:
        """A minimizer of the loss, shape ``shape``, float64."""

    @abc.abstractmethod
    def objective(self, weight: Tensor, logabsdet: Tensor | None = None) -> Tensor:
        r"""The loss at ``weight`` (and its :math:`\log|\det|` where the task needs it)."""

    def loss(self, holder: Constrained) -> Tensor:
        """The loss at the holder's current weight, using its own log|det| bookkeeping."""
        logabsdet = holder.logabsdet() if self.needs_logdet else None
        return self.objective(holder.weight(), logabsdet)

    def relative(self, loss: float) -> float:
        r"""Relative loss gap :math:`(L - L^*) / \text{scale}` (0 at the optimum)."""
        return (float(loss) - self.optimum) / self.scale

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, seed={self.seed}, dtype={self.dtype})"
