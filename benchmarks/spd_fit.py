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

Methods: ``p4`` (``PositiveDefinite()`` defaults: projected, rank n, merges every 10 steps;
log-det by ``pert.logabsdet()``), variants of its rank, rule and merge interval,
``geoopt`` (``ManifoldParameter`` on ``SymmetricPositiveDefinite``, log-det by ``slogdet``)
and ``cholesky`` (``P = L Lᵀ``, ``L`` lower triangular with diagonal ``exp(d)``, log-det ``2 Σ d``).

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

Step = Callable[[], float]
Make = Callable[[torch.Tensor, float], Step]


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


def problem(n: int, samples: int, seed: int) -> torch.Tensor:
    """Sample covariance ``S`` of ``samples`` draws from a random Gaussian (float64)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    eig = 10 ** (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
    x = torch.randn(samples, n, generator=g, dtype=torch.float64) @ (q * eig.sqrt()) @ q.mT
    return x.mT @ x / samples


def loss_of(s: torch.Tensor, p: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    return (p * s).sum() / 2 - logdet / 2


def steps_to_target(s: torch.Tensor, step: Step, max_steps: int, target: float) -> int:
    n = s.shape[0]
    best = n / 2 + float(torch.linalg.slogdet(s)[1]) / 2
    start = float(torch.trace(s)) / 2
    for i in range(1, max_steps + 1):
        loss = step()
        if not math.isfinite(loss):
            return max_steps + 1
        if (loss - best) / (start - best) <= target:
            return i
    return max_steps + 1


def p4_method(**options: object) -> Make:
    merge_every = options.pop("merge_every", None)
    fraction = options.pop("rank_fraction", None)

    def make(s: torch.Tensor, lr: float) -> Step:
        n = s.shape[0]
        if fraction is not None:
            options["rank"] = max(1, int(fraction * n))  # type: ignore[operator]
        holder = torch.nn.Linear(n, n, bias=False, dtype=torch.float64)
        with torch.no_grad():
            holder.weight.copy_(torch.eye(n))
        pert = p4opt.register(holder, "weight", p4opt.PositiveDefinite(seed=0, **options))
        opt = p4opt.P4Optimizer(torch.optim.Adam(holder.parameters(), lr=lr),
                                merge_every=merge_every)  # type: ignore[arg-type]

        def step() -> float:
            loss = loss_of(s, holder.weight, pert.logabsdet())
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.item()

        return step

    return make


def geoopt_method(s: torch.Tensor, lr: float) -> Step:
    import geoopt

    n = s.shape[0]
    p = geoopt.ManifoldParameter(torch.eye(n, dtype=torch.float64),
                                 manifold=geoopt.SymmetricPositiveDefinite())
    opt = geoopt.optim.RiemannianAdam([p], lr=lr)

    def step() -> float:
        loss = loss_of(s, p, torch.linalg.slogdet(p)[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def cholesky_method(s: torch.Tensor, lr: float) -> Step:
    n = s.shape[0]
    z = torch.zeros(n, n, dtype=torch.float64, requires_grad=True)
    d = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([z, d], lr=lr)

    def step() -> float:
        low = torch.tril(z, -1) + torch.diag(d.exp())
        loss = loss_of(s, low @ low.mT, 2 * d.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


METHODS: dict[str, Make] = {
    "p4": p4_method(),
    "p4-merge-1": p4_method(merge_every=1),
    "p4-rank-n/4": p4_method(rank_fraction=0.25),
    "p4-rank-n/4-merge-1": p4_method(rank_fraction=0.25, merge_every=1),
    "p4-factored-rank-4": p4_method(update="factored", rank=4),
    "geoopt": geoopt_method,
    "cholesky": cholesky_method,
}


def time_per_step(names: list[str], s: torch.Tensor, repeats: int = 5, steps: int = 20) -> dict:
    """Seconds per step of each method, blocks of ``steps`` interleaved, best of ``repeats``."""
    runs = {name: METHODS[name](s, 1e-3) for name in names}
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
                    s = problem(n, args.samples_per_dim * n, seed)
                    steps.append(steps_to_target(s, METHODS[name](s, lr), args.max_steps,
                                                 args.target))
                    records.append({"n": n, "method": name, "lr": lr, "seed": seed,
                                    "steps": steps[-1]})
                median = statistics.median(steps)
                if best is None or median < best[2]:
                    best = (lr, steps, median)
            rows[name] = best
        seconds = time_per_step(names, problem(n, args.samples_per_dim * n, 0))
        for name, (lr, steps, median) in rows.items():
            ratio = seconds[name] / seconds["cholesky"] if "cholesky" in seconds else math.nan
            shown = ", ".join(str(x) if x <= args.max_steps else "missed" for x in steps)
            wall = ratio * median / rows["cholesky"][2] if "cholesky" in rows else math.nan
            print(f"| {name} | {lr:g} | {shown} | {median:g} | {ratio:.2f} | {wall:.2f} |")
    if args.out is not None:
        args.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
