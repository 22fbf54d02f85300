"""p4opt: train constrained weights through property-preserving parameter perturbations (P⁴)."""

from __future__ import annotations

import importlib
from typing import Any

from p4opt import nn
from p4opt.errors import (
    NotRegisteredError,
    P4Error,
    P4RuntimeError,
    P4TypeError,
    P4ValueError,
    RegistrationError,
    ShapeError,
    SingularMatrixError,
)
from p4opt.families import (
    Circulant,
    Fixed,
    Invertible,
    LinearStructure,
    Orthogonal,
    PositiveDefinite,
    SpecialLinear,
    Symmetric,
    ZeroSum,
)
from p4opt.optimizer import P4Optimizer
from p4opt.perturbation import MergeResult, Perturbation, Proposal, Reason, ValidationReport
from p4opt.registry import perturbation_of, perturbations, register, unregister

__version__ = "0.2.0"

__all__ = [
    "Perturbation",
    "Proposal",
    "MergeResult",
    "Reason",
    "ValidationReport",
    "Invertible",
    "Orthogonal",
    "PositiveDefinite",
    "SpecialLinear",
    "LinearStructure",
    "Symmetric",
    "ZeroSum",
    "Circulant",
    "Fixed",
    "checks",
    "P4Optimizer",
    "register",
    "unregister",
    "perturbation_of",
    "perturbations",
    "P4Error",
    "P4ValueError",
    "P4TypeError",
    "P4RuntimeError",
    "RegistrationError",
    "NotRegisteredError",
    "ShapeError",
    "SingularMatrixError",
    "nn",
    "datasets",
]

#: Submodules imported on first use (they pull in more than the core needs).
_LAZY = {"checks", "datasets", "baselines", "tasks", "studies"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"p4opt.{name}")
    raise AttributeError(f"module 'p4opt' has no attribute {name!r}")
