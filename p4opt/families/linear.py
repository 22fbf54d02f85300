r"""Linearly structured tensors :math:`\{\theta : C\,\mathrm{vec}\,\theta = d\}` via null(C)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from p4opt._typing import Tensor
from p4opt.errors import P4TypeError, P4ValueError, ShapeError, describe
from p4opt.families.affine import AffineSpace, DenseSpace
from p4opt.perturbation import Perturbation, Proposal, ValidationReport

__all__ = ["LinearStructure"]

#: Validation tolerance of the constraint residual, per layer dtype (times ``max(1, max|θ|)``).
RESIDUAL_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


def _as_float64(name: str, value: Any, ndim: int) -> Tensor:
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise P4TypeError(f"{name} must hold real numbers, got {describe(tensor)}")
    if tensor.ndim != ndim:
        raise ShapeError(f"{name} must be {ndim}-dimensional, got {describe(tensor)}")
    tensor = tensor.detach().to(torch.float64)
    if not torch.isfinite(tensor).all():
        raise P4ValueError(f"{name} contains NaN or Inf")
    return tensor


class LinearStructure(Perturbation):
    r"""Tensors satisfying linear equality constraints, trained in the constraints' null space.

    .. math::

        S = \{\theta : C\,\mathrm{vec}(\theta) = d\}, \qquad
        R_z(\theta) = \theta + \mathrm{reshape}(N z),

    with :math:`N` an orthonormal basis of :math:`\mathrm{null}(C)` (``vec`` is
    the row-major flatten), ``z`` the trainable coordinates and identity
    :math:`z = 0`. Since :math:`C N = 0`, every :math:`R_z(\theta)` lies in
    :math:`S`; a gradient step on ``z`` is a projected-gradient step on
    :math:`\theta`. A merge folds :math:`Nz` into :math:`\theta` and re-projects
    onto :math:`S` in float64, so rounding never accumulates.

    Registering on a tensor outside :math:`S` replaces it by its orthogonal
    projection onto :math:`S` (the nearest feasible tensor in Frobenius norm).

    This class is the dense fallback (one SVD of ``C`` at registration,
    :math:`O(pk)` per step for ``p`` entries and ``k`` free directions); the
    presets :class:`~p4opt.Symmetric`, :class:`~p4opt.ZeroSum`,
    :class:`~p4opt.Circulant` and :class:`~p4opt.Fixed` use closed forms costing
    :math:`O(p)`. :meth:`intersection` stacks several structures' constraints.

    **Merge interval.** ``z`` acts exactly linearly and its coordinates do not
    change at a merge, so the optimizer state of ``z`` stays valid: a merge
    returns ``reset=False`` and :class:`~p4opt.P4Optimizer` keeps the momentum.
    Merging therefore only bounds :math:`\lVert z\rVert` (the float rounding of
    :math:`\theta + Nz` grows with it) and removes drift; it costs one
    projection plus a residual check (:math:`O(p)` for presets, :math:`O(pk)`
    dense). ``default_merge_every = 100`` makes that cost negligible per step
    while keeping the residual at the rounding level of :math:`\theta` itself.

    Parameters
    ----------
    C : Tensor or array-like, shape (m, p)
        Constraint matrix (real; any float or integer dtype, used in float64).
    d : Tensor or array-like, shape (m,)
        Right-hand side.
    seed : int, optional
        Seed of the (unused) generator, for a uniform interface.

    Attributes
    ----------
    z : torch.nn.Parameter, shape (k,)
        Trainable coordinates, in the layer's dtype.
    space : AffineSpace
        The feasible set's strategy (built at registration for the tensor's shape).

    Raises
    ------
    TypeError, ShapeError, ValueError
        Bad ``C``/``d``; at registration: ``C`` not matching the tensor, an
        empty feasible set, or a constraint fixing every entry.

    Examples
    --------
    >>> import torch, p4opt
    >>> _ = torch.manual_seed(0)
    >>> lin = torch.nn.Linear(3, 2, bias=False, dtype=torch.float64)
    >>> C = torch.ones(1, 6)                          # all entries sum to 1
    >>> pert = p4opt.register(lin, "weight", p4opt.LinearStructure(C, torch.ones(1)))
    >>> round(lin.weight.sum().item(), 12)            # projected at registration
    1.0
    >>> pert.z.shape                                  # 6 entries - 1 constraint
    torch.Size([5])
    >>> with torch.no_grad():
    ...     _ = pert.z.normal_()
    >>> w = lin.weight.clone()
    >>> pert.merge().accepted, torch.allclose(lin.weight, w), pert.validate().ok
    (True, True, True)
    """

    default_merge_every: ClassVar[int] = 100
    #: ``z`` keeps its coordinates across a merge, so its optimizer state stays valid.
    reset_optimizer_state: ClassVar[bool] = False

    def __init__(self, C: Any = None, d: Any = None, *, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        self.C: Tensor | None = None
        self.d: Tensor | None = None
        if type(self)._make_space is LinearStructure._make_space:
            if C is None or d is None:
                raise P4TypeError("LinearStructure needs a constraint matrix C and a right side d")
            C, d = _as_float64("C", C, 2), _as_float64("d", d, 1)
            if C.shape[0] != d.shape[0]:
                raise ShapeError(f"C has {C.shape[0]} rows but d has {d.shape[0]} entries")
            self.C, self.d = C, d
        self.space: AffineSpace | None = None

    @classmethod
    def intersection(cls, *structures: LinearStructure, seed: int | None = None) -> LinearStructure:
        r"""A structure whose constraints are those of all ``structures`` stacked (dense).

        Example: ``LinearStructure.intersection(Circulant(), ZeroSum(0, 1.0))``.
        Uses the dense fallback (one SVD at registration); redundant rows are fine.
        """
        if not structures or not all(isinstance(s, LinearStructure) for s in structures):
            raise P4TypeError("intersection needs one or more LinearStructure instances")
        return _Intersection(structures, seed=seed)

    # ------------------------------------------------------------ registration
    def _make_space(self, value: Tensor) -> AffineSpace:
        """Build the strategy for ``value``; presets override this."""
        assert self.C is not None and self.d is not None
        return DenseSpace(self.C.to(value.device), self.d.to(value.device), value.shape, self.where)

    def attach(self, value: Tensor) -> Tensor:
        """Build the space for ``value``'s shape and return ``value`` projected onto it."""
        self.space = self._make_space(value.detach())
        projected = self.space.project(value.detach().to(torch.float64)).to(value.dtype)
        projected = self.space.finish(projected)
        if value.device.type != "meta":
            residual = float(self.space.residual(projected.to(torch.float64)))
            finite = bool(torch.isfinite(projected).all())  # an overflow gives tolerance inf
            if not (finite and residual <= self._tolerance(projected)):
                raise P4ValueError(
                    f"{self.where}: {value.dtype} cannot hold the structure at this magnitude "
                    f"(residual {residual:.1e} after projection); use a wider dtype or smaller "
                    "values"
                )
        if "z" not in self._parameters or self.z.shape != (self.space.dim,):
            self.z = nn.Parameter(value.new_zeros(self.space.dim))
        self.identity()
        return projected

    # ---------------------------------------------------------------- contract
    @torch.no_grad()
    def identity(self) -> None:
        """Set ``z = 0``."""
        self.z.zero_()

    def apply(self, base: Tensor) -> Tensor:
        r""":math:`\theta + \mathrm{reshape}(Nz)` in the layer's dtype."""
        space = self._space()
        return space.finish(base + space.lift(self.z))

    def _space(self) -> AffineSpace:
        if self.space is None:
            raise RuntimeError(f"{type(self).__name__} is not registered on a tensor yet")
        return self.space

    def propose(self) -> Proposal:
        """Fold ``z`` into the base and re-project onto the set in float64 (removes drift)."""
        space = self._space()
        theta = self.base.to(torch.float64) + space.lift(self.z.to(torch.float64))
        projected = space.project(theta)
        drift = float((projected - theta).abs().max())
        candidate = space.finish(projected.to(self.base.dtype))
        return Proposal(candidate=candidate, figures={"drift_removed": drift})

    @torch.no_grad()
    def dtype_changed(self, old: torch.dtype, new: torch.dtype) -> None:
        """A more precise layer dtype: re-project the base so the new tolerance holds at once."""
        if torch.finfo(new).eps < torch.finfo(old).eps:
            space = self._space()
            projected = space.project(self.base.to(torch.float64)).to(self.base.dtype)
            self.base.copy_(space.finish(projected))

    @torch.no_grad()
    def validate(self) -> ValidationReport:
        r"""Residual :math:`\lVert C\,\mathrm{vec}(R_z(\theta)) - d\rVert_{\max}` now.

        Figures: ``residual`` (current tensor, layer dtype), ``base_residual``
        (the merged base) and ``update_norm`` :math:`\lVert z\rVert_2`.
        Tolerance: ``1e-12`` (float64), ``1e-6`` (float32) or four machine epsilons
        (float16, bfloat16), times
        ``max(1, max|θ|)`` (and, for a dense ``C``, times the largest row norm,
        at least 1). Cost: one residual evaluation (:math:`O(p)` for presets).
        """
        space = self._space()
        current = self.current()
        tol = self._tolerance(current)
        figures = {
            "residual": float(space.residual(current.to(torch.float64))),
            "base_residual": float(space.residual(self.base.to(torch.float64))),
            "update_norm": float(self.z.norm()),
        }
        tolerances = {"residual": tol, "base_residual": tol}
        return ValidationReport(where=self.where, figures=figures, tolerances=tolerances)

    def _tolerance(self, tensor: Tensor) -> float:
        scale = max(1.0, float(tensor.abs().max()))
        # half precision: a few roundings of the entries (float16 3.9e-3, bfloat16 0.031)
        dtype_tol = RESIDUAL_TOLERANCE.get(tensor.dtype, 4 * torch.finfo(tensor.dtype).eps)
        return dtype_tol * scale * self._space().tolerance_scale

    def residual(self) -> float:
        """Residual of the current tensor (see :meth:`validate`)."""
        with torch.no_grad():
            return float(self._space().residual(self.current().to(torch.float64)))

    def extra_repr(self) -> str:
        k = "?" if self.space is None else self.space.dim
        return f"free={k}"


class _Intersection(LinearStructure):
    """Stacked constraints of several structures, handled by the dense fallback."""

    def __init__(self, structures: tuple[LinearStructure, ...], seed: int | None = None) -> None:
        super().__init__(seed=seed)
        self._parts = structures

    def _make_space(self, value: Tensor) -> AffineSpace:
        rows, rhs = [], []
        for part in self._parts:
            part.where = self.where
            C, d = part._make_space(value).constraints()
            rows.append(C)
            rhs.append(d)
        C, d = torch.cat(rows), torch.cat(rhs)
        return DenseSpace(C, d, value.shape, self.where)
