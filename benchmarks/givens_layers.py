"""Layered Givens rotations: steps to target on orthogonal Procrustes, by layers and restart rule.

Solves ``min_Q ||X Q^T - Y||²`` (``Y = X Q*^T``, random ``Q* ∈ SO(n)``, start ``Q = I``,
``X`` of 4n rows) with P⁴ Orthogonal + Adam, and prints, per configuration, the steps to a
relative loss of ``--target`` (median over seeds at the learning rate of the grid with the best
median; ``-`` if a seed did not reach it within ``--max-steps``) and the time per step relative
to the Householder default, measured in the same run. This is the measurement behind the
defaults of ``Orthogonal(method="givens")`` (number of layers, restart rule).

    python benchmarks/givens_layers.py                     # n = 64, 3 seeds
    python benchmarks/givens_layers.py --n 256 --layers 32 64 255
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import p4opt
from p4opt.families.rotations.givens import default_layers


def problem(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return x, x @ q.float().mT


def run(n: int, seed: int, lr: float, max_steps: int, target: float, *, method: str,
        layers: int | None, rule: str | None) -> tuple[int | None, float]:
    """Steps to ``target`` (None if not reached) and seconds per step."""
    x, y = problem(n, seed)
    lin = torch.nn.Linear(n, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n))
    pert = p4opt.register(lin, "weight", p4opt.Orthogonal(method, rank=layers, seed=seed))
    if rule is not None:
        pert.strategy.restart_rule = rule
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=lr))
    norm = y.square().sum()
    t0 = time.perf_counter()
    for step in range(1, max_steps + 1):
        loss = (x @ lin.weight.mT - y).square().sum()
        if float(loss.detach() / norm) <= target:
            return step - 1, (time.perf_counter() - t0) / max(step - 1, 1)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return None, (time.perf_counter() - t0) / max_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="Givens layers to try (default: n/8, n/4, a whole tournament)")
    parser.add_argument("--rules", nargs="+", default=["keep", "advance", "shuffle"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--target", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n
    full = default_layers(n)
    layers = args.layers or sorted({max(1, n // 8), max(1, n // 4), full})
    configs: list[tuple[str, int | None, str | None]] = [("householder", None, None)]
    for count in layers:
        rules = args.rules if count < full else ["keep", "shuffle"]
        configs += [("givens", count, rule) for rule in rules if rule in args.rules]
    print(f"orthogonal Procrustes n={n}, steps to relative loss {args.target:g} "
          f"(median of {args.seeds} seeds at the best lr of {args.lrs})")
    reference = None
    for method, count, rule in configs:
        per_lr = {}
        for lr in args.lrs:
            out = [run(n, s, lr, args.max_steps, args.target, method=method, layers=count,
                       rule=rule) for s in range(args.seeds)]
            steps = [s if s is not None else float("inf") for s, _ in out]
            per_lr[lr] = (statistics.median(steps), statistics.median(t for _, t in out), steps)
        lr, (steps, sec, each) = min(per_lr.items(), key=lambda kv: kv[1][0])
        reference = reference or sec
        label = method if method == "householder" else f"givens layers={count} restart={rule}"
        shown = "-" if steps == float("inf") else f"{steps:.0f}"
        seeds = ", ".join("-" if s == float("inf") else str(s) for s in each)
        print(f"{label:40s} steps {shown:>5} (seeds {seeds}) lr {lr:g}  "
              f"time/step ÷ householder {sec / reference:.2f}", flush=True)


if __name__ == "__main__":
    main()
