r"""Differential entropies with error bars: Monte Carlo on exact log-densities, and a kNN check.

Test NLL minus entropy estimates :math:`\mathrm{KL}(p \,\|\, q) \ge 0` (0 for a
perfect model), so a density study reports it next to the entropy's error bar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from p4opt._typing import Tensor

__all__ = ["Entropy", "monte_carlo_entropy", "knn_entropy"]


@dataclass(frozen=True)
class Entropy:
    """A differential entropy in nats with its standard error (0 when exact) and method."""

    value: float
    stderr: float
    method: str

    def __str__(self) -> str:
        return f"{self.value:.4f} ± {self.stderr:.4f} nats ({self.method})"


def monte_carlo_entropy(log_prob_at_samples: Tensor, method: str = "monte carlo") -> Entropy:
    r""":math:`H = -\mathbb{E}_p[\log p(X)]` from exact log-densities at i.i.d. samples of ``p``.

    The standard error is the sample standard deviation over :math:`\sqrt{N}`.

    Examples
    --------
    >>> import torch, math
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(100000, 2, generator=g, dtype=torch.float64)
    >>> h = monte_carlo_entropy(-0.5 * x.square().sum(-1) - math.log(2 * math.pi))
    >>> abs(h.value - (1 + math.log(2 * math.pi))) < 4 * h.stderr
    True
    """
    neg = -log_prob_at_samples.to(torch.float64)
    n = neg.numel()
    return Entropy(float(neg.mean()), float(neg.std() / math.sqrt(n)), f"{method}, N={n}")


def knn_entropy(x: Tensor, k: int = 4, chunk: int = 2048) -> Entropy:
    r"""Kozachenko–Leonenko nearest-neighbour entropy estimate from samples ``x[N, d]``.

    .. math:: \hat H = \psi(N) - \psi(k) + \log V_d + \frac{d}{N} \sum_i \log r_{k,i}

    with :math:`r_{k,i}` the distance from sample ``i`` to its ``k``-th
    neighbour and :math:`V_d` the volume of the unit ball. Consistent but
    biased at finite ``N`` (most near sharp edges); the reported error is the
    sampling standard error only. Cost :math:`O(N^2 d)`.

    Examples
    --------
    >>> import torch, math
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(4000, 2, generator=g, dtype=torch.float64)   # uniform: H = 0
    >>> abs(knn_entropy(x).value) < 0.05
    True
    """
    x = x.to(torch.float64)
    n, d = x.shape
    logs = []
    for start in range(0, n, chunk):
        dist = torch.cdist(x[start : start + chunk], x)
        r = dist.topk(k + 1, dim=-1, largest=False).values[:, -1]  # skips the point itself
        logs.append(r.log())
    log_r = torch.cat(logs)
    log_vd = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1)
    terms = d * log_r
    digamma = torch.special.digamma
    const = float(digamma(torch.tensor(float(n))) - digamma(torch.tensor(float(k)))) + log_vd
    return Entropy(const + float(terms.mean()), float(terms.std() / math.sqrt(n)), f"kNN, k={k}")
