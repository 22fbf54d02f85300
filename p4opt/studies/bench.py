"""``p4opt bench``: step-cost ratios of P⁴Inv layers against plain and dense baselines.

Every figure is a ratio of two timings taken side by side in one run
(interleaved chunks, median over repetitions), so machine noise cancels to
first order; absolute times are not reported.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

import p4opt
from p4opt.studies.progress import Progress
from p4opt.studies.timing import interleaved_median

__all__ = ["COMMAND", "HELP", "add_arguments", "run", "step_cost", "inverse_cost"]

#: Name of the sub-command.
COMMAND = "bench"
#: One-line help of the sub-command.
HELP = "measure step-cost ratios of P⁴Inv layers against nn.Linear and dense slogdet/solve"

Step = Callable[[], None]


def _invertible_layer(n: int, seed: int, register: bool, rank: int = 1) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n, n)
    with torch.no_grad():  # a well-conditioned start, the same for every method
        lin.weight.copy_(torch.eye(n) + 0.3 * torch.randn(n, n) / n**0.5)
    if register:
        p4opt.register(lin, "weight", p4opt.Invertible(rank=rank, seed=seed))
    return lin


def step_cost(n: int, batch: int = 256, merge_every: int = 10, repeats: int = 7) -> dict:
    """Training-step cost of P⁴Inv and of dense ``slogdet``, each ÷ a plain ``nn.Linear`` step.

    A step is forward + log|det| + backward + Adam step (the plain layer has no
    log-det term). P⁴Inv chunks span ``merge_every`` steps so merges are
    amortized inside the timing; the O(n³) correction every ``correct_every``
    merges is timed separately and added per step.
    """
    x = torch.randn(batch, n)
    target = torch.randn(batch, n)
    plain = _invertible_layer(n, 0, register=False)
    dense = _invertible_layer(n, 0, register=False)
    p4 = _invertible_layer(n, 0, register=True)
    pert = p4opt.perturbation_of(p4, "weight")
    opts = {
        "plain": torch.optim.Adam(plain.parameters(), lr=1e-4),
        "dense": torch.optim.Adam(dense.parameters(), lr=1e-4),
        "p4inv": p4opt.P4Optimizer(torch.optim.Adam(p4.parameters(), lr=1e-4), merge_every),
    }

    def plain_step() -> None:
        (plain(x) - target).square().mean().backward()
        opts["plain"].step()
        opts["plain"].zero_grad()

    def dense_step() -> None:
        loss = (dense(x) - target).square().mean() - 1e-3 * torch.linalg.slogdet(dense.weight)[1]
        loss.backward()
        opts["dense"].step()
        opts["dense"].zero_grad()

    def p4_step() -> None:
        loss = (p4(x) - target).square().mean() - 1e-3 * pert.logabsdet()
        loss.backward()
        opts["p4inv"].step()
        opts["p4inv"].zero_grad()

    times = interleaved_median(
        {"plain": plain_step, "p4inv": p4_step, "dense": dense_step},
        calls=merge_every, repeats=repeats,
    )
    correction = interleaved_median({"correct": pert.correct}, calls=1, repeats=3)["correct"]
    per_step_correction = correction / (merge_every * (pert.correct_every or 1))
    return {
        "n": n,
        "batch": batch,
        "merge_every": merge_every,
        "p4inv_over_linear": (times["p4inv"] + per_step_correction) / times["plain"],
        "dense_slogdet_over_linear": times["dense"] / times["plain"],
        "correction_share_of_p4inv_step": per_step_correction / times["p4inv"],
        "merges_accepted": opts["p4inv"].stats["merges_accepted"],
        "merges_rejected": opts["p4inv"].stats["merges_rejected"],
    }


def inverse_cost(n: int, batch: int, repeats: int = 7, chunk: int = 20) -> dict:
    """Inverse pass ÷ forward pass for P⁴Inv (``solve``) and for a dense ``torch.linalg.solve``."""
    p4 = _invertible_layer(n, 1, register=True)
    pert = p4opt.perturbation_of(p4, "weight")
    dense = _invertible_layer(n, 1, register=False)
    with torch.no_grad():
        pert.U.normal_(std=1e-3)  # a pending update, as during training
    x = torch.randn(batch, n)
    y = p4(x).detach()

    def dense_inverse() -> None:
        torch.linalg.solve(dense.weight, (y - dense.bias).mT)

    with torch.no_grad():
        times = interleaved_median(
            {
                "p4_forward": lambda: p4(x),
                "p4_inverse": lambda: pert.solve(y - p4.bias),
                "dense_forward": lambda: dense(x),
                "dense_inverse": dense_inverse,
            },
            calls=chunk,
            repeats=repeats,
        )
    return {
        "n": n,
        "batch": batch,
        "p4inv_inverse_over_forward": times["p4_inverse"] / times["p4_forward"],
        "dense_solve_over_forward": times["dense_inverse"] / times["dense_forward"],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options on ``parser``."""
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512, 1024],
                        metavar="N", help="layer sizes n (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=256,
                        help="batch of the training step (default: %(default)s)")
    parser.add_argument("--inverse-batches", type=int, nargs="+", default=[1, 64], metavar="B",
                        help="batches of the inverse-pass timing (default: %(default)s)")
    parser.add_argument("--merge-every", type=int, default=10,
                        help="P⁴Inv merge interval; one timed chunk spans it "
                        "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="interleaved repetitions; the median is reported "
                        "(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("results/bench.json"),
                        help="JSON file of the ratios (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 0 keeps torch's default "
                        "(default: %(default)s, stable ratios on shared machines)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``, print the ratios and write them as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 layers")
    jobs = [("step", n, args.batch) for n in args.sizes]
    jobs += [("inverse", n, b) for n in args.sizes for b in args.inverse_batches]
    results: dict[str, list[dict]] = {"step": [], "inverse": []}
    with Progress(len(jobs), "p4opt bench") as progress:
        for kind, n, batch in jobs:
            if kind == "step":
                results["step"].append(step_cost(n, batch, args.merge_every, args.repeats))
            else:
                results["inverse"].append(inverse_cost(n, batch, args.repeats))
            progress.done(f"{kind} n={n} batch={batch}")
    print("\ntraining step ÷ plain nn.Linear step (forward + log-det + backward + Adam)")
    print(f"{'n':>6} {'batch':>6} {'P4Inv':>8} {'dense+slogdet':>14} {'correction %':>13}")
    for r in results["step"]:
        print(
            f"{r['n']:>6} {r['batch']:>6} {r['p4inv_over_linear']:>8.2f} "
            f"{r['dense_slogdet_over_linear']:>14.2f} "
            f"{100 * r['correction_share_of_p4inv_step']:>12.1f}%"
        )
    print("\ninverse pass ÷ forward pass of the same layer")
    print(f"{'n':>6} {'batch':>6} {'P4Inv solve':>12} {'dense solve':>12}")
    for r in results["inverse"]:
        print(
            f"{r['n']:>6} {r['batch']:>6} {r['p4inv_inverse_over_forward']:>12.2f} "
            f"{r['dense_solve_over_forward']:>12.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps({"meta": meta, **results}, indent=2))
    print(f"\nwrote {args.out}")
    return 0
