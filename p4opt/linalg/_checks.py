r"""Per-element checks of a merge, each one tensor call or a few (private to :mod:`.merge`).

On CPU every tensor call costs microseconds, as much as a merge's products at small ``n``:
these helpers return ``None`` where a check cannot fail, so that the caller tests only the
checks that can, and stack them into one test.
"""

from __future__ import annotations

import functools
import math

import torch

from p4opt._typing import Tensor
from p4opt.linalg._common import _eye_like
from p4opt.linalg.metrics import condition_estimate

__all__: list[str] = []

Bounds = tuple[float, float]


def _max_abs(x: Tensor) -> Tensor:
    """Largest entry magnitude of each matrix of a stack."""
    return x.abs().amax((-2, -1))


def _condition(m: Tensor) -> Tensor:
    """2-norm condition number of small matrices ``(*, k, k)`` (1 for k = 1)."""
    if m.shape[-1] == 1:
        return torch.ones(m.shape[:-2], dtype=m.dtype, device=m.device)
    s = torch.linalg.svdvals(torch.where(torch.isfinite(m), m, 0))
    return s[..., 0] / s[..., -1]


def _condition_exceeds(
    cap: Tensor, limit: float, spread: Tensor | None = None, lu: tuple[Tensor, Tensor] | None = None
) -> Tensor | None:
    r"""Whether :math:`\kappa_2(C) > ` ``limit``, skipping the SVD when a cheap test settles it.

    With :math:`E = C - I` and :math:`\lVert E\rVert_2 \le \lVert E\rVert_F = e < 1`,
    :math:`\kappa_2(C) \le (1 + e)/(1 - e)`; merges of small steps are all settled this way
    (``spread``, when given, is :math:`e`, computed by the caller before it added :math:`I`).
    Larger steps are settled by :math:`\kappa_2(C) \le \lVert C\rVert_F\lVert C^{-1}\rVert_F`
    (an inverse costs a fraction of an SVD). That bound can exceed :math:`\kappa_2` by a
    factor up to ``k``, so for ``k >= 32`` (the rank-n/4 merges of large matrices) a power-iteration
    estimate, a lower bound of :math:`\kappa_2` within a few percent of it after its
    iterations when the extreme singular values are separated, settles elements whose estimate
    is below ``limit / 4`` (:func:`condition_estimate`; ``lu`` is :math:`C`'s LU factorization
    if the caller has it). Only the rest pay for singular values, :math:`O(k^3)` with a large
    constant. Returns ``None`` (no element can exceed) for an infinite ``limit``.
    """
    if not math.isfinite(limit):
        return None
    e = torch.linalg.matrix_norm(cap - _eye_like(cap)) if spread is None else spread
    if bool((e < (limit - 1) / (limit + 1)).all()):
        return None
    clean = torch.where(torch.isfinite(cap), cap, 0)
    if cap.shape[-1] >= 32:
        estimate = condition_estimate(clean, lu)  # a lower bound: above the limit is decided
        exceeds = ~(estimate <= limit)  # NaN (singular) exceeds
        unsure = ~exceeds & (estimate * 4 > limit)
        if bool(unsure.any()):
            exceeds = exceeds.masked_scatter(unsure, _condition(cap[unsure]) > limit)
        return exceeds if bool(exceeds.any()) else None
    inverse, info = torch.linalg.inv_ex(clean)
    bound = torch.linalg.matrix_norm(clean) * torch.linalg.matrix_norm(inverse)
    if bool(((info == 0) & (bound <= limit)).all()):
        return None
    return _condition(cap) > limit


def _slogdet_lu(factors: Tensor, pivots: Tensor) -> tuple[Tensor, Tensor]:
    """Sign and log|det| from an LU factorization (as :func:`torch.linalg.slogdet`)."""
    diagonal = factors.diagonal(dim1=-2, dim2=-1)
    swapped = pivots != _positions(diagonal.shape[-1], pivots.dtype, pivots.device)
    # each row swap flips the sign: fold them in as -1 factors of the diagonal's sign product
    flips = torch.where(swapped, -1.0, 1.0).to(diagonal.dtype)
    sign = torch.cat([diagonal.sign(), flips], -1).prod(-1)
    return sign, diagonal.abs().log().sum(-1)


@functools.lru_cache(maxsize=16)
def _positions(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """1, ..., k: LAPACK's pivots of an LU without row swaps (shared, read-only)."""
    return torch.arange(1, k + 1, dtype=dtype, device=device)


def _outside(x: Tensor, bounds: Bounds, shift: Tensor | None = None) -> Tensor | None:
    """Whether ``x`` (+ ``shift``) lies outside the closed interval ``bounds`` (``None``:
    it cannot, the interval being unbounded)."""
    lo, hi = bounds
    if lo == -math.inf and hi == math.inf:
        return None
    if shift is not None:
        x = x + shift
    return (x < lo) | (x > hi)


def _frobenius(x: Tensor) -> Tensor:
    """Frobenius norm of each matrix of a stack (one call)."""
    return torch.linalg.matrix_norm(x)


def _first_failed(
    checks: list[Tensor | None], shape: torch.Size, device: torch.device
) -> Tensor | None:
    """Per element, the 1-based position of the first failed check, 0 if none failed.

    ``None`` entries are checks that cannot fail; returns ``None`` when no element failed any.
    """
    present = [(i, c) for i, c in enumerate(checks, start=1) if c is not None]
    if not present:
        return None
    failed = torch.stack([c if c.shape == shape else c.expand(shape) for _, c in present])
    if not bool(failed.any()):
        return None
    positions = torch.tensor([i for i, _ in present], device=device)
    return torch.where(failed.any(0), positions[failed.to(torch.uint8).argmax(0)], 0)
