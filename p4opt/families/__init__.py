"""The P⁴ families: one perturbation class per module."""

from p4opt.families.invertible import Invertible
from p4opt.families.orthogonal import Orthogonal

__all__ = ["Invertible", "Orthogonal"]
