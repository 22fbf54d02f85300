r"""The :class:`Perturbation` base class and the records a merge or a validation returns.

A perturbation family defines a map :math:`R_B : S \to S` on a feasible set
:math:`S`, parameterized by small trainable tensors :math:`B` with an identity
element :math:`B_0` (:math:`R_{B_0} = \mathrm{id}`). The frozen base tensor
:math:`A` lives in the module (``module.parametrizations[name].original``);
``module.<name>`` evaluates :math:`R_B(A)`.
"""

from __future__ import annotations

import abc
import functools
import math
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from p4opt._typing import Tensor
from p4opt.exceptions import RegistrationError

__all__ = ["Perturbation", "MergeResult", "ValidationReport", "live_perturbations"]

_LIVE: weakref.WeakSet[Perturbation] = weakref.WeakSet()


def live_perturbations() -> Iterator[Perturbation]:
    """Every :class:`Perturbation` object currently alive (used for optimizer discovery)."""
    return iter(list(_LIVE))


@dataclass(frozen=True)
class MergeResult:
    """What one merge cycle of one perturbation did.

    Attributes
    ----------
    accepted : bool
        Whether :math:`A \\leftarrow R_B(A)` was committed. When ``False`` the
        base tensor and its bookkeeping are bit-for-bit unchanged.
    reason : str
        ``"ok"`` or why the merge was rejected (e.g. ``"non-finite update"``).
    reset : bool
        Whether the trainable tensors were returned to the identity. The
        optimizer state of those tensors is then stale and is reset by
        :class:`~p4opt.P4Optimizer` (if configured).
    corrected : bool
        Whether a periodic numerical correction ran after this merge.
    state_invalid : bool
        The optimizer state of the trainable tensors is unusable (e.g. the
        update was non-finite, or was rejected and dropped, so its momentum
        points back towards it): :class:`~p4opt.P4Optimizer` always drops it,
        whatever its ``reset_state``.
    figures : Mapping[str, float]
        Numbers behind the decision (e.g. the update's log-determinant).
    """

    accepted: bool
    reason: str = "ok"
    reset: bool = True
    corrected: bool = False
    state_invalid: bool = False
    figures: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidationReport:
    """Figures measuring how well a perturbation's invariants hold.

    ``ok`` is true when every figure is within its tolerance (NaN never is).
    ``str(report)`` prints one line per figure.
    """

    where: str
    figures: Mapping[str, float]
    tolerances: Mapping[str, float]

    @property
    def ok(self) -> bool:
        return all(
            math.isfinite(self.figures[k]) and self.figures[k] <= tol
            for k, tol in self.tolerances.items()
        )

    def __str__(self) -> str:
        lines = [f"validation of {self.where}: {'ok' if self.ok else 'FAILED'}"]
        for key, value in self.figures.items():
            tol = self.tolerances.get(key)
            bound = "" if tol is None else f" (tolerance {tol:.1e})"
            lines.append(f"  {key}: {value:.3e}{bound}")
        return "\n".join(lines)


class Perturbation(nn.Module, abc.ABC):
    r"""Abstract base of every P⁴ family.

    A subclass implements four methods:

    ``identity()``
        Return the trainable tensors to :math:`B_0` (in place, so optimizer
        state keyed by tensor stays valid).
    ``apply(base)``
        :math:`R_B(A)`, differentiable in the trainable tensors.
    ``merge()``
        Validate and fold the update into the base tensor ``self.base``
        (in place), update any bookkeeping, reset to the identity, and return a
        :class:`MergeResult`. A rejected merge must leave ``self.base`` and all
        bookkeeping unchanged.
    ``validate()``
        Return a :class:`ValidationReport` with error figures.

    Optionally, ``attach(value)`` checks/projects the tensor the perturbation
    is registered on and initializes bookkeeping (it is torch's
    ``right_inverse`` hook, so it also runs when ``module.<name> = X`` is
    assigned later). ``default_merge_every`` sets the family's merge interval.

    The perturbation owns a seeded :class:`torch.Generator` (``self.generator``)
    for any randomness; its state is part of ``state_dict``.

    ``apply`` keeps working as :meth:`torch.nn.Module.apply` when given a
    callable, so ``model.apply(init_fn)`` is unaffected.

    Parameters
    ----------
    seed : int, optional
        Seed of the perturbation's generator. By default one is drawn from
        torch's global generator at construction (so ``torch.manual_seed``
        makes runs, and all ranks of a distributed job, identical).
    """

    default_merge_every: ClassVar[int] = 10
    #: Whether :class:`~p4opt.P4Optimizer` (``reset_state`` left out) drops the wrapped
    #: optimizer's state of the trainable tensors after a reset.
    reset_optimizer_state: ClassVar[bool] = True
    #: Buffers that keep their dtype under ``module.float()``/``.half()`` (bookkeeping precision);
    #: they still follow device moves.
    precise_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, seed: int | None = None) -> None:
        super().__init__()
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        elif not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.generator = torch.Generator().manual_seed(seed)
        self.where = "<unregistered>"
        object.__setattr__(self, "_owner", None)
        _LIVE.add(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _LIVE.add(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own_apply = cls.__dict__.get("apply")
        if own_apply is not None:

            @functools.wraps(own_apply)
            def apply(self: Perturbation, base: Any) -> Any:
                if callable(base) and not isinstance(base, Tensor):
                    return nn.Module.apply(self, base)
                return own_apply(self, base)

            cls.apply = apply  # type: ignore[method-assign]

    # ----------------------------------------------------------------- contract
    @abc.abstractmethod
    def identity(self) -> None:
        """Reset the trainable tensors to the identity element, in place."""

    @abc.abstractmethod
    def apply(self, base: Tensor) -> Tensor:  # type: ignore[override]
        """Return :math:`R_B(A)` for the base tensor ``base``."""

    @abc.abstractmethod
    def merge(self) -> MergeResult:
        """Fold the update into the base tensor (or reject it) and reset to the identity."""

    @abc.abstractmethod
    def validate(self) -> ValidationReport:
        """Measure the invariants of the current (perturbed) tensor."""

    def reject(self, reason: str, figures: Mapping[str, float] | None = None) -> MergeResult:
        """Drop the pending update: reset to the identity and report a rejected merge.

        For use in :meth:`merge` when the update cannot be kept (non-finite,
        overflowing): the optimizer state of the trainable tensors describes
        that update, so the result marks it ``state_invalid``.
        """
        self.identity()
        return MergeResult(
            accepted=False, reason=reason, reset=True, state_invalid=True, figures=figures or {}
        )

    def attach(self, value: Tensor) -> Tensor:
        """Check the tensor being registered and return the base tensor to store.

        Families override this to project onto their feasible set and to
        initialize bookkeeping. The default accepts any floating tensor.
        """
        if not value.is_floating_point():
            raise TypeError(f"{self.where} must be a floating-point tensor, got {value.dtype}")
        return value

    # ------------------------------------------------------------- plumbing
    def forward(self, base: Tensor) -> Tensor:
        return self.apply(base)

    def right_inverse(self, value: Tensor) -> Tensor:
        """torch.nn.utils.parametrize hook: see :meth:`attach`."""
        return self.attach(value)

    def _bind(self, owner: nn.Module, name: str) -> None:
        object.__setattr__(self, "_owner", owner.parametrizations[name])  # type: ignore[index]

    def _unbind(self) -> None:
        object.__setattr__(self, "_owner", None)

    @property
    def is_registered(self) -> bool:
        return self._owner is not None

    @property
    def base(self) -> Tensor:
        """The frozen base tensor :math:`A` this perturbation acts on."""
        if self._owner is None:
            raise RegistrationError(
                f"{type(self).__name__} is not registered on any tensor; "
                "use p4opt.register(module, name, perturbation) first"
            )
        return self._owner.original

    def trainable(self) -> list[nn.Parameter]:
        """The trainable tensors :math:`B` (the ones whose optimizer state a merge makes stale)."""
        return [p for p in self.parameters(recurse=False)]

    def current(self) -> Tensor:
        """The current perturbed tensor :math:`R_B(A)`."""
        return self.apply(self.base)

    def _apply(self, fn: Any, recurse: bool = True) -> Perturbation:
        # ``model.float()`` must not round float64 bookkeeping: move those buffers to the
        # target device only, keeping their dtype.
        order = list(self._buffers)
        saved = {n: self._buffers.pop(n) for n in self.precise_buffers if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in saved.items():
                if buf is not None:
                    probe = fn(torch.empty(0, dtype=buf.dtype, device=buf.device))
                    buf = buf.to(probe.device)
                self._buffers[name] = buf
            self._buffers = {n: self._buffers[n] for n in order}
        return self

    # ----------------------------------------------------------- extra state
    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
