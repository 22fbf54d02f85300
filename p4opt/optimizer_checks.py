"""Checks between a :class:`~p4opt.P4Optimizer`'s settings or state and its perturbations."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from p4opt._typing import Tensor
from p4opt.perturbation import Perturbation

__all__ = ["warn_short_intervals", "drop_mismatched_state", "gradients_finite", "mark_stepped"]


def warn_short_intervals(every: int | None, perturbations: Sequence[Perturbation]) -> None:
    """Warn for each perturbation that ``merge_every=every`` merges too often to learn.

    A family's ``min_merge_every`` is the fewest steps between merges with which it was
    measured to learn (Householder ``Orthogonal``: 3). ``every=None`` (each family's own
    interval) never warns.
    """
    for pert in perturbations if every is not None else ():
        if every < pert.min_merge_every:
            warnings.warn(
                f"merge_every={every}: {pert.where} ({type(pert).__name__}) stops learning when "
                f"merged more often than every {pert.min_merge_every} steps; leave merge_every "
                "out to use each family's interval", UserWarning, stacklevel=3,
            )


def drop_mismatched_state(
    optimizer: torch.optim.Optimizer, perturbations: Sequence[Perturbation]
) -> None:
    """Forget, with a warning, optimizer state whose shape no longer fits its tensor.

    A checkpoint of an older p4opt can hold such state (0.1's single Givens layer); the
    tensor's state then restarts from zero. Cost: one pass over the state entries.
    """
    for pert in perturbations:
        for name, param in pert.named_parameters(recurse=False):
            state = optimizer.state.get(param, {})
            if any(isinstance(v, Tensor) and v.ndim > 0 and v.shape != param.shape
                   for v in state.values()):
                del optimizer.state[param]
                warnings.warn(
                    f"optimizer state of {pert.where}.{name} has another shape than the tensor "
                    f"{tuple(param.shape)} (a checkpoint of an older p4opt); it restarts from "
                    "zero", UserWarning, stacklevel=4,
                )


def gradients_finite(param_groups: Sequence[dict]) -> bool:
    """Whether every gradient in the optimizer's parameter groups is finite."""
    grads = [p.grad for g in param_groups for p in g["params"] if p.grad is not None]
    # a finite sum proves every entry finite (one reduction, no mask); only a non-finite
    # sum, which large finite entries can also give, pays for the entrywise test
    return all(bool(torch.isfinite(g.sum())) or bool(torch.isfinite(g).all()) for g in grads)


def mark_stepped(perturbations: Sequence[Perturbation]) -> None:
    """Bump the version counter of every perturbation tensor a step may have changed.

    An optimizer that writes ``p.data`` leaves the counter as it was, and the families key
    their caches on it (a pending update known to be zero, a cached inverse): without the
    bump, a query between merges could answer for the tensor before the step.
    """
    for pert in perturbations:
        for p in pert.parameters(recurse=False):
            if p.grad is not None:
                # one tensor per call: torch < 2.5 takes no list here
                torch.autograd.graph.increment_version(p)
