"""Soak: a long float32 run with merges per family, property error checked along the way.

Each family trains an ``n x n`` float32 weight (``n/4 x n`` for ``orthogonal-cayley-stiefel``;
no bias) with Adam through ``p4opt.P4Optimizer``
(the family's default merge interval) on a fixed random regression task with fresh batches.
Ten times per run (every ``--steps / 10`` steps, 25 steps early so that the check falls
between two corrections, and at the end) the family's ``validate()`` figures are printed
together with the merges accepted, cut back (partial) and rejected so far. The run
passes when every check is inside the goal (inverse and log|det| errors <= 1e-6 for Invertible,
orthogonality error <= 1e-6 for Orthogonal (of the weight the layer computes, ``validate()``;
the stored base's own error is printed beside it), inverse, log det and factor errors <= 1e-6
for PositiveDefinite (on a Gaussian precision likelihood instead, fresh samples from a
covariance with eigenvalues in [1/e, e], from P = I: the regression's optimum over SPD matrices
lies on the cone's boundary, where no inverse stays accurate; ``positive-definite-boundary``
runs that regression on purpose, to show the near-boundary warning and the checks of the
layer's own matrix), the report of
``validate()`` for the linear structures) and the last check is no worse than ten times the
first or 1e-11 (no drift trend). Warnings are recorded; the summary gives the step of each.

    python benchmarks/soak.py                                     # 10^4 steps, every family
    python benchmarks/soak.py --steps 100000 --family invertible  # the full soak of one family
    python benchmarks/soak.py --steps 100000 --family positive-definite-boundary
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import p4opt

__all__ = ["FAMILIES", "GOALS", "soak"]

FAMILIES: dict[str, Callable[[int], p4opt.Perturbation]] = {
    "invertible": lambda n: p4opt.Invertible(seed=0),
    "invertible-factored": lambda n: p4opt.Invertible(update="factored", rank=4, seed=0),
    "orthogonal-householder": lambda n: p4opt.Orthogonal("householder", seed=0),
    "orthogonal-givens": lambda n: p4opt.Orthogonal("givens", seed=0),
    "orthogonal-cayley": lambda n: p4opt.Orthogonal("cayley", seed=0),
    # a wide (n/4, n) Stiefel weight: the rank-2k generator V^T Z - Z^T V
    "orthogonal-cayley-stiefel": lambda n: p4opt.Orthogonal("cayley", seed=0),
    "positive-definite": lambda n: p4opt.PositiveDefinite(seed=0),
    # the regression task: its optimum over SPD matrices lies on the cone's boundary
    "positive-definite-boundary": lambda n: p4opt.PositiveDefinite(seed=0),
    "symmetric": lambda n: p4opt.Symmetric(seed=0),
    "zerosum": lambda n: p4opt.ZeroSum(dim=0, value=1.0, seed=0),
    "circulant": lambda n: p4opt.Circulant(seed=0),
    "fixed": lambda n: p4opt.Fixed(
        torch.rand(n, n, generator=torch.Generator().manual_seed(1)) > 0.5, seed=0
    ),
}
#: The figures watched per family and their goal (None: the family's own tolerance).
GOALS: dict[str, dict[str, float | None]] = {
    "invertible": {"inverse_error": 1e-6, "logabsdet_error": 1e-6},
    "orthogonal": {"orthogonality_error": 1e-6},
    "spd": {"inverse_error": 1e-6, "logdet_error": 1e-6, "factor_error": 1e-6,
            "factor_inverse_error": 1e-6},
    "linear": {"residual": None},
}


def _kind(family: str) -> str:
    if family.startswith("positive-definite"):
        return "spd"
    return family.split("-")[0] if family.startswith(("invertible", "orthogonal")) else "linear"


def soak(family: str, steps: int, n: int = 64, lr: float = 1e-3, checks: int = 10,
         seed: int = 0) -> dict[str, object]:
    """Run one family for ``steps`` steps; return the checks and the merge counts."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    out = n // 4 if family.endswith("-stiefel") else n  # rows of the weight
    lin = nn.Linear(n, out, bias=False)
    with torch.no_grad():
        q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q[:out]
        if _kind(family) == "spd":  # start at I; data covariance q diag(e^c) q^T, c ~ U(-1, 1)
            scales = (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1).exp()
            root = ((q * scales.sqrt()) @ q.T).float()
            lin.weight.copy_(torch.eye(n))
        else:
            lin.weight.copy_(q + 0.1 * torch.randn(out, n, generator=gen, dtype=torch.float64))
    pert = p4opt.register(lin, "weight", FAMILIES[family](n))
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=lr))
    target = torch.randn(out, n, generator=gen) / math.sqrt(n)
    goals = GOALS[_kind(family)]
    every = max(1, steps // checks)
    rows = []
    warned: list[tuple[int, str]] = []
    likelihood = family == "positive-definite"
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, steps + 1):
            x = torch.randn(32, n, generator=gen)
            if likelihood:  # Gaussian precision likelihood: its optimum is interior
                x = x @ root
                loss = 0.5 * (lin(x) * x).sum(-1).mean() - 0.5 * pert.logabsdet().float()
            else:
                loss = (lin(x) - x @ target.T).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # 25 steps early: mid-cycle for a family that merges every step and corrects every 50
            if (step + 25) % every == 0 or step == steps:
                report = pert.validate()
                figures = {k: report.figures[k] for k in goals}
                if _kind(family) == "orthogonal":  # the stored base itself, in float64
                    base = pert.base.to(torch.float64)
                    figures["base_orthogonality_error"] = float(
                        p4opt.linalg.orthogonality_error(base)
                    )
                if _kind(family) == "spd":  # how close to the boundary, and the layer's own matrix
                    figures.update({k: report.figures[k] for k in ("condition",
                                                                    "layer_min_eigenvalue")})
                ok = (report.ok or _kind(family) != "spd") and all(
                    (report.ok if goal is None else figures[k] <= goal) for k, goal in goals.items()
                )
                row = {"step": step, "loss": float(loss.detach()), **figures, "ok": ok, **opt.stats}
                rows.append(row)
                print(json.dumps({"family": family, **row}), flush=True)
            while len(warned) < len(caught):
                warned.append((step, str(caught[len(warned)].message)))
                print(json.dumps({"family": family, "step": step, "warning": warned[-1][1]}))
    watched = [k for k in rows[0] if k.endswith("_error") or k == "residual"]
    first = {k: rows[0][k] for k in watched}
    last = {k: rows[-1][k] for k in watched}
    no_trend = all(last[k] <= 10 * max(first[k], 1e-12) for k in watched)  # 1e-12: rounding
    return {
        "family": family,
        "steps": steps,
        "all_checks_ok": all(r["ok"] for r in rows),
        "no_drift_trend": no_trend,
        "worst": {k: max(r[k] for r in rows) for k in watched},
        "merges": {k: opt.stats[k] for k in ("merges_accepted", "merges_partial",
                                              "merges_rejected", "corrections")},
        "seconds": round(time.perf_counter() - start, 1),
        "warnings": [{"step": step, "message": message} for step, message in warned],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="steps per family (10^4)")
    parser.add_argument("--n", type=int, default=64, help="matrix size (64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES),
                        help="family to run (repeatable; default all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    summaries = [soak(f, args.steps, args.n, args.lr) for f in args.family or FAMILIES]
    for summary in summaries:
        print("SUMMARY", json.dumps(summary))


if __name__ == "__main__":
    main()
