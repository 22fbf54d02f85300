"""Each built-in task is at its optimum at its true solution, and seeded."""

from __future__ import annotations

import pytest
import torch

from p4opt import linalg
from p4opt.studies import tasks
from p4opt.studies.tasks import (
    GaussianML,
    PrecisionML,
    Procrustes,
    StiefelTall,
    StiefelWide,
    TeacherRNN,
)


def _skew(n: int, scale: float, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return scale * (a - a.mT)


def test_procrustes_truth_is_the_svd_solution_and_loss_is_zero() -> None:
    task = Procrustes(12, seed=3, dtype=torch.float64)
    truth = task.solution()
    assert float(task.objective(truth)) <= 1e-28
    u, _, vh = torch.linalg.svd(task.y.mT @ task.x)  # argmin over O(n): polar factor of Y^T X
    assert float((u @ vh - truth).abs().max()) <= 1e-10
    assert task.relative(float(task.objective(task.initial()))) > 1.0
    for seed in range(3):  # feasible neighbours are worse
        assert float(task.objective(truth @ torch.linalg.matrix_exp(_skew(12, 1e-3, seed)))) > 0


def test_gaussian_ml_optimum_value_and_stationarity() -> None:
    task = GaussianML(10, seed=1, dtype=torch.float64)
    w = task.solution().requires_grad_(True)
    loss = task.objective(w)  # log|det| by slogdet
    assert abs(float(loss.detach()) - task.optimum) <= 1e-12
    (grad,) = torch.autograd.grad(loss, w)
    assert float(grad.abs().max()) <= 1e-10
    rotated = torch.linalg.matrix_exp(_skew(10, 0.3, 0)) @ w.detach()  # O W* is optimal too
    assert abs(float(task.objective(rotated)) - task.optimum) <= 1e-12
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        nearby = w.detach() + 1e-3 * torch.randn(10, 10, generator=g, dtype=torch.float64)
        assert float(task.objective(nearby)) > task.optimum
    assert task.relative(float(task.objective(task.initial()))) == pytest.approx(1.0, abs=1e-12)


def test_gaussian_ml_uses_the_given_logdet() -> None:
    task = GaussianML(6, dtype=torch.float64)
    w = task.solution()
    shifted = task.objective(w, torch.linalg.slogdet(w)[1] + 1.0)
    assert float(shifted) == pytest.approx(task.optimum - 1.0, abs=1e-12)


def test_teacher_rnn_truth_has_zero_loss_and_zero_gradient() -> None:
    task = TeacherRNN(8, seed=2, dtype=torch.float64)
    w = task.solution().requires_grad_(True)
    loss = task.objective(w)
    assert float(loss.detach()) == 0.0
    (grad,) = torch.autograd.grad(loss, w)
    assert float(grad.abs().max()) == 0.0
    assert float(task.objective(task.initial())) > 0.05
    rotated = task.solution() @ torch.linalg.matrix_exp(_skew(8, 1e-3, 1))
    assert float(task.objective(rotated)) > 0


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_tasks_are_seeded_and_start_feasible(name: str) -> None:
    a, b = tasks.make(name, 6, seed=4), tasks.make(name, 6, seed=4)
    assert torch.equal(a.initial(), b.initial())
    assert float(a.objective(a.initial())) == float(b.objective(b.initial()))
    start = a.initial().double()
    assert start.shape == a.solution().shape == a.shape
    if a.family == "orthogonal":
        assert float(linalg.orthogonality_error(start)) <= 1e-6
        if start.shape[0] == start.shape[1]:  # one connected component of O(n)
            det = float(torch.det(a.solution()))
            assert float(torch.det(start)) == pytest.approx(det, abs=1e-6)
    elif a.family == "spd":
        for w in (start, a.solution()):
            assert torch.equal(w, w.mT) or float((w - w.mT).abs().max()) <= 1e-12
            assert int(torch.linalg.cholesky_ex(w)[1]) == 0  # positive definite
    else:
        assert float(torch.det(start)) > 0
    assert tasks.make(name, 6, seed=5).relative(0.0) <= 0.0


def test_make_rejects_unknown_task_and_bad_size() -> None:
    with pytest.raises(ValueError, match="procrustes"):
        tasks.make("nope", 4)
    with pytest.raises(ValueError, match="n must be"):
        tasks.make("procrustes", 1)


@pytest.mark.parametrize("cls", [StiefelTall, StiefelWide])
def test_stiefel_truth_is_the_unique_zero_of_the_loss(cls) -> None:
    task = cls(16, seed=4, dtype=torch.float64)
    assert task.shape == ((16, 4) if cls is StiefelTall else (4, 16))
    for w in (task.solution(), task.initial()):  # both on the Stiefel manifold
        gram = w.mT @ w if w.shape[0] > w.shape[1] else w @ w.mT
        assert float((gram - torch.eye(4, dtype=w.dtype)).abs().max()) <= 1e-12
    assert float(task.objective(task.solution())) <= 1e-28
    assert task.relative(float(task.objective(task.initial()))) > 0.5
    truth = task.solution()
    long = max(truth.shape)
    for seed in range(3):  # a rotation of the long side moves the span: the loss rises
        rot = torch.linalg.matrix_exp(_skew(long, 1e-3, seed))
        moved = rot @ truth if cls is StiefelTall else truth @ rot
        assert float(task.objective(moved)) > 1e-10


def _spd_direction(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (a + a.mT) / 2


def test_precision_ml_optimum_is_the_loss_at_the_inverse_covariance() -> None:
    task = PrecisionML(10, seed=3, dtype=torch.float64)
    assert task.batch == 100 and task.family == "spd" and task.shape == (10, 10)
    s = task.covariance
    p = torch.linalg.inv(s)
    assert float((task.solution() - p).abs().max()) <= 1e-10
    assert abs(float(task.objective(p)) - task.optimum) <= 1e-10
    expected = 0.5 * float(torch.trace(p @ s)) - 0.5 * float(torch.linalg.slogdet(p)[1])
    assert abs(task.optimum - expected) <= 1e-10
    w = task.solution().requires_grad_(True)
    (grad,) = torch.autograd.grad(task.objective(w), w)  # S/2 - P^{-1}/2 = 0 at P = S^{-1}
    assert float(grad.abs().max()) <= 1e-10
    for seed in range(3):  # symmetric moves that keep P positive definite are worse
        moved = p + 1e-3 * _spd_direction(10, seed)
        assert float(task.objective(moved)) > task.optimum
    # the start is I and its relative loss is 1 by definition of the scale
    assert torch.equal(task.initial(), torch.eye(10, dtype=torch.float64))
    assert task.relative(float(task.objective(task.initial()))) == pytest.approx(1.0, abs=1e-12)
    assert task.scale == pytest.approx(0.5 * float(torch.trace(s)) - task.optimum, abs=1e-12)


def test_precision_ml_uses_the_given_logdet_and_checks_its_input() -> None:
    task = PrecisionML(6, dtype=torch.float64)
    p = task.solution()
    shifted = task.objective(p, torch.linalg.slogdet(p)[1] + 2.0)
    assert float(shifted) == pytest.approx(task.optimum - 1.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"shape \(6, 6\)"):
        task.objective(torch.eye(5, dtype=torch.float64))
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="samples_per_dim"):
            PrecisionML(6, samples_per_dim=bad)  # type: ignore[arg-type]
    assert PrecisionML(6, samples_per_dim=3).batch == 18


def test_precision_ml_covariance_spectrum_and_float32_loss() -> None:
    task = PrecisionML(32, seed=1)  # float32 as p4opt compare builds it
    assert task.covariance.dtype == torch.float64 and task.initial().dtype == torch.float32
    eig = torch.linalg.eigvalsh(task.covariance)
    assert 0.01 < float(eig.min()) and float(eig.max()) < 40.0  # [0.1, 10] up to sampling
    p = task.solution()
    rel = task.relative(float(task.objective(p.float())))
    assert abs(rel) <= 1e-4  # float32 rounding of the loss stays well below the target
