"""The :class:`Rotation` strategy interface of :class:`~p4opt.Orthogonal`."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from p4opt._typing import Tensor

if TYPE_CHECKING:
    from p4opt.families.orthogonal import Orthogonal

__all__ = ["Rotation"]


class Rotation(abc.ABC):
    r"""How :class:`~p4opt.Orthogonal` parameterizes :math:`G(B) \in SO(n)` with :math:`G(B_0) = I`.

    A strategy creates the trainable tensors on its perturbation, right-multiplies vectors
    by :math:`G` (``rotate``) and restarts the tensors after a merge. It holds no tensors
    itself, so ``state_dict`` and device moves stay the perturbation's business.
    """

    def __init__(self, pert: Orthogonal, rank: int | None) -> None:
        self.pert = pert
        self.rank = rank

    @abc.abstractmethod
    def create(self, like: Tensor, n: int) -> None:
        """Create the trainable tensors on the perturbation for ``n × n`` matrices."""

    @abc.abstractmethod
    def identity(self) -> None:
        """Return to :math:`G = I` with fresh random directions."""

    def restart(self) -> None:
        """Return to :math:`G = I` after a merge (default: as :meth:`identity`)."""
        self.identity()

    @abc.abstractmethod
    def rotate(self, x: Tensor) -> Tensor:
        """:math:`x\\,G` for vectors ``x[..., n]`` in ``x``'s dtype (differentiable)."""

    def describe(self) -> str:
        """Extra text for the perturbation's ``repr``."""
        return ""
