"""The P⁴ families: one perturbation class per module."""

from p4opt.families.invertible import Invertible

__all__ = ["Invertible"]
