r"""Typed records of the merge cycle: Reason, Proposal, MergeResult and ValidationReport."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from p4opt._typing import Tensor

__all__ = ["Reason", "Proposal", "MergeResult", "ValidationReport"]


class Reason(enum.StrEnum):
    """Why a merge folded all, part or none of an update.

    The members compare equal to their descriptions (``Reason.OK == "ok"``), and their order
    is the code that the batched kernels of :mod:`p4opt.linalg` return per stack element.
    """

    OK = "ok"
    NON_FINITE_UPDATE = "non-finite update"
    SINGULAR_UPDATE = "singular update"
    UPDATE_BOUNDS = "update log|det| outside bounds"
    ILL_CONDITIONED_UPDATE = "ill-conditioned update"
    LOGDET_BOUNDS = "log|det| outside bounds"
    NON_FINITE_RESULT = "non-finite merged tensor"
    INFEASIBLE_RESULT = "merged tensor outside the feasible set"

    @classmethod
    def from_code(cls, code: int) -> Reason:
        """The reason whose position in the enumeration is ``code``."""
        return _BY_CODE[int(code)]

    @property
    def code(self) -> int:
        """Position of this reason in the enumeration (0 for :attr:`OK`)."""
        return _BY_CODE.index(self)

    def __str__(self) -> str:
        return self.value


_BY_CODE: tuple[Reason, ...] = tuple(Reason)


@dataclass
class Proposal:
    """A family's candidate for one merge (returned by :meth:`Perturbation.propose`).

    Attributes
    ----------
    candidate : Tensor or None
        The merged tensor :math:`R_B(A)` at bookkeeping precision, or ``None`` when the family
        folds from factors (:class:`~p4opt.Invertible` adds rank-k products in place).
        The template rejects elements of a candidate that are not finite.
    codes : Tensor or None
        Per stack element, a :class:`Reason` code (int64; 0 = may be folded). ``None``: all 0.
    scale : Tensor or None
        Per stack element, the fraction ``t`` in (0, 1] of the update that will be folded
        (partial merge). ``None``: all 1.
    cut : Tensor or None
        Per stack element, the :class:`Reason` code for which the update was cut back
        (0 where it was not).
    figures : dict[str, float]
        Numbers behind the decision, reported in :class:`MergeResult`.
    data : Any
        Family-private intermediate results that :meth:`Perturbation.fold` reuses.
    """

    candidate: Tensor | None = None
    codes: Tensor | None = None
    scale: Tensor | None = None
    cut: Tensor | None = None
    figures: dict[str, float] = field(default_factory=dict)
    data: Any = None


@dataclass(frozen=True)
class MergeResult:
    """What one merge cycle of one perturbation did.

    Attributes
    ----------
    accepted : bool
        The whole update was folded (:math:`A \\leftarrow R_B(A)`) for every stack element.
    reason : Reason
        :attr:`Reason.OK`, or the first reason an element's update was cut back or not folded.
    folded : int
        Stack elements whose update was folded in full.
    partial : int
        Stack elements whose update was folded in part (the rest is still pending, so the
        layer's function did not change).
    rejected : int
        Stack elements whose base is bit-for-bit unchanged.
    scale : float
        Smallest fraction of an update that was folded (1 when all were folded in full).
    corrected : bool
        Whether the periodic numerical correction ran after this merge.
    stale : tuple of Tensor
        The trainable tensors whose optimizer state no longer describes them; the optimizer
        drops exactly these.
    dropped : bool
        A pending update was thrown away (non-finite, or rejected with ``on_reject="reset"``).
    figures : Mapping[str, float]
        Numbers behind the decision (e.g. the update's log-determinant).
    """

    accepted: bool
    reason: Reason = Reason.OK
    folded: int = 1
    partial: int = 0
    rejected: int = 0
    scale: float = 1.0
    corrected: bool = False
    stale: tuple[Tensor, ...] = ()
    dropped: bool = False
    figures: Mapping[str, float] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        """``"accepted"`` (all folded), ``"partial"`` (some folded or cut) or ``"rejected"``."""
        if self.accepted:
            return "accepted"
        return "partial" if self.folded or self.partial else "rejected"

    @property
    def reset(self) -> bool:
        """Whether the trainable tensors restarted (compatibility with 0.1)."""
        return bool(self.folded or self.dropped)

    @property
    def state_invalid(self) -> bool:
        """Whether the optimizer state had to be dropped (compatibility with 0.1)."""
        return self.dropped

    def __str__(self) -> str:
        parts = [f"folded {self.folded}", f"partial {self.partial}", f"rejected {self.rejected}"]
        text = f"merge {'accepted' if self.accepted else 'cut'} ({', '.join(parts)})"
        return text if self.reason is Reason.OK else f"{text}: {self.reason}"


@dataclass(frozen=True)
class ValidationReport:
    """Figures measuring how well a perturbation's invariants hold.

    ``ok`` is true when every figure with a tolerance is within it (NaN never is), and no
    ``problem`` was recorded; ``str(report)`` prints one line per figure.
    """

    where: str
    figures: Mapping[str, float]
    tolerances: Mapping[str, float]
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem and all(
            math.isfinite(self.figures[k]) and self.figures[k] <= tol
            for k, tol in self.tolerances.items()
        )

    def __str__(self) -> str:
        lines = [f"validation of {self.where}: {'ok' if self.ok else 'FAILED'}"]
        if self.problem:
            lines.append(f"  problem: {self.problem}")
        for key, value in self.figures.items():
            tol = self.tolerances.get(key)
            bound = "" if tol is None else f" (tolerance {tol:.1e})"
            lines.append(f"  {key}: {value:.3e}{bound}")
        return "\n".join(lines)
