"""Two-dimensional toy densities for flow studies: seeded generators and their entropies.

>>> import torch, p4opt.datasets as D
>>> x = D.sample("two_moons", 500, torch.Generator().manual_seed(0))
>>> tuple(x.shape), x.dtype
((500, 2), torch.float64)
>>> D.entropy("checkerboard").value == __import__("math").log(32)
True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from p4opt._typing import Tensor
from p4opt.datasets import toy2d
from p4opt.datasets.entropy import Entropy, knn_entropy, monte_carlo_entropy
from p4opt.datasets.toy2d import (
    checkerboard,
    eight_gaussians,
    pinwheel,
    rings,
    two_moons,
    two_spirals,
)
from p4opt.errors import P4ValueError

__all__ = [
    "NAMES",
    "sample",
    "log_prob",
    "entropy",
    "Entropy",
    "knn_entropy",
    "monte_carlo_entropy",
    "two_moons",
    "eight_gaussians",
    "checkerboard",
    "pinwheel",
    "two_spirals",
    "rings",
]

Sampler = Callable[[int, "torch.Generator | None"], Tensor]

_SAMPLERS: dict[str, Sampler] = {
    "two_moons": two_moons,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "pinwheel": pinwheel,
    "two_spirals": two_spirals,
    "rings": rings,
}
_LOG_PROBS: dict[str, Callable[[Tensor], Tensor]] = {
    "two_moons": toy2d.log_prob_two_moons,
    "eight_gaussians": toy2d.log_prob_eight_gaussians,
    "checkerboard": toy2d.log_prob_checkerboard,
    "two_spirals": toy2d.log_prob_two_spirals,
    "rings": toy2d.log_prob_rings,
}
_ALIASES = {"moons": "two_moons", "8gaussians": "eight_gaussians", "2spirals": "two_spirals"}

#: The dataset names, in the order studies report them.
NAMES: tuple[str, ...] = tuple(_SAMPLERS)


def _resolve(name: str) -> str:
    key = _ALIASES.get(name, name)
    if key not in _SAMPLERS:
        raise P4ValueError(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")
    return key


def sample(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` samples ``(n, 2)`` (float64) of the named dataset, drawn with ``generator``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise P4ValueError(f"n must be a positive int, got {n!r}")
    return _SAMPLERS[_resolve(name)](n, generator)


def log_prob(name: str, x: Tensor) -> Tensor:
    """Exact (or quadrature) log-density of the named dataset at ``x[..., 2]``.

    Not available for ``"pinwheel"`` (no closed form at arbitrary points).
    """
    key = _resolve(name)
    if key not in _LOG_PROBS:
        raise NotImplementedError(f"{key} has no log-density at arbitrary points")
    return _LOG_PROBS[key](x)


@functools.lru_cache(maxsize=64)
def entropy(name: str, n_samples: int = 10000, seed: int = 0) -> Entropy:
    """Differential entropy (nats) of the named dataset.

    Exact for the checkerboard (:math:`\\log 32`); otherwise a Monte-Carlo
    average of the exact (or quadrature) negative log-density over
    ``n_samples`` seeded samples, with its standard error. Cached.
    """
    key = _resolve(name)
    if key == "checkerboard":
        return Entropy(math.log(32.0), 0.0, "exact")
    g = torch.Generator().manual_seed(seed)
    if key == "pinwheel":
        _, logp = toy2d.pinwheel_with_log_prob(n_samples, g)
        return monte_carlo_entropy(logp, "monte carlo, change of variables")
    x = sample(key, n_samples, g)
    logp = torch.cat([log_prob(key, c) for c in x.split(2048)])
    return monte_carlo_entropy(logp, "monte carlo, exact density")
