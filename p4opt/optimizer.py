"""``P4Optimizer``: wraps any torch optimizer and runs the P⁴ merge schedule."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from p4opt._typing import StateDict, Tensor
from p4opt._validate import check_optional_int
from p4opt.errors import P4RuntimeError, P4TypeError, P4ValueError
from p4opt.optimizer_checks import (
    drop_mismatched_state,
    gradients_finite,
    mark_stepped,
    warn_short_intervals,
)
from p4opt.perturbation import MergeResult, Perturbation, owner_of
from p4opt.registry import is_sharded

__all__ = ["P4Optimizer", "Counters", "PerturbationStats"]

#: Optimizers that keep one state for all parameters instead of one per parameter.
_GLOBAL_STATE = (torch.optim.LBFGS,)
#: After this many merges of one perturbation, warn once if most were cut back or rejected.
_WARN_AFTER = 10


@dataclass
class Counters:
    """The wrapper's own counters (saved in :meth:`P4Optimizer.state_dict`)."""

    steps: int = 0
    merges_accepted: int = 0
    merges_partial: int = 0
    merges_rejected: int = 0
    corrections: int = 0
    steps_skipped: int = 0


@dataclass
class PerturbationStats:
    """Merge outcomes of one perturbation under one optimizer (see :meth:`P4Optimizer.report`)."""

    where: str
    accepted: int = 0
    partial: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    warned: bool = False

    def add(self, result: MergeResult) -> None:
        outcome = result.outcome
        setattr(self, outcome, getattr(self, outcome) + 1)
        if not result.accepted:
            key = str(result.reason)
            self.reasons[key] = self.reasons.get(key, 0) + 1


class P4Optimizer(torch.optim.Optimizer):
    r"""Run any ``torch.optim.Optimizer`` on P⁴ perturbations and merge them on schedule.

    The wrapper delegates to the wrapped optimizer (``param_groups``, ``state`` and
    ``defaults`` *are* the wrapped optimizer's, so LR schedulers, ``zero_grad`` and
    ``step(closure)`` behave as usual) and adds the merge cycle: after every
    ``merge_every``-th step each registered perturbation whose tensors are in the param
    groups merges (:meth:`p4opt.Perturbation.merge`). The wrapped optimizer's state of
    exactly the tensors a merge reports stale is dropped; no other state is touched
    (optimizers with one global state, such as LBFGS, have it reset). After each step the
    version counters of the perturbations' tensors that had a gradient are bumped, so an
    optimizer that writes ``p.data`` (which torch does not count) is seen by the families'
    caches like any other.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Built on the model's parameters *after* ``p4opt.register``.
    merge_every : int, optional
        Steps between merges for all perturbations. Left out, each uses its family's
        ``default_merge_every``.
    reset_state : bool, optional
        Drop the optimizer state of a perturbation's tensors whenever it restarts (``True``)
        or keep it (``False``); left out, each family decides. State that describes an update
        that was thrown away (non-finite) is always dropped.
    skip_nonfinite : bool
        Skip a step (no update, no merge; counted in ``steps_skipped``) when any gradient is
        NaN or Inf, as ``torch.amp.GradScaler`` does, so a bad batch cannot poison the moments
        of ordinary parameters. Costs one reduction per parameter.

    Attributes
    ----------
    optimizer : torch.optim.Optimizer
        The wrapped optimizer.
    perturbations : list[Perturbation]
        Perturbations found in the param groups, in param-group order.
    last_results : list[tuple[str, MergeResult]]
        Results of the most recent merge cycle.

    Examples
    --------
    >>> import torch, p4opt
    >>> _ = torch.manual_seed(0)
    >>> lin = torch.nn.Linear(4, 4)
    >>> _ = p4opt.register(lin, "weight", p4opt.Invertible())
    >>> opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-3), merge_every=2)
    >>> x = torch.randn(64, 4)
    >>> for _ in range(4):
    ...     loss = (lin(x) - 2 * x).square().mean()
    ...     loss.backward(); opt.step(); opt.zero_grad()
    >>> opt.stats["merges_accepted"], opt.stats["steps"]
    (2, 4)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        merge_every: int | None = None,
        *,
        reset_state: bool | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        if isinstance(optimizer, P4Optimizer):
            raise P4TypeError("optimizer is already a P4Optimizer; wrap the plain optimizer once")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise P4TypeError(
                "optimizer must be a torch.optim.Optimizer instance, "
                f"got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.merge_every = check_optional_int("merge_every", merge_every, minimum=1)
        self.reset_state = None if reset_state is None else bool(reset_state)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.counters = Counters()
        self.last_results: list[tuple[str, MergeResult]] = []
        self._per: dict[int, PerturbationStats] = {}
        self._grads: dict[int, dict[str, Tensor]] = {}
        for name in (
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, name, OrderedDict())
        self.perturbations = self._discover()
        warn_short_intervals(self.merge_every, self.perturbations)
        if not self.perturbations:
            warnings.warn(
                "P4Optimizer found no p4opt perturbation among the optimizer's parameters, so it "
                "will never merge; register perturbations (p4opt.register) before building the "
                "optimizer, or use the plain optimizer",
                stacklevel=2,
            )

    # ------------------------------------------------------------- delegation
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self.perturbations = self._discover()
        warn_short_intervals(self.merge_every, self.perturbations)

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:  # type: ignore[override]
        """Run ``hook(self, args, kwargs)`` before each step (once per step)."""
        return self.optimizer.register_step_pre_hook(lambda _, a, k: hook(self, a, k))

    def register_step_post_hook(self, hook: Callable[..., Any]) -> Any:  # type: ignore[override]
        """Run ``hook(self, args, kwargs)`` after each step (before its merges; once per step)."""
        return self.optimizer.register_step_post_hook(lambda _, a, k: hook(self, a, k))

    def __getstate__(self) -> dict[str, Any]:  # type: ignore[override]
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner = type(self.optimizer).__name__
        return (
            f"P4Optimizer({inner}, merge_every={self.merge_every}, "
            f"perturbations={len(self.perturbations)}, reset_state={self.reset_state})"
        )

    # -------------------------------------------------------------- discovery
    def _discover(self) -> list[Perturbation]:
        found: dict[int, Perturbation] = {}
        bases: dict[int, Perturbation] = {}
        for group in self.optimizer.param_groups:
            for tensor in group["params"]:
                owner = owner_of(tensor)
                if owner is not None:
                    (found if owner[1] == "trainable" else bases).setdefault(id(owner[0]), owner[0])
        params = [t for group in self.optimizer.param_groups for t in group["params"]]
        if any(is_sharded(t) for t in params):
            raise P4RuntimeError(
                "the optimizer's parameters are sharded (FSDP / DTensor), e.g. a model sharded "
                "after registration; p4opt's merges need whole tensors on every rank: use "
                "DistributedDataParallel instead"
            )
        for key, pert in bases.items():
            if key not in found:
                warnings.warn(
                    f"{pert.where} has a registered {type(pert).__name__} but the optimizer holds "
                    "only its frozen base tensor; build the optimizer after p4opt.register",
                    stacklevel=3,
                )
        return list(found.values())

    def interval(self, pert: Perturbation) -> int:
        """Steps between merges of ``pert`` under this optimizer."""
        return self.merge_every or pert.default_merge_every

    # ------------------------------------------------------------------ steps
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """One step of the wrapped optimizer, then the merges that are due."""
        if self.skip_nonfinite and closure is None and not gradients_finite(self.param_groups):
            self.counters.steps_skipped += 1
            return None
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        mark_stepped(self.perturbations)
        self.counters.steps += 1
        steps = self.counters.steps
        for pert in self.perturbations:
            if getattr(pert, "wants_gradients", False):
                self._grads[id(pert)] = {
                    name: p.grad.detach().clone()
                    for name, p in pert.named_parameters(recurse=False)
                    if p.grad is not None
                }
        due = [p for p in self.perturbations if steps % self.interval(p) == 0]
        if due:
            self._merge(due)
        return loss

    def merge(self) -> list[tuple[str, MergeResult]]:
        """Run a merge cycle for every perturbation now; returns ``(where, result)`` pairs."""
        return self._merge(self.perturbations)

    def _merge(self, perts: list[Perturbation]) -> list[tuple[str, MergeResult]]:
        results = []
        for pert in perts:
            if not pert.is_registered:
                continue
            result = pert.merge(reset_state=self.reset_state, grads=self._grads.get(id(pert)))
            self._count(pert, result)
            self._drop_state(result.stale)
            results.append((pert.where, result))
        self.last_results = results
        return results

    def _count(self, pert: Perturbation, result: MergeResult) -> None:
        c = self.counters
        name = f"merges_{result.outcome}"
        setattr(c, name, getattr(c, name) + 1)
        c.corrections += int(result.corrected)
        stats = self._per.setdefault(id(pert), PerturbationStats(pert.where))
        stats.add(result)
        total = stats.accepted + stats.partial + stats.rejected
        if not stats.warned and total >= _WARN_AFTER and 2 * stats.accepted < total:
            stats.warned = True
            warnings.warn(
                f"{pert.where}: {stats.partial} of {total} merges were cut back and "
                f"{stats.rejected} rejected (reasons: {stats.reasons}); the updates are too large "
                "for the family's bounds: lower the learning rate, merge more often, or widen the "
                "bounds (see P4Optimizer.report())",
                stacklevel=4,
            )

    def _drop_state(self, stale: tuple[Tensor, ...]) -> None:
        if not stale:
            return
        if isinstance(self.optimizer, _GLOBAL_STATE):
            self.optimizer.state.clear()  # curvature pairs describe the old coordinates
            return
        for tensor in stale:
            self.optimizer.state.pop(tensor, None)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: ``steps``, ``merges_accepted``, ``merges_partial``, ``merges_rejected``,
        ``corrections``, ``steps_skipped``."""
        return asdict(self.counters)

    def report(self) -> list[PerturbationStats]:
        """Per perturbation: merges accepted, cut back (partial) and rejected, with reasons."""
        return [self._per.get(id(p), PerturbationStats(p.where)) for p in self.perturbations]

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> StateDict:  # type: ignore[override]
        """The wrapped optimizer's state dict beside the wrapper's counters and schedule.

        Everything is tensors, numbers and strings, so ``torch.load(..., weights_only=True)``
        reads it back. The perturbations' random draws are part of the *model's* state dict.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "p4": {
                "counters": asdict(self.counters),
                "merge_every": self.merge_every,
                "reset_state": self.reset_state,
            },
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            state = hook(self, state) or state
        return state

    def load_state_dict(self, state_dict: StateDict) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict` (load the model's state dict as well, as usual).

        State dicts written by p4opt 0.1 load too (their generator states are ignored: the
        draws now live in the model's buffers). The state of a trainable tensor whose shape
        changed since (0.1's single Givens layer) is dropped with a warning: it restarts.
        """
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "p4"}:
            raise P4ValueError(
                "state_dict must come from P4Optimizer.state_dict() (keys 'optimizer' and 'p4')"
            )
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        own = state_dict["p4"]
        self.optimizer.load_state_dict(state_dict["optimizer"])
        drop_mismatched_state(self.optimizer, self.perturbations)
        known = {f for f in Counters.__dataclass_fields__}
        self.counters = Counters(**{k: int(v) for k, v in own["counters"].items() if k in known})
        self.merge_every = check_optional_int("merge_every", own["merge_every"], minimum=1)
        self.reset_state = None if own["reset_state"] is None else bool(own["reset_state"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
