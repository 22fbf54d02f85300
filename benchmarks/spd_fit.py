"""Steps to fit a Gaussian precision matrix: PositiveDefinite vs geoopt's SPD manifold vs Cholesky.

Maximum likelihood of a zero-mean Gaussian with precision ``P``: on a fixed sample ``X``
(``--samples-per-dim`` times ``n`` rows, true covariance with eigenvalues log-uniform in
[0.1, 10]) the loss is

    L(P) = mean(xᵀ P x) / 2 − log det(P) / 2 = tr(P S) / 2 − log det(P) / 2,

minimized by ``P* = S⁻¹``. Every method starts at ``P = I`` and runs full-batch Adam (geoopt:
RiemannianAdam) for at most ``--max-steps`` steps; a run reaches the target when the relative
excess loss ``(L − L*) / (L(I) − L*)`` falls below ``--target``. For each method the
learning rate with the smallest median steps over the seeds is kept (a run that misses the
target counts as ``--max-steps``). Printed: a Markdown table per ``n``.

The problem is the ``spd`` task of ``p4opt compare`` (``p4opt.studies.tasks.PrecisionML``,
here in float64) and ``p4``, ``geoopt``, ``cholesky`` are its methods ``p4-spd``, ``geoopt-spd``
and ``cholesky`` (``p4opt.studies.baselines``). Methods: ``p4`` (``PositiveDefinite()``
defaults: projected, whitened coordinates, rank n, merges every 10 steps; log-det by
``pert.logabsdet()``), variants of its coordinates, rank, rule and merge interval,
``geoopt`` (``ManifoldParameter`` on ``SymmetricPositiveDefinite``, log-det by ``slogdet``)
and ``cholesky`` (``P = L Lᵀ``, ``L`` lower triangular with diagonal ``exp(d)``, log-det
``2 Σ d``). This script differs from
``p4opt compare --task spd`` in what it reports: it stops each run at the target, counts a
step when the loss evaluated before it is within the target, and times steps relative to
``cholesky``.

Example: ``python benchmarks/spd_fit.py`` (n = 16 and 64, 3 seeds, about ten minutes on
2 cores); ``--quick`` for a one-seed smoke run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import p4opt
from p4opt.studies import baselines
from p4opt.studies.baselines import Constrained, P4Weight
from p4opt.studies.tasks import PrecisionML
from p4opt.studies.tasks.runner import _breakdown

Step = Callable[[], float]
Make = Callable[[PrecisionML, float], Step]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 3e-2, 1e-1])
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--target", type=float, default=1e-4)
    parser.add_argument("--samples-per-dim", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the methods")
    parser.add_argument("--quick", action="store_true", help="one seed, two learning rates")
    parser.add_argument("--out", type=Path, default=None, help="write every run as JSON")
    return parser.parse_args()


def problem(n: int, samples_per_dim: int, seed: int) -> PrecisionML:
    """The ``spd`` task of ``p4opt compare`` in float64 (``S`` is ``task.covariance``)."""
    return PrecisionML(n, seed, torch.float64, samples_per_dim=samples_per_dim)


def steps_to_target(task: PrecisionML, step: Step, max_steps: int, target: float) -> int:
    """Steps until the loss before a step is within ``target`` (``max_steps + 1``: missed, or a
    matrix factorization failed inside a step, as ``p4opt compare`` counts it)."""
    for i in range(1, max_steps + 1):
        try:
            loss = step()
        except RuntimeError as err:  # a failed factorization inside a step: diverged
            if not _breakdown(err):
                raise
            return max_steps + 1
        if not math.isfinite(loss):
            return max_steps + 1
        if task.relative(loss) <= target:
            return i
    return max_steps + 1


def _stepper(task: PrecisionML, holder: Constrained, opt: torch.optim.Optimizer) -> Step:
    def step() -> float:
        loss = task.loss(holder)  # log det as the holder tracks it
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def library_method(name: str) -> Make:
    """A method of ``p4opt compare`` (``p4-spd``, ``geoopt-spd``, ``cholesky``) at its defaults."""

    def make(task: PrecisionML, lr: float) -> Step:
        holder = baselines.get(name).build(task.initial(), 0)
        return _stepper(task, holder, holder.optimizer(lr))

    return make


def p4_variant(merge_every: int | None = None, rank_fraction: float | None = None,
               **options: object) -> Make:
    """``PositiveDefinite`` with other options than the defaults (rank, rule, merge interval)."""

    def make(task: PrecisionML, lr: float) -> Step:
        extra = dict(options)
        if rank_fraction is not None:
            extra["rank"] = max(1, int(rank_fraction * task.n))
        holder = P4Weight(task.initial(), 0, "PositiveDefinite", **extra)
        opt = p4opt.P4Optimizer(torch.optim.Adam(holder.parameters(), lr=lr),
                                merge_every=merge_every)
        return _stepper(task, holder, opt)

    return make


METHODS: dict[str, Make] = {
    "p4": library_method("p4-spd"),
    "p4-ambient": p4_variant(coordinates="ambient"),
    "p4-merge-1": p4_variant(merge_every=1),
    "p4-rank-n/4": p4_variant(rank_fraction=0.25),
    "p4-rank-n/4-merge-1": p4_variant(rank_fraction=0.25, merge_every=1),
    "p4-factored-rank-4": p4_variant(update="factored", rank=4),
    "geoopt": library_method("geoopt-spd"),
    "cholesky": library_method("cholesky"),
}


def time_per_step(names: list[str], task: PrecisionML, repeats: int = 5, steps: int = 20) -> dict:
    """Seconds per step of each method, blocks of ``steps`` interleaved, best of ``repeats``."""
    runs = {name: METHODS[name](task, 1e-3) for name in names}
    for step in runs.values():
        step()
    best = dict.fromkeys(names, math.inf)
    for _ in range(repeats):
        for name, step in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    seeds = 1 if args.quick else args.seeds
    lrs = args.lrs[:2] if args.quick else args.lrs
    names = args.methods or list(METHODS)
    records = []
    for n in args.sizes:
        print(f"\nn = {n}: steps to relative excess loss {args.target:g} "
              f"(median over {seeds} seeds at the best lr; > {args.max_steps} = missed)\n")
        print("| method | best lr | steps (per seed) | median steps | time per step "
              "(× cholesky) | time to target (× cholesky) |")
        print("|---|---|---|---|---|---|")
        rows = {}
        for name in names:
            best = None
            for lr in lrs:
                steps = []
                for seed in range(seeds):
                    if steps and steps[0] > args.max_steps:  # seed 0 missed: lr out of range
                        steps.append(args.max_steps + 1)
                        continue
                    task = problem(n, args.samples_per_dim, seed)
                    steps.append(steps_to_target(task, METHODS[name](task, lr), args.max_steps,
                                                 args.target))
                    records.append({"n": n, "method": name, "lr": lr, "seed": seed,
                                    "steps": steps[-1]})
                median = statistics.median(steps)
                if best is None or median < best[2]:
                    best = (lr, steps, median)
            rows[name] = best
        seconds = time_per_step(names, problem(n, args.samples_per_dim, 0))
        for name, (lr, steps, median) in rows.items():
            ratio = seconds[name] / seconds["cholesky"] if "cholesky" in seconds else math.nan
            shown = ", ".join(str(x) if x <= args.max_steps else "missed" for x in steps)
            wall = ratio * median / rows["cholesky"][2] if "cholesky" in rows else math.nan
            print(f"| {name} | {lr:g} | {shown} | {median:g} | {ratio:.2f} | {wall:.2f} |")
    if args.out is not None:
        args.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
