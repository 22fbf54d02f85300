r"""Validated low-rank merges: check every stack element (folding it: :mod:`.fold`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from p4opt._typing import Tensor
from p4opt.errors import P4ValueError
from p4opt.linalg._checks import (
    _condition_exceeds,
    _first_failed,
    _frobenius,
    _max_abs,
    _outside,
    _slogdet_lu,
)
from p4opt.linalg._common import _eye_like

__all__ = ["LowRankCheck", "low_rank_check", "MERGE_REJECTIONS", "loses_inverse_accuracy"]

#: Why a low-rank merge of a stack element is not folded, indexed by the code of
#: :func:`low_rank_check` (the same order and spelling as :class:`p4opt.Reason`).
MERGE_REJECTIONS = (
    "ok",
    "non-finite update",
    "singular update",
    "update log|det| outside bounds",
    "ill-conditioned update",
    "log|det| outside bounds",
    "non-finite merged tensor",
)

Bounds = tuple[float, float]

_ILL_CONDITIONED = MERGE_REJECTIONS.index("ill-conditioned update")
#: Largest rounding a rank-k fold may put into :math:`(A + UV^T)(A + UV^T)^{-1} - I`, by the
#: bound in :func:`low_rank_check` (the bookkeeping's own tolerance is 1e-6 in float64).
_CANCELLATION_LIMIT = 1e-7


@dataclass
class LowRankCheck:
    r"""Everything :func:`low_rank_fold_` needs, computed once by :func:`low_rank_check`.

    ``codes`` holds, per stack element, the position in :class:`p4opt.Reason` of the first
    failed check (0 = accepted). For a full update (``v=None``) ``inv_u`` is ``None`` and
    ``correction`` is the new inverse, or ``None`` when the check was asked not to form it
    (``inverse=False``) and every element passed: ``factorization`` then holds the LU
    factors of :math:`A + \Delta` to solve for it later.
    """

    codes: Tensor
    inv_u: Tensor | None
    correction: Tensor | None
    cap_sign: Tensor
    cap_logabsdet: Tensor
    #: Upper bounds of the entries' magnitudes of :math:`A` and :math:`A^{-1}` after the fold.
    entry_bounds: tuple[Tensor, Tensor] | None = None
    #: Whether every element passed (``codes`` all 0), known without reading ``codes``.
    all_pass: bool = False
    #: LU factors and pivots of the transpose :math:`(A + \Delta)^T` (as returned by
    #: ``torch.linalg.lu_factor``) when ``correction`` was left out: ``lu_solve`` with
    #: ``adjoint=True`` applies :math:`(A + \Delta)^{-1}`, without it :math:`(A + \Delta)^{-T}`.
    factorization: tuple[Tensor, Tensor] | None = None
    #: With ``factorization``: :math:`A + \Delta` rounded into ``out_dtype`` (checked finite),
    #: or ``None`` when ``out_dtype`` is the bookkeeping dtype.
    rounded: Tensor | None = None


def low_rank_check(
    matrix: Tensor,
    inv: Tensor,
    logabsdet: Tensor,
    u: Tensor,
    v: Tensor | None,
    update_bounds: Bounds = (-math.inf, math.inf),
    logdet_bounds: Bounds = (-math.inf, math.inf),
    max_condition: float = math.inf,
    out_dtype: torch.dtype | None = None,
    entry_bounds: tuple[Tensor, Tensor] | None = None,
    sign: Tensor | None = None,
    inverse: bool = True,
    positive: bool = False,
) -> LowRankCheck:
    r"""Check the update :math:`A \leftarrow A + UV^T` of every stack element; change nothing.

    An element passes when ``u`` and ``v`` are finite, :math:`C = I + V^TA^{-1}U` is
    non-singular with :math:`\log|\det C|` inside ``update_bounds`` and 2-norm condition at
    most ``max_condition``, the new :math:`\log|\det A|` lies in ``logdet_bounds``, and entry
    bounds show that neither :math:`A + UV^T` (in ``out_dtype``) nor its inverse can overflow.
    All checks use :math:`O(nk)` quantities after two :math:`O(n^2k)` products.

    ``v=None`` stands for :math:`V = I` (``u`` is then the whole change :math:`\Delta`, shape
    (*, n, n)): the check factorizes :math:`A + \Delta` itself (LU, :math:`O(n^3)`) and computes
    the new inverse from it, cheaper than the rank-n Woodbury products and exact whatever
    the error already in :math:`A^{-1}`; :math:`\log|\det C|` is the change of
    :math:`\log|\det A|` and there is no capacitance matrix whose condition could amplify
    rounding, so ``max_condition`` does not apply. It needs ``sign``, the sign of
    :math:`\det A`.

    Parameters
    ----------
    matrix, inv : Tensor, shape (*, n, n)
        :math:`A` and :math:`A^{-1}`.
    logabsdet : Tensor, shape (*)
    u, v : Tensor, shape (*, n, k), or ``u`` (*, n, n) and ``v=None``
    entry_bounds : (Tensor, Tensor), optional
        Upper bounds, shape (*), of :math:`\max|A_{ij}|` and :math:`\max|A^{-1}_{ij}|` (e.g.
        ``entry_bounds`` of the previous merge's check); saves two :math:`O(n^2)` passes.
    sign : Tensor, shape (*), optional
        Sign of :math:`\det A`; required with ``v=None``.
    inverse : bool
        With ``v=None``: ``False`` leaves the new inverse (:math:`2n^3` flops, three times the
        factorization) to the caller when every element passes, returning the LU factors in
        ``factorization``; :func:`low_rank_fold_` then leaves ``inv`` as it is, and the
        caller's ``inv`` argument is not read. With a refused element the inverse is formed
        as usual. Ignored for low-rank updates.
    positive : bool
        Also refuse, as outside ``update_bounds``, an update that changes the sign of
        :math:`\det A` (:math:`\det C < 0`), for families whose determinant must stay
        positive (:class:`~p4opt.SpecialLinear`).

    Returns
    -------
    LowRankCheck
        With ``entry_bounds`` valid for the matrices after :func:`low_rank_fold_`.
    """
    if v is None:
        if sign is None:
            raise P4ValueError("low_rank_check: v=None (the whole change) needs sign, the sign "
                               "of det A")
        return _whole_change_check(matrix, inv, logabsdet, sign, u, update_bounds,
                                   logdet_bounds, out_dtype, entry_bounds, inverse, positive)
    # a finite sum proves every entry finite (one pass, no mask); only a non-finite sum, which
    # finite entries can also give by overflowing, pays for the entrywise check. Below, every
    # check is one boolean per element, stacked so that the usual case (all pass) costs one
    # test: on CPU each tensor call costs microseconds, as much as the products at small n.
    finite_uv = torch.isfinite(u.sum((-2, -1)) + v.sum((-2, -1)))
    all_finite = bool(finite_uv.all())
    if not all_finite:
        finite_uv = torch.isfinite(u).all(-1).all(-1) & torch.isfinite(v).all(-1).all(-1)
        all_finite = bool(finite_uv.all())
    if not all_finite:
        u = torch.where(finite_uv[..., None, None], u, 0)
        v = torch.where(finite_uv[..., None, None], v, 0)
    inv_u = (u.mT @ inv.mT).mT  # CPU BLAS is several times faster in this layout for k > 1
    cap = v.mT @ inv_u  # C - I for now
    spread = torch.linalg.matrix_norm(cap) if math.isfinite(max_condition) else None
    cap.diagonal(dim1=-2, dim2=-1).add_(1)
    factors, pivots, _ = torch.linalg.lu_factor_ex(cap)  # one factorization: log|det|, solve
    cap_sign, cap_logabsdet = _slogdet_lu(factors, pivots)
    checks = [
        None if all_finite else ~finite_uv,
        ~torch.isfinite(cap_logabsdet),  # -inf for a singular C, NaN for a non-finite one
        _flips_or_outside(cap_sign, cap_logabsdet, update_bounds, positive),
        _condition_exceeds(cap, max_condition, spread, (factors, pivots)),
        _outside(logabsdet, logdet_bounds, shift=cap_logabsdet),
    ]
    code = _first_failed(checks, cap_sign.shape, inv.device)
    all_ok = code is None
    if not all_ok:
        ok = (code == 0)[..., None, None]
        cap = torch.where(ok, cap, _eye_like(cap))
        inv_u, u = torch.where(ok, inv_u, 0), torch.where(ok, u, 0)
    rhs = v.mT @ inv  # the Woodbury factor is C^{-1} V^T A^{-1}
    if all_ok:
        correction = torch.linalg.lu_solve(factors, pivots, rhs)
    else:  # rejected elements were replaced by I: factorize again
        correction = torch.linalg.solve(cap, rhs)
    # entrywise bounds: |(X + A B)_ij| <= max|X| + |A_i:| |B_:j| <= max|X| + |A|_F |B|_F
    mat_old, inv_old = entry_bounds or (_max_abs(matrix), _max_abs(inv))
    inv_bound = inv_old + _frobenius(inv_u) * _frobenius(correction)
    mat_bound = mat_old + _frobenius(u) * _frobenius(v)
    # the Woodbury sum cancels terms as large as these bounds: its rounding, relative to
    # (A + UV^T)(A + UV^T)^{-1} = I, can reach eps * mat_bound * inv_bound. An update that
    # could leave the inverse further off than the bookkeeping tolerates is ill-conditioned,
    # however well-conditioned C is (a 1 x 1 C always is)
    fits = (mat_bound < torch.finfo(out_dtype or matrix.dtype).max) & (
        inv_bound < torch.finfo(inv.dtype).max
    )  # an overflow is reported as such, below
    cancels = fits & loses_inverse_accuracy(mat_bound, inv_bound, inv.dtype)
    if bool(cancels.any()):
        code = torch.zeros(cancels.shape, dtype=torch.long, device=inv.device) if all_ok else code
        code = torch.where((code == 0) & cancels, _ILL_CONDITIONED, code)
    return _finish(code, (inv_u, correction, cap_sign, cap_logabsdet), lambda: (mat_old, inv_old),
                   (mat_bound, inv_bound), (inv.dtype, out_dtype or matrix.dtype))


def loses_inverse_accuracy(matrix_bound: Tensor, inverse_bound: Tensor,
                           dtype: torch.dtype) -> Tensor:
    r"""Whether a matrix and its inverse, bounded entrywise by the given figures, are too far
    apart in scale for ``dtype`` to keep :math:`AA^{-1} - I` within the bookkeeping's limit.

    .. math:: \varepsilon\,\max|A|\,\max|A^{-1}| > 10^{-7}

    (at least :math:`\varepsilon\kappa_\infty(A)/n^2`: past it, rounding alone can
    leave the inverse further off than ``validate()`` tolerates in float64, 1e-6).

    Parameters
    ----------
    matrix_bound, inverse_bound : Tensor, shape (*)
        Bounds of :math:`\max|A|` and :math:`\max|A^{-1}|` (one per stack element).
    dtype : torch.dtype
        Dtype the inverse is kept in.

    Returns
    -------
    Tensor of bool, shape (*)
        Elementwise, no reduction: cost :math:`O(1)` per element.

    Examples
    --------
    >>> import torch
    >>> loses_inverse_accuracy(torch.tensor([1.0, 1e5]), torch.tensor([1.0, 1e5]), torch.float64)
    tensor([False,  True])
    """
    return torch.finfo(dtype).eps * matrix_bound * inverse_bound > _CANCELLATION_LIMIT


def _finish(
    code: Tensor | None,
    parts: tuple[Tensor | None, Tensor, Tensor, Tensor],
    old: Callable[[], tuple[Tensor, Tensor]],
    new: tuple[Tensor, Tensor],
    dtypes: tuple[torch.dtype, torch.dtype],
) -> LowRankCheck:
    """The last check of both paths: neither the inverse nor the merged matrix may overflow
    (entry bounds ``new`` against the dtypes' largest values); ``code`` ``None``: all passed.
    ``old`` gives the bounds kept by refused elements (called only if one is refused)."""
    mat_bound, inv_bound = new
    fits = (inv_bound < torch.finfo(dtypes[0]).max) & (mat_bound < torch.finfo(dtypes[1]).max)
    shape = parts[2].shape
    if code is None and bool(fits.all()):  # (a comparison with NaN fails: it does not fit)
        zeros = torch.zeros(shape, dtype=torch.long, device=mat_bound.device)
        return LowRankCheck(zeros, *parts, (mat_bound, inv_bound), True)
    if code is None:
        code = torch.zeros(shape, dtype=torch.long, device=mat_bound.device)
    code = torch.where((code == 0) & ~fits, len(MERGE_REJECTIONS) - 1, code)
    folds = code == 0
    mat_old, inv_old = old()
    bounds = (torch.where(folds, mat_bound, mat_old), torch.where(folds, inv_bound, inv_old))
    return LowRankCheck(code, *parts, bounds)


def _whole_change_check(
    matrix: Tensor,
    inv: Tensor,
    logabsdet: Tensor,
    sign: Tensor,
    delta: Tensor,
    update_bounds: Bounds,
    logdet_bounds: Bounds,
    out_dtype: torch.dtype | None,
    entry_bounds: tuple[Tensor, Tensor] | None,
    inverse: bool = True,
    positive: bool = False,
) -> LowRankCheck:
    r""":func:`low_rank_check` for ``v=None``: factorize :math:`A + \Delta`; :math:`O(n^3)`."""
    merged = matrix + delta
    rounded = None
    if inverse:
        mat_bound = _max_abs(merged)
    else:  # the usual case first, in one test: everything finite and inside the bounds
        total = None
        if out_dtype is not None and out_dtype != merged.dtype:
            # the fold copies this rounding into the layer; a finite sum shows it did not
            # overflow (a non-finite delta shows here too; a large finite sum only falls
            # back to the exact checks below)
            rounded = merged.to(out_dtype)
            total = rounded.sum((-2, -1))
        factors, pivots = _factorize_transpose_(merged)
        new_sign, new_logabsdet = _slogdet_lu(factors, pivots)
        change = new_logabsdet - logabsdet
        # one test for both: the sum is finite iff both terms are (non-finite merged entries
        # also make log|det| non-finite)
        ok = torch.isfinite(new_logabsdet if total is None else total + new_logabsdet)
        for x, (lo, hi) in ((change, update_bounds), (new_logabsdet, logdet_bounds)):
            if math.isfinite(lo) or math.isfinite(hi):
                ok &= (x >= lo) & (x <= hi)
        if positive:
            ok &= new_sign * sign > 0
        if bool(ok.all()):
            zeros = torch.zeros(new_sign.shape, dtype=torch.long, device=matrix.device)
            return LowRankCheck(zeros, None, None, new_sign * sign, change, None, True,
                                (factors, pivots), rounded)
        merged = matrix + delta  # the factorization overwrote it
        mat_bound = _max_abs(merged)
    finite = torch.isfinite(delta.sum((-2, -1)))
    all_finite = bool(finite.all())
    if not all_finite:
        finite = torch.isfinite(delta).all(-1).all(-1)
        all_finite = bool(finite.all())
    if not all_finite:  # refused elements below; the others are checked on their own
        delta = torch.where(finite[..., None, None], delta, 0)
        merged = matrix + delta
        mat_bound = _max_abs(merged)
    factors, pivots = _factorize_transpose_(merged)
    new_sign, new_logabsdet = _slogdet_lu(factors, pivots)
    change = new_logabsdet - logabsdet
    checks = [
        None if all_finite else ~finite,
        ~torch.isfinite(new_logabsdet),  # -inf for a singular A + Delta, NaN for a non-finite one
        _flips_or_outside(new_sign * sign, change, update_bounds, positive),
        None,  # no capacitance matrix: nothing amplifies the rounding of the new inverse
        _outside(new_logabsdet, logdet_bounds),
    ]
    code = _first_failed(checks, new_sign.shape, matrix.device)
    # the solve returns column-major (A + Delta)^{-T}: its transpose is a row-major inverse
    new_inv = torch.linalg.lu_solve(factors, pivots, _eye_like(factors)).mT
    parts = (None, new_inv, new_sign * sign, change)
    return _finish(code, parts, lambda: entry_bounds or (_max_abs(matrix), _max_abs(inv)),
                   (mat_bound, _max_abs(new_inv)), (inv.dtype, out_dtype or matrix.dtype))


def _factorize_transpose_(merged: Tensor) -> tuple[Tensor, Tensor]:
    r"""LU factors and pivots of ``merged.mT``, computed in ``merged``'s memory (overwritten).

    LAPACK factorizes column-major storage, which the transpose of a row-major matrix is, so
    no copy is made; :math:`\det A^T = \det A`, and solves with the factors take
    ``adjoint=True`` to apply :math:`A^{-1}`. A backend that refuses the in-place form gets
    the usual factorization of a copy.
    """
    try:
        factors, pivots, _ = torch.linalg.lu_factor_ex(merged.mT, out=(
            merged.mT,
            torch.empty(merged.shape[:-1], dtype=torch.int32, device=merged.device),
            torch.empty(merged.shape[:-2], dtype=torch.int32, device=merged.device),
        ))
    except RuntimeError:  # pragma: no cover - CPU and CUDA take the in-place form
        factors, pivots, _ = torch.linalg.lu_factor_ex(merged.mT)
    return factors, pivots


def _flips_or_outside(
    cap_sign: Tensor, change: Tensor, bounds: Bounds, positive: bool
) -> Tensor | None:
    """Whether the change of log|det| leaves ``bounds`` or, with ``positive``, det changes sign."""
    outside = _outside(change, bounds)
    if not positive:
        return outside
    flips = cap_sign <= 0
    return flips if outside is None else outside | flips
