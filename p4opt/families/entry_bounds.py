"""Entry-magnitude bounds of :math:`A` and :math:`A^{-1}` carried between merges."""

from __future__ import annotations

from p4opt._typing import Tensor

__all__ = ["EntryBounds"]


class EntryBounds:
    """Upper bounds of max|A| and max|A⁻¹| carried from one fold to the next.

    :func:`~p4opt.linalg.merge.low_rank_check` returns bounds valid after its fold; they stay
    valid while neither tensor changes otherwise (tracked by storage and version counter) and
    are dropped after ``refresh`` folds, since they only grow, so that an exact O(n²) pass
    tightens them again.
    """

    def __init__(self, refresh: int = 64) -> None:
        self.refresh = refresh
        self._key: tuple[int, ...] | None = None
        self._age = 0
        self._bounds: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def _versions(matrix: Tensor, inv: Tensor) -> tuple[int, ...]:
        return (matrix.data_ptr(), matrix._version, inv.data_ptr(), inv._version)

    def get(self, matrix: Tensor, inv: Tensor) -> tuple[Tensor, Tensor] | None:
        """The carried bounds, or ``None`` when they must be computed exactly."""
        if self._age >= self.refresh or self._key != self._versions(matrix, inv):
            self._key, self._age, self._bounds = None, 0, None
        return self._bounds

    def put(self, matrix: Tensor, inv: Tensor, bounds: tuple[Tensor, Tensor]) -> None:
        """Record the bounds after a fold that left ``matrix`` and ``inv`` as they are now."""
        self._age = self._age + 1 if self._bounds is not None else 0
        self._key, self._bounds = self._versions(matrix, inv), bounds

