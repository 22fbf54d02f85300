"""Toy 2-D datasets: seeded generators, normalized densities, entropies against direct estimates."""

from __future__ import annotations

import math

import pytest
import torch

import p4opt.datasets as D
from p4opt.datasets import toy2d


@pytest.mark.parametrize("name", D.NAMES)
def test_generators_are_seeded_and_reproducible(name: str) -> None:
    a = D.sample(name, 300, torch.Generator().manual_seed(3))
    b = D.sample(name, 300, torch.Generator().manual_seed(3))
    c = D.sample(name, 300, torch.Generator().manual_seed(4))
    assert a.shape == (300, 2) and a.dtype == torch.float64 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.abs().max()) < 8  # everything lives on the plotting window's scale


WITH_DENSITY = ["two_moons", "eight_gaussians", "checkerboard", "rings", "two_spirals"]


@pytest.mark.parametrize("name", WITH_DENSITY)
def test_log_prob_integrates_to_one(name: str) -> None:
    # midpoint rule on cell centres: cells of 0.12 for densities smoothed at >= 0.08 (error
    # ~exp(-2 pi^2 sigma^2 / h^2)); the checkerboard's edges fall on cell boundaries
    half, res = (8.0, 400) if name == "checkerboard" else (6.0, 100)
    axis = (torch.arange(res, dtype=torch.float64) + 0.5) / res * 2 * half - half
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    mass = float(D.log_prob(name, pts).exp().sum()) * (2 * half / res) ** 2
    assert abs(mass - 1) < 2e-3


@pytest.mark.parametrize("name", ["two_moons", "eight_gaussians", "checkerboard", "rings"])
def test_log_prob_is_high_on_samples_and_low_far_away(name: str) -> None:
    x = D.sample(name, 500, torch.Generator().manual_seed(5))
    logp = D.log_prob(name, x)
    assert torch.isfinite(logp).all()
    assert float(D.log_prob(name, torch.tensor([[30.0, 30.0]]))) < float(logp.min()) - 10


def test_checkerboard_entropy_is_exact_and_matches_knn() -> None:
    h = D.entropy("checkerboard")
    assert h.value == math.log(32) and h.stderr == 0
    x = D.sample("checkerboard", 6000, torch.Generator().manual_seed(6))
    knn = D.knn_entropy(x)
    # kNN over-estimates near the squares' edges (about +0.07 nats at this N)
    assert -0.03 < knn.value - h.value < 0.1


def test_eight_gaussians_entropy_matches_closed_form_limit() -> None:
    # the components barely overlap, so H ~ log 8 + entropy of one 2-D Gaussian
    sigma = 0.5 / 1.414
    closed = math.log(8) + 1 + math.log(2 * math.pi * sigma**2)
    h = D.entropy("eight_gaussians", n_samples=20000)
    assert abs(h.value - closed) < 4 * h.stderr + 2e-3


@pytest.mark.parametrize("name", [n for n in D.NAMES if n != "checkerboard"])
def test_monte_carlo_entropy_agrees_with_knn(name: str) -> None:
    h = D.entropy(name, n_samples=3000, seed=1)
    x = D.sample(name, 6000, torch.Generator().manual_seed(7))
    knn = D.knn_entropy(x)
    assert abs(h.value - knn.value) < 0.06 + 3 * math.hypot(h.stderr, knn.stderr)


def test_pinwheel_density_recovers_cell_areas() -> None:
    # E_p[1{x in C} / p(x)] = area(C): a wrong density (normalization, Jacobian) breaks it
    g = torch.Generator().manual_seed(8)
    x, logp = toy2d.pinwheel_with_log_prob(200000, g)
    cell = 0.25
    idx = torch.floor(x / cell).long()
    _, inverse, counts = torch.unique(idx[:, 0] * 1000 + idx[:, 1], return_inverse=True,
                                      return_counts=True)
    area = torch.zeros(counts.shape, dtype=torch.float64).index_add_(0, inverse, (-logp).exp())
    ratio = area[counts > 400] / (x.shape[0] * cell**2)
    assert ratio.numel() > 50
    assert abs(float(ratio.median()) - 1) < 0.02 and float((ratio - 1).abs().max()) < 0.25


def test_unknown_name_and_bad_size_raise() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        D.sample("spiral", 10)
    with pytest.raises(ValueError, match="positive int"):
        D.sample("rings", 0)
    with pytest.raises(NotImplementedError):
        D.log_prob("pinwheel", torch.zeros(1, 2))
    assert D.sample("8gaussians", 5).shape == (5, 2)
