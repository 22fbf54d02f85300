"""Shared fixtures: deterministic seeds and small random problems."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def random_invertible(n: int, *, dtype=torch.float64, batch=(), seed: int = 0) -> torch.Tensor:
    """A well-conditioned random matrix (or stack): I + 0.3 G / sqrt(n)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(*batch, n, n, generator=g, dtype=torch.float64) / n**0.5
    return (torch.eye(n, dtype=torch.float64) + 0.3 * noise).to(dtype)
