r"""Symmetric positive-definite matrices by congruence, with tracked inverse and log-det."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import nn

from p4opt import linalg
from p4opt._typing import Tensor
from p4opt._validate import check_bounds, check_choice, check_int, check_number
from p4opt.errors import P4ValueError, ShapeError, SingularMatrixError, describe
from p4opt.families import congruence as cg
from p4opt.families.congruence import project_spd
from p4opt.families.positive_definite_correction import PositiveDefiniteCorrection
from p4opt.families.positive_definite_queries import INVERSE_TOLERANCE, PositiveDefiniteQueries
from p4opt.linalg._common import _eye_like
from p4opt.perturbation import Perturbation, Proposal, Reason

__all__ = ["PositiveDefinite", "project_spd"]

Bounds = tuple[float, float]
_SCALABLE = (Reason.UPDATE_BOUNDS.code, Reason.ILL_CONDITIONED_UPDATE.code)


class PositiveDefinite(PositiveDefiniteQueries, PositiveDefiniteCorrection, Perturbation):
    r"""Symmetric positive-definite matrices (and stacks) trained through a congruence.

    .. math:: R_{M}(A) = M A M^T, \qquad M = I + UV^T, \qquad
              \det R_M(A) = (\det C)^2 \det A, \quad C = I_k + V^TU,

    which is symmetric positive definite whenever :math:`A` is and :math:`C` is non-singular.
    The base keeps :math:`A^{-1}` (Woodbury applied on both sides) and :math:`\log\det A` in
    float64 (a float64 master copy of :math:`A` too), re-symmetrized at every merge.

    Two update rules (``update``):

    ``"projected"`` (default)
        The optimizer trains a dense :math:`\Delta` (zero at the identity); each merge (every 10
        steps by default) folds the best rank-k part of :math:`\Delta` (all of it when
        ``k >= n``, the default; a smaller ``k`` makes merges :math:`O(n^2k)` and drops the rest
        of the change). By default :math:`\Delta` acts in the base's own whitened coordinates
        (``coordinates="whitened"``): with a tracked factor :math:`A = FF^T` the layer sees

        .. math:: W = F (I + \Delta)(I + \Delta)^T F^T,
                  \qquad M = F (I + \Delta) F^{-1},

        so that a step of :math:`\Delta` changes :math:`W` relative to :math:`W` itself, as
        the affine-invariant geometry of the SPD cone does (Adam trained in these coordinates
        converges without the oscillation of ``coordinates="ambient"``, where the layer sees
        :math:`(I + \Delta) A (I + \Delta)^T`; measured in the documentation's SPD section).
        Merges update :math:`F \leftarrow F(I + \Delta)` and :math:`F^{-1}` (Woodbury) too.
    ``"factored"``
        :math:`U` (zero at the identity) and :math:`V` (redrawn) trained directly, in ambient
        coordinates.

    A merge is cut back (projected) or refused when :math:`C` is singular, has
    :math:`\log|\det C|` outside ``update_logdet_bounds`` (default :math:`(-k, k)`) or a 2-norm
    condition number above ``max_update_condition``, or when the merged matrix is not finite or
    has a non-positive diagonal entry. Every ``correct_every`` merges a Cholesky factorization
    recomputes :math:`A^{-1}` and :math:`\log\det A` and proves positive definiteness (a matrix
    that lost it to rounding is projected back by :func:`project_spd`); in whitened coordinates
    :math:`A = FF^T` and :math:`F^{-1}` are first recomputed from the tracked factor :math:`F`.

    Registration symmetrizes and clips eigenvalues at ``floor`` times the largest
    (:func:`project_spd`). Costs (projected / factored): forward :math:`O(n^3)` /
    :math:`O(n^2k)`; merge :math:`O(n^2k)`; correction :math:`O(n^3)`.

    Parameters
    ----------
    rank : int, optional
        Rank ``k`` of each merged update; default ``n`` (projected: all of :math:`\Delta`).
    update : {"projected", "factored"}
    coordinates : {"whitened", "ambient"}, optional
        Where the projected :math:`\Delta` acts (default ``"whitened"``; ``"factored"`` takes
        ``"ambient"`` only). Whitened coordinates keep two more float64 :math:`n \times n`
        buffers (:math:`F`, :math:`F^{-1}`) and cost :math:`O(n^2k)` more per merge; the
        forward pass takes two :math:`O(n^3)` products in either.
    correct_every : int or None
        Merges between Cholesky corrections (``None``: never).
    update_logdet_bounds : (float, float), optional
        Bounds on :math:`\log|\det C|` of one merged update.
    max_update_condition : float
        Largest 2-norm condition number of :math:`C`.
    floor : float
        Relative eigenvalue floor of the registration projection.
    init_scale, on_reject, seed
        As for :class:`~p4opt.Invertible`.

    Examples
    --------
    >>> import torch, p4opt
    >>> lin = torch.nn.Linear(4, 4, bias=False, dtype=torch.float64)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.eye(4) + 0.1)
    >>> pert = p4opt.register(lin, "weight", p4opt.PositiveDefinite(seed=0))
    >>> with torch.no_grad():
    ...     _ = pert.delta.normal_(std=0.1)
    >>> w = lin.weight
    >>> bool(torch.allclose(pert.logabsdet(), torch.linalg.slogdet(w)[1]))
    True
    >>> pert.merge().accepted, bool(torch.allclose(lin.weight, w))
    (True, True)
    """

    element_ndim: ClassVar[int | None] = 2
    reset_optimizer_state: ClassVar[bool] = False
    precise_buffers: ClassVar[tuple[str, ...]] = (
        "master", "inv", "logabsdet_base", "factor", "factor_inv"
    )

    def __init__(
        self,
        rank: int | None = None,
        *,
        update: Literal["projected", "factored"] = "projected",
        coordinates: Literal["whitened", "ambient"] | None = None,
        correct_every: int | None = 50,
        update_logdet_bounds: Bounds | None = None,
        max_update_condition: float = 1e3,
        floor: float = 1e-6,
        init_scale: float | None = None,
        on_reject: Literal["keep", "reset"] = "keep",
        seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed, correct_every=correct_every, on_reject=on_reject)
        self.rank = None if rank is None else check_int("rank", rank, minimum=1)
        self.update = check_choice("update", update, ("projected", "factored"))
        default = "whitened" if self.update == "projected" else "ambient"
        self.coordinates = check_choice(
            "coordinates", default if coordinates is None else coordinates, ("whitened", "ambient")
        )
        if self.update == "factored" and self.coordinates == "whitened":
            raise P4ValueError(
                'coordinates="whitened" needs update="projected"; the factored rule trains '
                'U and V in ambient coordinates (leave coordinates out or pass "ambient")'
            )
        self._bounds_given = update_logdet_bounds
        self.update_logdet_bounds = check_bounds("update_logdet_bounds", update_logdet_bounds)
        self.max_update_condition = check_number(
            "max_update_condition", max_update_condition, minimum=1
        )
        self.floor = check_number("floor", floor, positive=True)
        if self.floor >= 1:
            raise P4ValueError(f"floor must be in (0, 1), got {floor!r}")
        self._init_scale = None if init_scale is None else check_number(
            "init_scale", init_scale, positive=True
        )
        self.default_merge_every = 10
        self._warned_boundary = False  # the near-boundary warning is given once

    # ------------------------------------------------------------ registration
    def attach(self, value: Tensor) -> Tensor:
        """Check that ``value`` is square (or a stack); project it onto the SPD matrices."""
        if value.ndim < 2 or value.shape[-1] != value.shape[-2]:
            raise ShapeError(
                "PositiveDefinite needs a square matrix (n, n) or a stack (*, n, n), but "
                f"{self.where} is a {describe(value)}"
            )
        n = value.shape[-1]
        self.rank = n if self.rank is None else self.rank
        k = min(self.rank, n)
        if self._bounds_given is None:
            self.update_logdet_bounds = (-float(k), float(k))
        try:
            master = project_spd(value, self.floor)
            tracked = cg.spd_buffers(master, self.whitened)  # A = F F^T with F = L to start
        except SingularMatrixError as error:
            raise SingularMatrixError(f"{self.where}: {error}") from None
        tracked = {"master": master, **tracked}
        if "master" not in self._buffers:
            for name, tensor in tracked.items():
                self.register_buffer(name, tensor.to(value.device))
            like = dict(dtype=value.dtype, device=value.device)
            stack = value.shape[:-2]
            if self.update == "projected":
                self.delta = nn.Parameter(torch.zeros((*stack, n, n), **like))
            else:
                self.U = nn.Parameter(torch.zeros((*stack, n, k), **like))
                self.V = nn.Parameter(torch.zeros((*stack, n, k), **like))
        else:  # ``module.weight = X`` on a registered module: same shapes, new values
            with torch.no_grad():
                for name, tensor in tracked.items():
                    self._buffers[name].copy_(tensor)  # type: ignore[union-attr]
        self.identity()
        return master.to(value.dtype)

    # ---------------------------------------------------------------- contract
    def identity(self) -> None:
        """Return every matrix of the stack to its base (the pending update is dropped)."""
        self.restart(torch.ones(self.inv.shape[:-2], dtype=torch.bool), folded=False)

    @torch.no_grad()
    def restart(self, mask: Tensor, folded: bool) -> None:
        mask = mask.to(self.inv.device)[..., None, None]
        if self.update == "projected":
            self.delta.copy_(torch.where(mask, 0, self.delta))
            return
        scale = self.rank**-0.5 if self._init_scale is None else self._init_scale
        fresh = torch.randn(self.V.shape, generator=self.rng(), dtype=torch.float64) * scale
        self.U.copy_(torch.where(mask, 0, self.U))
        self.V.copy_(torch.where(mask, fresh.to(self.V), self.V))

    @property
    def whitened(self) -> bool:
        """Whether the projected change acts in the whitened coordinates of :math:`A = FF^T`."""
        return self.coordinates == "whitened"

    def apply(self, base: Tensor) -> Tensor:
        r"""The current matrix in the layer's dtype, exactly symmetric; ``base`` at the identity.

        Whitened: :math:`A + S + S^T` with :math:`G = F\Delta`, :math:`S = G(F + G/2)^T`
        (equal to :math:`F(I + \Delta)(I + \Delta)^TF^T`; two :math:`O(n^3)` products).
        Ambient: :math:`(I + UV^T) A (I + UV^T)^T`.
        """
        if self.update == "factored":
            return cg.congruence(base, self.U, self.V)
        if self.whitened:
            factor = self.factor.to(base.dtype)
            g = factor @ self.delta
            s = g @ (factor + 0.5 * g).mT
            return cg.symmetrize(base + (s + s.mT))
        e = self.delta @ base
        return cg.symmetrize(base + e + e.mT + e @ self.delta.mT)

    def _factors(self) -> tuple[Tensor, Tensor]:
        """The exact pending :math:`M - I = UV^T` in float64 (projected: :math:`(\\Delta, I)`,
        whitened: :math:`(F\\Delta, F^{-T})`)."""
        if self.update == "factored":
            return self.U.to(torch.float64), self.V.to(torch.float64)
        delta = self.delta.to(torch.float64)
        if self.whitened:  # (F delta, F^{-T} I)
            return self.factor @ delta, self.factor_inv.mT
        return delta, torch.eye(delta.shape[-1], dtype=delta.dtype, device=delta.device)

    def _at_zero(self) -> bool:
        return self.update == "projected" and not bool(self.delta.detach().any())

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def _merge_factors(self) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor | None] | None]:
        """``(U, V)`` of the merge, and in whitened coordinates the change ``(a, b)`` they
        stand for (:math:`\\Delta \\approx ab^T`, ``b = None``: the identity)."""
        if self.update == "factored":
            return *self._factors(), None
        delta = self.delta.to(torch.float64)
        n = delta.shape[-1]
        if self.rank >= n:  # type: ignore[operator]
            a, b = delta, None
        else:
            start = torch.randn((*delta.shape[:-1], self.rank), generator=self.rng(),
                                dtype=delta.dtype)
            a, b = linalg.range_finder(delta, start.to(delta.device))  # delta ~ a b^T
        if not self.whitened:
            return a, _eye_like(delta) if b is None else b, None
        v = self.factor_inv.mT if b is None else self.factor_inv.mT @ b
        return self.factor @ a, v, (a, b)

    def propose(self) -> Proposal:
        """Check every element's capacitance; cut projected steps back; build the merged bases."""
        u, v, change = self._merge_factors()
        finite = torch.isfinite(u).all(-1).all(-1) & torch.isfinite(v).all(-1).all(-1)
        keep = finite[..., None, None]
        u, v = torch.where(keep, u, 0), torch.where(keep, v, 0)
        if change is not None:
            a, b = change
            change = (torch.where(keep, a, 0), b)
        cap = cg.congruence_capacitance(u, v)  # computed once, scaled below when cut back
        bounds, limit = self.update_logdet_bounds, self.max_update_condition
        codes, lad = cg.capacitance_codes(cap, bounds, limit)
        scale = torch.ones(codes.shape, dtype=torch.float64, device=u.device)
        scalable = torch.isin(codes, torch.tensor(_SCALABLE, device=codes.device))
        cut = torch.where(scalable, codes, 0)
        if self.update == "projected" and bool(scalable.any()):
            t = cg.congruence_scale(u, v, bounds, limit)
            scale = torch.where(scalable & (t > 0), t, scale)
            t3 = scale[..., None, None]
            u, eye = u * t3, _eye_like(cap)
            cap = eye + t3 * (cap - eye)  # I + t V^T U
            if change is not None:
                change = (change[0] * t3, change[1])
            codes, lad = cg.capacitance_codes(cap, bounds, limit)
        if change is None:
            matrix = cg.congruence(self.master, u, v)
            factors = None
        else:  # A V = F b and V^T A V = b^T b: no product with F^{-T}
            a, b = change
            av = self.factor if b is None else self.factor @ b
            inner = _eye_like(cap) if b is None else b.mT @ b
            matrix = cg.congruence(self.master, u, v, av, inner)
            factors = cg.factor_update(self.factor, self.factor_inv, u, v, a, b, cap)
        inv = cg.congruence_inverse(self.inv, u, v, cap)
        dtype_max = torch.finfo(self.base.dtype).max
        bad = ~(matrix.abs().amax((-2, -1)) < dtype_max) | ~torch.isfinite(inv).all(-1).all(-1)
        codes = torch.where((codes == 0) & bad, Reason.NON_FINITE_RESULT.code, codes)
        not_pd = (matrix.diagonal(dim1=-2, dim2=-1) <= 0).any(-1)
        codes = torch.where((codes == 0) & not_pd, Reason.INFEASIBLE_RESULT.code, codes)
        # past a condition of about 1e-7 / eps even a freshly factorized float64 inverse misses
        # validate()'s tolerance: refuse, as Invertible's rank-k merges do (O(n^2) per merge)
        far = linalg.loses_inverse_accuracy(
            matrix.abs().amax((-2, -1)), inv.abs().amax((-2, -1)), inv.dtype
        )
        codes = torch.where((codes == 0) & far, Reason.ILL_CONDITIONED_UPDATE.code, codes)
        if self.base.dtype != matrix.dtype and bool((codes == 0).any()):
            # the layer stores the merged matrix rounded into its dtype: near the cone's
            # boundary (condition past about 1 / eps of that dtype) the rounding is indefinite,
            # or positive definite by less than one rounding. One Cholesky per merge, O(n^3/3),
            # of the stored matrix less one epsilon of its scale on the diagonal
            stored = torch.nan_to_num(matrix.to(self.base.dtype).to(matrix.dtype))
            shift = torch.finfo(self.base.dtype).eps * stored.abs().amax((-2, -1))
            info = torch.linalg.cholesky_ex(stored - shift[..., None, None] * _eye_like(stored))[1]
            codes = torch.where((codes == 0) & (info != 0), Reason.INFEASIBLE_RESULT.code, codes)
        codes = torch.where(finite, codes, Reason.NON_FINITE_UPDATE.code)
        figures = {"update_logabsdet": float(lad.abs().nan_to_num(math.inf).amax())}
        data = (matrix, inv, self.logabsdet_base + 2 * lad, factors)
        return Proposal(codes=codes, scale=scale, cut=cut, figures=figures, data=data)

    def fold(self, proposal: Proposal, ok: Tensor) -> None:
        matrix, inv, logdet, factors = proposal.data
        mask = ok[..., None, None]
        self.master.copy_(torch.where(mask, matrix, self.master))
        self.inv.copy_(torch.where(mask, inv, self.inv))
        if factors is not None:
            self.factor.copy_(torch.where(mask, factors[0], self.factor))
            self.factor_inv.copy_(torch.where(mask, factors[1], self.factor_inv))
        self.logabsdet_base.copy_(torch.where(ok, logdet, self.logabsdet_base))
        self.base.copy_(self.master)
        partial = ok & (proposal.scale < 1)  # type: ignore[operator]
        if bool(partial.any()):  # the step was cut back; the rest is discarded
            self.restart(partial, folded=True)
        # congruence updates add their rounding to the tracked inverse, amplified by the
        # condition number: correct at once (Cholesky, O(n^3)) when the probe sees a hundredth
        # of validate()'s tolerance (two matrix-vector products per merge)
        if linalg.inverse_drifted(self.master, self.inv, INVERSE_TOLERANCE):
            self.correct()

    def extra_repr(self) -> str:
        return (
            f"update={self.update!r}, coordinates={self.coordinates!r}, rank={self.rank}, "
            f"correct_every={self.correct_every}"
        )
