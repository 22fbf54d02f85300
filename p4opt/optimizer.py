"""``P4Optimizer``: wraps any torch optimizer and runs the P⁴ merge schedule."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from p4opt._typing import StateDict
from p4opt.perturbation import MergeResult, Perturbation, live_perturbations

__all__ = ["P4Optimizer"]


def _check_interval(merge_every: int | None) -> int | None:
    if merge_every is None:
        return None
    if isinstance(merge_every, bool) or not isinstance(merge_every, int) or merge_every < 1:
        raise ValueError(f"merge_every must be a positive int or None, got {merge_every!r}")
    return merge_every


class P4Optimizer(torch.optim.Optimizer):
    r"""Run any ``torch.optim.Optimizer`` on P⁴ perturbations and merge them on schedule.

    The wrapper delegates everything to the wrapped optimizer (``param_groups``,
    ``state`` and ``defaults`` *are* the wrapped optimizer's, so LR schedulers,
    ``zero_grad`` and ``step(closure)`` behave as usual) and adds the merge
    cycle: after every ``merge_every``-th step each registered perturbation
    whose tensors are in the param groups is validated and merged
    (:math:`A \leftarrow R_B(A)`, :math:`B \leftarrow B_0`). After a merge that
    returns the perturbation to its identity, the wrapped optimizer's state
    for *that perturbation's own tensors* is dropped (``reset_state=True``),
    because it describes a tensor that no longer exists; no other state is
    touched. Unregistered parameters are optimized exactly as without the
    wrapper.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Built on the model's parameters *after* ``p4opt.register``.
    merge_every : int, optional
        Steps between merges for all perturbations. Left out, each uses its
        family's ``default_merge_every``.
    reset_state : bool, optional
        Drop the wrapped optimizer's state of a perturbation's tensors after
        it is reset (``True``) or keep it (``False``, momentum carries over).
        Left out, each family decides (``Perturbation.reset_optimizer_state``:
        ``True`` unless the family documents a measured reason).

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
    ) -> None:
        if isinstance(optimizer, P4Optimizer):
            raise TypeError("optimizer is already a P4Optimizer; wrap the plain optimizer once")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer instance, "
                f"got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.merge_every = _check_interval(merge_every)
        self.reset_state = None if reset_state is None else bool(reset_state)
        self._counters = {"steps": 0, "merges_accepted": 0, "merges_rejected": 0, "corrections": 0}
        self.last_results: list[tuple[str, MergeResult]] = []
        self.perturbations = self._discover()
        for name in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, name, OrderedDict())
        self._patch_step_function()

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
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        position = {id(p): i for i, p in enumerate(params)}
        found: list[tuple[int, Perturbation]] = []
        for pert in live_perturbations():
            if not pert.is_registered:
                continue
            hits = [position[id(t)] for t in pert.trainable() if id(t) in position]
            if hits:
                found.append((min(hits), pert))
            elif id(pert.base) in position:
                warnings.warn(
                    f"{pert.where} has a registered {type(pert).__name__} but only its frozen base "
                    "tensor is in the optimizer; build the optimizer after p4opt.register",
                    stacklevel=3,
                )
        return [p for _, p in sorted(found, key=lambda item: item[0])]

    def interval(self, pert: Perturbation) -> int:
        """Steps between merges of ``pert`` under this optimizer."""
        return self.merge_every or pert.default_merge_every

    def resets_state(self, pert: Perturbation) -> bool:
        """Whether a reset of ``pert`` drops its tensors' state in the wrapped optimizer."""
        return pert.reset_optimizer_state if self.reset_state is None else self.reset_state

    # ------------------------------------------------------------------ steps
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """One step of the wrapped optimizer, then the merges that are due."""
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self._counters["steps"] += 1
        steps = self._counters["steps"]
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
            result = pert.merge()
            key = "merges_accepted" if result.accepted else "merges_rejected"
            self._counters[key] += 1
            self._counters["corrections"] += int(result.corrected)
            if result.state_invalid or (result.reset and self.resets_state(pert)):
                for tensor in pert.trainable():
                    self.optimizer.state.pop(tensor, None)
            results.append((pert.where, result))
        self.last_results = results
        return results

    @property
    def stats(self) -> dict[str, int]:
        """Counters: ``steps``, ``merges_accepted``, ``merges_rejected``, ``corrections``."""
        return dict(self._counters)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> StateDict:  # type: ignore[override]
        """The wrapped optimizer's state dict beside the schedule, counters and generators.

        Everything is tensors, numbers and strings, so ``torch.load(...,
        weights_only=True)`` reads it back.
        """
        return {
            "optimizer": self.optimizer.state_dict(),
            "p4": {
                "counters": dict(self._counters),
                "merge_every": self.merge_every,
                "reset_state": self.reset_state,
                "generators": [p.generator.get_state() for p in self.perturbations],
            },
        }

    def load_state_dict(self, state_dict: StateDict) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict` (load the model's state dict as well, as usual)."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "p4"}:
            raise ValueError(
                "state_dict must come from P4Optimizer.state_dict() (keys 'optimizer' and 'p4')"
            )
        own = state_dict["p4"]
        generators = own["generators"]
        if len(generators) != len(self.perturbations):
            raise ValueError(
                f"state_dict holds {len(generators)} perturbation generators but this optimizer "
                f"manages {len(self.perturbations)} perturbations"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._counters = {k: int(v) for k, v in own["counters"].items()}
        self.merge_every = _check_interval(own["merge_every"])
        self.reset_state = None if own["reset_state"] is None else bool(own["reset_state"])
        for pert, gen_state in zip(self.perturbations, generators, strict=True):
            pert.generator.set_state(gen_state)
