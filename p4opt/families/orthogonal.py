r"""P⁴ orthogonal family: square orthogonal weights trained through :math:`Q \leftarrow Q\,G(B)`."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch

from p4opt import linalg as rotations
from p4opt._typing import Tensor
from p4opt._validate import check_choice, check_number
from p4opt.errors import ShapeError, describe
from p4opt.families.rotations import METHODS, Rotation, default_rank
from p4opt.perturbation import Perturbation, Proposal, ValidationReport

__all__ = ["Orthogonal", "default_rank"]

Method = Literal["householder", "givens"]
Group = Literal["SO", "O"]


class Orthogonal(Perturbation):
    r"""Orthogonal square matrices trained by right-multiplying rotations (P⁴ orthogonal).

    .. math:: R_B(Q) = Q\, G(B), \qquad G(B) \in SO(n), \qquad G(B_0) = I

    The rotation :math:`G` is a strategy chosen by ``method``:
    :class:`~p4opt.families.rotations.Householder` (products of reflection pairs in compact
    WY form, :math:`O(n^2k)` to form :math:`QG`) or
    :class:`~p4opt.families.rotations.Givens` (rotations on disjoint coordinate pairs,
    :math:`O(n^2)`).

    Registration maps the tensor to the nearest orthogonal matrix (its polar factor) when it
    is not orthogonal to within ``100 n`` machine epsilons; with ``group="SO"`` a matrix with
    :math:`\det < 0` is mapped to the nearest matrix of :math:`SO(n)`. Merges are computed in
    float64 and rounded into the layer's dtype; every ``correct_every`` merges the base is
    re-orthonormalized by Newton–Schulz polar steps (:math:`O(n^3)`). The optimizer's state is
    kept across merges (``reset_optimizer_state = False``); the default rank and merge
    interval were chosen by measurement (see the documentation's Orthogonal page).

    Parameters
    ----------
    method : {"householder", "givens"}
    rank : int, optional
        Number of reflections (even, ``2 <= k <= 4n``) for ``"householder"``; default
        :func:`default_rank`. Must be left out for ``"givens"``.
    group : {"SO", "O"}
        Feasible set: the rotations (default) or all orthogonal matrices.
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
    """

    default_merge_every: ClassVar[int] = 7
    reset_optimizer_state: ClassVar[bool] = False

    def __init__(
        self,
        method: Method = "householder",
        rank: int | None = None,
        *,
        group: Group = "SO",
        correct_every: int | None = 50,
        init_scale: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed, correct_every=correct_every)
        self.method = check_choice("method", method, tuple(METHODS))
        self.group = check_choice("group", group, ("SO", "O"))
        self.init_scale = check_number("init_scale", init_scale, positive=True)
        self.strategy: Rotation = METHODS[method](self, rank)

    @property
    def rank(self) -> int | None:
        return self.strategy.rank

    # ------------------------------------------------------------ registration
    def attach(self, value: Tensor) -> Tensor:
        """Check that ``value`` is square; return its nearest orthogonal matrix (see class doc)."""
        if value.ndim != 2 or value.shape[0] != value.shape[1]:
            raise ShapeError(
                f"Orthogonal needs a square matrix, but {self.where} is a {describe(value)}"
            )
        n = value.shape[0]
        self.strategy.create(value, n)
        self.identity()
        if value.device.type == "meta":  # shapes only; the values arrive by load_state_dict
            return value
        matrix = value.detach().to(torch.float64)
        special = self.group == "SO"
        tol = min(100 * n * torch.finfo(value.dtype).eps, 1e-3)  # bfloat16: 100 n eps > 1
        if float(rotations.orthogonality_error(matrix)) > tol or (
            special and float(torch.linalg.det(matrix)) < 0
        ):
            matrix = rotations.polar_factor(matrix, special=special)
        return matrix.to(value.dtype)

    # ---------------------------------------------------------------- contract
    def identity(self) -> None:
        """Return to :math:`G = I` (fresh directions from the perturbation's draws)."""
        self.strategy.identity()

    def apply(self, base: Tensor) -> Tensor:
        """:math:`QG(B)` in the layer's dtype."""
        return self.strategy.rotate(base)

    def rotate(self, x: Tensor) -> Tensor:
        """Apply :math:`G(B)` to vectors ``x[..., n]`` (returns :math:`xG`)."""
        return self.strategy.rotate(x)

    def propose(self) -> Proposal:
        """The rotated base :math:`QG` in float64 (the template rejects it if not finite)."""
        return Proposal(candidate=self.strategy.rotate(self.base.to(torch.float64)))

    def restart(self, mask: Tensor, folded: bool) -> None:
        if folded:
            self.strategy.restart()
        else:
            self.strategy.identity()

    @torch.no_grad()
    def correct(self) -> dict[str, float]:
        """Re-orthonormalize the base (Newton–Schulz polar steps); cost :math:`O(n^3)`."""
        special = self.group == "SO"
        q, err = rotations.refine_orthogonal(self.base.to(torch.float64), special=special)
        if math.isfinite(err):
            self.base.copy_(q.to(self.base.dtype))
        return {"orthogonality_error": err}

    def dtype_changed(self, old: torch.dtype, new: torch.dtype) -> None:
        """A more precise layer dtype: re-orthonormalize so the new tolerance holds at once."""
        if torch.finfo(new).eps < torch.finfo(old).eps:
            self.correct()

    @torch.no_grad()
    def validate(self) -> ValidationReport:
        r"""Orthogonality error :math:`\lVert W^TW - I\rVert_{\max}` of :math:`W = QG` and det sign.

        Computed in float64 from the layer's tensors; tolerances ``1e-10`` for float64
        layers and ``1e-5`` otherwise. For ``group="SO"`` the figure ``det_sign_error`` is 1
        when :math:`\det W < 0`. Cost :math:`O(n^3)`.
        """
        w = self.current().to(torch.float64)
        sign = float(torch.linalg.slogdet(w)[0])
        tol = 1e-10 if self.base.dtype == torch.float64 else 1e-5
        error = float(rotations.orthogonality_error(w))
        figures = {"orthogonality_error": error, "det_sign": sign}
        tolerances = {"orthogonality_error": tol}
        if self.group == "SO":
            figures["det_sign_error"] = 0.0 if sign > 0 else 1.0
            tolerances["det_sign_error"] = 0.5
        return ValidationReport(where=self.where, figures=figures, tolerances=tolerances)

    def extra_repr(self) -> str:
        every = self.correct_every
        return (
            f"method={self.method!r}{self.strategy.describe()}, group={self.group!r}, "
            f"correct_every={every}"
        )
