r"""P⁴Inv: invertible matrices trained through low-rank updates :math:`A + U V^T`."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from p4opt import linalg
from p4opt._typing import Tensor
from p4opt.exceptions import ShapeError, SingularMatrixError, describe
from p4opt.perturbation import MergeResult, Perturbation, ValidationReport

__all__ = ["Invertible"]

Bounds = tuple[float, float]
_NON_FINITE, _SINGULAR, _UPDATE_BOUNDS, _OVERFLOW = (
    linalg.MERGE_REJECTIONS.index(reason)
    for reason in (
        "non-finite update", "singular update", "update log|det| outside bounds",
        "non-finite merged matrix",
    )
)


def _check_bounds(name: str, bounds: Bounds | None) -> Bounds:
    if bounds is None:
        return (-math.inf, math.inf)
    lo, hi = (float(b) for b in bounds)
    if not lo < hi:
        raise ValueError(f"{name} must be (low, high) with low < high, got {bounds!r}")
    return lo, hi


class Invertible(Perturbation):
    r"""Invertible square matrices with an exactly tracked inverse and log-determinant (P⁴Inv).

    .. math::

        R_{U,V}(A) = A + U V^T, \qquad U, V \in \mathbb{R}^{n \times k}

    with identity :math:`U = 0` (``V`` redrawn from the perturbation's
    generator at every reset). The base keeps :math:`A^{-1}` and
    :math:`\log|\det A|` with its sign in ``dtype`` (float64 by default, also
    for float32 layers, whose base is then also kept in float64 and rounded
    into the layer). The current matrix's inverse follows from Woodbury,

    .. math:: (A + UV^T)^{-1} = A^{-1} - A^{-1}U\,C^{-1} V^T A^{-1},
              \qquad C = I_k + V^T A^{-1} U,

    and its determinant from the determinant lemma
    :math:`\det(A + UV^T) = \det C \cdot \det A`.

    Costs (``B`` vectors, ``k`` rank): forward :math:`O(Bn^2 + n^2k)`;
    :meth:`logabsdet` :math:`O(n^2 k)`; :meth:`solve` :math:`O(Bn^2)`; merge
    :math:`O(n^2 k)`; a correction every ``correct_every`` merges
    :math:`O(n^3)`. Nothing cubic runs per step.

    Parameters
    ----------
    rank : int
        Rank ``k >= 1`` of the update (1 is the P⁴Inv paper's case).
    correct_every : int or None
        Every this many accepted merges, refine the stored inverse by an
        iterative step (see ``refine_order``) and recompute log|det| by LU.
        ``None`` disables corrections.
    update_logdet_bounds : (float, float) or None
        A merge is rejected when :math:`\log|\det C|` leaves these bounds
        (the inverse update amplifies errors by up to :math:`1/|\det C|` for
        rank one). Default :math:`(-2k, 2k)`: a rank-k update may change the
        volume by :math:`e^{\pm 2}` per direction.
    max_update_condition : float
        A merge is also rejected when the 2-norm condition number of
        :math:`C` exceeds this (rank > 1 only): the Woodbury update amplifies
        rounding by at most about this factor, harmless at float64 with
        periodic refinement. A tighter :math:`e^4` rejected 9 of 100 useful
        merges when fitting a map of condition 1.4e3 and left the loss 6000×
        higher.
    logdet_bounds : (float, float) or None
        A merge is rejected when the new :math:`\log|\det A|` leaves these bounds.
    refine_order : int
        Order of the iterative inverse step: 2 is Newton–Schulz, 3 or more a
        higher-order hyperpower step.
    on_reject : {"reset", "keep"}
        After a rejected merge, drop the update (``"reset"``, the paper's
        choice; the layer's output jumps back to :math:`A`) or keep training it
        (``"keep"``). A non-finite update is always dropped.
    restart : {"random", "gradient"}
        How ``V`` restarts after an accepted merge. ``"random"`` (default, the
        paper's choice): redrawn from the generator. ``"gradient"``: along an
        orthonormal basis of the last gradient of ``V``, which, with ``U``
        accumulated over the cycle, is one power-iteration step towards the
        top right singular vectors of the weight's gradient (the directions
        the next cycle most needs); random where there is no usable gradient
        (registration, rejected merges, ``merge()`` outside ``step()``).
        Measured on Gaussian maximum likelihood, n = 64 (Adam, lr 3e-2): with
        ``"gradient"`` rank 32 reached relative loss 1e-4 in 110 steps instead
        of 191, rank 16 (merges every 5) in 198 instead of 332; at rank 1 and
        4, and in the 2×2 flow, it was no better or worse, hence the default.
        Use it for wide updates (``rank >= n / 4``).
    init_scale : float, optional
        Standard deviation of the redrawn ``V``; default :math:`1/\sqrt{k}`, so
        that an Adam step changes each entry of :math:`UV^T` by about ``lr``
        whatever the rank (as for a plain weight).
    dtype : torch.dtype
        Bookkeeping precision.
    max_condition : float
        Registration fails for a matrix whose 1-norm condition number exceeds this.
    seed : int, optional
        Seed of the generator that redraws ``V``.

    Attributes
    ----------
    U, V : torch.nn.Parameter, shape (n, k)
        The trainable factors, in the layer's dtype.
    inv : Tensor, shape (n, n)
        :math:`A^{-1}` in ``dtype``.

    Examples
    --------
    >>> import torch, p4opt
    >>> _ = torch.manual_seed(0)
    >>> lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    >>> pert = p4opt.register(lin, "weight", p4opt.Invertible(rank=2))
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

    default_merge_every: ClassVar[int] = 10
    #: Keeping Adam's moments across merges measured far better than dropping them: fitting a
    #: 16×16 map (cond ≈ 1.4e3) to 1500 Adam steps, rank 4, merges every 10 steps, reached a
    #: relative loss of 2e-13 (kept) versus 7e-3 (dropped: each restart takes lr-sized steps).
    reset_optimizer_state: ClassVar[bool] = False
    precise_buffers: ClassVar[tuple[str, ...]] = (
        "inv",
        "precise_base",
        "sign_base",
        "logabsdet_base",
    )

    def __init__(
        self,
        rank: int = 1,
        *,
        correct_every: int | None = 50,
        update_logdet_bounds: Bounds | None = None,
        max_update_condition: float = 1e3,
        logdet_bounds: Bounds | None = None,
        refine_order: int = 2,
        on_reject: Literal["reset", "keep"] = "reset",
        restart: Literal["random", "gradient"] = "random",
        init_scale: float | None = None,
        dtype: torch.dtype = torch.float64,
        max_condition: float = 1e12,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if correct_every is not None and (not isinstance(correct_every, int) or correct_every < 1):
            raise ValueError(f"correct_every must be a positive int or None, got {correct_every!r}")
        if on_reject not in ("reset", "keep"):
            raise ValueError(f"on_reject must be 'reset' or 'keep', got {on_reject!r}")
        if not isinstance(refine_order, int) or refine_order < 2:
            raise ValueError(f"refine_order must be an int >= 2, got {refine_order!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.rank = rank
        self.correct_every = correct_every
        if update_logdet_bounds is None:
            update_logdet_bounds = (-2.0 * rank, 2.0 * rank)
        self.update_logdet_bounds = _check_bounds("update_logdet_bounds", update_logdet_bounds)
        if not max_update_condition >= 1:
            raise ValueError(f"max_update_condition must be >= 1, got {max_update_condition!r}")
        self.max_update_condition = float(max_update_condition)
        self.logdet_bounds = _check_bounds("logdet_bounds", logdet_bounds)
        self.refine_order = refine_order
        self.on_reject = on_reject
        if restart not in ("gradient", "random"):
            raise ValueError(f"restart must be 'gradient' or 'random', got {restart!r}")
        self.restart = restart
        self.init_scale = rank**-0.5 if init_scale is None else float(init_scale)
        self.dtype = dtype
        self.max_condition = float(max_condition)
        self._cast_cache: dict[Any, tuple[int, Tensor]] = {}

    # ------------------------------------------------------------ registration
    def attach(self, value: Tensor) -> Tensor:
        """Check that ``value`` is square (or a stack) and invertible; set up the bookkeeping."""
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{self.where} must be a floating-point tensor, got {describe(value)}")
        if value.ndim < 2 or value.shape[-1] != value.shape[-2]:
            raise ShapeError(
                "Invertible needs a square matrix (n, n) or a stack (*, n, n), but "
                f"{self.where} is a {describe(value)}"
            )
        n = value.shape[-1]
        if self.rank > n:
            raise ValueError(f"rank {self.rank} exceeds the size {n} of {self.where}")
        matrix = value.detach().to(self.dtype)
        inv, info = torch.linalg.inv_ex(matrix)
        sign, logabsdet = torch.linalg.slogdet(matrix)
        cond = torch.linalg.matrix_norm(matrix, 1) * torch.linalg.matrix_norm(inv, 1)
        worst = float(torch.where(torch.isfinite(cond), cond, math.inf).amax())
        if bool((info != 0).any()) or bool((sign == 0).any()) or not math.isfinite(worst):
            raise SingularMatrixError(
                f"{self.where} is singular; Invertible needs an invertible matrix"
            )
        if worst > self.max_condition:
            raise SingularMatrixError(
                f"{self.where} is numerically singular (1-norm condition number {worst:.2e} > "
                f"max_condition={self.max_condition:.1e}); start from a better-conditioned matrix"
            )
        self._init_state(value, matrix, inv, sign, logabsdet)
        return value

    def _init_state(
        self, value: Tensor, matrix: Tensor, inv: Tensor, sign: Tensor, logabsdet: Tensor
    ) -> None:
        factor_shape = (*value.shape[:-1], self.rank)
        precise = matrix.clone() if value.dtype != self.dtype else None
        if "U" not in self._parameters:
            like = dict(dtype=value.dtype, device=value.device)
            self.U = nn.Parameter(torch.zeros(factor_shape, **like))
            self.V = nn.Parameter(torch.zeros(factor_shape, **like))
            self.register_buffer("inv", inv)
            self.register_buffer("precise_base", precise)
            self.register_buffer("sign_base", sign)
            self.register_buffer("logabsdet_base", logabsdet)
            self.register_buffer("merges", torch.zeros((), dtype=torch.long))
        else:  # ``module.weight = X`` on a registered module: same shapes, new values
            with torch.no_grad():
                self.inv.copy_(inv)
                self.sign_base.copy_(sign)
                self.logabsdet_base.copy_(logabsdet)
                if precise is not None:
                    self.precise_base.copy_(precise)
        self.identity()

    # ---------------------------------------------------------------- contract
    def identity(self) -> None:
        """Set ``U = 0`` and redraw ``V`` from the perturbation's generator."""
        self._reset(torch.ones((), dtype=torch.bool))

    @torch.no_grad()
    def _reset(self, mask: Tensor, along: Tensor | None = None) -> None:
        """Return the stack elements selected by the boolean ``mask`` to the identity.

        ``V`` is redrawn from the generator, or, where ``along`` (the last gradient of
        ``V``) is finite and nonzero, set to an orthonormal basis of its columns scaled
        to the norm of a random draw.
        """
        fresh = torch.randn(self.V.shape, generator=self.generator, dtype=torch.float64)
        fresh = fresh.mul_(self.init_scale)
        if along is not None:
            along = along.detach().to(torch.float64)
            usable = torch.isfinite(along).all(-1).all(-1) & (along.abs().amax((-2, -1)) > 0)
            basis = torch.linalg.qr(torch.where(usable[..., None, None], along, fresh)).Q
            scaled = basis * (self.init_scale * along.shape[-2] ** 0.5)
            fresh = torch.where(usable[..., None, None], scaled, fresh)
        fresh = fresh.to(self.V)
        mask = mask.to(self.V.device)[..., None, None]
        self.U.copy_(torch.where(mask, torch.zeros_like(self.U), self.U))
        self.V.copy_(torch.where(mask, fresh, self.V))

    def apply(self, base: Tensor) -> Tensor:
        """:math:`A + U V^T` in the layer's dtype; cost :math:`O(n^2 k)` per matrix."""
        if base.ndim == 2:
            return torch.addmm(base, self.U, self.V.mT)
        return base + self.U @ self.V.mT

    def _factors(self) -> tuple[Tensor, Tensor]:
        return self.U.to(self.dtype), self.V.to(self.dtype)

    def _matrix(self) -> Tensor:
        """The base matrix :math:`A` at bookkeeping precision."""
        return self.precise_base if self.precise_base is not None else self.base

    # ------------------------------------------------------------ user methods
    def logabsdet(self) -> Tensor:
        r""":math:`\log|\det(A + UV^T)|`, differentiable in ``U`` and ``V``.

        Returns a 0-dim tensor in the bookkeeping dtype; cost :math:`O(n^2 k)`.
        """
        u, v = self._factors()
        return linalg.lemma_slogdet(self.inv, u, v, self.sign_base, self.logabsdet_base)[1]

    def sign(self) -> Tensor:
        r"""Sign of :math:`\det(A + UV^T)` (``+1.`` or ``-1.``), a 0-dim tensor."""
        with torch.no_grad():
            u, v = self._factors()
            return linalg.lemma_slogdet(self.inv, u, v, self.sign_base, self.logabsdet_base)[0]

    def inverse(self) -> Tensor:
        r""":math:`(A + UV^T)^{-1}` by Woodbury, differentiable; shape (n, n), bookkeeping dtype.

        Cost :math:`O(n^2 k)`. Prefer :meth:`solve` to apply it to vectors.
        """
        u, v = self._factors()
        return linalg.woodbury_inverse(self.inv, u, v)

    def solve(self, y: Tensor) -> Tensor:
        r"""Apply :math:`(A + UV^T)^{-1}` to every vector ``y[..., n]`` without forming it.

        Computed in ``y``'s dtype (a float32 ``y`` uses a float32 copy of the
        float64 inverse, refreshed after each merge); differentiable in ``y``,
        ``U`` and ``V``. Cost :math:`O(B n^2)` for ``B`` vectors.

        For a stack of shape ``(*, n, n)``, ``y`` has shape ``(..., *, n)`` and
        element ``i`` of the stack is applied to ``y[..., i, :]`` (via the
        explicit inverses, cost :math:`O(L n^2 k + B L n^2)`).
        """
        n = self.inv.shape[-1]
        stack = self.inv.shape[:-2]
        if not isinstance(y, Tensor) or not y.is_floating_point():
            raise TypeError(f"y must be a floating-point tensor, got {describe(y)}")
        if y.ndim < 1 + len(stack) or y.shape[y.ndim - 1 - len(stack):] != (*stack, n):
            want = ", ".join(str(d) for d in (*stack, n))
            raise ShapeError(f"y must have shape (..., {want}) for {self.where}, got {describe(y)}")
        if stack:
            return (self.inverse().to(y.dtype) @ y.unsqueeze(-1)).squeeze(-1)
        inv_t = self._inverse_transposed(y.dtype)
        return linalg.woodbury_solve(inv_t, self.U.to(y.dtype), self.V.to(y.dtype), y)

    def _inverse_transposed(self, dtype: torch.dtype) -> Tensor:
        """Contiguous :math:`A^{-T}` in ``dtype``, cached until the bookkeeping changes."""
        key = (dtype, self.inv.device, self.inv.data_ptr())
        version = self.inv._version
        hit = self._cast_cache.get(key)
        if hit is None or hit[0] != version:
            hit = (version, self.inv.mT.to(dtype).contiguous())
            self._cast_cache.clear()
            self._cast_cache[key] = hit
        return hit[1]

    def logdet_penalty(self, margin: float = 0.5) -> Tensor:
        r"""Soft penalty keeping the update's :math:`\log|\det C|` inside the merge bounds.

        .. math:: \mathrm{relu}(l_{lo} + m - \ell)^2 + \mathrm{relu}(\ell - l_{hi} + m)^2,
                  \qquad \ell = \log|\det(I + V^T A^{-1} U)|

        Add it (scaled) to the loss; it is zero while the update is ``margin``
        inside the bounds. Cost :math:`O(n^2 k)`.
        """
        u, v = self._factors()
        cap_logabsdet = torch.linalg.slogdet(linalg.capacitance(self.inv, u, v)[1])[1]
        lo, hi = self.update_logdet_bounds
        zero = torch.zeros_like(cap_logabsdet)
        below = torch.relu(lo + margin - cap_logabsdet) if math.isfinite(lo) else zero
        above = torch.relu(cap_logabsdet - hi + margin) if math.isfinite(hi) else zero
        return below**2 + above**2

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge(self) -> MergeResult:
        """Fold :math:`UV^T` into :math:`A` after validating it; cost :math:`O(n^2 k)`.

        For a stack ``(L, n, n)`` every layer is validated and merged on its
        own; ``accepted`` is true only if all were, and the figure
        ``rejected`` counts the others (which keep their base bit for bit).
        """
        u, v = self._factors()
        matrix = self._matrix()
        code, update = linalg.low_rank_merge_(
            matrix, self.inv, self.sign_base, self.logabsdet_base, u, v,
            self.update_logdet_bounds, self.logdet_bounds, out_dtype=self.base.dtype,
            max_condition=self.max_update_condition,
        )
        ok = code == 0
        n_rejected = int((~ok).sum())
        figures = {  # signed for one matrix, the largest magnitude for a stack
            "update_logabsdet": float(update if update.ndim == 0 else update.abs().amax()),
            "rejected": float(n_rejected),
        }
        if bool(ok.any()):
            if matrix is not self.base:  # round the float64 master into the layer
                self.base.copy_(matrix)
            self.merges += 1
        corrected = bool(ok.any()) and self.correct_every is not None and (
            int(self.merges) % self.correct_every == 0
        )
        if corrected:
            figures.update(self.correct())
        # accepted layers always restart from the identity; rejected ones per ``on_reject``,
        # except updates that cannot be kept (non-finite or singular)
        forced = (code == _NON_FINITE) | (code == _SINGULAR) | (code == _OVERFLOW)
        reset = ok | forced | (self.on_reject == "reset")
        # accepted elements restart along the last gradient of V (see ``restart``)
        along = self.V.grad if self.restart == "gradient" and bool(ok.any()) else None
        self._reset(reset & ~ok)
        self._reset(ok, along=along)
        reason = "ok"
        if n_rejected:
            codes = code[~ok].tolist()
            first = linalg.MERGE_REJECTIONS[codes[0]]
            if code.ndim:
                first = f"{n_rejected} of {ok.numel()} rejected: {first}"
            reason = first
            if codes[0] == _UPDATE_BOUNDS:
                lo, hi = self.update_logdet_bounds
                reason += f" [{lo:g}, {hi:g}] (update log|det| {figures['update_logabsdet']:.3g})"
        return MergeResult(
            accepted=n_rejected == 0,
            reason=reason,
            reset=bool(reset.any()),
            corrected=corrected,
            # a dropped update's optimizer state points back towards it: drop that too
            state_invalid=bool((reset & ~ok).any()),
            figures=figures,
        )

    @torch.no_grad()
    def correct(self) -> dict[str, float]:
        """Refine the stored inverse iteratively and recompute log|det| by LU; cost :math:`O(n^3)`.

        Returns the figures ``inverse_residual`` (after refinement). Leaves the
        bookkeeping unchanged if the refinement produces anything non-finite.
        """
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

        Figures: ``inverse_error`` :math:`\lVert W W^{-1} - I\rVert_{\max}` and
        ``logabsdet_error`` :math:`|\log|\det W| - \mathrm{slogdet}(W)|` for the
        current matrix :math:`W = A + UV^T` at bookkeeping precision (``inf``
        when the signs disagree), ``base_rounding`` (max relative gap between
        the layer's base and the float64 base), and ``update_logabsdet``.
        """
        u, v = self._factors()
        w = self._matrix() + u @ v.mT
        inverse_error = float(linalg.inverse_residual(w, self.inverse()).abs().amax())
        ref_sign, ref_logabsdet = torch.linalg.slogdet(w)
        sign, logabsdet = linalg.lemma_slogdet(self.inv, u, v, self.sign_base, self.logabsdet_base)
        logdet_error = float((logabsdet - ref_logabsdet).abs().amax())
        if bool((sign != ref_sign).any()):
            logdet_error = math.inf
        scale = float(self._matrix().abs().amax())
        rounding = float((self.base.to(self.dtype) - self._matrix()).abs().amax()) / scale
        cap_logabsdet = torch.linalg.slogdet(linalg.capacitance(self.inv, u, v)[1])[1].abs().amax()
        eps = torch.finfo(self.base.dtype).eps
        figures = {
            "inverse_error": inverse_error,
            "logabsdet_error": logdet_error,
            "base_rounding": rounding,
            "update_logabsdet": float(cap_logabsdet),
        }
        tolerances = {"inverse_error": 1e-6, "logabsdet_error": 1e-6, "base_rounding": 2 * eps}
        return ValidationReport(where=self.where, figures=figures, tolerances=tolerances)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, correct_every={self.correct_every}, dtype={self.dtype}"
