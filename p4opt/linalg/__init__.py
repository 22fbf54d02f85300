r"""Pure linear-algebra kernels behind the P⁴ families (no state, no modules).

Every function accepts leading batch dimensions ``(*, n, n)`` so that stacks of
equally shaped layers are handled by one kernel, and is differentiable where
that makes sense. Row-vector convention: a batch of vectors is ``y[..., n]``
and "applying :math:`M^{-1}` to ``y``" returns ``y @ M^{-T}``, matching
``torch.nn.Linear`` (``y = x W^T + b``).

Modules: :mod:`~p4opt.linalg.lowrank` (Woodbury, determinant lemma),
:mod:`~p4opt.linalg.merge` (validated and partial low-rank merges),
:mod:`~p4opt.linalg.sketch` (randomized range finder),
:mod:`~p4opt.linalg.refine` (Schulz-type refinement of inverses and polar factors),
:mod:`~p4opt.linalg.householder` (compact WY reflections),
:mod:`~p4opt.linalg.cayley` (Cayley rotations), :mod:`~p4opt.linalg.givens`
(rotations), :mod:`~p4opt.linalg.metrics` (error figures, sum-to-zero basis) and
:mod:`~p4opt.linalg.random` (Haar sampling).
"""

from __future__ import annotations

from p4opt.linalg.cayley import (
    cayley_apply,
    cayley_apply_at_zero,
    cayley_stiefel_apply,
    cayley_stiefel_apply_at_zero,
)
from p4opt.linalg.fold import low_rank_fold_, low_rank_merge_
from p4opt.linalg.givens import (
    givens_apply,
    givens_layers_apply,
    invert_permutation,
    round_robin,
)
from p4opt.linalg.householder import householder_apply, householder_wy, householder_wy_inverse
from p4opt.linalg.lowrank import capacitance, lemma_slogdet, woodbury_inverse, woodbury_solve
from p4opt.linalg.merge import (
    MERGE_REJECTIONS,
    LowRankCheck,
    loses_inverse_accuracy,
    low_rank_check,
)
from p4opt.linalg.metrics import (
    condition_estimate,
    inverse_drifted,
    orthogonality_error,
    probe_inverse_residual,
    spd_condition,
    spectral_norm_estimate,
    sum_complement,
)
from p4opt.linalg.partial import feasible_scale
from p4opt.linalg.random import random_orthogonal
from p4opt.linalg.refine import (
    hyperpower_step,
    inverse_residual,
    newton_schulz_polar_step,
    newton_schulz_step,
    polar_factor,
    refine_inverse,
    refine_orthogonal,
)
from p4opt.linalg.sketch import orthonormalize, range_finder

__all__ = [
    "capacitance",
    "woodbury_inverse",
    "woodbury_solve",
    "lemma_slogdet",
    "low_rank_check",
    "loses_inverse_accuracy",
    "low_rank_fold_",
    "low_rank_merge_",
    "LowRankCheck",
    "feasible_scale",
    "MERGE_REJECTIONS",
    "range_finder",
    "orthonormalize",
    "inverse_residual",
    "newton_schulz_step",
    "hyperpower_step",
    "refine_inverse",
    "newton_schulz_polar_step",
    "refine_orthogonal",
    "polar_factor",
    "householder_wy",
    "householder_wy_inverse",
    "householder_apply",
    "cayley_apply",
    "cayley_apply_at_zero",
    "cayley_stiefel_apply",
    "cayley_stiefel_apply_at_zero",
    "givens_apply",
    "givens_layers_apply",
    "round_robin",
    "invert_permutation",
    "condition_estimate",
    "orthogonality_error",
    "probe_inverse_residual",
    "spectral_norm_estimate",
    "inverse_drifted",
    "spd_condition",
    "sum_complement",
    "random_orthogonal",
]
