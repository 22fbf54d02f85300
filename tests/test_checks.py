"""Tests of the model-level structure checks in ``p4opt.checks``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import p4opt
import p4opt.checks as checks
from p4opt.exceptions import ShapeError


def _mlp(n: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(n, 32, dtype=dtype), nn.ReLU(), nn.Linear(32, 32, dtype=dtype), nn.ReLU(),
        nn.Linear(32, n, dtype=dtype),
    )


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 64, 8, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@torch.no_grad()
def test_linear_maps_pass_every_check(data, dtype: torch.dtype) -> None:
    x, y = data.to(dtype)
    torch.manual_seed(0)
    lin = nn.Linear(8, 8, bias=False, dtype=dtype)
    lambdas = torch.linspace(-10, 10, 21)
    assert float(checks.additivity_error(lin, x, y)) <= 1e-6
    errors = checks.homogeneity_error(lin, x, lambdas)
    assert errors.shape == (21,)
    assert float(errors[lambdas != 0].max()) <= 1e-6
    assert float(errors[lambdas == 0]) == 0.0  # f(0) = 0 exactly without a bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@torch.no_grad()
def test_relu_mlp_fails_the_checks(data, dtype: torch.dtype) -> None:
    x, y = data.to(dtype)
    mlp = _mlp(8, dtype)
    assert float(checks.additivity_error(mlp, x, y)) > 1e-2
    errors = checks.homogeneity_error(mlp, x, [-10.0, -1.0, 0.5, 2.0, 10.0])
    assert float(errors.min()) > 1e-2


@torch.no_grad()
def test_homogeneity_error_matches_definition(data) -> None:
    x = data[0].double()
    mlp = _mlp(8, torch.float64)
    err = checks.homogeneity_error(mlp, x, [3.0])[0]
    fx = mlp(x)
    expected = (mlp(3.0 * x) - 3.0 * fx).norm() / (3.0 * fx).norm()
    assert torch.allclose(err, expected, rtol=1e-12)


def test_checks_are_differentiable(data) -> None:
    x, y = data
    mlp = _mlp(8, torch.float32)
    penalty = checks.homogeneity_error(mlp, x, [-1.0, 2.0]).mean() + checks.additivity_error(
        mlp, x, y
    )
    penalty.backward()
    assert float(mlp[0].weight.grad.abs().max()) > 0


@torch.no_grad()
def test_conservation_error_of_a_zero_sum_layer() -> None:
    torch.manual_seed(3)
    x = torch.randn(128, 16, dtype=torch.float64)
    lin = nn.Linear(16, 16, bias=False, dtype=torch.float64)
    before = float(checks.conservation_error(lin, x))
    p4opt.register(lin, "weight", p4opt.ZeroSum(dim=0, value=1.0))
    after = float(checks.conservation_error(lin, x))
    assert before > 1e-2 and after < 1e-14
    # matches the definition on a hand-made case: doubling a positive state
    pos = torch.rand(4, 5, dtype=torch.float64)
    assert abs(float(checks.conservation_error(lambda u: 2 * u, pos)) - 1.0) < 1e-14


@torch.no_grad()
def test_symmetry_error() -> None:
    torch.manual_seed(2)
    a = torch.randn(3, 6, 6, dtype=torch.float64)
    assert float(checks.symmetry_error(a + a.mT).max()) == 0.0
    expected = torch.linalg.matrix_norm(a - a.mT) / torch.linalg.matrix_norm(a)
    assert torch.allclose(checks.symmetry_error(a), expected, rtol=1e-14)
    lin = nn.Linear(6, 6)
    p4opt.register(lin, "weight", p4opt.Symmetric())
    assert float(checks.symmetry_error(lin.weight)) == 0.0


def test_shape_errors() -> None:
    with pytest.raises(ShapeError, match="square"):
        checks.symmetry_error(torch.ones(2, 3))
    with pytest.raises(ShapeError, match="equal shapes"):
        checks.additivity_error(torch.relu, torch.ones(2, 3), torch.ones(3, 2))
