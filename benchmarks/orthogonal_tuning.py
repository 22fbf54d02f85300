"""Orthogonal Procrustes: steps to a relative loss of 1e-4, P⁴ Orthogonal vs geoopt and geotorch.

Solves ``min_Q ||X Q^T - Y||²`` with ``Y = X Q*^T`` for a random ``Q* ∈ SO(n)``, starting from
``Q = I``, with Adam over a small learning-rate grid, and prints, per configuration, the steps
needed to reach ``||X Q^T - Y||² / ||Y||² <= 1e-4`` (``-`` if not within ``--max-steps``). This is
the measurement behind the defaults of ``p4opt.Orthogonal`` (merge interval, keeping the
optimizer state across merges; the number of reflections: ``householder_rank.py``).

    python benchmarks/orthogonal_tuning.py            # defaults + a few alternatives, n = 64
    python benchmarks/orthogonal_tuning.py --full     # the whole grid used to pick the defaults
    python benchmarks/orthogonal_tuning.py --cost     # also the step-time ratio at n = 512
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

import p4opt
from p4opt.studies import baselines
from p4opt.studies.timing import interleaved_median


def problem(n: int, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return x, x @ q.float().mT


def steps_to(weight, opt, x, y, max_steps: int, target: float) -> int | None:
    """Adam-style steps on ``||X Wᵀ - Y||²`` until the relative loss is below ``target``."""
    norm = y.square().sum()
    for s in range(1, max_steps + 1):
        (x @ weight().mT - y).square().sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            if float((x @ weight().mT - y).square().sum() / norm) <= target:
                return s
    return None


def run_p4(x, y, lr, max_steps, target, *, method, rank, merge_every, reset_state):
    n = x.shape[1]
    lin = torch.nn.Linear(n, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n))
    kwargs = {"rank": rank} if rank is not None else {}
    p4opt.register(lin, "weight", p4opt.Orthogonal(method, seed=0, **kwargs))
    inner = torch.optim.Adam(lin.parameters(), lr=lr)
    opt = p4opt.P4Optimizer(inner, merge_every=merge_every, reset_state=reset_state)
    return steps_to(lambda: lin.weight, opt, x, y, max_steps, target)


def run_peer(x, y, lr, max_steps, target, *, peer):
    """A peer from ``p4opt.studies.baselines`` (same start ``Q = I``, its own optimizer)."""
    holder = peer(torch.eye(x.shape[1]))
    return steps_to(holder.weight, holder.optimizer(lr), x, y, max_steps, target)


def step_cost(n: int, batch: int, reps: int, rank: int | None) -> float:
    """(P⁴ Orthogonal + Adam step) / (plain nn.Linear + Adam step), interleaved medians."""
    x, y = torch.randn(batch, n), torch.randn(batch, n)

    def trainer(p4: bool):
        lin = torch.nn.Linear(n, n)
        if p4:
            kwargs = {"rank": rank} if rank is not None else {}
            p4opt.register(lin, "weight", p4opt.Orthogonal(seed=0, **kwargs))
            opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-3))
        else:
            opt = torch.optim.Adam(lin.parameters(), lr=1e-3)

        def step() -> None:
            (lin(x) - y).square().mean().backward()
            opt.step()
            opt.zero_grad()

        return step

    # chunks of 20 steps: two merge cycles of the default interval
    times = interleaved_median({"plain": trainer(False), "p4": trainer(True)}, calls=20,
                               repeats=reps)
    return times["p4"] / times["plain"]


def fmt(results: dict[float, int | None]) -> str:
    cells = [f"lr={lr:g}: {'-' if s is None else s}" for lr, s in results.items()]
    best = min((s for s in results.values() if s is not None), default=None)
    return f"best {'-' if best is None else best:>4}   " + ", ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--rows", type=int, default=None, help="rows of X (default 4n)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--target", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--full", action="store_true", help="the whole grid used for the defaults")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost", action="store_true",
                        help="also the step-time ratio vs nn.Linear at n=512, batch 256")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n
    x, y = problem(n, args.rows or 4 * n, args.seed)
    run = dict(max_steps=args.max_steps, target=args.target)
    print(f"orthogonal Procrustes n={n}, X {tuple(x.shape)}, steps to rel. loss {args.target:g}")
    t0 = time.perf_counter()
    geo = {lr: run_peer(x, y, lr, peer=baselines.GeooptStiefel, **run)
           for lr in [*args.lrs, 0.3, 0.5, 1.0, 2.0]}
    print(f"{'geoopt RiemannianAdam (Stiefel)':44s}", fmt(geo), flush=True)
    gt = {lr: run_peer(x, y, lr, peer=baselines.Geotorch, **run) for lr in [0.01, 0.02, *args.lrs]}
    print(f"{'geotorch orthogonal + Adam':44s}", fmt(gt), flush=True)
    if args.full:
        grid = itertools.product([None, 16, 32, 64, 2 * n, 4 * n], [1, 5, 10, 20], [None, True])
        configs = [("householder", r, m, s) for r, m, s in grid] + [("givens", None, 10, None)]
    else:
        configs = [("householder", None, None, None), ("householder", None, None, True),
                   ("householder", 32, None, None), ("householder", n, None, None),
                   ("householder", 4 * n, None, None), ("givens", None, None, None)]
    configs = [c for c in configs if c[1] is None or c[1] <= 4 * n]  # Householder takes <= 4n
    for method, rank, merge_every, reset in configs:
        shown_rank = p4opt.families.orthogonal.default_rank(n) if rank is None else rank
        label = (f"P4 {method}" + (f" rank={shown_rank}" if method == "householder" else "")
                 + f" merge_every={merge_every or p4opt.Orthogonal.default_merge_every}"
                 + (" reset" if reset else ""))
        res = {lr: run_p4(x, y, lr, method=method, rank=rank, merge_every=merge_every,
                          reset_state=reset, **run) for lr in args.lrs}
        print(f"{label:44s}", fmt(res), flush=True)
    if args.cost:
        for rank in (None, 64):
            shown = p4opt.families.orthogonal.default_rank(512) if rank is None else rank
            ratio = step_cost(512, 256, reps=15, rank=rank)
            print(f"step time / nn.Linear step time, n=512 batch 256 rank={shown}: {ratio:.2f}x")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
