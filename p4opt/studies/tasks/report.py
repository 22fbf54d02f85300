r"""The printed table and the figure of one task's comparison (a :class:`TaskResult`)."""

from __future__ import annotations

import math
from pathlib import Path

from p4opt.studies.records import MethodResult, TaskResult, write_json
from p4opt.studies.types import MissingDependencyError

__all__ = ["format_table", "write_json", "plot_task", "CLIP_FACTOR", "TIME_CUT"]

#: Loss curves are clipped at ``target / CLIP_FACTOR``: below it every method has converged.
CLIP_FACTOR = 10.0
#: The wall-time axis stops at this many times the latest time-to-target of the methods
#: that reached the target (slower curves are cut, and the figure says so).
TIME_CUT = 3.0

_SHORT = {"orthogonality": "orth", "logdet_error": "logdet", "inverse_error": "inv",
          "symmetry": "sym"}


def _num(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "diverged" if value > 0 else "-inf"
    return format(value, fmt)


def _constraint(figures: dict[str, float]) -> str:
    return " ".join(f"{_SHORT.get(k, k)} {v:.1e}" for k, v in figures.items())


def _row(m: MethodResult, seeds: int) -> tuple[str, ...]:
    if m.status != "ok":
        return (m.name, "-", "-", "-", "-", "-", "-", f"{m.status} (see note)")
    chosen = m.chosen()
    ok = f"{chosen.succeeded}/{seeds}" if chosen is not None else "-"
    seconds = _num(m.seconds_to_target, ".2f") + ("s" if m.seconds_to_target is not None else "")
    return (
        m.name,
        _num(m.lr, ".0e"),
        _num(m.step_cost_ratio, ".2f") + "x",
        _num(m.steps_to_target, ".0f"),
        seconds,
        ok,
        _num(m.final_rel, ".1e") if chosen is not None else "-",
        _constraint(m.constraint),
    )


def format_table(result: TaskResult) -> str:
    """The printed table of one task: cost ratio, steps and time to target, final loss, errors."""
    seeds = len(result.seeds)
    head = (
        f"{result.task} n={result.n} batch={result.batch}: {result.description}\n"
        f"target relative loss {result.target:.0e}, {result.steps} steps, {seeds} seed(s); "
        f"cost = step time / plain nn.Linear step "
        f"({1e3 * result.reference_step_seconds:.3f} ms)"
    )
    columns = ("method", "lr", "cost", "steps→tgt", "time→tgt", "ok", "final rel",
               "constraint error")
    rows = [_row(m, seeds) for m in result.methods]
    widths = [max(len(str(r[i])) for r in (columns, *rows)) for i in range(len(columns) - 1)]
    lines = [head]
    for row in (columns, *rows):
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join(cells) + "  " + str(row[-1]))
    lines.insert(2, "-" * max(len(line) for line in lines[2:]))
    return "\n".join(lines)


_STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "x"),
           ("-.", "P"), (":", "*")]


def plot_task(result: TaskResult, path: Path) -> None:
    """Relative loss against step and against wall time, one line per method (PNG).

    Curves are clipped at ``target / CLIP_FACTOR`` (the floor is drawn); the
    wall-time axis stops at ``TIME_CUT`` times the latest time-to-target among
    the methods that reached it; every method has its own line style and
    marker, P⁴ methods drawn thicker.

    Raises
    ------
    MissingDependencyError
        When matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingDependencyError(
            "matplotlib is needed for the figures of p4opt compare: pip install 'p4opt[plot]'"
        ) from err
    floor = result.target / CLIP_FACTOR
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(14, 4.6))
    reached = [m.seconds_to_target for m in result.ok() if m.seconds_to_target is not None]
    cut = TIME_CUT * max(reached) if reached else None
    cut_names = []
    for i, m in enumerate(result.ok()):
        chosen = m.chosen()
        if chosen is None or not chosen.runs:
            continue
        run = chosen.runs[0]
        rel = [max(v, floor) if math.isfinite(v) else math.nan for v in run.relative]
        line, marker = _STYLES[i % len(_STYLES)]
        every = max(1, len(rel) // 8)
        style = {"ls": line, "marker": marker, "markevery": (i % every, every), "ms": 4,
                 "lw": 2.0 if m.p4 else 1.2, "label": f"{m.name} (lr {m.lr:.0e})"}
        by_step.semilogy(range(len(rel)), rel, **style)
        by_time.semilogy(run.seconds, rel, **style)
        if cut is not None and run.seconds and run.seconds[-1] > cut and (
                m.seconds_to_target is None or m.seconds_to_target > cut / TIME_CUT):
            cut_names.append(m.name)
    for ax, xlabel in ((by_step, "optimizer step"), (by_time, "wall time (s)")):
        ax.axhline(result.target, color="grey", lw=0.8, ls=":")
        ax.set_ylim(bottom=floor / 2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative loss (L - L*) / scale")
        ax.grid(alpha=0.3)
    by_step.annotate(f"target {result.target:.0e}; curves clipped at {floor:.0e}",
                     xy=(0.01, 0.02), xycoords="axes fraction", fontsize=7, color="grey")
    if cut is not None:
        by_time.set_xlim(0, cut)
        if cut_names:
            by_time.annotate(f"axis cut at {TIME_CUT:g}x the slowest time to target; "
                             f"runs longer: {', '.join(cut_names)}", xy=(0.01, 0.02),
                             xycoords="axes fraction", fontsize=7, color="grey")
    by_time.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    seeds = len(result.seeds)
    fig.suptitle(f"{result.task} n={result.n}: {result.description} "
                 f"(first of {seeds} seed(s) at each method's chosen lr)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
