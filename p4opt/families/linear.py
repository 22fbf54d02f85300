r"""Linearly structured tensors :math:`\{\theta : C\,\mathrm{vec}\,\theta = d\}` via null(C)."""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch
from torch import nn

from p4opt._typing import Tensor
from p4opt.exceptions import ShapeError, describe
from p4opt.perturbation import MergeResult, Perturbation, ValidationReport

__all__ = ["LinearStructure", "AffineSpace", "DenseSpace"]

#: Validation tolerance of the constraint residual, per layer dtype (times ``max(1, max|θ|)``).
RESIDUAL_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


class AffineSpace(nn.Module, abc.ABC):
    r"""Strategy describing one affine set :math:`S = \{\theta : C\,\mathrm{vec}(\theta) = d\}`.

    A space is built for one tensor shape. It owns whatever index/basis
    buffers it needs (so they follow ``.to(device)`` and ``state_dict``) and
    implements three operations; :class:`LinearStructure` does the rest:

    ``lift(z)``
        :math:`\mathrm{reshape}(N z)` for the flat coordinates ``z`` of shape
        ``(dim,)`` in an orthonormal basis :math:`N` of :math:`\mathrm{null}(C)`;
        differentiable, in ``z``'s dtype.
    ``project(theta)``
        The orthogonal projection onto :math:`S` (``theta`` in float64).
    ``violation(theta)``
        :math:`C\,\mathrm{vec}(\theta) - d` as a flat vector (rows may be
        redundant); from it follow :meth:`residual` and the dense :meth:`constraints`.

    Optionally ``finish(w)`` re-rounds a low-precision tensor so that the
    constraint holds to more than its rounding level (e.g. a zero-sum fiber's
    last entry recomputed from the others in float64); it must be the
    identity in exact arithmetic on :math:`S`, so gradients are unchanged.
    ``tolerance_scale`` widens :meth:`LinearStructure.validate`'s tolerance for
    rows of :math:`C` with large norms (rounding errors grow with them).
    """

    tolerance_scale: float = 1.0

    dim: int
    shape: tuple[int, ...]

    @abc.abstractmethod
    def lift(self, z: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def project(self, theta: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def violation(self, theta: Tensor) -> Tensor: ...

    def finish(self, w: Tensor) -> Tensor:
        return w

    def residual(self, theta: Tensor) -> Tensor:
        r""":math:`\lVert C\,\mathrm{vec}(\theta) - d\rVert_{\max}` (0-dim; 0 if unconstrained)."""
        gap = self.violation(theta).abs()
        return gap.max() if gap.numel() else gap.sum()

    def constraints(self) -> tuple[Tensor, Tensor]:
        """Dense ``(C, d)`` in float64 (Jacobian of :meth:`violation`); cost :math:`O(m p^2)`."""
        zero = torch.zeros(self.shape, dtype=torch.float64, device=self._device())
        jac = torch.func.jacrev(self.violation)(zero)
        return jac.reshape(jac.shape[0], -1), -self.violation(zero)

    def _device(self) -> torch.device:
        buf = next(iter(self.buffers()), None)
        return torch.device("cpu") if buf is None else buf.device


class DenseSpace(AffineSpace):
    r"""The affine set of a dense :math:`C \in \mathbb{R}^{m \times p}` and :math:`d`.

    One SVD of :math:`C` in float64 (cost :math:`O(m p \min(m, p))`) gives the
    rank :math:`r`, an orthonormal null-space basis :math:`N \in \mathbb{R}^{p\times k}`
    (:math:`k = p - r`) and the minimum-norm point :math:`\theta_0 = C^+ d`.
    ``lift`` costs :math:`O(pk)`; ``project``
    (:math:`\theta \mapsto \theta_0 + N N^T(\theta - \theta_0)`) costs :math:`O(pk)`;
    ``residual`` :math:`O(mp)`. Memory :math:`O(p(k + m))`.
    """

    def __init__(self, C: Tensor, d: Tensor, shape: torch.Size, where: str) -> None:
        super().__init__()
        p = math.prod(shape)
        if C.shape[1] != p:
            raise ShapeError(
                f"C has {C.shape[1]} columns but {where} has {p} entries "
                f"(shape {tuple(shape)}); C must be (m, {p})"
            )
        _, s, vh = torch.linalg.svd(C, full_matrices=True)
        tol = max(C.shape) * torch.finfo(torch.float64).eps * _amax(s)
        r = int((s > tol).sum())
        if r == p:
            raise ValueError(
                f"the constraint C vec(θ) = d fixes every entry of {where} (rank of C = {p} "
                "= number of entries): nothing is left to train"
            )
        theta0 = torch.linalg.lstsq(C, d.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
        gap = _amax((C @ theta0 - d).abs())
        if gap > 1e-8 * (1.0 + _amax(d.abs())):
            raise ValueError(
                f"the constraint C vec(θ) = d on {where} is inconsistent (empty feasible set): "
                f"the least-squares residual is {gap:.2e}"
            )
        self.shape = tuple(shape)
        self.dim = p - r
        self.tolerance_scale = max(1.0, _amax(torch.linalg.vector_norm(C, dim=1)))
        self.register_buffer("C", C)
        self.register_buffer("d", d)
        self.register_buffer("N", vh[r:].mT.contiguous())
        self.register_buffer("theta0", theta0)
        self._cast: dict[Any, Tensor] = {}

    def _apply(self, fn: Any, recurse: bool = True) -> DenseSpace:
        # Keep the float64 basis under ``model.float()``: follow device moves only.
        saved = {k: self._buffers.pop(k) for k in ("C", "d", "N", "theta0")}
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, dtype=torch.float64, device=saved["N"].device)).device
        self._buffers.update({k: v.to(device) for k, v in saved.items()})
        self._cast.clear()
        return self

    def _basis(self, dtype: torch.dtype) -> Tensor:
        if dtype == self.N.dtype:
            return self.N
        key = (dtype, self.N.device)
        if key not in self._cast:
            self._cast.clear()
            self._cast[key] = self.N.to(dtype)
        return self._cast[key]

    def lift(self, z: Tensor) -> Tensor:
        return (self._basis(z.dtype) @ z).reshape(self.shape)

    def project(self, theta: Tensor) -> Tensor:
        offset = theta.reshape(-1) - self.theta0
        return (self.theta0 + self.N @ (self.N.mT @ offset)).reshape(self.shape)

    def violation(self, theta: Tensor) -> Tensor:
        return self.C @ theta.reshape(-1).to(self.C) - self.d

    def constraints(self) -> tuple[Tensor, Tensor]:
        return self.C, self.d


def _amax(t: Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def _as_float64(name: str, value: Any, ndim: int) -> Tensor:
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must hold real numbers, got {describe(tensor)}")
    if tensor.ndim != ndim:
        raise ShapeError(f"{name} must be {ndim}-dimensional, got {describe(tensor)}")
    tensor = tensor.detach().to(torch.float64)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or Inf")
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
    >>> float(lin.weight.sum())                       # projected at registration
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

    def __init__(self, C: Any = None, d: Any = None, *, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        self.C: Tensor | None = None
        self.d: Tensor | None = None
        if type(self)._make_space is LinearStructure._make_space:
            if C is None or d is None:
                raise TypeError("LinearStructure needs a constraint matrix C and right-hand side d")
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
            raise TypeError("intersection needs one or more LinearStructure instances")
        return _Intersection(structures, seed=seed)

    # ------------------------------------------------------------ registration
    def _make_space(self, value: Tensor) -> AffineSpace:
        """Build the strategy for ``value``; presets override this."""
        assert self.C is not None and self.d is not None
        return DenseSpace(self.C.to(value.device), self.d.to(value.device), value.shape, self.where)

    def attach(self, value: Tensor) -> Tensor:
        """Build the space for ``value``'s shape and return ``value`` projected onto it."""
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{self.where} must be a floating-point tensor, got {describe(value)}")
        if value.is_complex():
            raise TypeError(f"{self.where} must be real, got {describe(value)}")
        self.space = self._make_space(value.detach())
        projected = self.space.project(value.detach().to(torch.float64)).to(value.dtype)
        projected = self.space.finish(projected)
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

    @torch.no_grad()
    def merge(self) -> MergeResult:
        """Fold ``z`` into the base, re-project onto the set in float64 and set ``z = 0``.

        The optimizer state of ``z`` stays valid (same coordinates), hence
        ``reset=False``. A non-finite ``z`` or result is rejected, the base is
        left unchanged and ``z`` reset (``reset=True``: its state is poisoned).
        """
        space = self._space()
        if not torch.isfinite(self.z).all():
            self.identity()
            return MergeResult(accepted=False, reason="non-finite update", reset=True)
        theta = self.base.to(torch.float64) + space.lift(self.z.to(torch.float64))
        projected = space.project(theta)
        new_base = space.finish(projected.to(self.base.dtype))
        if not torch.isfinite(new_base).all():
            self.identity()
            return MergeResult(accepted=False, reason="non-finite merged tensor", reset=True)
        self.base.copy_(new_base)
        self.identity()
        drift = float((projected - theta).abs().max())
        return MergeResult(accepted=True, reset=False, figures={"drift_removed": drift})

    @torch.no_grad()
    def validate(self) -> ValidationReport:
        r"""Residual :math:`\lVert C\,\mathrm{vec}(R_z(\theta)) - d\rVert_{\max}` now.

        Figures: ``residual`` (current tensor, layer dtype), ``base_residual``
        (the merged base) and ``update_norm`` :math:`\lVert z\rVert_2`.
        Tolerance: ``1e-12`` (float64) or ``1e-6`` (float32), times
        ``max(1, max|θ|)`` (and, for a dense ``C``, times the largest row norm,
        at least 1). Cost: one residual evaluation (:math:`O(p)` for presets).
        """
        space = self._space()
        current = self.apply(self.base)
        scale = max(1.0, float(current.abs().max()))
        tol = RESIDUAL_TOLERANCE.get(current.dtype, 1e-3) * scale * space.tolerance_scale
        figures = {
            "residual": float(space.residual(current.to(torch.float64))),
            "base_residual": float(space.residual(self.base.to(torch.float64))),
            "update_norm": float(self.z.norm()),
        }
        tolerances = {"residual": tol, "base_residual": tol}
        return ValidationReport(where=self.where, figures=figures, tolerances=tolerances)

    def residual(self) -> float:
        """Residual of the current tensor (see :meth:`validate`)."""
        with torch.no_grad():
            return float(self._space().residual(self.apply(self.base).to(torch.float64)))

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
