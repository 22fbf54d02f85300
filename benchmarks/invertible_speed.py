"""Steps and wall time to a Gaussian-likelihood target: P⁴Inv (library) against a dense weight.

Methods, all with Adam (the P⁴Inv ones through ``p4opt.P4Optimizer``):
``dense`` (a plain weight and ``torch.linalg.slogdet``), ``p4inv`` (``p4opt.Invertible()`` at
the library defaults: rank ``n``, the whole step), ``rank-n4`` and ``rank-n`` (the projected
rule at rank ``n // 4``, the default above ``n = 512`` before 0.2, and at rank ``n``),
``lowmem`` (``Invertible(update="factored", rank=n // 4, restart="gradient")``),
``p4inv-r1-0.1`` (0.1.0's default: ``update="factored", rank=1``), ``p4inv-f32`` (the
defaults with float32 bookkeeping) and ``lu`` (the LU parametrization of Glow-style flows,
:class:`p4opt.studies.baselines.LU`). For the P⁴Inv methods the table also gives the largest
``validate()`` inverse error at the end of the runs.
Each method takes the learning rate of the grid with the fewest median steps to the relative
target 1e-4 over the seeds; the step cost of every method is timed side by side (interleaved,
one thread, each method at its best learning rate from the same start) and time to target =
steps × step cost.

Examples
--------
python benchmarks/invertible_speed.py --n 256 --seeds 3
python benchmarks/invertible_speed.py --n 1024 --seeds 1 --cap 300 --lrs 1e-2 3e-2 \\
    --methods dense p4inv
python benchmarks/invertible_speed.py --n 2048 --cost-only --methods dense p4inv rank-n4
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

import p4opt
from p4opt.studies.baselines import LU
from p4opt.studies.tasks import GaussianML
from p4opt.studies.timing import interleaved_median

OPTIONS = {
    "p4inv": lambda n: {},
    "rank-n4": lambda n: {"rank": max(1, n // 4)},
    "rank-n": lambda n: {"rank": n},
    "p4inv-f32": lambda n: {"dtype": torch.float32},
    "lowmem": lambda n: {"update": "factored", "rank": max(1, n // 4), "restart": "gradient"},
    "p4inv-r1-0.1": lambda n: {"update": "factored", "rank": 1},
}


def build(
    method: str, task: GaussianML, lr: float, seed: int
) -> tuple[Callable, torch.optim.Optimizer]:
    """The loss closure and the optimizer of one method on one task."""
    torch.manual_seed(seed)
    if method == "dense":
        w = torch.nn.Parameter(task.initial().clone())
        return (lambda: task.objective(w, torch.linalg.slogdet(w)[1])), torch.optim.Adam([w], lr=lr)
    if method == "lu":  # Glow's LU parametrization (p4opt.studies.baselines.LU)
        lu = LU(task.initial().clone())
        return (lambda: task.objective(lu.weight(), lu.logabsdet())), lu.optimizer(lr)
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(task.initial().clone())
    pert = p4opt.register(holder, "weight", p4opt.Invertible(seed=seed, **OPTIONS[method](task.n)))
    opt = p4opt.P4Optimizer(torch.optim.Adam(holder.parameters(), lr=lr))
    return (lambda: task.objective(holder.weight, pert.logabsdet().to(task.dtype))), opt


#: Largest ``validate()`` inverse error at the end of each P⁴Inv method's runs.
INVERSE_ERRORS: dict[str, float] = {}


def steps_to_target(method: str, n: int, lr: float, seed: int, cap: int) -> int | None:
    task = GaussianML(n, seed=seed)
    loss_fn, opt = build(method, task, lr, seed)
    reached = None
    for step in range(cap):
        loss = loss_fn()
        if task.relative(float(loss.detach())) < 1e-4:
            reached = step
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
    for pert in getattr(opt, "perturbations", ()):
        error = pert.validate().figures["inverse_error"]
        INVERSE_ERRORS[method] = max(INVERSE_ERRORS.get(method, 0.0), error)
    return reached


def step_costs(
    methods: list[str], n: int, lrs: dict[str, float] | None = None
) -> dict[str, float]:
    """Median seconds per step of each method, interleaved, at its learning rate in ``lrs``
    (default 1e-3): the first ~40 steps of a run, where merges are most often cut back."""
    task = GaussianML(n, seed=0)
    steps = {}
    for method in methods:
        loss_fn, opt = build(method, task, (lrs or {}).get(method, 1e-3), 0)

        def step(loss_fn: Callable = loss_fn, opt: torch.optim.Optimizer = opt) -> None:
            loss_fn().backward()
            opt.step()
            opt.zero_grad()

        steps[method] = step
    return interleaved_median(steps, calls=3, repeats=9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="matrix size (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (default: %(default)s)")
    parser.add_argument("--cap", type=int, default=400, help="step cap (default: %(default)s)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 3e-2, 1e-1],
                        help="learning-rate grid (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=["dense", "p4inv", "lowmem"],
                        help="methods; dense must be one (default: %(default)s)")
    parser.add_argument("--cost-only", action="store_true",
                        help="time the steps only, every method at the first lr of --lrs "
                             "(no runs to the target; for sizes where those take too long)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cost_only:
        cost = step_costs(args.methods, args.n, dict.fromkeys(args.methods, args.lrs[0]))
        print("\n| n | method | lr | step cost/dense |")
        print("|---|---|---|---|")
        for method in args.methods:
            print(f"| {args.n} | {method} | {args.lrs[0]:g} | {cost[method] / cost['dense']:.2f} |")
        return
    best: dict[str, tuple[float, float]] = {}
    for method in args.methods:
        for lr in args.lrs:
            runs = [steps_to_target(method, args.n, lr, s, args.cap) for s in range(args.seeds)]
            median = statistics.median(r if r is not None else float("inf") for r in runs)
            print(f"n={args.n} {method} lr={lr:g} steps={runs}", flush=True)
            if method not in best or median < best[method][1]:
                best[method] = (lr, median)
    cost = step_costs(args.methods, args.n, {m: lr for m, (lr, _) in best.items()})
    dense_steps, dense_cost = best["dense"][1], cost["dense"]
    print("\n| n | method | best lr | median steps | steps/dense | step cost/dense | time/dense "
          "| worst inverse error |")
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        lr, steps = best[method]
        ratio = cost[method] / dense_cost
        error = f"{INVERSE_ERRORS[method]:.1e}" if method in INVERSE_ERRORS else "-"
        if steps == float("inf"):
            print(f"| {args.n} | {method} | - | - | - | {ratio:.2f} | - | {error} |")
            continue
        print(f"| {args.n} | {method} | {lr:g} | {steps:g} | {steps / dense_steps:.2f} | "
              f"{ratio:.2f} | {steps * ratio / dense_steps:.2f} | {error} |")


if __name__ == "__main__":
    main()
