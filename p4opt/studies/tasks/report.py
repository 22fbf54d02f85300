r"""Tables, JSON and figures of a comparison (one result dict per task)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from p4opt.studies.baselines import MissingDependencyError

__all__ = ["format_table", "write_json", "plot_task"]

_SHORT = {"orthogonality": "orth", "logdet_error": "logdet", "inverse_error": "inv"}


def _num(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "diverged" if value > 0 else "-inf"
    return format(value, fmt)


def _constraint(figures: dict[str, float]) -> str:
    return " ".join(f"{_SHORT.get(k, k)} {v:.1e}" for k, v in figures.items())


def format_table(result: dict[str, Any]) -> str:
    """The printed table of one task: cost ratio, steps and time to target, final loss, errors."""
    head = (
        f"{result['task']} n={result['n']} batch={result['batch']}: {result['description']}\n"
        f"target relative loss {result['target']:.0e}, {result['steps']} steps; "
        f"cost = step time / plain nn.Linear step "
        f"({1e3 * result['reference_step_seconds']:.3f} ms)"
    )
    columns = ("method", "lr", "cost", "steps→tgt", "time→tgt", "final rel", "constraint error")
    rows = []
    for m in result["methods"]:
        if m["status"] != "ok":
            rows.append((m["name"], "-", "-", "-", "-", "-", m["reason"]))
            continue
        rows.append(
            (
                m["name"],
                _num(m["lr"], ".0e"),
                _num(m["step_cost_ratio"], ".2f") + "x",
                _num(m["steps_to_target"], "d"),
                _num(m["seconds_to_target"], ".2f") + ("s" if m["seconds_to_target"] else ""),
                _num(m["final_relative_loss"], ".1e"),
                _constraint(m["constraint"]),
            )
        )
    widths = [max(len(str(r[i])) for r in (columns, *rows)) for i in range(len(columns) - 1)]
    lines = [head]
    for row in (columns, *rows):
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join(cells) + "  " + str(row[-1]))
    lines.insert(2, "-" * len(lines[1]))
    return "\n".join(lines)


def write_json(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` as JSON (non-finite floats become ``null``)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(payload), indent=1))


def plot_task(result: dict[str, Any], path: Path) -> None:
    """Relative loss against step and against wall time, one line per method (PNG).

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
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in result["methods"]:
        if m["status"] != "ok":
            continue
        rel = [max(v, 1e-16) if v is not None and math.isfinite(v) else math.nan
               for v in m["history"]["relative"]]
        style = "-" if m["p4"] else "--"
        label = f"{m['name']} (lr {m['lr']:.0e})"
        by_step.semilogy(range(len(rel)), rel, style, label=label)
        by_time.semilogy(m["history"]["seconds"], rel, style, label=label)
    for ax, xlabel in ((by_step, "step"), (by_time, "wall time (s)")):
        ax.axhline(result["target"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative loss")
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7, loc="best")
    fig.suptitle(f"{result['task']} n={result['n']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
