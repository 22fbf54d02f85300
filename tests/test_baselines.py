"""The comparison baselines keep their constraint and skip cleanly without optional packages."""

from __future__ import annotations

import sys

import pytest
import torch

from p4opt.studies import baselines
from p4opt.studies.baselines import MissingDependencyError, constraint_errors
from p4opt.studies.tasks import PrecisionML, random_orthogonal
from p4opt.studies.tasks.runner import train
from p4opt.studies.tasks.stiefel import random_stiefel

ORTHOGONAL = [m.name for m in baselines.methods("orthogonal")]
INVERTIBLE = [m.name for m in baselines.methods("invertible")]
SPD = [m.name for m in baselines.methods("spd")]


def _start(family: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if family == "orthogonal":
        return random_orthogonal(n, g, det=1.0).to(dtype)
    if family == "spd":
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        return (torch.eye(n, dtype=torch.float64) + 0.1 * a @ a.mT).to(dtype)
    noise = torch.randn(n, n, generator=g, dtype=torch.float64)
    w = torch.eye(n, dtype=torch.float64) + 0.2 * noise
    if torch.det(w) < 0:  # geotorch.invertible needs det > 0
        w[0] = -w[0]
    return w.to(dtype)


def _train(holder: baselines.Constrained, family: str, lr: float, steps: int = 5) -> None:
    g = torch.Generator().manual_seed(2)
    n = holder.weight().shape[-1]
    dtype = holder.weight().dtype
    x = torch.randn(32, n, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(32, n, generator=g, dtype=torch.float64).to(dtype)
    opt = holder.optimizer(lr)
    for _ in range(steps):
        loss = (x @ holder.weight().mT - y).square().mean()
        if family == "invertible":
            loss = loss - holder.logabsdet()
        loss.backward()
        opt.step()
        opt.zero_grad()


def _method(name: str) -> baselines.Method:
    method = baselines.get(name)
    reason = method.unavailable()
    if reason is not None:
        pytest.skip(reason)
    return method


@pytest.mark.parametrize("name", ORTHOGONAL)
def test_orthogonal_peer_starts_at_init_and_stays_orthogonal_float32(name: str) -> None:
    method = _method(name)
    init = _start("orthogonal", 12, torch.float32)
    holder = method.build(init, seed=0)
    assert float((holder.weight().detach() - init).abs().max()) <= 1e-6
    _train(holder, "orthogonal", lr=method.lr_grid[1])
    moved = float((holder.weight().detach() - init).abs().max())
    assert moved > 1e-3  # it trained
    assert constraint_errors(holder, "orthogonal")["orthogonality"] <= 1e-5


@pytest.mark.parametrize("name", INVERTIBLE)
def test_invertible_peer_tracks_logdet_and_inverse_float64(name: str) -> None:
    method = _method(name)
    init = _start("invertible", 10, torch.float64)
    holder = method.build(init, seed=0)
    assert float((holder.weight().detach() - init).abs().max()) <= 1e-10
    _train(holder, "invertible", lr=1e-2)
    assert float((holder.weight().detach() - init).abs().max()) > 1e-3
    errors = constraint_errors(holder, "invertible")
    assert errors["logdet_error"] <= 1e-9
    assert errors["inverse_error"] <= 1e-9


def test_lu_logdet_is_sum_of_log_scales_and_matches_slogdet() -> None:
    init = _start("invertible", 16, torch.float64)
    holder = baselines.LU(init)
    _train(holder, "invertible", lr=3e-2, steps=10)
    w = holder.weight().detach()
    sign, ref = torch.linalg.slogdet(w)
    tracked = holder.logabsdet().detach()
    assert abs(float(tracked - ref)) <= 1e-10
    assert float(tracked - holder.log_scale.detach().sum()) == 0.0
    y = torch.randn(5, 16, dtype=torch.float64)
    expected = torch.linalg.solve(w, y.mT).mT
    assert float((holder.solve(y).detach() - expected).abs().max()) <= 1e-10


def test_lu_float32_logdet_error_small() -> None:
    holder = baselines.LU(_start("invertible", 32, torch.float32))
    _train(holder, "invertible", lr=1e-2, steps=10)
    assert constraint_errors(holder, "invertible")["logdet_error"] <= 1e-5


@pytest.mark.parametrize("module", ["geoopt", "geotorch"])
def test_missing_optional_package_skips_with_message(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    affected = [m for m in baselines.METHODS if module in m.requires]
    assert affected
    for method in affected:
        reason = method.unavailable()
        assert reason is not None and module in reason and "p4opt[baselines]" in reason
        with pytest.raises(MissingDependencyError, match=module):
            method.build(_start(method.family, 4, torch.float32))
    others = [m for m in baselines.METHODS if not m.requires]
    assert all(m.unavailable() is None for m in others)


def test_missing_p4_family_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import p4opt

    monkeypatch.delattr(p4opt, "Orthogonal", raising=False)
    reason = baselines.get("p4-householder").unavailable()
    assert reason is not None and "p4opt.Orthogonal" in reason


def test_get_unknown_method_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="geoopt-radam"):
        baselines.get("no-such-method")
    assert baselines.get("linear") is baselines.REFERENCE


def test_non_matrix_init_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be a matrix"):
        baselines.get("dense").build(torch.zeros(3))


@pytest.mark.parametrize("shape", [(12, 4), (4, 12)])
@pytest.mark.parametrize("name", ORTHOGONAL)
def test_orthogonal_peer_trains_a_stiefel_weight(name: str, shape: tuple[int, int]) -> None:
    method = _method(name)
    init = random_stiefel(*shape, torch.Generator().manual_seed(1)).float()
    holder = method.build(init, seed=0)
    assert holder.weight().shape == shape
    assert float((holder.weight().detach() - init).abs().max()) <= 1e-6
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, shape[1], generator=g)
    y = torch.randn(32, shape[0], generator=g)
    opt = holder.optimizer(method.lr_grid[1])
    for _ in range(5):
        (x @ holder.weight().mT - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert float((holder.weight().detach() - init).abs().max()) > 1e-3  # it trained
    assert constraint_errors(holder, "orthogonal")["orthogonality"] <= 1e-5


def test_spd_methods_are_the_three_compared() -> None:
    assert SPD == ["p4-spd", "geoopt-spd", "cholesky"]
    assert [baselines.get(name).p4 for name in SPD] == [True, False, False]
    for name in SPD:
        grid = baselines.get(name).lr_grid
        assert len(grid) == 3 and list(grid) == sorted(grid)


@pytest.mark.parametrize("name", SPD)
def test_spd_method_starts_at_init_and_tracks_logdet_float64(name: str) -> None:
    method = _method(name)
    init = _start("spd", 10, torch.float64)
    holder = method.build(init, seed=0)
    assert float((holder.weight().detach() - init).abs().max()) <= 1e-10
    task = PrecisionML(10, seed=1, dtype=torch.float64)
    opt = holder.optimizer(method.lr_grid[1])
    for _ in range(12):  # past the first merge of p4-spd (every 10 steps)
        task.loss(holder).backward()
        opt.step()
        opt.zero_grad()
    w = holder.weight().detach()
    assert float((w - init).abs().max()) > 1e-3  # it trained
    errors = constraint_errors(holder, "spd")
    assert set(errors) == {"symmetry", "logdet_error"}
    assert errors["symmetry"] <= 1e-12 and errors["logdet_error"] <= 1e-9
    y = torch.randn(4, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = torch.linalg.solve(w, y.mT).mT
    assert float((holder.solve(y).detach() - expected).abs().max()) <= 1e-9


@pytest.mark.parametrize("name", SPD)
def test_spd_method_reaches_the_target_at_n8(name: str) -> None:
    method = _method(name)
    task = PrecisionML(8, seed=0, dtype=torch.float64)
    run = train(method, task, method.lr_grid[1], 200, stop_at_target=True)
    assert run.steps_to_target is not None and run.steps_to_target <= 200
    assert run.relative[-1] <= task.target
    assert run.relative[0] == pytest.approx(1.0, abs=1e-12)  # every method starts at I
    assert run.constraint["logdet_error"] <= 1e-9


def test_cholesky_logdet_is_twice_the_log_diagonal_and_init_is_checked() -> None:
    init = _start("spd", 6, torch.float64)
    holder = baselines.Cholesky(init)
    assert torch.allclose(holder.factor().detach(), torch.linalg.cholesky(init), atol=1e-12)
    with torch.no_grad():
        holder.log_diag.add_(0.3)
        holder.lower.add_(torch.ones(6, 6, dtype=torch.float64))  # upper part is ignored
    w, tracked = holder.weight().detach(), holder.logabsdet().detach()
    assert float(tracked) == pytest.approx(float(torch.logdet(w)), abs=1e-10)
    assert float(tracked - 2 * holder.log_diag.detach().sum()) == 0.0
    with pytest.raises(ValueError, match="symmetric positive definite"):
        baselines.Cholesky(-init)
    with pytest.raises(ValueError, match="symmetric positive definite"):
        baselines.Cholesky(init + torch.triu(torch.ones(6, 6, dtype=torch.float64), 1))
    with pytest.raises(ValueError, match="square matrix"):
        baselines.Cholesky(torch.ones(3, 4, dtype=torch.float64))


def test_spd_constraint_errors_flag_an_indefinite_weight_and_bad_family() -> None:
    holder = baselines.Dense(torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)))
    errors = constraint_errors(holder, "spd")
    assert errors["logdet_error"] == float("inf") and errors["symmetry"] == 0.0
    with pytest.raises(ValueError, match="family must be"):
        constraint_errors(holder, "unitary")  # type: ignore[arg-type]
