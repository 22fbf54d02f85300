r"""Train a comparison method on a task and time its steps against the reference step."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from p4opt.studies.baselines import REFERENCE, Method, constraint_errors
from p4opt.studies.tasks.base import Task

__all__ = ["Run", "train", "pick_best", "step_costs"]


@dataclass
class Run:
    """The trajectory of one method at one learning rate on one task.

    ``relative[i]`` is the relative loss before step ``i`` (so ``relative[0]``
    is the start) and ``seconds[i]`` the wall time spent training until then.
    """

    method: str
    lr: float
    relative: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    constraint: dict[str, float] = field(default_factory=dict)

    @property
    def final(self) -> float:
        """Relative loss at the last evaluation (``inf`` when it diverged)."""
        value = self.relative[-1] if self.relative else math.inf
        return value if math.isfinite(value) else math.inf

    @property
    def steps(self) -> int:
        return max(len(self.relative) - 1, 0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["final_relative_loss"] = self.final
        out["steps"] = self.steps
        return out


def train(
    method: Method,
    task: Task,
    lr: float,
    steps: int,
    *,
    seed: int = 0,
    stop_at_target: bool = False,
) -> Run:
    """Train ``method`` on ``task`` for ``steps`` optimizer steps at learning rate ``lr``.

    The wall time covers building nothing: only the loop of loss, backward and
    optimizer step (the loss value is read every step). With
    ``stop_at_target`` the run ends when the relative loss reaches the target.
    The constraint figures are measured at the end (not timed).
    """
    torch.manual_seed(seed)
    holder = method.build(task.initial(), seed)
    optimizer = holder.optimizer(lr)
    run = Run(method.name, lr)
    start = time.perf_counter()
    for step in range(steps + 1):
        loss = task.loss(holder)
        value = task.relative(loss.item())
        run.relative.append(value)
        run.seconds.append(time.perf_counter() - start)
        if run.steps_to_target is None and value <= task.target:
            run.steps_to_target, run.seconds_to_target = step, run.seconds[-1]
            if stop_at_target:
                break
        if step == steps or not math.isfinite(value):
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    run.constraint = constraint_errors(holder, method.family)
    return run


def pick_best(runs: Sequence[Run], target: float) -> Run:
    """The best run of a learning-rate grid.

    Runs that end at or below ``target`` come first, then runs that reached it
    and rose again; within each, fewest steps to the target wins. Runs that
    never reached it rank last, by final loss.
    """

    def key(run: Run) -> tuple[bool, float, float]:
        steps = math.inf if run.steps_to_target is None else run.steps_to_target
        return (not run.final <= target, steps, run.final)

    return min(runs, key=key)


def step_costs(
    methods: Sequence[Method],
    task: Task,
    *,
    lrs: dict[str, float],
    repeats: int = 7,
    window: int = 20,
) -> dict[str, float]:
    """Median seconds per training step of each method and of the reference ``nn.Linear`` step.

    Every method trains on ``task`` from its start point; the timed windows of
    ``window`` steps (merges included, amortized) are interleaved across
    methods, in a rotating order, ``repeats`` times. The result maps method
    names (and ``"linear"``) to the median seconds of one step. The
    reference trains at a tiny learning rate: on tasks whose loss needs
    log|det| it would otherwise shrink towards zero and into subnormal floats.
    """
    everyone = [REFERENCE, *methods]
    lrs = {**lrs, REFERENCE.name: 1e-4}
    states = []
    for method in everyone:
        holder = method.build(task.initial(), 0)
        optimizer = holder.optimizer(lrs.get(method.name, method.lr_grid[len(method.lr_grid) // 2]))
        states.append((method.name, holder, optimizer))
        _steps(task, holder, optimizer, 2)  # warm-up (allocations, lazy imports)
    samples: dict[str, list[float]] = {name: [] for name, _, _ in states}
    for r in range(repeats):
        shift = r % len(states)
        for name, holder, optimizer in states[shift:] + states[:shift]:
            start = time.perf_counter()
            _steps(task, holder, optimizer, window)
            samples[name].append((time.perf_counter() - start) / window)
    return {name: statistics.median(values) for name, values in samples.items()}


def _steps(task: Task, holder: Any, optimizer: torch.optim.Optimizer, count: int) -> None:
    for _ in range(count):
        loss = task.loss(holder)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
