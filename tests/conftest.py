"""Shared fixtures: deterministic seeds and small random problems."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """Seed every test; run on one thread: the suite's tensors are tiny, and extra threads
    only add synchronization (milliseconds per op on a busy 2-core machine)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_invertible(n: int, *, dtype=torch.float64, batch=(), seed: int = 0) -> torch.Tensor:
    """A well-conditioned random matrix (or stack): I + 0.3 G / sqrt(n)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(*batch, n, n, generator=g, dtype=torch.float64) / n**0.5
    return (torch.eye(n, dtype=torch.float64) + 0.3 * noise).to(dtype)
