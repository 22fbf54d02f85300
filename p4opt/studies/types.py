"""Small types shared by the tasks and the baselines (neither imports the other for them)."""

from __future__ import annotations

from typing import Literal

from p4opt.errors import P4Error

__all__ = ["Family", "MissingDependencyError"]

#: The constraint a comparison method keeps and a task needs.
Family = Literal["orthogonal", "invertible", "spd"]


class MissingDependencyError(P4Error, ImportError):
    """An optional package a comparison method or a figure needs is not installed."""
