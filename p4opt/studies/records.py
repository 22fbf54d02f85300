r"""Typed results of a comparison: one record per run, per method and per task.

Every module that writes or reads results uses these dataclasses; JSON is
``dataclasses.asdict`` (non-finite floats become ``null``) and ``from_dict``
reads it back.

Examples
--------
>>> run = RunRecord("gaussian", 8, "dense", 0.03, 0, steps=2, steps_to_target=2,
...                 seconds_to_target=0.01, final_rel=5e-5, max_rel_after_target=5e-5,
...                 relative=[1.0, 0.1, 5e-5], seconds=[0.0, 0.005, 0.01])
>>> RunRecord.from_dict(to_json_dict(run)) == run
True
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "INSTABILITY_FACTOR",
    "RunRecord",
    "LrSummary",
    "MethodResult",
    "TaskResult",
    "Study",
    "to_json_dict",
    "write_json",
    "read_json",
]

#: A run is unstable when its relative loss, after first reaching the target, rises above
#: this factor times the target.
INSTABILITY_FACTOR = 10.0

Status = Literal["ok", "skipped", "failed"]


def _inf(value: float | None) -> float:
    return math.inf if value is None else float(value)


@dataclass
class RunRecord:
    """One training run: a method at one learning rate and one seed on one task.

    ``relative[i]`` is the relative loss before step ``i`` (``relative[0]`` is
    the start) and ``seconds[i]`` the wall time of training until then.
    ``final_rel`` is ``inf`` when the run diverged; ``max_rel_after_target``
    is the largest relative loss from the first step at the target on
    (``None`` when the target was not reached).
    """

    task: str
    n: int
    method: str
    lr: float
    seed: int
    steps: int = 0
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    final_rel: float = math.inf
    max_rel_after_target: float | None = None
    constraint: dict[str, float] = field(default_factory=dict)
    relative: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def reached(self) -> bool:
        """Whether the run reached the target at some step."""
        return self.steps_to_target is not None

    def unstable(self, target: float) -> bool:
        """Whether it diverged, or rose above ``INSTABILITY_FACTOR * target`` after reaching it."""
        if not math.isfinite(self.final_rel):
            return True
        after = self.max_rel_after_target
        return after is not None and not after <= INSTABILITY_FACTOR * target

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        data = dict(data)
        data["final_rel"] = _inf(data.get("final_rel"))
        if data.get("max_rel_after_target") is None and data.get("steps_to_target") is not None:
            data["max_rel_after_target"] = math.inf
        data["relative"] = [_inf(v) for v in data.get("relative", [])]
        return cls(**data)


@dataclass
class LrSummary:
    """The runs of one learning rate over the seeds, and the figures the lr rule ranks by."""

    lr: float
    runs: list[RunRecord]
    succeeded: int = 0
    unstable: int = 0
    median_steps_to_target: float | None = None
    median_seconds_to_target: float | None = None
    median_final_rel: float = math.inf

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LrSummary:
        data = dict(data)
        data["runs"] = [RunRecord.from_dict(r) for r in data["runs"]]
        data["median_final_rel"] = _inf(data.get("median_final_rel"))
        return cls(**data)


@dataclass
class MethodResult:
    """One method on one task: the chosen learning rate's figures and the grid behind them.

    ``steps_to_target``, ``seconds_to_target`` and ``final_rel`` are medians over
    the seeds at the chosen ``lr`` (``None`` / ``inf`` when the median run did
    not reach the target / diverged); ``constraint`` holds the worst error over
    those seeds; ``step_cost_ratio`` is the median step time ÷ the reference
    ``nn.Linear`` step, timed side by side.
    """

    name: str
    description: str
    p4: bool
    status: Status = "ok"
    reason: str = ""
    lr: float | None = None
    lr_grid: list[float] = field(default_factory=list)
    trials: list[LrSummary] = field(default_factory=list)
    steps_to_target: float | None = None
    seconds_to_target: float | None = None
    final_rel: float = math.inf
    constraint: dict[str, float] = field(default_factory=dict)
    step_seconds: float | None = None
    step_cost_ratio: float | None = None

    def chosen(self) -> LrSummary | None:
        """The summary of the chosen learning rate (``None`` when nothing ran)."""
        return next((t for t in self.trials if t.lr == self.lr), None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodResult:
        data = dict(data)
        data["trials"] = [LrSummary.from_dict(t) for t in data.get("trials", [])]
        data["final_rel"] = _inf(data.get("final_rel"))
        return cls(**data)


@dataclass
class TaskResult:
    """Every method on one task, with the task's setting."""

    task: str
    n: int
    family: str
    batch: int
    description: str
    target: float
    steps: int
    seeds: list[int]
    reference_step_seconds: float
    methods: list[MethodResult] = field(default_factory=list)

    def ok(self) -> list[MethodResult]:
        """The methods that ran."""
        return [m for m in self.methods if m.status == "ok"]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskResult:
        data = dict(data)
        data["methods"] = [MethodResult.from_dict(m) for m in data["methods"]]
        return cls(**data)


@dataclass
class Study:
    """A whole ``p4opt compare`` run: its configuration, environment, files and tasks."""

    config: dict[str, Any]
    environment: dict[str, str]
    figures: list[str]
    tasks: list[TaskResult]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Study:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["tasks"] = [TaskResult.from_dict(t) for t in data["tasks"]]
        return cls(**data)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json_dict(record: Any) -> Any:
    """``dataclasses.asdict(record)`` with non-finite floats as ``None`` (strict JSON)."""
    return _clean(asdict(record) if hasattr(record, "__dataclass_fields__") else record)


def write_json(study: Study | dict[str, Any], path: Path) -> None:
    """Write a study (or any JSON-able dict) to ``path``; non-finite floats become ``null``."""
    path.write_text(json.dumps(to_json_dict(study), indent=1))


def read_json(path: Path) -> Study:
    """Read a ``results.json`` written by :func:`write_json` back into a :class:`Study`."""
    return Study.from_dict(json.loads(Path(path).read_text()))
