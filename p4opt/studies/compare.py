"""``p4opt compare``: P⁴ families versus their peers on the built-in tasks."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from p4opt.studies import baselines, tasks
from p4opt.studies.baselines import Method, MissingDependencyError
from p4opt.studies.tasks.report import format_table, plot_task, write_json
from p4opt.studies.tasks.runner import Run, pick_best, step_costs, train

__all__ = ["COMMAND", "HELP", "add_arguments", "run", "DEFAULT_SET", "compare_task"]

COMMAND = "compare"
HELP = "compare P⁴ families with geoopt, geotorch and torch parametrizations on built-in tasks"

#: Tasks and sizes run when no ``--task`` is given.
DEFAULT_SET: tuple[tuple[str, int], ...] = (("procrustes", 64), ("gaussian", 64), ("rnn", 32))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options on ``parser``."""
    names = [m.name for m in baselines.METHODS]
    parser.add_argument("--task", action="append", choices=sorted(tasks.TASKS),
                        help="task to run (repeatable); default: procrustes n=64, gaussian n=64, "
                        "rnn n=32")
    parser.add_argument("--n", type=int, help="matrix size for every task (default: per task)")
    parser.add_argument("--steps", type=int,
                        help="optimizer steps per run (default: per task); 0 times steps only")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="output folder for results.json and figures (default: results/)")
    parser.add_argument("--methods", nargs="+", metavar="NAME", choices=names,
                        help=f"methods to run (default: all that apply): {', '.join(names)}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: at most 30 steps, one learning rate, 3 timing repeats")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and start points")
    parser.add_argument("--repeats", type=int, default=7,
                        help="interleaved timing repeats (median is reported; default 7)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: stable timings on shared machines)")
    parser.add_argument("--no-plot", action="store_true", help="skip the figures")
    parser.set_defaults(run=run)


def _units(method: Method, quick: bool) -> int:
    return len(_grid(method, quick))


def _grid(method: Method, quick: bool) -> tuple[float, ...]:
    grid = method.lr_grid
    return (grid[len(grid) // 2],) if quick else grid


def _skipped(method: Method, status: str, reason: str) -> dict[str, Any]:
    return {"name": method.name, "description": method.description, "p4": method.p4,
            "status": status, "reason": reason}


def _fit(method: Method, task: tasks.Task, steps: int, quick: bool, bar: tqdm) -> dict[str, Any]:
    """Full-length runs over the learning-rate grid; the best one is reported."""
    grid = _grid(method, quick)
    trials: list[Run] = []
    for lr in grid:
        trials.append(train(method, task, lr, steps))
        bar.update(1)
    final = pick_best(trials, task.target)
    out = final.to_dict()
    return {
        "name": method.name, "description": method.description, "p4": method.p4, "status": "ok",
        "reason": "", "lr": final.lr, "lr_grid": list(grid),
        "lr_trials": [{"lr": t.lr, "steps_to_target": t.steps_to_target,
                       "final_relative_loss": t.final} for t in trials],
        "steps_to_target": final.steps_to_target, "seconds_to_target": final.seconds_to_target,
        "final_relative_loss": final.final, "constraint": final.constraint,
        "history": {"relative": out["relative"], "seconds": out["seconds"]},
    }


def compare_task(
    task: tasks.Task,
    methods: list[Method],
    steps: int,
    *,
    quick: bool = False,
    repeats: int = 7,
    bar: tqdm | None = None,
) -> dict[str, Any]:
    """Run every method of ``task``'s family on ``task``; returns the task's result dict."""
    bar = bar if bar is not None else tqdm(disable=True)
    results: list[dict[str, Any]] = []
    for method in methods:
        reason = method.unavailable()
        if reason is not None:
            tqdm.write(reason, file=sys.stderr)
            results.append(_skipped(method, "skipped", reason))
            bar.update(_units(method, quick))
            continue
        bar.set_postfix_str(f"{task.name} n={task.n} {method.name}")
        if steps == 0:
            results.append({**_skipped(method, "ok", ""), "lr": None,
                            "steps_to_target": None, "seconds_to_target": None,
                            "final_relative_loss": None, "constraint": {},
                            "history": {"relative": [], "seconds": []}})
            bar.update(_units(method, quick))
            continue
        try:
            results.append(_fit(method, task, steps, quick, bar))
        except (MissingDependencyError, RuntimeError, ValueError) as err:
            tqdm.write(f"method {method.name!r} failed on {task.name}: {err}", file=sys.stderr)
            results.append(_skipped(method, "failed", f"failed: {err}"))
    ok = [m for m, r in zip(methods, results, strict=True) if r["status"] == "ok"]
    costs = step_costs(ok, task, lrs={r["name"]: r["lr"] for r in results if r.get("lr")},
                       repeats=repeats)
    bar.update(1)
    for r in results:
        if r["status"] == "ok":
            r["step_seconds"] = costs[r["name"]]
            r["step_cost_ratio"] = costs[r["name"]] / costs["linear"]
    return {"task": task.name, "n": task.n, "family": task.family, "batch": task.batch,
            "description": task.description, "target": task.target, "steps": steps,
            "seed": task.seed, "reference_step_seconds": costs["linear"], "methods": results}


def _plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    if args.task:
        return [(name, args.n or 64) for name in args.task]
    return [(name, args.n or n) for name, n in DEFAULT_SET]


def run(args: argparse.Namespace) -> int:
    """Run the comparison described by ``args``; prints tables, writes JSON and figures."""
    if args.steps is not None and args.steps < 0:
        raise SystemExit("p4opt compare: --steps must be >= 0")
    torch.set_num_threads(max(1, args.threads))
    plan = [tasks.make(name, n, seed=args.seed) for name, n in _plan(args)]
    wanted = set(args.methods or [m.name for m in baselines.METHODS])
    chosen = {t.name: [m for m in baselines.methods(t.family) if m.name in wanted] for t in plan}
    total = sum(sum(_units(m, args.quick) for m in chosen[t.name]) + 1 for t in plan)
    args.out.mkdir(parents=True, exist_ok=True)
    repeats = 3 if args.quick else args.repeats
    started = time.perf_counter()
    results = []
    with tqdm(total=total, desc="p4opt compare", unit="run", leave=False, disable=None) as bar:
        for task in plan:
            steps = task.default_steps if args.steps is None else args.steps
            steps = min(steps, 30) if args.quick else steps
            result = compare_task(task, chosen[task.name], steps, quick=args.quick,
                                  repeats=repeats, bar=bar)
            results.append(result)
            tqdm.write(format_table(result) + "\n")
    elapsed = time.perf_counter() - started
    figures = [] if args.no_plot else _plot_all(results, args.out)
    payload = {
        "config": {"tasks": [[t.name, t.n] for t in plan], "seed": args.seed,
                   "quick": args.quick, "threads": torch.get_num_threads(),
                   "repeats": repeats, "seconds": elapsed},
        "environment": _environment(),
        "figures": figures,
        "tasks": results,
    }
    write_json(payload, args.out / "results.json")
    print(f"compared in {elapsed:.1f} s; wrote {args.out / 'results.json'}"
          + (f" and {len(figures)} figure(s)" if figures else ""))
    return 0


def _plot_all(results: list[dict[str, Any]], out: Path) -> list[str]:
    names = []
    for result in results:
        if result["steps"] == 0:
            continue
        path = out / f"{result['task']}_n{result['n']}.png"
        try:
            plot_task(result, path)
        except MissingDependencyError as err:
            print(f"p4opt compare: no figures: {err}", file=sys.stderr)
            return names
        names.append(path.name)
    return names


def _environment() -> dict[str, str]:
    import p4opt

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "p4opt": p4opt.__version__, "machine": platform.machine()}
    for module in ("geoopt", "geotorch"):
        try:
            env[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            env[module] = "missing"
    return env
