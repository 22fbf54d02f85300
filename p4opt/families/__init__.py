"""The P⁴ families: one perturbation class per module."""

from p4opt.families.invertible import Invertible
from p4opt.families.linear import LinearStructure
from p4opt.families.orthogonal import Orthogonal
from p4opt.families.structures import Circulant, Fixed, Symmetric, ZeroSum

__all__ = [
    "Invertible",
    "Orthogonal",
    "LinearStructure",
    "Symmetric",
    "ZeroSum",
    "Circulant",
    "Fixed",
]
