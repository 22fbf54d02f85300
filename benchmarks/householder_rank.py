"""Householder's number of reflections against time to target, beside geoopt.

On orthogonal Procrustes (``p4opt compare``'s ``procrustes`` task, batch 4n, target 1e-4; or
its Stiefel variants with ``--task stiefel-tall`` / ``stiefel-wide``, weights n × n/4),
every rank runs every learning rate of its grid on every seed, the rule of ``p4opt compare``
picks one, and the step costs (÷ a plain ``nn.Linear`` step) are timed side by side in one
run. ``steps x cost`` is the time to the target in units of a plain step: the figure the
default rank is chosen by (a larger rank takes fewer steps and costs more per step). The
peers run with a grid one step wider than ``p4opt compare``'s, since their best rate sat at
its edge at these sizes.

    python benchmarks/householder_rank.py --n 512 --ranks 128 256 384 512   # about 10 minutes
    python benchmarks/householder_rank.py --n 64 --ranks 64 96 128 --steps 300
    python benchmarks/householder_rank.py --task stiefel-tall --n 512 --ranks 128 256
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import torch

from p4opt.families.rotations import default_rank
from p4opt.studies import baselines, tasks
from p4opt.studies.baselines.base import Method
from p4opt.studies.baselines.p4 import P4Weight
from p4opt.studies.compare import compare_task

__all__ = ["rank_method", "main"]

#: Peer learning-rate grids: ``p4opt compare``'s and one step further (see the docstring).
PEER_GRID = (1.0, 3.0, 10.0)


def rank_method(rank: int, lrs: tuple[float, ...]) -> Method:
    """``p4-householder`` with ``rank`` reflections (Adam, the default merge interval)."""
    return Method(
        f"p4-householder-k{rank}", "orthogonal",
        functools.partial(P4Weight, family="Orthogonal", method="householder", rank=rank),
        lrs, p4=True, description=f"P⁴ Orthogonal, {rank} Householder reflections, Adam",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="procrustes",
                        choices=["procrustes", "stiefel-tall", "stiefel-wide"],
                        help="task of p4opt compare (procrustes)")
    parser.add_argument("--n", type=int, default=512, help="matrix size, the long side (512)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None,
                        help="numbers of reflections (default: n/4, n/2, 3n/4, n)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.3],
                        help="Householder learning rates (0.1 0.3)")
    parser.add_argument("--peers", nargs="*", default=["geoopt-rsgd", "geoopt-radam"],
                        help="peer methods of p4opt compare (geoopt-rsgd geoopt-radam)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (3)")
    parser.add_argument("--steps", type=int, default=400, help="steps per run (400)")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats (7)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.n
    ranks = args.ranks or [n // 4, n // 2, 3 * n // 4, n]
    methods = [rank_method(k, tuple(args.lrs)) for k in ranks]
    by_name = {m.name: m for m in baselines.METHODS}
    methods += [dataclasses.replace(by_name[p], lr_grid=PEER_GRID) for p in args.peers
                if by_name[p].unavailable() is None]
    runs = [tasks.make(args.task, n, seed=s) for s in range(args.seeds)]
    start = time.perf_counter()
    result = compare_task(runs, methods, args.steps, repeats=args.repeats)
    shape = tuple(runs[0].initial().shape)
    print(f"{args.task} {shape[0]}x{shape[1]}, batch {runs[0].batch}, {args.seeds} seeds, "
          f"target {runs[0].target:g}; default rank {default_rank(*shape)}")
    print("| method | lr | steps → target | seeds ok | cost (÷ nn.Linear) | steps × cost |")
    print("|---|---|---|---|---|---|")
    for r in result.methods:
        if r.status != "ok":
            print(f"| {r.name} | {r.status}: {r.reason} | | | | |")
            continue
        steps = r.steps_to_target
        ok = max(t.succeeded for t in r.trials if t.lr == r.lr)
        product = "—" if steps is None else f"{steps * r.step_cost_ratio:.0f}"
        print(f"| {r.name} | {r.lr:g} | {'—' if steps is None else f'{steps:.0f}'} | "
              f"{ok}/{args.seeds} | {r.step_cost_ratio:.2f} | {product} |")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
