r"""P⁴Inv: invertible matrices with an exactly tracked inverse and log-determinant."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch

from p4opt import linalg
from p4opt._typing import Tensor
from p4opt._validate import check_bounds, check_choice, check_dtype, check_int, check_number
from p4opt.errors import P4ValueError, ShapeError
from p4opt.families import square
from p4opt.families.entry_bounds import EntryBounds
from p4opt.families.invertible_queries import TrackedInverse, tracked_report
from p4opt.families.invertible_updates import (
    Factored,
    Projected,
    UpdateRule,
    default_rank,
)
from p4opt.families.precise_master import PreciseMaster
from p4opt.linalg import merge as lowrank
from p4opt.linalg.partial import SCALABLE, feasible_scale
from p4opt.perturbation import Perturbation, Proposal, ValidationReport

__all__ = ["Invertible", "default_rank"]

Bounds = tuple[float, float]


class Invertible(PreciseMaster, TrackedInverse, Perturbation):
    r"""Invertible square matrices with an exactly tracked inverse and log-determinant (P⁴Inv).

    The base :math:`A` keeps :math:`A^{-1}` and :math:`\log|\det A|` with its sign in
    ``dtype`` (float64 by default, also for float32 layers, whose base then has a float64
    master copy). A merge folds a rank-k update :math:`UV^T` exactly:

    .. math:: (A + UV^T)^{-1} = A^{-1} - A^{-1}U\,C^{-1} V^T A^{-1}, \qquad
              \det(A + UV^T) = \det C \cdot \det A, \qquad C = I_k + V^T A^{-1} U .

    Two update rules (``update``): ``"projected"`` (default) trains a dense pending change
    :math:`\Delta` with the optimizer's usual state and folds its best rank-k part after every
    step (the rest is discarded); ``"factored"`` trains :math:`A + UV^T` directly (:math:`2nk`
    numbers of optimizer state, for very large ``n``). An update outside the bounds is cut back
    to the largest fraction that passes (a *partial* merge). A tensor ``(*, n, n)`` is a stack
    merged element by element; a 1×1 convolution weight ``(c, c, 1, ...)`` is one matrix.

    Costs (``B`` vectors, rank ``k``): forward and :meth:`solve` :math:`O(Bn^2)`;
    :meth:`logabsdet` :math:`O(n^2)` (projected) or :math:`O(n^2k)`; merge :math:`O(n^2k)`;
    a correction every ``correct_every`` merges :math:`O(n^3)`.

    Parameters
    ----------
    rank : int, optional
        Rank ``k`` of each merged update; default :func:`default_rank` of ``n``.
    update : {"projected", "factored"}
        The update rule (see above).
    correct_every : int or None
        Every this many merges, refine the stored inverse by an iterative step
        (``refine_order``) and recompute log|det| by LU. ``None`` disables corrections.
    update_logdet_bounds : (float, float), optional
        Bounds on :math:`\log|\det C|` of one merged update; default :math:`(-k/2, k/2)`
        (projected, merged every step) or :math:`(-2k, 2k)` (factored).
    max_update_condition : float
        Largest 2-norm condition number of :math:`C` (the factor by which the Woodbury
        update can amplify rounding). A merge of the whole change (``rank >= n``, projected)
        factorizes :math:`A + \Delta` itself and has no :math:`C` to check.
    logdet_bounds : (float, float), optional
        Bounds on :math:`\log|\det A|` after the merge.
    refine_order : int
        Order of the iterative inverse step: 2 is Newton–Schulz, 3 or more a hyperpower step.
    on_reject : {"keep", "reset"}
        A finite update that cannot be folded even in part is kept pending (default) or
        dropped.
    restart, init_scale : {"random", "gradient"}, float
        ``"factored"`` only: how ``V`` restarts; its draws' std (default :math:`1/\sqrt k`).
    power_iters : int
        ``"projected"`` only: power iterations of the range finder.
    dtype : torch.dtype
        Bookkeeping precision.
    max_condition : float
        Registration fails for a matrix whose 1-norm condition number exceeds this.
    seed : int, optional
        Seed of the perturbation's random draws.

    References
    ----------
    - A. Krämer, J. Köhler, F. Noé, "Preserving properties of neural networks by
      perturbative updates", NeurIPS 2020 (the P⁴ and P⁴Inv updates).
    - W. W. Hager, "Updating the inverse of a matrix", SIAM Review 31 (1989).
    - N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness",
      SIAM Review 53 (2011).

    Examples
    --------
    >>> import torch, p4opt
    >>> _ = torch.manual_seed(0)
    >>> lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    >>> pert = p4opt.register(lin, "weight", p4opt.Invertible(update="factored", rank=2))
    >>> with torch.no_grad():
    ...     _ = pert.U.normal_(std=0.1)
    >>> w = lin.weight
    >>> torch.allclose(pert.logabsdet(), torch.linalg.slogdet(w)[1])
    True
    >>> pert.merge().accepted
    True
    >>> torch.allclose(lin.weight, w)   # a merge does not change the layer
    True
    """

    reset_optimizer_state: ClassVar[bool] = False
    #: low_rank_check refuses non-finite factors element by element
    proposes_finite_only: ClassVar[bool] = True
    #: Whether a merge must keep the sign of every determinant (refused, or cut back to a
    #: fraction that keeps it, otherwise); :class:`~p4opt.SpecialLinear` sets it.
    keeps_determinant_sign: ClassVar[bool] = False
    precise_buffers: ClassVar[tuple[str, ...]] = (
        "inv",
        "precise_base",
        "sign_base",
        "logabsdet_base",
    )

    def __init__(
        self,
        rank: int | None = None,
        *,
        update: Literal["projected", "factored"] = "projected",
        correct_every: int | None = 50,
        update_logdet_bounds: Bounds | None = None,
        max_update_condition: float = 1e3,
        logdet_bounds: Bounds | None = None,
        refine_order: int = 2,
        on_reject: Literal["keep", "reset"] = "keep",
        restart: Literal["random", "gradient"] = "random",
        power_iters: int = 1,
        init_scale: float | None = None,
        dtype: torch.dtype = torch.float64,
        max_condition: float = 1e12,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed, correct_every=correct_every, on_reject=on_reject)
        self.rank = None if rank is None else check_int("rank", rank, minimum=1)
        self.update = check_choice("update", update, ("projected", "factored"))
        self._bounds_given = update_logdet_bounds
        self.update_logdet_bounds = check_bounds("update_logdet_bounds", update_logdet_bounds)
        self.max_update_condition = check_number(
            "max_update_condition", max_update_condition, minimum=1
        )
        self.logdet_bounds = check_bounds("logdet_bounds", logdet_bounds)
        self.refine_order = check_int("refine_order", refine_order, minimum=2)
        self.restart_rule = check_choice("restart", restart, ("random", "gradient"))
        self.power_iters = check_int("power_iters", power_iters, minimum=0)
        self._init_scale = None if init_scale is None else check_number(
            "init_scale", init_scale, positive=True
        )
        self.dtype = check_dtype("dtype", dtype)
        self.max_condition = check_number("max_condition", max_condition, minimum=1)
        if update == "projected" and restart != "random":
            raise P4ValueError("restart applies to update='factored' only; leave it out")
        self.wants_gradients = update == "factored" and restart == "gradient"
        self.rule: UpdateRule = Projected(self) if update == "projected" else Factored(self)
        self.default_merge_every = self.rule.merge_every
        self._cast_cache: dict[Any, tuple[int, Tensor]] = {}
        self._bounds = EntryBounds()
        self._conv = False

    @property
    def init_scale(self) -> float:
        return self.rank**-0.5 if self._init_scale is None else self._init_scale  # type: ignore[operator]

    # ------------------------------------------------------------ registration
    def attach(self, value: Tensor) -> Tensor:
        """Check that ``value`` is square (a stack, or a 1×1 conv weight) and invertible."""
        matrix = self._as_matrix(value.detach())
        n = matrix.shape[-1]
        if self.rank is None:
            self.rank = default_rank(n)
        if self.rank > n and self.update == "factored":
            raise ShapeError(f"rank {self.rank} exceeds the size {n} of {self.where}")
        if self._bounds_given is None:  # per direction: e^{±1/2} (projected), e^{±2} (factored)
            k = min(self.rank, n)
            per = 0.5 if self.update == "projected" else 2.0
            self.update_logdet_bounds = (-per * k, per * k)
        matrix = matrix.to(self.dtype)
        if matrix.device.type == "meta":
            inv, sign, logabsdet = matrix.clone(), matrix[..., 0, 0], matrix[..., 0, 0]
        else:
            inv, sign, logabsdet = self._check_invertible(matrix)
        self._init_state(value, matrix, inv, sign, logabsdet)
        return value

    def _as_matrix(self, value: Tensor) -> Tensor:
        """The (*, n, n) matrix view of a registered tensor (see :func:`square.matrix_view`)."""
        matrix, self._conv = square.matrix_view(value, self.where, self._context)
        return matrix

    def _as_weight(self, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.base.shape) if self._conv else matrix

    def _check_invertible(self, matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return square.check_invertible(matrix, self.where, self.max_condition)

    def _init_state(
        self, value: Tensor, matrix: Tensor, inv: Tensor, sign: Tensor, logabsdet: Tensor
    ) -> None:
        precise = matrix.clone() if value.dtype != self.dtype else None
        self._pending_lu = None  # new bookkeeping replaces a deferred inverse
        if "inv" not in self._buffers:
            self.register_buffer("inv", inv)
            self.register_buffer("precise_base", precise)
            self.register_buffer("sign_base", sign)
            self.register_buffer("logabsdet_base", logabsdet)
        else:  # ``module.weight = X`` on a registered module: same shapes, new values
            with torch.no_grad():
                self.inv.copy_(inv)
                self.sign_base.copy_(sign)
                self.logabsdet_base.copy_(logabsdet)
                if precise is not None:
                    self.precise_base.copy_(precise)
        self.rule.create(value, matrix.shape[:-2], matrix.shape[-1])
        self.identity()

    # ---------------------------------------------------------------- contract
    def identity(self) -> None:
        """Return every matrix of the stack to its base (the pending update is dropped)."""
        self.rule.restart(torch.ones(self._inverse_shape[:-2], dtype=torch.bool), folded=False)

    def apply(self, base: Tensor) -> Tensor:
        """:math:`A + \\Delta` (or :math:`A + UV^T`) in the layer's dtype."""
        if not self._conv:
            return self.rule.apply(base)
        c = base.shape[0]
        return self.rule.apply(base.reshape(c, c)).reshape(base.shape)

    def _stack_shape(self) -> torch.Size:
        return self._inverse_shape[:-2]

    # ------------------------------------------------------------------ merging
    def propose(self) -> Proposal:
        """Check the rank-k update of every matrix; scale back those outside the bounds."""
        u, v = self.rule.factors()
        args = (self.update_logdet_bounds, self.logdet_bounds, self.max_update_condition)
        matrix = self._matrix()
        whole = v is None  # the check factorizes A + Delta and needs no A^{-1}
        inv = self._buffers["inv"] if whole else self.inv
        bounds = None if whole else self._bounds.get(matrix, inv)
        positive = self.keeps_determinant_sign
        check = lowrank.low_rank_check(
            matrix, inv, self.logabsdet_base, u, v, *args, self.base.dtype, bounds,
            self.sign_base, inverse=not whole, positive=positive,
        )
        if check.all_pass or not bool(check.codes.ne(0).any()):  # the whole update folds
            return Proposal(figures=self._figures(check), data=(u, v, check))
        scale = torch.ones(check.codes.shape, dtype=torch.float64, device=u.device)
        u = u.to(self.dtype)  # the whole change comes in the layer's dtype
        scalable = torch.isin(check.codes, torch.tensor(SCALABLE, device=u.device))
        cut = torch.where(scalable, check.codes, 0)
        if bool(scalable.any()):
            t = feasible_scale(self.inv, self.logabsdet_base, u, v, *args, positive=positive)
            use = scalable & (t > 0)
            if bool(use.any()):
                scale = torch.where(use, t, scale)
                u = u * scale[..., None, None].to(u.dtype)
                check = lowrank.low_rank_check(
                    matrix, inv, self.logabsdet_base, u, v, *args, self.base.dtype, bounds,
                    self.sign_base, inverse=not whole, positive=positive,
                )
        return Proposal(
            codes=check.codes, scale=scale, cut=cut, figures=self._figures(check),
            data=(u, v, check),
        )

    @staticmethod
    def _figures(check: lowrank.LowRankCheck) -> dict[str, float]:
        lad = check.cap_logabsdet
        return {"update_logabsdet": float(lad if lad.ndim == 0 else lad.abs().amax())}

    def fold(self, proposal: Proposal, ok: Tensor) -> None:
        u, v, check = proposal.data
        matrix = self._matrix()
        deferred = check.factorization is not None  # every element folds: keep the LU factors
        inv = self._buffers["inv"] if deferred else self.inv
        linalg.low_rank_fold_(matrix, inv, self.sign_base, self.logabsdet_base, u, v, check)
        if deferred:
            self._defer_inverse(*check.factorization)  # type: ignore[misc]
        if matrix is self.precise_base:  # round the float64 master into the layer
            self.base.copy_(self._as_weight(matrix if check.rounded is None else check.rounded))
        if check.entry_bounds is not None and v is not None:
            self._bounds.put(matrix, inv, check.entry_bounds)
        if v is not None:  # a Woodbury fold: its error adds up and grows with A's condition
            self._correct_if_drifted(matrix, inv)
        if proposal.scale is None:
            return
        partial = ok & (proposal.scale < 1)
        if bool(partial.any()):
            self.rule.keep_remainder(partial, proposal.scale)  # type: ignore[arg-type]

    def restart(self, mask: Tensor, folded: bool) -> None:
        self.rule.restart(mask, folded)

    @torch.no_grad()
    def correct(self) -> dict[str, float]:
        """Refine the stored inverse iteratively and recompute log|det| by LU; :math:`O(n^3)`.

        Nothing to do while the inverse waits as the LU factors of the last whole-step merge:
        it will be solved from a fresh factorization of the current matrix, and log|det| came
        from the same factors.
        """
        if self._inverse_pending:
            return {}
        matrix = self._matrix()
        inv, residual = linalg.refine_inverse(
            matrix, self.inv, order=self.refine_order, max_steps=2
        )
        sign, logabsdet = torch.linalg.slogdet(matrix)
        if math.isfinite(residual) and bool(torch.isfinite(logabsdet).all() & (sign != 0).all()):
            self.inv.copy_(inv)
            self.sign_base.copy_(sign)
            self.logabsdet_base.copy_(logabsdet)
        return {"inverse_residual": residual}

    @torch.no_grad()
    def validate(self) -> ValidationReport:
        r"""Measure the bookkeeping against dense linear algebra; cost :math:`O(n^3)`.

        Figures for the current matrix :math:`W` at bookkeeping precision: ``inverse_error``
        :math:`\lVert W W^{-1} - I\rVert_{\max}`, ``logabsdet_error`` against
        ``torch.linalg.slogdet`` (``inf`` when the signs disagree), ``base_rounding`` (the
        layer's base against the float64 master) and ``update_logabsdet``. A singular
        pending update gives a FAILED report that says so.
        """
        return tracked_report(self)

    def extra_repr(self) -> str:
        return (
            f"update={self.update!r}, rank={self.rank}, correct_every={self.correct_every}, "
            f"dtype={self.dtype}"
        )
