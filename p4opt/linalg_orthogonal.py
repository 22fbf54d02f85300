"""Former home of the orthogonal kernels; they live in :mod:`p4opt.linalg` (kept importable)."""

from __future__ import annotations

from p4opt.linalg.givens import givens_apply, invert_permutation
from p4opt.linalg.householder import householder_apply, householder_wy, householder_wy_inverse
from p4opt.linalg.metrics import orthogonality_error
from p4opt.linalg.refine import newton_schulz_polar_step, polar_factor, refine_orthogonal

__all__ = [
    "orthogonality_error",
    "polar_factor",
    "newton_schulz_polar_step",
    "refine_orthogonal",
    "householder_wy",
    "householder_wy_inverse",
    "householder_apply",
    "givens_apply",
    "invert_permutation",
]
