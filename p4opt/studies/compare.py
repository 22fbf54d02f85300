"""``p4opt compare``: P⁴ families versus their peers on the built-in tasks."""

from __future__ import annotations

import argparse
import io
import platform
import sys
import textwrap
import time
from pathlib import Path

import torch

from p4opt.studies import baselines, tasks
from p4opt.studies.baselines import Method, MissingDependencyError
from p4opt.studies.progress import Progress
from p4opt.studies.records import (
    INSTABILITY_FACTOR,
    MethodResult,
    Study,
    TaskResult,
    write_json,
)
from p4opt.studies.report import markdown, verdict
from p4opt.studies.tasks.report import format_table, plot_task
from p4opt.studies.tasks.runner import choose_lr, step_costs, summarize, train

__all__ = ["COMMAND", "HELP", "LEGEND", "LR_RULE", "DEFAULT_SET", "add_arguments", "run",
           "compare_task", "select", "EmptySelectionError"]

#: Name of the sub-command.
COMMAND = "compare"
#: One-line help of the sub-command.
HELP = "compare P⁴ families with geoopt, geotorch and torch parametrizations on built-in tasks"

#: Tasks and sizes run when no ``--task`` is given.
DEFAULT_SET: tuple[tuple[str, int], ...] = (("procrustes", 64), ("gaussian", 64), ("rnn", 32))

#: How the learning rate of each method is chosen (printed by ``--help``).
LR_RULE = (
    "Each method runs every learning rate of its grid on every seed. A run succeeds when it "
    "reaches the target and its relative loss never rises above "
    f"{INSTABILITY_FACTOR:g}x the target afterwards. Learning rates rank by the number of "
    "seeds that succeed, then by the median steps to the target, then by the median final "
    "relative loss; the table shows the first."
)

#: What the columns of the printed tables mean (printed before the first table).
LEGEND = """\
legend: lr = learning rate chosen from the method's grid (rule: p4opt compare --help)
        cost = median time of one training step / a plain nn.Linear step, timed side by side
        steps→tgt, time→tgt = optimizer steps, wall seconds until the relative loss first
                   reaches the target (median over seeds); - = target not reached
        ok = seeds whose run reached the target and stayed below 10x it
        final rel = relative loss (L - L*) / scale after the last step (0 = optimum)
        constraint error = orth max|WᵀW - I|; logdet |tracked - float64 slogdet|;
                   inv max|W solve(I) - I|; sym max|W - Wᵀ| (spd), at the end of the run"""


class EmptySelectionError(ValueError):
    """No chosen method applies to a chosen task."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options on ``parser``."""
    names = [m.name for m in baselines.METHODS]
    parser.add_argument("--task", action="append", choices=sorted(tasks.TASKS), metavar="TASK",
                        help="task to run, repeatable: " + ", ".join(sorted(tasks.TASKS))
                        + " (default: procrustes n=64, gaussian n=64, rnn n=32)")
    parser.add_argument("--n", type=int, metavar="N",
                        help="matrix size for every task (default: 64 with --task, else per task)")
    parser.add_argument("--steps", type=int, metavar="S",
                        help="optimizer steps per run; 0 times steps only "
                        "(default: per task, 300-600; at most 30 with --quick)")
    parser.add_argument("--methods", nargs="+", metavar="NAME", choices=names,
                        help=f"methods to run (default: all that apply): {', '.join(names)}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: at most 30 steps, the middle learning rate of each "
                        "grid, 3 timing repeats (default: off)")
    parser.add_argument("--seeds", type=int, default=1, metavar="K",
                        help="seeds per learning rate; tables show medians over seeds "
                        "(default: %(default)s; the documented studies use 3)")
    parser.add_argument("--seed", type=int, default=0,
                        help="first seed of data and start points; seeds are SEED..SEED+K-1 "
                        "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="interleaved timing repeats; the median is reported "
                        "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: %(default)s, stable timings on "
                        "shared machines)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="output folder for results.json and figures (default: %(default)s/)")
    parser.add_argument("--no-plot", action="store_true",
                        help="skip the figures (default: draw them when matplotlib is installed)")
    rule = textwrap.fill(f"learning-rate rule: {LR_RULE}", width=92)
    parser.epilog = f"{LEGEND}\n\n{rule}"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.set_defaults(run=run)


def _grid(method: Method, quick: bool) -> tuple[float, ...]:
    grid = method.lr_grid
    return (grid[len(grid) // 2],) if quick else grid


def _fit(method: Method, runs: list[tasks.Task], steps: int, quick: bool,
         progress: Progress) -> MethodResult:
    """Every learning rate of the grid on every seed; the rule of ``LR_RULE`` picks one."""
    trials = []
    for lr in _grid(method, quick):
        records = []
        for task in runs:
            records.append(train(method, task, lr, steps, seed=task.seed))
            rec = records[-1]
            reached = "-" if rec.steps_to_target is None else str(rec.steps_to_target)
            progress.done(f"{task.name} n={task.n} {method.name} lr={lr:g} seed={task.seed}: "
                          f"steps→tgt {reached}, final rel {rec.final_rel:.1e}")
        trials.append(summarize(lr, records, runs[0].target))
    best = choose_lr(trials)
    worst: dict[str, float] = {}
    for rec in best.runs:
        for key, value in rec.constraint.items():
            worst[key] = max(worst.get(key, 0.0), value)
    return MethodResult(
        method.name, method.description, method.p4, lr=best.lr, lr_grid=list(_grid(method, quick)),
        trials=trials, steps_to_target=best.median_steps_to_target,
        seconds_to_target=best.median_seconds_to_target, final_rel=best.median_final_rel,
        constraint=worst,
    )


def compare_task(
    runs: list[tasks.Task],
    methods: list[Method],
    steps: int,
    *,
    quick: bool = False,
    repeats: int = 7,
    progress: Progress | None = None,
) -> TaskResult:
    """Run ``methods`` on one task, once per seeded instance in ``runs``.

    Step costs are timed on the first instance.
    """
    progress = progress if progress is not None else Progress(0, "", stream=io.StringIO())
    task = runs[0]
    results: list[MethodResult] = []
    for method in methods:
        units = len(_grid(method, quick)) * len(runs) if steps else 0
        reason = method.unavailable()
        if reason is not None:
            results.append(MethodResult(method.name, method.description, method.p4,
                                        status="skipped", reason=reason))
            progress.done(f"{task.name} n={task.n} {method.name}: skipped", units)
            continue
        if steps == 0:
            results.append(MethodResult(method.name, method.description, method.p4))
            continue
        try:
            results.append(_fit(method, runs, steps, quick, progress))
        except (MissingDependencyError, RuntimeError, TypeError, ValueError) as err:
            results.append(MethodResult(method.name, method.description, method.p4,
                                        status="failed", reason=f"failed: {err}"))
    ok = [m for m, r in zip(methods, results, strict=True) if r.status == "ok"]
    costs = step_costs(ok, task, lrs={r.name: r.lr for r in results if r.lr}, repeats=repeats)
    progress.done(f"{task.name} n={task.n}: step costs timed")
    for r in results:
        if r.status == "ok":
            r.step_seconds = costs[r.name]
            r.step_cost_ratio = costs[r.name] / costs["linear"]
    return TaskResult(task.name, task.n, task.family, task.batch, task.description, task.target,
                      steps, [t.seed for t in runs], costs["linear"], results)


def _plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    if args.task:
        return [(name, args.n or 64) for name in args.task]
    return [(name, args.n or n) for name, n in DEFAULT_SET]


def select(args: argparse.Namespace) -> list[tuple[str, int, list[Method]]]:
    """The (task, size, methods) to run; tasks that no chosen method applies to are dropped.

    Raises
    ------
    EmptySelectionError
        When a task named by ``--task`` has no chosen method, or nothing is left.
    """
    wanted = args.methods or [m.name for m in baselines.METHODS]
    plan = []
    for name, n in _plan(args):
        family = tasks.TASKS[name].family
        chosen = [m for m in baselines.methods(family) if m.name in wanted]
        if not chosen and (args.task or args.methods is None):
            applicable = ", ".join(m.name for m in baselines.methods(family))
            raise EmptySelectionError(
                f"no chosen method applies to task {name!r} ({family} weights); "
                f"got --methods {' '.join(wanted)}; methods for it: {applicable}")
        if chosen:
            plan.append((name, n, chosen))
    if not plan:
        raise EmptySelectionError(f"no chosen method applies to any task: {' '.join(wanted)}")
    return plan


def run(args: argparse.Namespace) -> int:
    """Run the comparison described by ``args``; prints tables, writes JSON and figures."""
    for option in ("steps", "n"):
        value = getattr(args, option)
        if value is not None and value < (0 if option == "steps" else 2):
            return _fail(f"--{option} must be >= {0 if option == 'steps' else 2}, got {value}")
    if args.seeds < 1 or args.repeats < 1:
        return _fail(f"--seeds and --repeats must be >= 1, got {args.seeds} and {args.repeats}")
    try:
        plan = select(args)
    except EmptySelectionError as err:
        return _fail(str(err))
    torch.set_num_threads(max(1, args.threads))
    seeds = [args.seed + k for k in range(args.seeds)]
    steps_of = {}
    for name, _, _ in plan:
        default = tasks.TASKS[name].default_steps
        steps = default if args.steps is None else args.steps
        steps_of[name] = min(steps, 30) if args.quick else steps
    total = sum(len(seeds) * sum(len(_grid(m, args.quick)) for m in chosen) * bool(steps_of[t]) + 1
                for t, _, chosen in plan)
    args.out.mkdir(parents=True, exist_ok=True)
    repeats = 3 if args.quick else args.repeats
    started = time.perf_counter()
    results: list[TaskResult] = []
    told: set[str] = set()
    print(LEGEND + "\n", flush=True)
    with Progress(total, "p4opt compare") as progress:
        for name, n, chosen in plan:
            runs = [tasks.make(name, n, seed=s) for s in seeds]
            result = compare_task(runs, chosen, steps_of[name], quick=args.quick,
                                  repeats=repeats, progress=progress)
            results.append(result)
            progress.write(_task_text(result, told))
    elapsed = time.perf_counter() - started
    figures = [] if args.no_plot else _plot_all(results, args.out)
    study = Study(
        config={"tasks": [[t, n] for t, n, _ in plan], "seed": args.seed, "seeds": args.seeds,
                "quick": args.quick, "threads": torch.get_num_threads(), "repeats": repeats,
                "seconds": elapsed, "lr_rule": LR_RULE},
        environment=_environment(), figures=figures, tasks=results)
    write_json(study, args.out / "results.json")
    (args.out / "summary.md").write_text(markdown(study, command=_command(args)))
    if args.quick:
        print("note: --quick is a smoke run (at most 30 steps, one learning rate): it checks "
              "that everything runs; drop --quick for the comparison itself.")
    print(f"compared in {elapsed:.1f} s; wrote {args.out / 'results.json'}, summary.md"
          + (f" and {len(figures)} figure(s): {', '.join(figures)}" if figures else ""))
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces ``args`` (for the generated summary)."""
    parts = ["p4opt compare"]
    parts += [f"--task {t}" for t in args.task or []]
    for option in ("n", "steps", "seeds", "seed", "repeats", "threads"):
        value = getattr(args, option)
        default = {"seeds": 1, "seed": 0, "repeats": 7, "threads": 1}.get(option)
        if value is not None and value != default:
            parts.append(f"--{option} {value}")
    if args.methods:
        parts.append("--methods " + " ".join(args.methods))
    parts += ["--quick"] if args.quick else []
    return " ".join(parts)


def _task_text(result: TaskResult, told: set[str]) -> str:
    """The table of one task, the skip reasons not printed before, and the verdict line."""
    lines = [format_table(result)]
    for m in result.methods:
        if m.status != "ok" and m.reason not in told:
            told.add(m.reason)
            lines.append(f"  note: {m.reason}")
    if result.steps:
        lines.append("  → " + verdict(result))
    return "\n".join(lines) + "\n"


def _fail(message: str) -> int:
    print(f"p4opt compare: error: {message}", file=sys.stderr)
    return 2


def _plot_all(results: list[TaskResult], out: Path) -> list[str]:
    names = []
    for result in results:
        if result.steps == 0:
            continue
        path = out / f"{result.task}_n{result.n}.png"
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
