"""The :class:`Rotation` strategy interface of :class:`~p4opt.Orthogonal`."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

import torch

from p4opt._typing import Tensor

if TYPE_CHECKING:
    from p4opt.families.orthogonal import Orthogonal

__all__ = ["Rotation"]


class Rotation(abc.ABC):
    r"""How :class:`~p4opt.Orthogonal` parameterizes :math:`G(B) \in SO(n)` with :math:`G(B_0) = I`.

    A strategy creates the trainable tensors on its perturbation, right-multiplies vectors
    by :math:`G` (``rotate``) and restarts the tensors after a merge. It holds no tensors
    itself, so ``state_dict`` and device moves stay the perturbation's business.

    :math:`n` is the long side of the weight: a rectangular weight is rotated on its
    long side (see :class:`~p4opt.Orthogonal`). A strategy with ``stacks = True`` also
    serves stacks (*, n, p): one rotation per element, and ``identity(mask)`` /
    ``restart(mask)`` act on the elements selected by a boolean ``mask`` of the stack's
    shape.
    """

    #: Whether the strategy serves stacks of matrices (one rotation per element).
    stacks: ClassVar[bool] = False
    #: Steps between merges when ``P4Optimizer`` is given none (``Orthogonal.default_merge_every``).
    merge_every: ClassVar[int] = 7
    #: Fewest steps between merges with which the strategy was measured to learn.
    min_merge_every: ClassVar[int] = 1

    def __init__(self, pert: Orthogonal, rank: int | None) -> None:
        self.pert = pert
        self.rank = rank

    @abc.abstractmethod
    def create(self, like: Tensor, n: int) -> None:
        """Create the trainable tensors on the perturbation for rotations of size ``n``.

        ``like`` is the registered tensor (its dtype, device and, for a stack, its leading
        dimensions).
        """

    @abc.abstractmethod
    def identity(self) -> None:
        """Return to :math:`G = I` with fresh random directions."""

    def restart(self) -> None:
        """Return to :math:`G = I` after a merge (default: as :meth:`identity`)."""
        self.identity()

    @abc.abstractmethod
    def rotate(self, x: Tensor) -> Tensor:
        """:math:`x\\,G` for vectors ``x[..., n]`` in ``x``'s dtype (differentiable)."""

    def rotate_rows(self, rows: Tensor) -> Tensor:
        """:math:`VG` for the base's own rows :math:`V` (*, k, m) (default: :meth:`rotate`);
        a strategy whose generator is built from the base takes it from here."""
        return self.rotate(rows)

    def merge_plan(self, dtype: torch.dtype) -> tuple[torch.dtype, bool]:
        """How a merge of the pending rotation is computed for a layer of ``dtype``: the dtype
        in which it forms :math:`QG`, and whether the result may miss orthogonality by more
        than rounding and must be re-orthonormalized. Default ``(float64, False)``: the
        strategy's products carry more than rounding, and reflections and plane rotations are
        orthogonal entry by entry."""
        return torch.float64, False

    def upgrade_state_dict(  # noqa: B027 - optional hook, a no-op by default
        self, state_dict: dict[str, Tensor], prefix: str
    ) -> None:
        """Rewrite, in place, entries an older p4opt saved in another layout (default: none)."""

    def describe(self) -> str:
        """Extra text for the perturbation's ``repr``."""
        return ""
