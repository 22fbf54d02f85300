r"""Peers of the P⁴ families behind one interface, for comparisons.

A :class:`Method` builds a :class:`Constrained` holder from a feasible start
matrix; the holder exposes the current ``weight()``, its ``logabsdet()``,
``solve(y)`` and a fresh ``optimizer(lr)``. Methods whose optional package
(geoopt, geotorch) is missing report why through :meth:`Method.unavailable`
and raise :class:`MissingDependencyError` from :meth:`Method.build`.

Examples
--------
>>> import torch
>>> from p4opt.studies import baselines
>>> method = baselines.get("lu")
>>> holder = method.build(torch.eye(3))
>>> opt = holder.optimizer(lr=1e-2)
>>> sorted(baselines.constraint_errors(holder, "invertible"))
['inverse_error', 'logdet_error']
"""

from __future__ import annotations

from functools import partial

from p4opt._typing import Tensor
from p4opt.studies.baselines.base import (
    Constrained,
    Family,
    Method,
    MissingDependencyError,
    constraint_errors,
    missing_modules,
    orthogonality_error,
)
from p4opt.studies.baselines.dense import LU, Cholesky, Dense, Plain
from p4opt.studies.baselines.p4 import P4Weight
from p4opt.studies.baselines.peers import GeooptSPD, GeooptStiefel, Geotorch, TorchOrthogonal

__all__ = [
    "Constrained",
    "Family",
    "Method",
    "MissingDependencyError",
    "METHODS",
    "REFERENCE",
    "get",
    "methods",
    "constraint_errors",
    "missing_modules",
    "orthogonality_error",
    "Dense",
    "Plain",
    "LU",
    "Cholesky",
    "P4Weight",
    "GeooptStiefel",
    "GeooptSPD",
    "Geotorch",
    "TorchOrthogonal",
]

_ADAM = (3e-3, 1e-2, 3e-2)
_ADAM_ORTH = (3e-2, 1e-1, 3e-1)
_RIEMANN = (0.3, 1.0, 3.0)


def _p4_invertible_lowmem(init: Tensor, seed: int) -> P4Weight:
    """P⁴ Invertible's low-memory rule: factored, rank ``n // 4``, gradient restarts."""
    rank = max(1, init.shape[-1] // 4)
    return P4Weight(init, seed, "Invertible", update="factored", rank=rank, restart="gradient")

#: The reference step of every comparison: a plain ``nn.Linear`` weight under Adam.
REFERENCE = Method(
    "linear", "invertible", Plain, _ADAM, description="plain nn.Linear weight, Adam (reference)"
)

METHODS: tuple[Method, ...] = (
    Method(
        "p4-householder",
        "orthogonal",
        partial(P4Weight, family="Orthogonal", method="householder"),
        _ADAM_ORTH,
        requires=("p4opt:Orthogonal",),
        p4=True,
        description="P⁴ Orthogonal, Householder reflections, Adam",
    ),
    Method(
        "p4-cayley",
        "orthogonal",
        partial(P4Weight, family="Orthogonal", method="cayley"),
        (1e-2, 3e-2, 1e-1),
        requires=("p4opt:Orthogonal",),
        p4=True,
        description="P⁴ Orthogonal, Cayley generator merged every step, Adam",
    ),
    Method(
        "p4-givens",
        "orthogonal",
        partial(P4Weight, family="Orthogonal", method="givens"),
        _ADAM_ORTH,
        requires=("p4opt:Orthogonal",),
        p4=True,
        description="P⁴ Orthogonal, Givens rotations, Adam",
    ),
    Method(
        "geoopt-radam",
        "orthogonal",
        partial(GeooptStiefel, optimizer="adam"),
        _RIEMANN,
        requires=("geoopt",),
        description="geoopt RiemannianAdam on Stiefel",
    ),
    Method(
        "geoopt-rsgd",
        "orthogonal",
        partial(GeooptStiefel, optimizer="sgd"),
        _RIEMANN,
        requires=("geoopt",),
        description="geoopt RiemannianSGD (momentum 0.9) on Stiefel",
    ),
    Method(
        "geotorch",
        "orthogonal",
        partial(Geotorch, constraint="orthogonal"),
        _ADAM_ORTH,
        requires=("geotorch",),
        description="geotorch.orthogonal (matrix exponential), Adam",
    ),
    Method(
        "torch-expm",
        "orthogonal",
        partial(TorchOrthogonal, orthogonal_map="matrix_exp"),
        _ADAM_ORTH,
        description="torch parametrizations.orthogonal, matrix_exp, Adam",
    ),
    Method(
        "torch-cayley",
        "orthogonal",
        partial(TorchOrthogonal, orthogonal_map="cayley"),
        _ADAM_ORTH,
        description="torch parametrizations.orthogonal, cayley, Adam",
    ),
    Method(
        "torch-householder",
        "orthogonal",
        partial(TorchOrthogonal, orthogonal_map="householder"),
        (1e-2, 3e-2, 1e-1),
        description="torch parametrizations.orthogonal, householder, Adam",
    ),
    Method(
        "p4-invertible",
        "invertible",
        partial(P4Weight, family="Invertible"),
        _ADAM,
        p4=True,
        description="P⁴ Invertible at the library defaults (p4opt.Invertible()), Adam",
    ),
    Method(
        "p4-invertible-lowmem",
        "invertible",
        _p4_invertible_lowmem,
        (1e-2, 3e-2, 1e-1),
        p4=True,
        description="P⁴ Invertible's low-memory rule (update='factored', rank n/4, "
        "restart='gradient': 2nk numbers of optimizer state), Adam",
    ),
    Method(
        "dense",
        "invertible",
        Dense,
        (1e-2, 3e-2, 1e-1),
        description="dense weight with slogdet/solve, Adam",
    ),
    Method(
        "lu",
        "invertible",
        LU,
        (1e-2, 3e-2, 1e-1),
        description="LU-parametrized weight (flows), Adam",
    ),
    Method(
        "geotorch-invertible",
        "invertible",
        partial(Geotorch, constraint="invertible"),
        _ADAM,
        requires=("geotorch",),
        description="geotorch.invertible (det > 0) with slogdet/solve, Adam",
    ),
    Method(
        "p4-spd",
        "spd",
        partial(P4Weight, family="PositiveDefinite"),
        (1e-2, 3e-2, 1e-1),  # whitened coordinates: best at 3e-2 (n = 16, 64)
        requires=("p4opt:PositiveDefinite",),
        p4=True,
        description="P⁴ PositiveDefinite at the library defaults (p4opt.PositiveDefinite()), "
        "tracked log det, Adam",
    ),
    Method(
        "geoopt-spd",
        "spd",
        GeooptSPD,
        _RIEMANN,
        requires=("geoopt",),
        description="geoopt RiemannianAdam on SymmetricPositiveDefinite, slogdet",
    ),
    Method(
        "cholesky",
        "spd",
        Cholesky,
        (1e-2, 3e-2, 1e-1),
        description="P = L L^T, L lower triangular with exp diagonal, log det 2 sum(d), Adam",
    ),
)


def get(name: str) -> Method:
    """The method called ``name`` (``REFERENCE`` for ``"linear"``)."""
    for method in (REFERENCE, *METHODS):
        if method.name == name:
            return method
    known = ", ".join(m.name for m in METHODS)
    raise ValueError(f"unknown method {name!r}; known methods: {known}")


def methods(family: Family | None = None) -> list[Method]:
    """The methods of ``family`` (all of them for ``None``), P⁴ first."""
    return [m for m in METHODS if family is None or m.family == family]
