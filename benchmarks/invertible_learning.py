"""How fast invertible weights learn: projected P⁴Inv against dense, LU and the factored modes.

Gaussian maximum likelihood from W = I (``p4opt.tasks.GaussianML``, relative
target 1e-4), best learning rate per method from one grid, several seeds, one
thread. Steps to target are counted per run; seconds to target are steps times
the median cost of one step (merges amortized), measured for all methods side
by side in one interleaved loop, and reported as ratios to dense ("loop time":
the median wall time of the training runs themselves, measured one after another).

Method names: ``dense`` (slogdet), ``lu`` (LU parametrization), ``p4inv-r1`` and
``p4inv-half`` (``p4opt.Invertible`` at rank 1 and n/2, library defaults),
``lowmem-n4`` (``p4opt.Invertible`` rank n/4, gradient restarts, kept on
reject), and ``proj-k<K>-p<P>[-cold|-mix][-m<M>][-b<B>][-c<C>]`` (projected
mode, see ``projected_invertible.py``): rank ``K`` as ``n8``, ``n4``, ``n2``,
``n`` (n/8 ... n) or a number (capped at n), ``P`` power iterations, ``-cold``
for a fresh random block at every merge (``-mix``: half fresh, half the last
basis), ``-m<M>`` to merge every M steps, ``-b<B>`` for update log|det| bounds
(-B, B) (default (-2, 2); ``-binf`` for none; ``-b<B>k`` for (-Bk, Bk)),
``-c<C>`` for a largest condition number C of the capacitance (default none), ``-ef``
for error feedback (the left-out part is added to the next pending update).

Examples::

    python benchmarks/invertible_learning.py --sizes 64 256 --seeds 3
    python benchmarks/invertible_learning.py --readme --accuracy --sizes
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from projected_invertible import ProjectedInvertible, merge_scaled_, partial_scale  # noqa: E402

from p4opt import linalg  # noqa: E402
from p4opt.baselines.dense import LU, Dense  # noqa: E402
from p4opt.baselines.p4 import P4Weight  # noqa: E402
from p4opt.tasks.gaussian import GaussianML  # noqa: E402

DEFAULT_METHODS = (
    "dense,lu,p4inv-r1,p4inv-half,lowmem-n4,"
    "proj-kn8-p1,proj-kn4-p1,proj-kn2-p1,proj-kn-p0,proj-kn4-p0,proj-kn4-p2,proj-kn4-p1-cold,"
    "proj-k64-p1"
)


def _rank(token: str, n: int) -> int:
    fractions = {"n": 1, "n2": 2, "n4": 4, "n8": 8}
    return max(1, n // fractions[token]) if token in fractions else min(int(token), n)


def build(name: str, init: torch.Tensor, seed: int) -> Any:
    """A holder with ``weight()``, ``logabsdet()``, ``optimizer(lr)`` (and maybe ``after_step``)."""
    n = init.shape[-1]
    if name == "dense":
        return Dense(init, seed)
    if name == "lu":
        return LU(init, seed)
    if name == "p4inv-r1":
        return P4Weight(init, seed, "Invertible", rank=1)
    if name == "p4inv-half":
        return P4Weight(init, seed, "Invertible", rank=max(1, n // 2))
    if name == "lowmem-n4":
        return P4Weight(init, seed, "Invertible", rank=max(1, n // 4), restart="gradient",
                        on_reject="keep")
    if name.startswith("proj-"):
        parts = name.split("-")[1:]
        options: dict[str, Any] = {"rank": _rank(parts[0][1:], n), "seed": seed}
        for part in parts[1:]:
            if part == "ef":
                options["feedback"] = True
            elif part in ("cold", "mix"):
                options["warm"] = False if part == "cold" else "mix"
            elif part.startswith("p"):
                options["power_iters"] = int(part[1:])
            elif part.startswith("m"):
                options["merge_every"] = int(part[1:])
            elif part.startswith("c"):
                options["max_condition"] = float(part[1:])
            elif part.startswith("b"):
                scale = options["rank"] if part.endswith("k") else 1
                bound = float(part[1:].rstrip("k")) * scale
                options["bounds"] = (-bound, bound)
        return ProjectedInvertible(init, **options)
    raise ValueError(f"unknown method {name!r}")


def step(task: GaussianML, holder: Any, optimizer: torch.optim.Optimizer) -> float:
    """One training step; returns the relative loss before it."""
    loss = task.objective(holder.weight(), holder.logabsdet())
    value = task.relative(loss.item())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if hasattr(holder, "after_step"):
        holder.after_step()
    return value


def train(name: str, task: GaussianML, lr: float, steps: int, seed: int) -> dict[str, Any]:
    """Train until the target or ``steps``; steps to target (None if missed) and the final loss."""
    torch.manual_seed(seed)
    holder = build(name, task.initial(), seed)
    optimizer = holder.optimizer(lr)
    reached, value = None, math.inf
    start = time.perf_counter()
    for i in range(steps + 1):
        with torch.no_grad():
            value = task.relative(task.objective(holder.weight(), holder.logabsdet()).item())
        if value <= task.target or not math.isfinite(value) or i == steps:
            reached = i if value <= task.target else None
            break
        step(task, holder, optimizer)
    return {"method": name, "lr": lr, "seed": seed, "steps": reached, "final": value,
            "seconds": time.perf_counter() - start, "partial": getattr(holder, "partial", None)}


def step_cost(names: list[str], task: GaussianML, lrs: dict[str, float], repeats: int,
              window: int) -> dict[str, float]:
    """Median seconds per step of each method, timed in interleaved windows (merges included)."""
    states = []
    for name in names:
        holder = build(name, task.initial(), 0)
        optimizer = holder.optimizer(lrs[name])
        for _ in range(2):
            step(task, holder, optimizer)
        states.append((name, holder, optimizer))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(states)
        for name, holder, optimizer in states[shift:] + states[:shift]:
            start = time.perf_counter()
            for _ in range(window):
                step(task, holder, optimizer)
            samples[name].append((time.perf_counter() - start) / window)
    return {name: statistics.median(values) for name, values in samples.items()}


def study(n: int, names: list[str], lrs: list[float], seeds: int, steps: int, repeats: int,
          window: int, fixed: dict[str, float] | None = None, first_seed: int = 0
          ) -> dict[str, Any]:
    """Grid over lr and seeds per method at size ``n``; best lr by median steps; step costs.

    ``fixed`` maps method names to a single learning rate used instead of the grid.
    """
    fixed = fixed or {}
    runs = []
    for seed in range(first_seed, first_seed + seeds):
        task = GaussianML(n, seed)
        for name in names:
            for lr in [fixed[name]] if name in fixed else lrs:
                runs.append(train(name, task, lr, steps, seed))
                print(json.dumps({"n": n, **runs[-1]}), flush=True)
    best: dict[str, dict[str, Any]] = {}
    for name in names:
        per_lr = []
        for lr in [fixed[name]] if name in fixed else lrs:
            counts = [r["steps"] for r in runs if r["method"] == name and r["lr"] == lr]
            finals = [r["final"] for r in runs if r["method"] == name and r["lr"] == lr]
            hits = [c if c is not None else math.inf for c in counts]
            per_lr.append((statistics.median(hits), statistics.median(finals), lr, counts))
        med, final, lr, counts = min(per_lr)
        seconds = [r["seconds"] for r in runs if r["method"] == name and r["lr"] == lr]
        best[name] = {"lr": lr, "median_steps": med, "median_final": final, "steps": counts,
                      "median_loop_seconds": statistics.median(seconds)}
    costs = step_cost(names, GaussianML(n, 0), {k: v["lr"] for k, v in best.items()},
                      repeats, window)
    for name in names:
        best[name]["step_cost_ratio"] = costs[name] / costs["dense"]
        best[name]["time_ratio"] = (best[name]["median_steps"] * costs[name]
                                    / (best["dense"]["median_steps"] * costs["dense"]))
        best[name]["loop_time_ratio"] = (best[name]["median_loop_seconds"]
                                         / best["dense"]["median_loop_seconds"])
    return {"n": n, "runs": runs, "best": best}


def readme_example(names: list[str], lrs: list[float], steps: int = 100) -> dict[str, Any]:
    """The README loop: fit ``(lin(x) - 2x)^2`` mean - 1e-3 log|det|, n = 256, 100 Adam steps."""
    out: dict[str, Any] = {}
    for name in names:
        for lr in lrs:
            torch.manual_seed(0)
            lin = torch.nn.Linear(256, 256)
            x = torch.randn(64, 256)
            holder = build(name, lin.weight.detach().clone(), 0)
            bias = lin.bias.detach().clone().requires_grad_()
            optimizer = holder.optimizer(lr)
            optimizer.add_param_group({"params": [bias]})
            for _ in range(steps + 1):
                fit = (x @ holder.weight().mT + bias - 2 * x).square().mean()
                if _ == steps:
                    break
                (fit - 1e-3 * holder.logabsdet()).backward()
                optimizer.step()
                optimizer.zero_grad()
                if hasattr(holder, "after_step"):
                    holder.after_step()
            out.setdefault(name, {})[lr] = float(fit.detach())
    return {name: {"best_lr": min(v, key=v.get), "fit": min(v.values()), "by_lr": v}
            for name, v in out.items()}


def accuracy(shape: tuple[int, ...], rank: int, merges: int, seed: int = 0) -> dict[str, float]:
    """Bookkeeping errors after ``merges`` partial merges of random rank-k updates.

    One Newton-Schulz step on the inverse every 50 merges, as in the projected mode.
    """
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    a = torch.eye(n, dtype=torch.float64).expand(shape).clone()
    inv, (sign, lad) = a.clone(), torch.linalg.slogdet(a)
    for i in range(1, merges + 1):
        u = torch.randn(*shape[:-1], rank, generator=g, dtype=torch.float64) * 0.3 / n**0.5
        v = torch.randn(*shape[:-1], rank, generator=g, dtype=torch.float64)
        u = u - 0.3 * (a @ v) / (v.square().sum(-2, keepdim=True) + 1)  # pull towards I
        t, figures = partial_scale(inv, u, v, (-0.5, 0.5), 1e3)
        merge_scaled_(a, inv, sign, lad, u, v, t, figures)
        if i % 50 == 0:
            inv.copy_(linalg.newton_schulz_step(a, inv))
    eye = torch.eye(n, dtype=torch.float64)
    return {"inverse_error": float((a @ inv - eye).abs().max()),
            "logdet_error": float((lad - torch.linalg.slogdet(a)[1]).abs().max()),
            "cond_max": float(torch.linalg.cond(a).max())}


def stack_equivalence(layers: int = 200, steps: int = 1000, lr: float = 1e-2) -> dict[str, float]:
    """Projected mode at k = n = 2 on a stack of 2x2 weights against dense Adam (float64).

    Each layer fits its own Gaussian (``0.5 mean |W x|^2 - log|det W|`` on 64 samples).
    Returns the largest weight difference after ``steps`` and the bookkeeping errors.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layers, 64, 2, generator=g, dtype=torch.float64)
    x = x @ (torch.randn(layers, 2, 2, generator=g, dtype=torch.float64) + 2 * torch.eye(2))
    init = torch.eye(2, dtype=torch.float64).repeat(layers, 1, 1)
    dense = init.clone().requires_grad_()
    dense_opt = torch.optim.Adam([dense], lr=lr)
    proj = ProjectedInvertible(init, rank=2, bounds=(-math.inf, math.inf))
    proj_opt = proj.optimizer(lr)
    for _ in range(steps):
        for w, lad, opt in ((dense, torch.linalg.slogdet(dense)[1], dense_opt),
                            (proj.weight(), proj.logabsdet(), proj_opt)):
            loss = (0.5 * (x @ w.mT).square().sum(-1).mean(-1) - lad).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
        proj.after_step()
    w = proj.precise
    eye = torch.eye(2, dtype=torch.float64)
    return {"max_weight_difference": float((w - dense.detach()).abs().max()),
            "max_weight": float(w.abs().max()),
            "inverse_error": float((w @ proj.inv - eye).abs().max()),
            "logdet_error": float((proj.logabsdet_base - torch.linalg.slogdet(w)[1]).abs().max())}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 256])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated names")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--fixed-lr", default="", help="NAME=LR,... : one lr instead of the grid")
    parser.add_argument("--steps", type=int, default=400, help="step cap per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per method")
    parser.add_argument("--window", type=int, default=10, help="steps per timed window")
    parser.add_argument("--readme", action="store_true", help="run the README example")
    parser.add_argument("--readme-methods", default="dense,p4inv-r1,proj-k64-p1,proj-k32-p1")
    parser.add_argument("--accuracy", type=int, default=0, help="merges for the accuracy check")
    parser.add_argument("--out", type=Path, default=None, help="write all figures as JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    names = args.methods.split(",")
    if "dense" not in names:
        names.insert(0, "dense")
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "sizes": []}
    for n in args.sizes:
        fixed = {k: float(v) for k, v in (p.split("=") for p in args.fixed_lr.split(",") if p)}
        res = study(n, names, args.lrs, args.seeds, args.steps, args.repeats, args.window, fixed,
                    args.first_seed)
        result["sizes"].append(res)
        print(f"\nn = {n}: method | lr | median steps | steps/dense | step cost/dense | "
              "time/dense | loop time/dense")
        dense = res["best"]["dense"]["median_steps"]
        for name, b in res["best"].items():
            ratios = (b["median_steps"] / dense, b["step_cost_ratio"], b["time_ratio"],
                      b["loop_time_ratio"])
            print(f"{name} | {b['lr']:g} | {b['median_steps']} | "
                  + " | ".join(f"{r:.2f}" for r in ratios), flush=True)
    if args.readme:
        result["readme"] = readme_example(args.readme_methods.split(","), args.lrs + [1e-3])
        print(json.dumps(result["readme"], indent=1), flush=True)
    if args.accuracy:
        result["accuracy"] = {
            "stack 200x2x2 k=2": accuracy((200, 2, 2), 2, args.accuracy),
            "n=256 k=64": accuracy((256, 256), 64, args.accuracy),
        }
        result["stack_equivalence"] = stack_equivalence()
        print(json.dumps({k: result[k] for k in ("accuracy", "stack_equivalence")}, indent=1),
              flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
