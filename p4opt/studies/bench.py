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

__all__ = ["COMMAND", "HELP", "MODES", "add_arguments", "run", "step_cost", "inverse_cost"]

#: Name of the sub-command.
COMMAND = "bench"
#: One-line help of the sub-command.
HELP = "measure step-cost ratios of P⁴Inv layers against nn.Linear and dense slogdet/solve"

Step = Callable[[], None]


#: The P⁴Inv modes measured: the library defaults and the low-memory mode of the docs.
MODES: dict[str, Callable[[int], dict]] = {
    "p4inv": lambda n: {},
    "lowmem": lambda n: {"update": "factored", "rank": max(1, n // 4), "restart": "gradient"},
}


def _invertible_layer(n: int, seed: int, mode: str | None) -> torch.nn.Linear:
    """A well-conditioned ``nn.Linear(n, n)``, the same for every method; P⁴Inv when ``mode``."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n, n)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n) + 0.3 * torch.randn(n, n) / n**0.5)
    if mode is not None:
        p4opt.register(lin, "weight", p4opt.Invertible(seed=seed, **MODES[mode](n)))
    return lin


def step_cost(
    n: int, batch: int = 256, merge_every: int | None = None, repeats: int = 7, chunk: int = 10
) -> dict:
    """Training-step cost of the P⁴Inv modes and of dense ``slogdet``, each ÷ a plain step.

    A step is forward + log|det| + backward + Adam step (the plain layer has no log-det term).
    Timed chunks of ``chunk`` steps amortize the merges (each mode at its default merge
    interval unless ``merge_every`` is given); the O(n³) correction every ``correct_every``
    merges is timed separately and added per step.
    """
    x = torch.randn(batch, n)
    target = torch.randn(batch, n)
    layers = {"plain": _invertible_layer(n, 0, None), "dense": _invertible_layer(n, 0, None)}
    layers.update({mode: _invertible_layer(n, 0, mode) for mode in MODES})
    opts: dict[str, torch.optim.Optimizer] = {}
    steps: dict[str, Callable[[], None]] = {}
    for name, layer in layers.items():
        adam = torch.optim.Adam(layer.parameters(), lr=1e-4)
        opts[name] = adam if name in ("plain", "dense") else p4opt.P4Optimizer(adam, merge_every)

        def step(name: str = name, layer: torch.nn.Linear = layer) -> None:
            loss = (layer(x) - target).square().mean()
            if name == "dense":
                loss = loss - 1e-3 * torch.linalg.slogdet(layer.weight)[1]
            elif name != "plain":
                loss = loss - 1e-3 * p4opt.perturbation_of(layer, "weight").logabsdet()
            loss.backward()
            opts[name].step()
            opts[name].zero_grad()

        steps[name] = step
    times = interleaved_median(steps, calls=chunk, repeats=repeats)
    out: dict = {"n": n, "batch": batch}
    out["dense_slogdet_over_linear"] = times["dense"] / times["plain"]
    for mode in MODES:
        pert = p4opt.perturbation_of(layers[mode], "weight")
        opt = opts[mode]
        correct = interleaved_median({"c": pert.correct}, calls=1, repeats=3)["c"]
        merges = max(1, int(opt.stats["merges_accepted"]) + int(opt.stats["merges_partial"]))
        per_step = correct * merges / (int(opt.stats["steps"]) * (pert.correct_every or 1))
        out[f"{mode}_over_linear"] = (times[mode] + per_step) / times["plain"]
        out[f"{mode}_merges"] = {k: opt.stats[k] for k in ("steps", "merges_accepted",
                                                           "merges_partial", "merges_rejected")}
    return out


def inverse_cost(n: int, batch: int, repeats: int = 7, chunk: int = 20) -> dict:
    """Inverse pass ÷ forward pass of each P⁴Inv mode (``solve``) and of ``torch.linalg.solve``.

    The default mode is measured right after a merge, as in training (its pending change is
    zero at every forward pass); the low-memory mode with a pending update. Also returns
    the round-trip error ``max|solve(f(x) - b) - x|`` of each mode, a correctness check.
    """
    dense = _invertible_layer(n, 1, None)
    x = torch.randn(batch, n)
    jobs: dict[str, Callable[[], object]] = {
        "dense_forward": lambda: dense(x),
        "dense_inverse": lambda: torch.linalg.solve(dense.weight, (dense(x) - dense.bias).mT),
    }
    out: dict = {"n": n, "batch": batch}
    for mode in MODES:
        layer = _invertible_layer(n, 1, mode)
        pert = p4opt.perturbation_of(layer, "weight")
        if mode == "lowmem":
            with torch.no_grad():
                pert.U.normal_(std=1e-3)  # a pending update, as during training
        with torch.no_grad():
            y = layer(x) - layer.bias
            out[f"{mode}_roundtrip_error"] = float((pert.solve(y) - x).abs().max())
        jobs[f"{mode}_forward"] = lambda layer=layer: layer(x)
        jobs[f"{mode}_inverse"] = lambda pert=pert, y=y: pert.solve(y)
    with torch.no_grad():
        times = interleaved_median(jobs, calls=chunk, repeats=repeats)
    out["dense_solve_over_forward"] = times["dense_inverse"] / times["dense_forward"]
    for mode in MODES:
        out[f"{mode}_inverse_over_forward"] = times[f"{mode}_inverse"] / times[f"{mode}_forward"]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options on ``parser``."""
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512, 1024],
                        metavar="N", help="layer sizes n (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=256,
                        help="batch of the training step (default: %(default)s)")
    parser.add_argument("--inverse-batches", type=int, nargs="+", default=[1, 64], metavar="B",
                        help="batches of the inverse-pass timing (default: %(default)s)")
    parser.add_argument("--merge-every", type=int, default=None,
                        help="P⁴Inv merge interval (default: each mode's own, every step for "
                        "the projected default, 10 for the low-memory mode)")
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
    print("\ntraining step ÷ plain nn.Linear step (forward + log-det + backward + Adam); "
          "P4Inv = Invertible() defaults, low-mem = update='factored', rank n/4")
    print(f"{'n':>6} {'batch':>6} {'P4Inv':>8} {'low-mem':>8} {'dense+slogdet':>14}")
    for r in results["step"]:
        print(
            f"{r['n']:>6} {r['batch']:>6} {r['p4inv_over_linear']:>8.2f} "
            f"{r['lowmem_over_linear']:>8.2f} {r['dense_slogdet_over_linear']:>14.2f}"
        )
    print("\ninverse pass ÷ forward pass of the same layer")
    print(f"{'n':>6} {'batch':>6} {'P4Inv solve':>12} {'low-mem solve':>14} {'dense solve':>12}")
    for r in results["inverse"]:
        print(
            f"{r['n']:>6} {r['batch']:>6} {r['p4inv_inverse_over_forward']:>12.2f} "
            f"{r['lowmem_inverse_over_forward']:>14.2f} {r['dense_solve_over_forward']:>12.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps({"meta": meta, **results}, indent=2))
    print(f"\nwrote {args.out}")
    return 0
