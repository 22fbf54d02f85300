"""p4opt: train constrained weights through property-preserving parameter perturbations (P⁴)."""

from p4opt import checks, datasets, nn
from p4opt.exceptions import (
    NotRegisteredError,
    P4Error,
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
    Symmetric,
    ZeroSum,
)
from p4opt.optimizer import P4Optimizer
from p4opt.perturbation import MergeResult, Perturbation, ValidationReport
from p4opt.registry import perturbation_of, perturbations, register, unregister

__version__ = "0.1.0"

__all__ = [
    "Perturbation",
    "MergeResult",
    "ValidationReport",
    "Invertible",
    "Orthogonal",
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
    "RegistrationError",
    "NotRegisteredError",
    "ShapeError",
    "SingularMatrixError",
    "nn",
    "datasets",
]
