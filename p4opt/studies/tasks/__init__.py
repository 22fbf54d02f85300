r"""Built-in comparison tasks (used by ``p4opt compare``, the examples and the benchmarks).

Every task is seeded and full-batch, trains one weight (square, or rectangular for the
Stiefel tasks; symmetric positive definite for ``spd``) under the constraint of its
``family``, and knows its optimum so that progress is a
relative loss gap with a ``target``.

Examples
--------
>>> from p4opt.studies import tasks
>>> task = tasks.make("procrustes", n=8)
>>> task.family, task.target
('orthogonal', 0.0001)
"""

from __future__ import annotations

import torch

from p4opt.studies.tasks.base import Task, random_orthogonal
from p4opt.studies.tasks.gaussian import GaussianML
from p4opt.studies.tasks.procrustes import Procrustes
from p4opt.studies.tasks.rnn import TeacherRNN
from p4opt.studies.tasks.spd import PrecisionML
from p4opt.studies.tasks.stiefel import StiefelTall, StiefelWide

__all__ = [
    "Task",
    "TASKS",
    "make",
    "random_orthogonal",
    "Procrustes",
    "GaussianML",
    "TeacherRNN",
    "StiefelTall",
    "StiefelWide",
    "PrecisionML",
]

#: Task classes by name.
TASKS: dict[str, type[Task]] = {
    t.name: t
    for t in (Procrustes, GaussianML, TeacherRNN, StiefelTall, StiefelWide, PrecisionML)
}


def make(name: str, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Task:
    """Build the task called ``name`` (see ``TASKS``) at size ``n``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name](n, seed=seed, dtype=dtype)
