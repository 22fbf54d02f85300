"""PositiveDefinite: SPD by congruence, with a tracked inverse and log-determinant."""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

import p4opt
from p4opt.families.congruence import congruence, congruence_inverse
from p4opt.families.positive_definite import project_spd

RULES = {
    "projected": lambda: p4opt.PositiveDefinite(seed=0),  # whitened coordinates
    "projected-ambient": lambda: p4opt.PositiveDefinite(coordinates="ambient", seed=0),
    "projected-rank2": lambda: p4opt.PositiveDefinite(rank=2, seed=0),
    "projected-rank2-ambient": lambda: p4opt.PositiveDefinite(
        rank=2, coordinates="ambient", seed=0
    ),
    "factored": lambda: p4opt.PositiveDefinite(update="factored", rank=2, seed=0),
}


def _spd(n: int, batch=(), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    return x @ x.mT / n + 0.5 * torch.eye(n, dtype=torch.float64)


def _layer(rule: str, n: int = 5, batch=()):
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(_spd(n, batch))
    return holder, p4opt.register(holder, "weight", RULES[rule]())


def _perturb(pert: p4opt.PositiveDefinite, std: float = 0.1, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pert.trainable():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _gaussian_fit(holder, pert, steps: int, lr: float = 0.05, every=None) -> list[float]:
    n = holder.weight.shape[-1]
    s = _spd(n, seed=7)  # the loss's minimizer is the precision s^{-1}
    opt = p4opt.P4Optimizer(torch.optim.Adam(holder.parameters(), lr=lr), merge_every=every)
    losses = []
    for _ in range(steps):
        loss = ((holder.weight * s).sum() - pert.logabsdet().sum()) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("rule", sorted(RULES))
def test_training_keeps_the_matrix_spd_and_fits_the_precision(rule):
    holder, pert = _layer(rule)
    losses = _gaussian_fit(holder, pert, 60)
    w = holder.weight.detach()
    assert (w - w.mT).abs().max() <= 1e-12
    assert torch.linalg.eigvalsh(w).min() > 0
    assert losses[-1] < losses[0] - 0.5
    report = pert.validate()
    assert report.ok, report
    assert pert.merges > 0


@pytest.mark.parametrize("rule", ["projected", "projected-ambient", "factored"])  # whole update
def test_merge_leaves_the_matrix_unchanged(rule):
    holder, pert = _layer(rule)
    _perturb(pert)
    before = holder.weight.detach().clone()
    lad, inv = pert.logabsdet().detach(), pert.inverse().detach()
    result = pert.merge()
    assert result.accepted
    assert (holder.weight - before).abs().max() < 1e-12 * before.abs().max()
    assert (pert.logabsdet() - lad).abs().max() < 1e-12
    assert (pert.inverse() - inv).abs().max() < 1e-10


@pytest.mark.parametrize("rule", ["projected-rank2", "projected-rank2-ambient"])
def test_partial_rank_merge_folds_the_leading_directions(rule):
    holder, pert = _layer(rule)
    _perturb(pert)
    pert.merge()  # the rest of the change is dropped: the matrix moved, and stays tracked
    w = holder.weight.detach()
    assert (pert.inverse() - torch.linalg.inv(w)).abs().max() < 1e-10
    assert (pert.logabsdet() - torch.linalg.slogdet(w)[1]).abs().max() < 1e-12


@pytest.mark.parametrize("rule", sorted(RULES))
def test_inverse_logdet_and_solve_match_dense_algebra(rule):
    holder, pert = _layer(rule)
    for _ in range(2):  # at the identity, then with a pending update
        w = holder.weight.detach()
        assert (pert.inverse() - torch.linalg.inv(w)).abs().max() < 1e-10
        assert (pert.logabsdet() - torch.linalg.slogdet(w)[1]).abs() < 1e-12
        y = torch.randn(3, 5, dtype=torch.float64)
        assert (pert.solve(y) - torch.linalg.solve(w, y.mT).mT).abs().max() < 1e-10
        assert float(pert.sign()) == 1.0
        _perturb(pert)


@contextlib.contextmanager
def _trainable_as(pert, name: str, value: torch.Tensor):
    saved = pert._parameters[name]
    pert._parameters[name] = value
    try:
        yield
    finally:
        pert._parameters[name] = saved


@pytest.mark.parametrize("rule", ["projected", "projected-ambient"])
@pytest.mark.parametrize("at_zero", [True, False])
def test_gradients_of_logdet_inverse_and_solve_pass_gradcheck(at_zero, rule):
    holder, pert = _layer(rule, n=4)
    start = torch.zeros(4, 4, dtype=torch.float64) if at_zero else 0.1 * torch.randn(4, 4).double()
    y = torch.randn(2, 4, dtype=torch.float64)

    def outputs(delta):
        with _trainable_as(pert, "delta", delta):
            return pert.logabsdet(), pert.inverse(), pert.solve(y), holder.weight

    assert torch.autograd.gradcheck(outputs, (start.requires_grad_(),))


def test_factored_logdet_and_inverse_pass_gradcheck():
    holder, pert = _layer("factored", n=4)
    u = (0.1 * torch.randn(4, 2, dtype=torch.float64)).requires_grad_()
    v = torch.randn(4, 2, dtype=torch.float64).requires_grad_()

    def outputs(u, v):
        with _trainable_as(pert, "U", u), _trainable_as(pert, "V", v):
            return pert.logabsdet(), pert.inverse(), holder.weight

    assert torch.autograd.gradcheck(outputs, (u, v))


def test_registration_projects_onto_spd_and_validates():
    holder = torch.nn.Module()
    raw = torch.randn(6, 6, dtype=torch.float64)  # neither symmetric nor definite
    holder.weight = torch.nn.Parameter(raw.clone())
    pert = p4opt.register(holder, "weight", p4opt.PositiveDefinite(floor=1e-3))
    w = holder.weight.detach()
    eig = torch.linalg.eigvalsh(w)
    assert torch.equal(w, w.mT) and eig.min() >= 1e-3 * eig.max() * (1 - 1e-9)
    sym_eig = torch.linalg.eigvalsh((raw + raw.mT) / 2)
    assert (eig - sym_eig.clamp_min(1e-3 * sym_eig.max())).abs().max() < 1e-10
    assert pert.validate().ok
    spd = _spd(6)
    assert torch.equal(project_spd(spd), spd)  # an SPD input is kept as it is


def test_registration_refuses_non_square_and_negative_definite():
    lin = torch.nn.Linear(3, 4)
    with pytest.raises(p4opt.ShapeError, match="square"):
        p4opt.register(lin, "weight", p4opt.PositiveDefinite())
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(-torch.eye(3))
    with pytest.raises(p4opt.SingularMatrixError, match="no positive eigenvalue"):
        p4opt.register(holder, "weight", p4opt.PositiveDefinite())


@pytest.mark.parametrize("rule", ["projected", "factored"])
def test_stack_is_merged_element_by_element(rule):
    holder, pert = _layer(rule, n=4, batch=(3,))
    _perturb(pert)
    base = pert.base.detach().clone()
    with torch.no_grad():
        pert.trainable()[0][1] = float("nan")
    result = pert.merge()
    assert (result.folded, result.rejected) == (2, 1)
    assert torch.equal(pert.base[1], base[1]) and not torch.equal(pert.base[0], base[0])
    w = holder.weight.detach()
    assert (pert.inverse() - torch.linalg.inv(w)).abs().max() < 1e-10
    assert (pert.logabsdet() - torch.linalg.slogdet(w)[1]).abs().max() < 1e-12
    assert pert.validate().ok


def test_singular_congruence_is_refused_and_the_base_kept():
    holder, pert = _layer("factored", n=4)
    v = torch.randn(4, 2, dtype=torch.float64)
    u = -v @ torch.linalg.inv(v.mT @ v)  # V^T U = -I: I + U V^T is singular
    with torch.no_grad():
        pert.U.copy_(u)
        pert.V.copy_(v)
    base = pert.base.detach().clone()
    result = pert.merge()
    assert result.rejected == 1 and torch.equal(pert.base, base)


def test_float32_layer_keeps_a_float64_master_and_corrections_run():
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(_spd(8).float())
    pert = p4opt.register(holder, "weight", p4opt.PositiveDefinite(correct_every=5, seed=0))
    _gaussian_fit(holder, pert, 20, lr=0.02, every=1)
    assert pert.master.dtype == torch.float64 and int(pert.merges) == 20
    report = pert.validate()
    assert report.ok, report


def test_congruence_kernels_match_dense_products():
    a = _spd(6)
    g = torch.Generator().manual_seed(3)
    u, v = (0.3 * torch.randn(2, 6, 3, generator=g, dtype=torch.float64)).unbind(0)
    m = torch.eye(6, dtype=torch.float64) + u @ v.mT
    assert (congruence(a, u, v) - m @ a @ m.mT).abs().max() < 1e-12
    ref = torch.linalg.inv(m @ a @ m.mT)
    assert (congruence_inverse(torch.linalg.inv(a), u, v) - ref).abs().max() < 1e-10


def test_docs_example_runs_and_recovers_the_covariance():
    page = Path(__file__).resolve().parents[1] / "docs" / "families" / "positive_definite.md"
    block = re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)[1]
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, "positive_definite.md", "exec"), namespace)  # noqa: S102
    x, cov = namespace["x"], namespace["covariance"]
    sample = x.mT @ x / x.shape[0]  # the maximum-likelihood covariance
    assert (cov - sample).abs().max() < 1e-3 * sample.abs().max()
    assert namespace["pert"].validate().ok


@pytest.mark.parametrize("rule", ["projected", "factored"])
def test_autocast_and_torch_func_grad(rule):
    lin = torch.nn.Linear(5, 5)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(5) + 0.1 * torch.randn(5, 5))
    pert = p4opt.register(lin, "weight", RULES[rule]())
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-2), merge_every=2)
    x = torch.randn(8, 5)
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lin(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.stats["merges_accepted"] == 2 and pert.validate().ok
    params = {k: v.detach() for k, v in lin.named_parameters()}
    grads = torch.func.grad(
        lambda p: torch.func.functional_call(lin, p, (x,)).square().mean()
    )(params)
    name = next(k for k in grads if k.startswith("parametrizations.weight.0."))
    params_grad = dict(lin.named_parameters())[name]
    lin(x).square().mean().backward()
    assert torch.allclose(grads[name], params_grad.grad, atol=1e-6)


def test_whitened_change_acts_through_the_tracked_factor():
    holder, pert = _layer("projected", n=5, batch=(2,))
    _perturb(pert, std=0.2)
    f, delta = pert.factor, pert.delta.detach()
    m = f @ (torch.eye(5, dtype=torch.float64) + delta)
    assert (holder.weight - m @ m.mT).abs().max() < 1e-12  # W = F (I + D)(I + D)^T F^T
    for _ in range(3):
        assert pert.merge().accepted
        _perturb(pert, std=0.2, seed=int(pert.merges) + 1)
    pert.merge()
    report = pert.validate()  # F F^T against the master copy, F^{-1} against F
    assert report.ok, report
    assert report.figures["factor_error"] < 1e-13 and report.figures["factor_inverse_error"] < 1e-12
    assert (pert.factor @ pert.factor.mT - holder.weight).abs().max() < 1e-12


def test_whitened_correction_keeps_the_coordinates():
    holder, pert = _layer("projected", n=5)
    _perturb(pert, std=0.2)
    pert.merge()
    factor = pert.factor.clone()
    with torch.no_grad():
        pert.factor_inv.add_(1e-7)  # an inverse that drifted
    figures = pert.correct()
    assert figures["factor_residual"] > 1e-7  # the drift was seen ...
    assert torch.equal(pert.factor, factor)  # ... F (the coordinates of delta) kept ...
    assert pert.validate().figures["factor_inverse_error"] < 1e-12  # ... and F^{-1} recomputed


def test_factored_rule_refuses_whitened_coordinates():
    with pytest.raises(p4opt.P4ValueError, match="coordinates"):
        p4opt.PositiveDefinite(update="factored", coordinates="whitened")
    with pytest.raises(ValueError, match="coordinates"):
        p4opt.PositiveDefinite(coordinates="riemannian")


@pytest.mark.parametrize("seed", [0, 1])
def test_whitened_adam_reaches_the_precision_and_stays(seed):
    from p4opt.studies.tasks import PrecisionML

    task = PrecisionML(16, seed=seed)
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(task.initial())
    pert = p4opt.register(holder, "weight", p4opt.PositiveDefinite(seed=seed))
    opt = p4opt.P4Optimizer(torch.optim.Adam(holder.parameters(), lr=0.03))
    relative = []
    for _ in range(300):
        loss = task.objective(holder.weight, pert.logabsdet())
        relative.append(task.relative(float(loss.detach())))
        loss.backward()
        opt.step()
        opt.zero_grad()
    reached = next(i for i, r in enumerate(relative) if r < task.target)
    assert reached < 150  # measured 81 and 87 steps (ambient coordinates: 77-86 ...)
    assert max(relative[reached:]) < 10 * task.target  # ... then 2e-3 to 8e-3)


@pytest.mark.parametrize("rule", ["projected", "projected-ambient"])
def test_cut_back_merge_keeps_every_tracked_quantity_exact(rule):
    holder, pert = _layer(rule)
    with torch.no_grad():
        pert.delta.copy_(2.0 * torch.eye(5, dtype=torch.float64))  # log|det C| = 5 log 3 > k = 5
    result = pert.merge()
    assert result.outcome == "partial" and result.scale < 1  # cut back, not refused
    w = holder.weight.detach()
    assert float(torch.linalg.slogdet(w)[1] - torch.linalg.slogdet(_spd(5))[1]) <= 2 * 5 + 1e-9
    assert (pert.inverse() - torch.linalg.inv(w)).abs().max() < 1e-10
    assert (pert.logabsdet() - torch.linalg.slogdet(w)[1]).abs().max() < 1e-12
    report = pert.validate()
    assert report.ok, report


def _ill_conditioned(n: int, condition: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    eig = torch.logspace(0, -math.log10(condition), n, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.mT


def test_near_boundary_warns_once_and_validate_checks_the_layer_dtype():
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(_ill_conditioned(16, 1e9, seed=1))
    pert = p4opt.register(holder, "weight", p4opt.PositiveDefinite(seed=0, floor=1e-12))
    assert pert.validate().ok  # float64 holds a condition number of 1e9
    holder.float()  # rounding into float32 can leave the matrix indefinite
    with pytest.warns(UserWarning, match=r"condition number 1e\+09.*float32"):
        report = pert.validate()  # noticing the new dtype checks the condition number
    assert not report.ok and "float32 matrix is not positive definite" in report.problem
    assert report.figures["layer_min_eigenvalue"] < 0 < report.figures["min_eigenvalue"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per perturbation
        figures = pert.correct()
    assert 0.7e9 < figures["condition"] <= 1.001e9


def test_well_conditioned_float32_layer_corrects_without_warning():
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(_ill_conditioned(16, 1e3, seed=2).float())
    pert = p4opt.register(holder, "weight", p4opt.PositiveDefinite(seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures = pert.correct()
    assert 0.7e3 < figures["condition"] <= 1.001e3
    report = pert.validate()
    assert report.ok and abs(report.figures["condition"] / 1e3 - 1) < 1e-3


def test_correction_of_a_singular_factor_projects_and_restarts_the_factor():
    holder, pert = _layer("projected", n=6, batch=(2,))
    with torch.no_grad():
        pert.factor[1, :, 0] = 0  # F F^T singular: the Cholesky proof fails for element 1
    kept = pert.factor[0].clone()
    figures = pert.correct()
    assert figures["repaired"] == 1
    assert torch.equal(pert.factor[0], kept)  # the healthy element keeps its coordinates
    report = pert.validate()
    assert report.ok, report
    assert report.figures["factor_error"] < 1e-12 and report.figures["min_eigenvalue"] > 0


def _merge_towards(dtype: torch.dtype, smallest: float) -> tuple[p4opt.MergeResult, bool, bool]:
    """Merge, from P = I, the change to Q diag(1, smallest) Q^T (Q a 45 degree rotation)."""
    lin = torch.nn.Linear(2, 2, bias=False, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
    pert = p4opt.register(lin, "weight", p4opt.PositiveDefinite(
        update_logdet_bounds=(-100.0, 100.0), max_update_condition=1e12, seed=0))
    c = math.sqrt(0.5)
    q = torch.tensor([[c, -c], [c, c]], dtype=torch.float64)
    root = q @ torch.diag(torch.tensor([1.0, math.sqrt(smallest)], dtype=torch.float64)) @ q.T
    with torch.no_grad():
        pert.delta.copy_((root - torch.eye(2, dtype=torch.float64)).to(dtype))
    before = pert.base.clone()
    result = pert.merge()
    unchanged = torch.equal(pert.base, before)
    pert.identity()
    return result, unchanged, pert.validate().ok


@pytest.mark.parametrize(("dtype", "smallest", "folds"), [
    (torch.float32, 1e-12, False),  # rounds to [[.5, .5], [.5, .5]]: singular in float32
    (torch.float32, 1e-4, True),
    (torch.bfloat16, 1e-6, False),  # the change itself rounds to a singular I + delta
])
def test_a_merge_whose_stored_matrix_leaves_the_cone_is_refused(dtype, smallest, folds):
    # found by the bad-input campaign: near the boundary the merged float64 matrix is positive
    # definite, but the layer's float32 / bfloat16 copy was not (validate() failed), and a
    # singular capacitance raised LinAlgError inside the merge instead of being refused
    result, unchanged, ok = _merge_towards(dtype, smallest)
    assert result.accepted == folds and unchanged != folds and ok


@pytest.mark.parametrize("coordinates", ["whitened", "ambient"])
def test_merge_refused_where_float64_cannot_keep_the_inverse(coordinates):
    # one direction shrunk by 1e-6 gives condition 1e12: no float64 inverse meets validate()'s
    # 1e-6 there, so the merge is refused and the layer stays as it was
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(torch.eye(4, dtype=torch.float64))
    pert = p4opt.register(holder, "weight", p4opt.PositiveDefinite(
        coordinates=coordinates, update_logdet_bounds=(-60, 60), max_update_condition=1e15,
        seed=0))
    base = pert.base.clone()
    with torch.no_grad():
        pert.delta[3, 3] = -1 + 1e-6
    result = pert.merge()
    assert not result.accepted and "ill-conditioned" in str(result.reason)
    assert torch.equal(pert.base, base)
    with torch.no_grad():  # a milder step (condition 1e6) is accepted, with an accurate inverse
        pert.delta.zero_()
        pert.delta[3, 3] = -1 + 1e-3
    assert pert.merge().accepted
    report = pert.validate()
    assert report.ok and report.figures["condition"] > 1e5, report


def test_merge_corrects_a_drifted_inverse():
    holder, pert = _layer("projected")
    with torch.no_grad():
        pert.inv.add_(1e-7)  # drift left by earlier merges, below validate()'s tolerance
    _perturb(pert, 0.05)
    assert pert.merge().accepted
    residual = p4opt.linalg.inverse_residual(pert.master, pert.inv).abs().amax()
    assert float(residual) < 1e-12
