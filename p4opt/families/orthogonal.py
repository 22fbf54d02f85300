r"""P⁴ orthogonal family: orthogonal and Stiefel weights trained through rotations :math:`G(B)`."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch

from p4opt import linalg as rotations
from p4opt._typing import Tensor
from p4opt._validate import check_choice, check_number
from p4opt.errors import P4ValueError, ShapeError, describe
from p4opt.families.rotations import METHODS, Rotation, default_rank
from p4opt.perturbation import Perturbation, Proposal, ValidationReport

__all__ = ["Orthogonal", "default_rank"]

Method = Literal["householder", "givens", "cayley"]
Group = Literal["SO", "O"]


class Orthogonal(Perturbation):
    r"""Orthogonal and Stiefel matrices trained by multiplying rotations (P⁴ orthogonal).

    .. math:: R_B(Q) = Q\, G(B)\ (n \le p), \qquad R_B(Q) = G(B)^T Q\ (n > p),
              \qquad G(B) \in SO(\max(n, p)), \qquad G(B_0) = I

    A square weight (n, n) is an orthogonal matrix. A rectangular weight (n, p) is a point
    of the Stiefel manifold: orthonormal columns (:math:`Q^TQ = I_p`) when ``n > p``,
    orthonormal rows (:math:`QQ^T = I_n`) when ``n < p``. The rotation acts on the long
    side, the only side from which every Stiefel point can be reached (a rotation of the
    short side alone keeps the span of the columns, or rows, fixed). A stack (*, n, p), for
    example a convolution weight (out, in, k, k) or a batch of problems, is a stack of such
    matrices, each with its own rotation, merged and validated element by element
    (``method="householder"`` or ``"cayley"``).

    The rotation :math:`G` is a strategy chosen by ``method``:
    :class:`~p4opt.families.rotations.Householder` (products of reflection pairs in compact
    WY form, :math:`O(n^2k)` to form :math:`QG`),
    :class:`~p4opt.families.rotations.Givens` (``L`` layers of rotations on disjoint
    coordinate pairs, by default a round-robin tournament of ``n - 1`` layers that turns every
    pair once: :math:`O(n^2L)`, elementwise work, so slower per step than Householder beyond
    small ``n``) or :class:`~p4opt.families.rotations.Cayley` (the Cayley transform of a
    dense generator :math:`X`, :math:`n^2` trainable entries, merged after every step: the
    forward pass is the base itself and the merge one :math:`O(n^3)` LU solve; a rectangular
    weight trains :math:`Z` of its own shape instead, merged in :math:`O(mk^2)`).

    Registration maps each matrix to the nearest orthogonal (or Stiefel) matrix, its polar
    factor, when its orthogonality error exceeds the tolerance of :meth:`validate` (or
    ``100 max(n, p)`` machine epsilons if smaller); with ``group="SO"`` a matrix with
    :math:`\det < 0` is mapped to the nearest matrix of :math:`SO(n)`. Merges are computed in
    float64 (Cayley: in the layer's dtype, float32 at least, as an increment) and rounded
    into the layer's dtype; every ``correct_every`` merges the base is
    re-orthonormalized by Newton–Schulz polar steps (:math:`O(n^3)`). The optimizer's state is
    kept across merges (``reset_optimizer_state = False``); the default rank and merge
    interval were chosen by measurement (see the documentation's Orthogonal page).

    Parameters
    ----------
    method : {"householder", "givens", "cayley"}
        ``"givens"`` takes single matrices, square or rectangular (no stacks).
        ``"cayley"`` sets ``default_merge_every`` to 1; its generator's entries are angles, so
        it wants a smaller learning rate than Householder (the documentation's Orthogonal
        page compares the two and says when to pick which).
    rank : int, optional
        ``"householder"``: number of reflections (even, ``2 <= k <= 4 max(n, p)``), default
        :func:`default_rank` ``(n, p)``. ``"givens"``: number of layers ``L`` (at least 1),
        default :func:`~p4opt.families.rotations.givens.default_layers` ``(max(n, p))``, a
        whole tournament; fewer layers move on through the tournament at every merge.
        ``"cayley"``: must be left out.
    group : {"SO", "O"}, optional
        Feasible set of a square weight: the rotations (the default) or all orthogonal
        matrices. A rectangular weight has no determinant: its Stiefel manifold is connected
        and ``group`` must be left out (or ``"O"``); ``"SO"`` raises
        :class:`~p4opt.errors.P4ValueError` at registration.
    correct_every : int or None
        Merges between re-orthonormalizations; ``None`` disables them.
    init_scale : float
        Standard deviation of the entries of freshly drawn reflection vectors.
    seed : int, optional
        Seed of the perturbation's random draws.

    References
    ----------
    - A. Krämer, J. Köhler, F. Noé, "Preserving properties of neural networks by
      perturbative updates", NeurIPS 2020.
    - N. J. Higham, "Functions of Matrices", SIAM 2008, §8.3 (Newton–Schulz polar
      iteration).
    - M. Lezcano-Casado, D. Martínez-Rubio, "Cheap orthogonal constraints in neural
      networks", ICML 2019 (geotorch).

    Examples
    --------
    >>> import torch, p4opt
    >>> _ = torch.manual_seed(0)
    >>> lin = torch.nn.Linear(6, 6, bias=False, dtype=torch.float64)
    >>> pert = p4opt.register(lin, "weight", p4opt.Orthogonal(rank=4))
    >>> with torch.no_grad():
    ...     _ = pert.vectors.add_(0.3 * torch.randn(6, 4, dtype=torch.float64))
    >>> w = lin.weight.detach()
    >>> float((w.T @ w - torch.eye(6)).abs().max()) < 1e-14
    True
    >>> pert.merge().accepted, torch.allclose(lin.weight, w)   # merging keeps the layer
    (True, True)
    >>> pert.validate().ok
    True

    A rectangular weight keeps orthonormal columns (here 8 inputs, 3 outputs: rows):

    >>> lin = torch.nn.Linear(8, 3, bias=False, dtype=torch.float64)
    >>> pert = p4opt.register(lin, "weight", p4opt.Orthogonal(rank=4))
    >>> w = lin.weight.detach()
    >>> float((w @ w.T - torch.eye(3)).abs().max()) < 1e-14, pert.validate().ok
    (True, True)
    """

    #: Householder and Givens; ``"cayley"`` instances set their own (1).
    default_merge_every: ClassVar[int] = 7
    reset_optimizer_state: ClassVar[bool] = False
    element_ndim: ClassVar[int | None] = 2

    def __init__(
        self,
        method: Method = "householder",
        rank: int | None = None,
        *,
        group: Group | None = None,
        correct_every: int | None = 50,
        init_scale: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed, correct_every=correct_every)
        self.method = check_choice("method", method, tuple(METHODS))
        self._group = None if group is None else check_choice("group", group, ("SO", "O"))
        self.init_scale = check_number("init_scale", init_scale, positive=True)
        self.strategy: Rotation = METHODS[method](self, rank)
        self.default_merge_every = self.strategy.merge_every

    @property
    def min_merge_every(self) -> int:  # type: ignore[override]
        """Householder pairs restarted after every step stop learning (measured; see the docs)."""
        return self.strategy.min_merge_every

    @property
    def rank(self) -> int | None:
        return self.strategy.rank

    @property
    def group(self) -> Group | None:
        """The feasible group of a square weight (``"SO"`` by default); ``None`` for Stiefel."""
        if self._group is None and self.is_registered and self._rectangular:
            return None
        return self._group or "SO"

    @property
    def _rectangular(self) -> bool:
        return self.base.shape[-1] != self.base.shape[-2]

    @property
    def _special(self) -> bool:
        return self.group == "SO"

    # ------------------------------------------------------------ registration
    def attach(self, value: Tensor) -> Tensor:
        """Check the shape (*, n, p); return the nearest orthogonal matrices (see class doc)."""
        if value.ndim < 2:
            raise ShapeError(
                f"Orthogonal needs a matrix (n, p) or a stack (*, n, p), but {self.where} is "
                f"a {describe(value)}"
            )
        n, p = value.shape[-2:]
        if n != p and self._group == "SO":
            raise P4ValueError(
                f"group='SO' needs a square weight, but {self.where} is {n}×{p}: leave group "
                "out for a rectangular (Stiefel) weight"
            )
        if value.ndim > 2 and not self.strategy.stacks:
            raise P4ValueError(
                f"method={self.method!r} takes a single matrix, but {self.where} is a stack "
                f"{describe(value)}: use method='householder' or 'cayley' for stacks"
            )
        self.strategy.create(value, max(n, p))
        self.identity()
        if value.device.type == "meta":  # shapes only; the values arrive by load_state_dict
            return value
        matrix = value.detach().to(torch.float64)
        special = self._group != "O" and n == p
        tol = min(100 * max(n, p) * torch.finfo(value.dtype).eps, _tolerance(value.dtype))
        bad = rotations.orthogonality_error(matrix) > tol
        if special:
            bad |= torch.linalg.det(matrix) < 0
        if bool(bad.any()):
            projected = rotations.polar_factor(matrix, special=special)
            matrix = torch.where(bad[..., None, None], projected, matrix)
        return matrix.to(value.dtype)

    # ---------------------------------------------------------------- contract
    def identity(self) -> None:
        """Return to :math:`G = I` (fresh directions from the perturbation's draws)."""
        self.strategy.identity()

    def apply(self, base: Tensor) -> Tensor:
        """:math:`QG(B)`, or :math:`G(B)^TQ` for a tall weight, in the layer's dtype."""
        if base.shape[-2] > base.shape[-1]:  # orthonormal columns: rotate the long side
            return self.strategy.rotate_rows(base.mT).mT
        return self.strategy.rotate_rows(base)

    def rotate(self, x: Tensor) -> Tensor:
        """Apply :math:`G(B)` to vectors ``x[..., m]``, ``m = max(n, p)`` (returns :math:`xG`)."""
        return self.strategy.rotate(x)

    def propose(self) -> Proposal:
        """The rotated base, in the strategy's merge dtype (float64 unless the strategy says
        otherwise; the template rejects non-finite elements); the strategy says when the
        product must be re-orthonormalized before it is folded."""
        dtype, refine = self.strategy.merge_plan(self.base.dtype)
        candidate = self.apply(self.base.to(dtype))
        if refine:
            candidate = candidate.to(torch.float64)
            finite = torch.isfinite(candidate).flatten(-2).all(-1)
            if bool(finite.all()):
                candidate = rotations.refine_orthogonal(candidate, special=self._special)[0]
            elif bool(finite.any()):  # refine the finite elements; the template refuses the rest
                refined = rotations.refine_orthogonal(candidate[finite], special=self._special)[0]
                candidate = candidate.index_put((finite,), refined)
        return Proposal(candidate=candidate)

    def restart(self, mask: Tensor, folded: bool) -> None:
        args = (mask,) if self._stack_shape() else ()  # stacks restart element by element
        if folded:
            self.strategy.restart(*args)
        else:
            self.strategy.identity(*args)

    @torch.no_grad()
    def correct(self) -> dict[str, float]:
        """Re-orthonormalize the base (Newton–Schulz polar steps); cost :math:`O(n^3)`."""
        base = self.base.to(torch.float64)
        q, err = rotations.refine_orthogonal(base, special=self._special)
        if math.isfinite(err):
            self.base.copy_(q.to(self.base.dtype))
        elif base.ndim > 2:  # keep the elements that came out finite
            finite = torch.isfinite(q).flatten(-2).all(-1)
            self.base.copy_(torch.where(finite[..., None, None], q, base).to(self.base.dtype))
            err = float(rotations.orthogonality_error(q[finite]).amax(initial=0.0))
        return {"orthogonality_error": err}

    def dtype_changed(self, old: torch.dtype, new: torch.dtype) -> None:
        """A more precise layer dtype: re-orthonormalize so the new tolerance holds at once."""
        if torch.finfo(new).eps < torch.finfo(old).eps:
            self.correct()

    @torch.no_grad()
    def validate(self) -> ValidationReport:
        r"""Orthogonality error of :math:`W = R_B(Q)` and, for ``group="SO"``, its det sign.

        The error is :math:`\lVert W^TW - I_p\rVert_{\max}` (:math:`\lVert WW^T -
        I_n\rVert_{\max}` for a wide weight), the largest over a stack, computed in float64
        from the layer's tensors; tolerances ``1e-10`` for float64 layers, ``1e-5`` for
        float32 and eight machine epsilons for float16 and bfloat16. For ``group="SO"`` the
        figure ``det_sign_error`` is 1 when some :math:`\det W < 0`. Cost
        :math:`O(np\min(n, p))` per matrix.
        """
        w = self.current().to(torch.float64)
        tol = _tolerance(self.base.dtype)
        error = float(rotations.orthogonality_error(w).amax())
        figures = {"orthogonality_error": error}
        tolerances = {"orthogonality_error": tol}
        if not self._rectangular:
            sign = float(torch.linalg.slogdet(w)[0].amin())
            figures["det_sign"] = sign
            if self._special:
                figures["det_sign_error"] = 0.0 if sign > 0 else 1.0
                tolerances["det_sign_error"] = 0.5
        return ValidationReport(where=self.where, figures=figures, tolerances=tolerances)

    def upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """0.1 checkpoints of ``method="givens"`` (one layer) load into the layered form."""
        self.strategy.upgrade_state_dict(state_dict, prefix)

    def extra_repr(self) -> str:
        every = self.correct_every
        return (
            f"method={self.method!r}{self.strategy.describe()}, group={self.group!r}, "
            f"correct_every={every}"
        )


def _tolerance(dtype: torch.dtype) -> float:
    """Largest orthogonality error :meth:`Orthogonal.validate` accepts for a layer dtype.

    ``1e-10`` for float64, ``1e-5`` for float32, and eight machine epsilons for float16 and
    bfloat16, whose rounding of an orthogonal matrix alone reaches about half an epsilon.

    Examples
    --------
    >>> _tolerance(torch.float64), _tolerance(torch.float32), _tolerance(torch.bfloat16)
    (1e-10, 1e-05, 0.0625)
    """
    if dtype == torch.float64:
        return 1e-10
    return max(1e-5, 8 * torch.finfo(dtype).eps)
