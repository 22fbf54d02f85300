r"""The comparison interface: a :class:`Method` builds a :class:`Constrained` weight holder."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from p4opt import linalg
from p4opt._typing import Tensor
from p4opt.errors import ShapeError, describe
from p4opt.studies.types import Family, MissingDependencyError

__all__ = [
    "Family",
    "Constrained",
    "Method",
    "MissingDependencyError",
    "missing_modules",
    "orthogonality_error",
    "constraint_errors",
]

def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The entries of ``names`` that cannot be imported.

    An entry is a module name (``"geoopt"``) or ``"module:attribute"``
    (``"p4opt:Orthogonal"``, missing when the attribute is absent). A module
    set to ``None`` in ``sys.modules`` counts as missing.

    Examples
    --------
    >>> missing_modules(("math", "math:nothing_here", "no_such_module_here"))
    ['math:nothing_here', 'no_such_module_here']
    """
    missing = []
    for entry in names:
        module, _, attribute = entry.partition(":")
        try:
            found = importlib.import_module(module)
        except ImportError:
            missing.append(entry)
            continue
        if attribute and not hasattr(found, attribute):
            missing.append(entry)
    return missing


class Constrained(nn.Module):
    r"""A weight :math:`W` (square, or rectangular on the Stiefel tasks) trained under a constraint.

    Subclasses implement :meth:`weight`; :meth:`logabsdet` and :meth:`solve`
    default to dense linear algebra (:math:`O(n^3)`), :meth:`optimizer` to
    :class:`torch.optim.Adam` over the module's parameters.
    """

    def weight(self) -> Tensor:
        """The current weight, shape (n, n), differentiable in the trainable tensors."""
        raise NotImplementedError

    def logabsdet(self) -> Tensor:
        r""":math:`\log|\det W|` as the method tracks it (dense ``slogdet`` by default)."""
        return torch.linalg.slogdet(self.weight())[1]

    def solve(self, y: Tensor) -> Tensor:
        r"""Apply :math:`W^{-1}` to every vector ``y[..., n]`` (dense solve by default)."""
        return torch.linalg.solve(self.weight(), y.unsqueeze(-1)).squeeze(-1)

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """A fresh optimizer over this holder's trainable tensors."""
        return torch.optim.Adam(self.parameters(), lr=lr)


def _as_linear(init: Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` whose weight (out, in) is a copy of ``init`` (same dtype)."""
    if not isinstance(init, Tensor) or init.ndim != 2:
        raise ShapeError(f"init must be a matrix, got {describe(init)}")
    out_features, in_features = init.shape
    lin = nn.Linear(in_features, out_features, bias=False, dtype=init.dtype, device=init.device)
    with torch.no_grad():
        lin.weight.copy_(init)
    return lin


@dataclass(frozen=True)
class Method:
    """One comparison method: how to build and train a constrained weight.

    Attributes
    ----------
    name : str
        Short label used in tables, JSON and ``--methods``.
    family : {"orthogonal", "invertible", "spd"}
        The constraint it keeps (tasks of that family apply).
    factory : callable
        ``factory(init, seed)`` returns a :class:`Constrained` holder starting
        at the feasible matrix ``init`` (shape (n, n), or (n, p) on the Stiefel tasks).
    lr_grid : tuple of float
        Learning rates tried by ``p4opt compare`` (the best one is kept).
    requires : tuple of str
        Optional packages (import names) the method needs.
    p4 : bool
        Whether it is a P⁴ family (as opposed to a peer baseline).
    description : str
        One line for tables and docs.
    """

    name: str
    family: Family
    factory: Callable[[Tensor, int], Constrained]
    lr_grid: tuple[float, ...]
    requires: tuple[str, ...] = ()
    p4: bool = False
    description: str = ""

    def unavailable(self) -> str | None:
        """Why the method cannot run here (a missing package), or ``None`` when it can."""
        missing = missing_modules(self.requires)
        if not missing:
            return None
        names = ", ".join(m.replace(":", ".") for m in missing)
        hint = "" if self.p4 else " (pip install 'p4opt[baselines]')"
        return f"method {self.name!r} skipped: {names} is not available{hint}"

    def build(self, init: Tensor, seed: int = 0) -> Constrained:
        """Build the holder starting at ``init`` (shape (n, n), its dtype is kept).

        Raises
        ------
        MissingDependencyError
            When an optional package the method needs is missing.
        """
        reason = self.unavailable()
        if reason is not None:
            raise MissingDependencyError(reason)
        return self.factory(init, seed)


def orthogonality_error(weight: Tensor) -> float:
    r""":math:`\lVert W^T W - I\rVert_{\max}` (:math:`WW^T` if wide) in float64; :math:`O(n^3)`.

    Examples
    --------
    >>> orthogonality_error(torch.eye(3)) == 0.0
    True
    """
    return float(linalg.orthogonality_error(weight.detach().to(torch.float64)).amax())


@torch.no_grad()
def constraint_errors(holder: Constrained, family: Family) -> dict[str, float]:
    r"""Error figures of a holder's constraint; cost :math:`O(n^3)`.

    ``orthogonality`` for the orthogonal family; for the invertible family
    ``logdet_error`` (tracked :math:`\log|\det W|` against float64
    ``slogdet``) and ``inverse_error`` (:math:`\lVert W\,\mathrm{solve}(I) - I\rVert_{\max}`);
    for the spd family ``symmetry`` (:math:`\lVert W - W^T\rVert_{\max}`) and
    ``logdet_error`` (tracked :math:`\log\det W` against float64 Cholesky of
    :math:`(W + W^T)/2`; infinite when that factorization fails, i.e. :math:`W` is not
    positive definite).

    Raises
    ------
    ValueError
        When ``family`` is not one of ``"orthogonal"``, ``"invertible"``, ``"spd"``.
    """
    if family not in ("orthogonal", "invertible", "spd"):
        raise ValueError(f"family must be 'orthogonal', 'invertible' or 'spd', got {family!r}")
    w = holder.weight().detach()
    if family == "orthogonal":
        return {"orthogonality": orthogonality_error(w)}
    if family == "spd":
        return _spd_errors(holder, w)
    ref_sign, ref = torch.linalg.slogdet(w.to(torch.float64))
    tracked = float(holder.logabsdet())
    logdet_error = abs(tracked - float(ref)) if float(ref_sign) != 0 else math.inf
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    inv = holder.solve(eye).mT.to(torch.float64)
    inverse_error = float((w.to(torch.float64) @ inv - eye.to(torch.float64)).abs().amax())
    return {"logdet_error": logdet_error, "inverse_error": inverse_error}


def _spd_errors(holder: Constrained, weight: Tensor) -> dict[str, float]:
    """``symmetry`` and ``logdet_error`` of an SPD holder (see :func:`constraint_errors`)."""
    w = weight.to(torch.float64)
    symmetry = float((w - w.mT).abs().amax())
    factor, info = torch.linalg.cholesky_ex((w + w.mT) / 2)
    if int(info) != 0:
        return {"symmetry": symmetry, "logdet_error": math.inf}
    ref = 2 * float(factor.diagonal().log().sum())
    return {"symmetry": symmetry, "logdet_error": abs(float(holder.logabsdet()) - ref)}
