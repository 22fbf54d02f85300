r"""Fold a checked low-rank merge in place (the checks: :mod:`.merge`)."""

from __future__ import annotations

import math

import torch

from p4opt._typing import Tensor
from p4opt.linalg.merge import LowRankCheck, low_rank_check

__all__ = ["low_rank_fold_", "low_rank_merge_"]


def _addmm_(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> None:
    """``out += alpha * a @ b`` in place, without an (n, n) temporary for 2-D and 3-D ``out``."""
    if out.ndim == 2:
        out.addmm_(a, b, alpha=alpha)
    elif out.ndim == 3:
        out.baddbmm_(a, b, alpha=alpha)
    else:
        out.add_(a @ b, alpha=alpha)


def low_rank_fold_(
    matrix: Tensor,
    inv: Tensor,
    sign: Tensor,
    logabsdet: Tensor,
    u: Tensor,
    v: Tensor | None,
    check: LowRankCheck,
) -> None:
    r"""Apply the checked update to the elements with code 0, in place (Woodbury and the lemma).

    .. math:: A \leftarrow A + UV^T, \quad A^{-1} \leftarrow A^{-1} - A^{-1}U C^{-1} V^TA^{-1},
              \quad \log|\det A| \mathrel{+}= \log|\det C|

    (``v=None``, :math:`V = I`: :math:`A \leftarrow A + U` and the inverse the check computed
    from the factorization of :math:`A + U`; ``inv`` is left as it is when the check left the
    inverse out, see ``LowRankCheck.factorization``.)

    Rejected elements receive a zero update. Cost :math:`O(n^2 k)`, no :math:`n \times n`
    temporary for 2-D and 3-D inputs.
    """
    full = v is None
    if check.all_pass or bool((check.codes == 0).all()):
        if full:
            if check.correction is not None:  # else the caller keeps check.factorization
                inv.copy_(check.correction)
            if torch.promote_types(u.dtype, matrix.dtype) != matrix.dtype:
                u = u.to(matrix.dtype)
            matrix.add_(u)  # a lower-precision change is promoted in the sum, without a copy
        else:
            _addmm_(inv, check.inv_u, check.correction, alpha=-1.0)
            _addmm_(matrix, u.to(matrix.dtype), v.mT.to(matrix.dtype))
        sign.mul_(check.cap_sign)
        logabsdet.add_(check.cap_logabsdet)
        return
    ok_b = check.codes == 0
    ok = ok_b[..., None, None]
    if full:
        inv.copy_(torch.where(ok, check.correction, inv))
        matrix.add_(torch.where(ok, u, 0).to(matrix.dtype))
    else:  # both factors masked: a zero times a NaN of a refused element is still NaN
        correction = torch.where(ok, check.correction, 0)
        _addmm_(inv, torch.where(ok, check.inv_u, 0), correction, alpha=-1.0)
        _addmm_(matrix, torch.where(ok, u, 0).to(matrix.dtype), torch.where(ok, v, 0).mT.to(
            matrix.dtype))
    sign.copy_(torch.where(ok_b, sign * check.cap_sign, sign))
    logabsdet.copy_(torch.where(ok_b, logabsdet + check.cap_logabsdet, logabsdet))


def low_rank_merge_(
    matrix: Tensor,
    inv: Tensor,
    sign: Tensor,
    logabsdet: Tensor,
    u: Tensor,
    v: Tensor | None,
    update_bounds: tuple[float, float] = (-math.inf, math.inf),
    logdet_bounds: tuple[float, float] = (-math.inf, math.inf),
    out_dtype: torch.dtype | None = None,
    max_condition: float = math.inf,
) -> tuple[Tensor, Tensor]:
    r"""Validate :math:`A \leftarrow A + UV^T`; apply it in place with its inverse and log|det|.

    :func:`low_rank_check` then :func:`low_rank_fold_`: elements that pass every check are
    updated in place (Woodbury and the determinant lemma, or a factorization of
    :math:`A + \Delta` for ``v=None``); the others keep their values bit for bit. Nothing is
    written before every check has run, and 2-D and 3-D inputs get no :math:`n \times n`
    temporary on the rank-k path.

    Parameters
    ----------
    matrix, inv : Tensor, shape (*, n, n)
        :math:`A` and :math:`A^{-1}` (finite), updated in place.
    sign, logabsdet : Tensor, shape (*)
        Updated in place.
    u, v : Tensor, shape (*, n, k), or ``u`` (*, n, n) and ``v=None`` (the whole change)
    update_bounds, logdet_bounds : (float, float)
    out_dtype : torch.dtype, optional
        Dtype the merged matrix will be stored in (checked for overflow).
    max_condition : float
        Largest accepted 2-norm condition number of :math:`C`.

    Returns
    -------
    code : Tensor, shape (*), int64
        Index into :data:`~p4opt.linalg.merge.MERGE_REJECTIONS` (0 = accepted).
    update_logabsdet : Tensor, shape (*)
        :math:`\log|\det C|` of the proposed update. Cost :math:`O(n^2 k)`.

    Examples
    --------
    >>> import torch
    >>> a, inv = torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    >>> sign, lad = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    >>> u = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    >>> code, _ = low_rank_merge_(a, inv, sign, lad, u, u)
    >>> int(code), a.diagonal().tolist(), inv.diagonal().tolist(), round(float(lad.exp()), 12)
    (0, [2.0, 1.0], [0.5, 1.0], 2.0)
    """
    check = low_rank_check(
        matrix, inv, logabsdet, u, v, update_bounds, logdet_bounds, max_condition, out_dtype,
        sign=sign,
    )
    low_rank_fold_(matrix, inv, sign, logabsdet, u, v, check)
    return check.codes, check.cap_logabsdet
