"""The P⁴ families: one perturbation class per module."""

from p4opt.families.invertible import Invertible
from p4opt.families.linear import LinearStructure
from p4opt.families.orthogonal import Orthogonal
from p4opt.families.positive_definite import PositiveDefinite
from p4opt.families.special_linear import SpecialLinear
from p4opt.families.structures import Circulant, Fixed, Symmetric, ZeroSum

__all__ = [
    "Invertible",
    "Orthogonal",
    "PositiveDefinite",
    "SpecialLinear",
    "LinearStructure",
    "Symmetric",
    "ZeroSum",
    "Circulant",
    "Fixed",
]
