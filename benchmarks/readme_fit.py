"""The README's "Use" example, P⁴Inv defaults against a dense weight: fit term after 100 steps.

``nn.Linear(256, 256)`` fitted to ``2 x`` on 64 fixed Gaussian inputs (seed 0) with
``- 1e-3 log|det W|``, 100 Adam steps, for each learning rate of the grid; the dense weight
takes its log-determinant from ``torch.linalg.slogdet``. Prints the fit term at the end of each
run and the ratio of the best fits (P⁴Inv ÷ dense).

    python benchmarks/readme_fit.py
"""

from __future__ import annotations

import torch

import p4opt


def fit(method: str, lr: float, steps: int = 100) -> float:
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256)
    if method == "p4inv":
        pert = p4opt.register(lin, "weight", p4opt.Invertible())
        opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=lr))
        logdet = pert.logabsdet
    else:
        opt = torch.optim.Adam(lin.parameters(), lr=lr)
        logdet = lambda: torch.linalg.slogdet(lin.weight)[1]  # noqa: E731
    x = torch.randn(64, 256)
    for _ in range(steps):
        term = (lin(x) - 2 * x).square().mean()
        (term - 1e-3 * logdet()).backward()
        opt.step()
        opt.zero_grad()
    return float(term.detach())


def main() -> None:
    torch.set_num_threads(1)
    best = {}
    for method in ("dense", "p4inv"):
        for lr in (1e-2, 3e-2, 1e-1):
            value = fit(method, lr)
            print(f"{method:6s} lr={lr:g}: fit {value:.2e}", flush=True)
            best[method] = min(best.get(method, float("inf")), value)
    print(f"best fit, P4Inv / dense: {best['p4inv'] / best['dense']:.2f}")


if __name__ == "__main__":
    main()
