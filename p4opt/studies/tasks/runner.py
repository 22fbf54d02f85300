r"""Train a comparison method on a task, choose its learning rate, time its steps.

The learning-rate rule (:func:`choose_lr`), stated once here and in ``p4opt compare --help``:
every lr of the method's grid runs on every seed; a run *succeeds* when it reaches
the target and its loss never rises above ``INSTABILITY_FACTOR`` (10) × the target
afterwards (nor diverges). Learning rates rank by the number of seeds that succeed
(more first), then by the median steps to the target (failed runs count as never),
then by the median final relative loss.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from p4opt.studies.baselines import REFERENCE, Constrained, Method, constraint_errors
from p4opt.studies.records import LrSummary, RunRecord
from p4opt.studies.tasks.base import Task
from p4opt.studies.timing import interleaved_median

__all__ = ["train", "summarize", "choose_lr", "step_costs"]


def train(
    method: Method,
    task: Task,
    lr: float,
    steps: int,
    *,
    seed: int = 0,
    stop_at_target: bool = False,
) -> RunRecord:
    """Train ``method`` on ``task`` for ``steps`` optimizer steps at learning rate ``lr``.

    The wall time covers only the loop of loss, backward and optimizer step
    (the loss value is read every step), not building. With ``stop_at_target``
    the run ends when the relative loss reaches the target. The constraint
    figures are measured at the end (not timed). ``seed`` seeds the method
    (e.g. a perturbation's generator); the task carries its own seed.

    A linear-algebra breakdown after the first step (an eigen-, Cholesky or LU
    factorization inside the loss or the optimizer step that fails, as a Riemannian
    retraction can at a large learning rate) ends the run as diverged: its last
    relative loss is ``inf``. Any other error, and any error in the first step, is raised.
    """
    torch.manual_seed(seed)
    holder = method.build(task.initial(), seed)
    optimizer = holder.optimizer(lr)
    run = RunRecord(task.name, task.n, method.name, lr, task.seed)
    start = time.perf_counter()
    for step in range(steps + 1):
        try:
            loss = task.loss(holder)
            value = task.relative(loss.item())
        except RuntimeError as err:
            if step == 0 or not _breakdown(err):
                raise
            value = math.inf  # the previous step left a point the loss cannot be taken at
        run.relative.append(value)
        run.seconds.append(time.perf_counter() - start)
        if run.steps_to_target is None and value <= task.target:
            run.steps_to_target, run.seconds_to_target = step, run.seconds[-1]
            if stop_at_target:
                break
        if step == steps or not math.isfinite(value):
            break
        try:
            loss.backward()
            optimizer.step()
        except RuntimeError as err:
            if step == 0 or not _breakdown(err):
                raise
            run.relative.append(math.inf)  # the step broke down: the run diverged here
            run.seconds.append(time.perf_counter() - start)
            break
        optimizer.zero_grad()
    run.steps = len(run.relative) - 1
    last = run.relative[-1]
    run.final_rel = last if math.isfinite(last) else math.inf
    if run.steps_to_target is not None:
        after = run.relative[run.steps_to_target :]
        run.max_rel_after_target = max(v if math.isfinite(v) else math.inf for v in after)
    run.constraint = constraint_errors(holder, method.family)
    return run


def _breakdown(err: RuntimeError) -> bool:
    """Whether ``err`` is a failed matrix factorization (also when raised from TorchScript)."""
    return isinstance(err, torch.linalg.LinAlgError) or "linalg." in str(err)


def _median(values: Sequence[float]) -> float | None:
    middle = statistics.median(values) if values else math.inf
    return None if math.isinf(middle) else float(middle)


def summarize(lr: float, runs: list[RunRecord], target: float) -> LrSummary:
    """The figures of one learning rate over its seeds (medians; a failed run counts as ∞)."""
    good = [not r.unstable(target) and r.reached() for r in runs]
    steps = [r.steps_to_target if ok else math.inf for r, ok in zip(runs, good, strict=True)]
    seconds = [r.seconds_to_target if ok else math.inf for r, ok in zip(runs, good, strict=True)]
    return LrSummary(
        lr=lr,
        runs=runs,
        succeeded=sum(good),
        unstable=sum(r.unstable(target) for r in runs),
        median_steps_to_target=_median(steps),  # type: ignore[arg-type]
        median_seconds_to_target=_median(seconds),  # type: ignore[arg-type]
        median_final_rel=statistics.median(r.final_rel for r in runs) if runs else math.inf,
    )


def choose_lr(trials: Sequence[LrSummary]) -> LrSummary:
    """The best learning rate of a grid by the rule of this module's docstring."""
    if not trials:
        raise ValueError("choose_lr needs at least one learning rate, got none")

    def key(t: LrSummary) -> tuple[int, float, float]:
        steps = math.inf if t.median_steps_to_target is None else t.median_steps_to_target
        return (-t.succeeded, steps, t.median_final_rel)

    return min(trials, key=key)


def step_costs(
    methods: Sequence[Method],
    task: Task,
    *,
    lrs: dict[str, float],
    repeats: int = 7,
    window: int = 20,
) -> dict[str, float]:
    """Median seconds per training step of each method and of the reference ``nn.Linear`` step.

    Every method trains on ``task`` from its start point; timed windows of
    ``window`` steps (merges included, amortized) are interleaved across
    methods by :func:`~p4opt.studies.timing.interleaved_median`. The result
    maps method names (and ``"linear"``) to the median seconds of one step.
    The reference trains at a tiny learning rate: on tasks whose loss needs
    log|det| it would otherwise shrink towards zero and into subnormal floats.
    """
    lrs = {**lrs, REFERENCE.name: 1e-4}
    functions = {}
    for method in [REFERENCE, *methods]:
        holder = method.build(task.initial(), 0)
        lr = lrs.get(method.name, method.lr_grid[len(method.lr_grid) // 2])
        functions[method.name] = _stepper(task, holder, holder.optimizer(lr))
    return interleaved_median(functions, calls=window, repeats=repeats, warmup=2)


def _stepper(
    task: Task, holder: Constrained, optimizer: torch.optim.Optimizer
) -> Callable[[], None]:
    def step() -> None:
        loss = task.loss(holder)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step
