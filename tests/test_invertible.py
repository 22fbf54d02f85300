"""P⁴Inv: bookkeeping exactness, merge invariance, stabilization and input checks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_invertible

import p4opt
from p4opt.exceptions import RegistrationError, ShapeError, SingularMatrixError

F64 = torch.float64


def _layer(n=8, dtype=torch.float64, rank=1, seed=0, **kw):
    lin = torch.nn.Linear(n, n, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(random_invertible(n, dtype=dtype, seed=seed))
    family = p4opt.Invertible(update="factored", rank=rank, seed=seed, **kw)
    pert = p4opt.register(lin, "weight", family)
    return lin, pert


def _perturb(pert, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pert.U.copy_(scale * torch.randn(pert.U.shape, generator=g, dtype=torch.float64))
        pert.V.copy_(torch.randn(pert.V.shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("rank", [1, 3])
def test_queries_match_dense_linear_algebra(rank):
    lin, pert = _layer(rank=rank)
    _perturb(pert)
    w = lin.weight.detach()
    sign, lad = torch.linalg.slogdet(w)
    assert abs(pert.logabsdet() - lad) < 1e-12 and pert.sign() == sign
    assert (pert.inverse() - torch.linalg.inv(w)).abs().max() < 1e-12
    y = torch.randn(5, 8, dtype=torch.float64)
    assert (lin.weight @ pert.solve(y).mT - y.mT).abs().max() < 1e-12


def test_merge_leaves_outputs_and_logdet_unchanged():
    lin, pert = _layer(rank=2)
    _perturb(pert)
    x = torch.randn(16, 8, dtype=torch.float64)
    y_before, lad_before = lin(x).detach(), pert.logabsdet().detach()
    result = pert.merge()
    assert result.accepted and result.reset
    assert torch.count_nonzero(pert.U) == 0
    assert (lin(x) - y_before).abs().max() < 1e-13
    assert abs(pert.logabsdet() - lad_before) < 1e-12
    assert pert.validate().ok


def test_float32_layer_stays_exact_over_thousands_of_merges():
    n = 16
    lin, pert = _layer(n, dtype=torch.float32, rank=2, correct_every=50)
    g = torch.Generator().manual_seed(3)
    accepted = 0
    for _ in range(2000):
        with torch.no_grad():
            pert.U.copy_(0.02 * torch.randn(n, 2, generator=g))
        accepted += pert.merge().accepted
    assert accepted >= 1800  # the random walk drifts towards ill-conditioned updates
    report = pert.validate()
    assert report.figures["inverse_error"] < 1e-10, report
    assert report.figures["logabsdet_error"] < 1e-10, report
    # against the float32 weight the layer actually uses: float32 rounding only
    w = lin.weight.detach().double()
    assert (w @ pert.inverse() - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-5
    assert abs(pert.logabsdet() - torch.linalg.slogdet(w)[1]) < 1e-5
    assert pert.inv.dtype == torch.float64 and pert.precise_base.dtype == torch.float64


def test_gradcheck_weight_logabsdet_inverse_and_solve():
    lin, pert = _layer(5, rank=2)
    _perturb(pert, scale=0.1)
    params = (pert.U, pert.V)  # gradcheck perturbs these very tensors in place
    y = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, v: lin.weight, params)
    assert torch.autograd.gradcheck(lambda u, v: pert.logabsdet(), params)
    assert torch.autograd.gradcheck(lambda u, v: pert.inverse(), params)
    assert torch.autograd.gradcheck(lambda u, v, y: pert.solve(y), (*params, y))
    # and they agree with differentiating the dense formulas
    grads = torch.autograd.grad(pert.logabsdet(), params)
    ref = torch.autograd.grad(torch.linalg.slogdet(lin.weight)[1], params)
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(grads, ref, strict=True))


def test_update_outside_bounds_is_cut_back_without_a_jump():
    lin, pert = _layer(update_logdet_bounds=(-0.5, 0.5))
    _perturb(pert, scale=2.0)  # a large update
    x = torch.randn(5, 8, dtype=torch.float64)
    before, lad = lin(x).detach(), pert.logabsdet().detach()
    result = pert.merge()
    assert not result.accepted and result.partial == 1 and 0 < result.scale < 1
    assert result.reason is p4opt.Reason.UPDATE_BOUNDS
    assert -0.5 <= result.figures["update_logabsdet"] <= 0.5
    assert (lin(x) - before).abs().max() < 1e-12  # the rest of the update is still pending
    assert abs(float(pert.logabsdet().detach() - lad)) < 1e-12
    assert torch.count_nonzero(pert.U) > 0 and pert.validate().ok


@pytest.mark.parametrize("on_reject", ["keep", "reset"])
def test_unfoldable_merge_leaves_everything_bit_for_bit(on_reject):
    # the base itself violates logdet_bounds, so no fraction of the update can be folded
    lin, pert = _layer(logdet_bounds=(50.0, 60.0), on_reject=on_reject)
    _perturb(pert, scale=0.1)
    u = pert.U.detach().clone()
    snapshot = {k: v.clone() for k, v in lin.state_dict().items() if isinstance(v, torch.Tensor)}
    result = pert.merge()
    assert result.rejected == 1 and result.reason is p4opt.Reason.LOGDET_BOUNDS
    for key in (
        "parametrizations.weight.original",
        "parametrizations.weight.0.inv",
        "parametrizations.weight.0.logabsdet_base",
        "parametrizations.weight.0.sign_base",
    ):
        assert torch.equal(lin.state_dict()[key], snapshot[key]), key
    if on_reject == "keep":
        assert torch.equal(pert.U.detach(), u) and result.stale == ()
    else:
        assert torch.count_nonzero(pert.U) == 0 and result.stale == tuple(pert.trainable())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_never_reach_the_base(bad):
    lin, pert = _layer()
    opt = p4opt.P4Optimizer(torch.optim.SGD(lin.parameters(), lr=0.1), merge_every=2)
    base = pert.base.detach().clone()
    for step in range(4):
        (lin(torch.randn(4, 8, dtype=torch.float64)).sum() * (bad if step == 1 else 1.0)).backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(pert.base).all() and torch.isfinite(pert.inv).all()
    assert opt.stats["merges_rejected"] == 1 and opt.stats["merges_accepted"] == 1
    assert not torch.equal(pert.base, base)  # the clean merge went through
    assert pert.validate().ok


def test_stack_matches_per_matrix_results_and_rejects_elementwise():
    stack = random_invertible(3, batch=(6,))
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(stack.clone())
    pert = p4opt.register(holder, "weight", p4opt.Invertible(update="factored", rank=1, seed=0))
    assert pert.U.shape == (6, 3, 1)
    _perturb(pert, scale=0.1)
    with torch.no_grad():
        pert.U[4] = float("nan")
    w = holder.weight.detach()
    sign, lad = torch.linalg.slogdet(w[[0, 1, 2, 3, 5]])
    keep = [0, 1, 2, 3, 5]
    assert (pert.logabsdet()[keep] - lad).abs().max() < 1e-12
    y = torch.randn(2, 6, 3, dtype=torch.float64)
    x = pert.solve(y)
    assert (torch.einsum("lij,blj->bli", w[keep], x[:, keep]) - y[:, keep]).abs().max() < 1e-12
    result = pert.merge()
    assert not result.accepted and result.rejected == 1
    assert torch.equal(holder.parametrizations.weight.original[4], stack[4])
    assert (holder.weight.detach()[keep] - w[keep]).abs().max() < 1e-13
    assert pert.validate().ok


def test_model_float_keeps_float64_bookkeeping_and_apply_works():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.float64))
    pert = p4opt.register(model[0], "weight", p4opt.Invertible())
    model.float()
    assert model[0].weight.dtype == torch.float32
    assert pert.inv.dtype == torch.float64 and pert.logabsdet_base.dtype == torch.float64
    calls = []
    model.apply(lambda m: calls.append(type(m).__name__))  # nn.Module.apply still works
    assert "Invertible" in calls and "ParametrizedLinear" in calls
    clone = copy.deepcopy(model)
    assert (
        p4opt.perturbation_of(clone[0], "weight").base is clone[0].parametrizations.weight.original
    )


def test_registration_errors_name_the_parameter():
    with pytest.raises(ShapeError, match=r"Linear\.weight.*\(3, 5\)"):
        p4opt.register(torch.nn.Linear(5, 3), "weight", p4opt.Invertible())
    lin = torch.nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.zero_()
    with pytest.raises(SingularMatrixError, match=r"Linear\.weight is singular"):
        p4opt.register(lin, "weight", p4opt.Invertible())
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-15])))
    with pytest.raises(SingularMatrixError, match="numerically singular"):
        p4opt.register(lin, "weight", p4opt.Invertible())
    with pytest.raises(ValueError, match="rank"):
        p4opt.Invertible(rank=0)
    with pytest.raises(ValueError, match="exceeds"):
        p4opt.register(torch.nn.Linear(2, 2), "weight", p4opt.Invertible(update="factored", rank=3))
    with pytest.raises(TypeError, match="dtype"):
        p4opt.Invertible(dtype=torch.int64)
    with pytest.raises(ValueError, match="low < high"):
        p4opt.Invertible(update_logdet_bounds=(1.0, -1.0))


def test_solve_checks_its_input():
    _, pert = _layer()
    with pytest.raises(ShapeError, match=r"\(\.\.\., 8\)"):
        pert.solve(torch.randn(3, 7, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        pert.solve(torch.ones(8, dtype=torch.long))


def test_registry_contract():
    lin, pert = _layer()
    with pytest.raises(RegistrationError, match="already has"):
        p4opt.register(lin, "weight", p4opt.Invertible())
    with pytest.raises(RegistrationError, match="already registered"):
        p4opt.register(torch.nn.Linear(8, 8), "weight", pert)
    with pytest.raises(RegistrationError, match="must be an nn.Parameter"):
        p4opt.register(lin, "nothing", p4opt.Invertible())
    with pytest.raises(p4opt.NotRegisteredError, match=r"Linear\.bias"):
        p4opt.perturbation_of(lin, "bias")
    assert [name for name, _ in p4opt.perturbations(torch.nn.Sequential(lin))] == ["0.weight"]
    _perturb(pert)
    current = lin.weight.detach().clone()
    param = p4opt.unregister(lin, "weight")
    assert type(param) is torch.nn.Parameter and param.requires_grad
    assert torch.equal(lin.weight, current)
    assert not pert.is_registered


def test_assigning_the_weight_reinitializes_bookkeeping():
    lin, pert = _layer()
    new = random_invertible(8, seed=5)
    lin.weight = new
    assert torch.equal(lin.weight.detach(), new)
    assert (pert.inv - torch.linalg.inv(new)).abs().max() < 1e-12


def test_penalty_is_zero_inside_and_grows_outside():
    _, pert = _layer(update_logdet_bounds=(-1.0, 1.0))
    assert pert.logdet_penalty() == 0
    _perturb(pert, scale=1.0, seed=4)  # update log|det| ≈ 1.8
    outside = pert.logdet_penalty()
    assert outside > 0 and outside.requires_grad


def test_gradient_restart_aligns_v_with_its_last_gradient():
    lin, pert = _layer(8, rank=2, restart="gradient")
    opt = p4opt.P4Optimizer(torch.optim.SGD(lin.parameters(), lr=0.05), merge_every=3)
    x = torch.randn(32, 8, dtype=torch.float64)
    for step in range(3):
        (lin(x) - 2 * x).square().mean().backward()
        if step == 2:
            grad = pert.V.grad.clone()
        opt.step()
        opt.zero_grad()
    assert opt.stats["merges_accepted"] == 1
    v = pert.V.detach()
    # orthogonal columns spanning the gradient's column space, scaled like a random draw
    assert torch.allclose(v.mT @ v, torch.eye(2, dtype=torch.float64) * 8 / 2, atol=1e-10)
    residual = grad - v @ torch.linalg.lstsq(v, grad).solution
    assert residual.abs().max() < 1e-10 * grad.abs().max()
    with pytest.raises(ValueError, match="restart"):
        p4opt.Invertible(restart="sideways")


@pytest.mark.parametrize("n", [16, 32])
def test_defaults_reach_the_gaussian_likelihood_target_like_a_dense_weight(n):
    # seeded regression of the learning speed: dense Adam needs about 80 steps here
    from p4opt.studies.tasks import GaussianML

    task = GaussianML(n, seed=0, dtype=torch.float64)
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(task.initial().clone())
    pert = p4opt.register(holder, "weight", p4opt.Invertible(seed=0))
    opt = p4opt.P4Optimizer(torch.optim.Adam(holder.parameters(), lr=3e-2))
    for _ in range(120):
        loss = task.objective(holder.weight, pert.logabsdet())
        if task.relative(float(loss.detach())) < 1e-4:
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert task.relative(float(loss.detach())) < 1e-4
    assert pert.validate().ok


def test_bookkeeping_stays_exact_over_ten_thousand_partial_merges():
    # a stack of 10 matrices merged 1000 times: 10^4 partial merges, element by element
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(random_invertible(6, batch=(10,)))
    bounds = (-0.05, 0.05)
    pert = p4opt.register(
        holder, "weight", p4opt.Invertible(update="factored", rank=2, update_logdet_bounds=bounds)
    )
    g = torch.Generator().manual_seed(3)
    partial = 0
    for _ in range(1_000):
        with torch.no_grad():  # a large random update: every merge is cut back
            pert.U.copy_(0.5 * torch.randn(pert.U.shape, generator=g, dtype=torch.float64))
            pert.V.copy_(torch.randn(pert.V.shape, generator=g, dtype=torch.float64))
            pert.U.sub_(0.02 * pert.base @ pert.V)  # a pull back keeps the matrices tame
        partial += pert.merge().partial
    report = pert.validate()
    assert partial > 9_000 and report.ok, report
    assert report.figures["inverse_error"] < 1e-6 and report.figures["logabsdet_error"] < 1e-6


def test_entry_bounds_are_carried_only_while_the_tensors_are_untouched():
    from p4opt.families.entry_bounds import EntryBounds

    a, inv = torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    bounds = (torch.tensor(2.0), torch.tensor(3.0))
    cache = EntryBounds(refresh=2)
    assert cache.get(a, inv) is None  # nothing carried yet: compute exactly
    cache.put(a, inv, bounds)
    assert cache.get(a, inv) is bounds
    inv.mul_(2.0)  # changed outside a fold (a correction): the bounds no longer hold
    assert cache.get(a, inv) is None
    cache.put(a, inv, bounds)
    cache.put(a, inv, bounds)
    cache.put(a, inv, bounds)  # two folds after the first: time for an exact pass
    assert cache.get(a, inv) is None


def _projected_at_zero(n=6):
    """A float64 layer in the projected mode right after registration (Δ = 0)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(n, n, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, dtype=F64))
    return lin, p4opt.register(lin, "weight", p4opt.Invertible())


def _dense_queries(weight, y):
    solved = torch.linalg.solve(weight, y.mT).mT
    return torch.linalg.slogdet(weight)[1], torch.linalg.inv(weight), solved


def test_projected_queries_at_zero_have_the_dense_gradients():
    # at Δ = 0 the queries are cached values; their gradients must be those of dense algebra
    lin, pert = _projected_at_zero()
    y = torch.randn(3, 6, dtype=F64, requires_grad=True)
    probes = [torch.randn(s, dtype=F64) for s in [(), (6, 6), (3, 6)]]
    ours = [pert.logabsdet(), pert.inverse(), pert.solve(y)]
    torch.autograd.backward(ours, probes)
    got_delta, got_y = pert.delta.grad.clone(), y.grad.clone()
    w = pert.base.detach().clone().requires_grad_(True)
    y2 = y.detach().clone().requires_grad_(True)
    dense = _dense_queries(w, y2)
    torch.autograd.backward(dense, probes)
    for a, b in zip(ours, dense, strict=True):
        assert (a - b).abs().max() < 1e-12
    assert (got_delta - w.grad).abs().max() < 1e-10
    assert (got_y - y2.grad).abs().max() < 1e-10
    with torch.no_grad():  # the inference path (no graph) returns the same values
        for a, b in zip([pert.logabsdet(), pert.inverse(), pert.solve(y)], dense, strict=True):
            assert (a - b).abs().max() < 1e-12


def test_projected_queries_work_under_torch_func_grad():
    from torch.func import functional_call, grad

    lin, pert = _projected_at_zero()
    y = torch.randn(3, 6, dtype=F64)

    class Queries(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pert = pert

        def forward(self, y: torch.Tensor) -> torch.Tensor:
            pert = self.pert
            return pert.logabsdet() + pert.solve(y).square().sum() + pert.inverse().sum()

    queries = Queries()
    params = {"pert.delta": pert.delta}
    via_func = grad(lambda p: functional_call(queries, p, (y,)))(params)["pert.delta"]
    queries(y).backward()
    assert (via_func - pert.delta.grad).abs().max() < 1e-12


def test_factored_inference_solve_follows_every_change_of_the_update():
    # under no_grad the factored rule caches (A + UV^T)^{-T}; it must never serve a stale one
    lin, pert = _layer(rank=3)
    y = torch.randn(4, 8, dtype=F64)
    for change in ("none", "u", "v", "merge"):
        if change == "u":
            _perturb(pert, seed=2)
        elif change == "v":
            with torch.no_grad():
                pert.V.mul_(-0.5)
        elif change == "merge":
            assert pert.merge().accepted
        with torch.no_grad():
            cached = pert.solve(y)
        exact = torch.linalg.solve(lin.weight.detach(), y.mT).mT
        assert (cached - exact).abs().max() < 1e-12, change
        assert (cached - pert.solve(y).detach()).abs().max() < 1e-12, change


class _DataSGD(torch.optim.Optimizer):
    """Plain SGD written the old way, through ``p.data``: no version counter moves."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize("update", ["projected", "factored"])
def test_queries_between_merges_follow_an_optimizer_that_writes_param_data(update):
    # the families cache on version counters (Δ known to be zero, a cached inverse); a step
    # through p.data must not leave a query answering for the tensors before the step
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6, bias=False, dtype=F64)
    pert = p4opt.register(lin, "weight", p4opt.Invertible(update=update, rank=3, seed=0))
    opt = p4opt.P4Optimizer(_DataSGD(lin.parameters(), lr=0.01), merge_every=3)
    x, y = torch.randn(8, 6, dtype=F64), torch.randn(4, 6, dtype=F64)
    for step in range(1, 6):
        with torch.no_grad():
            pert.solve(y)  # fills the inference cache of the factored rule
        (lin(x).square().sum() - pert.logabsdet()).backward()
        opt.step()
        opt.zero_grad()
        w = lin.weight.detach()
        assert step % 3 == 0 or bool((w != pert.base).any())  # a pending update between merges
        assert abs(float(pert.logabsdet().detach()) - float(torch.linalg.slogdet(w)[1])) < 1e-10
        with torch.no_grad():
            solved = pert.solve(y)
        assert (solved - torch.linalg.solve(w, y.mT).mT).abs().max() < 1e-10


def test_the_default_whole_step_rule_follows_dense_adam_with_exact_bookkeeping():
    # up to n = 512 the default folds the whole step: the iterates are dense Adam's
    from p4opt.studies.tasks import GaussianML

    task = GaussianML(40, seed=1, dtype=torch.float64)
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(task.initial().clone())
    pert = p4opt.register(holder, "weight", p4opt.Invertible(seed=0))
    assert pert.rank == 40
    opt = p4opt.P4Optimizer(torch.optim.Adam(holder.parameters(), lr=3e-2))
    dense = torch.nn.Parameter(task.initial().clone())
    dense_opt = torch.optim.Adam([dense], lr=3e-2)
    for _ in range(60):
        task.objective(holder.weight, pert.logabsdet()).backward()
        opt.step()
        opt.zero_grad()
        task.objective(dense, torch.linalg.slogdet(dense)[1]).backward()
        dense_opt.step()
        dense_opt.zero_grad()
    assert (holder.weight.detach() - dense.detach()).abs().max() < 1e-9
    assert opt.stats["merges_accepted"] == 60
    report = pert.validate()
    assert report.ok and report.figures["inverse_error"] < 1e-12


@pytest.mark.parametrize("update", ["factored", "projected"])
def test_a_drifted_inverse_is_corrected_at_the_next_rank_k_merge(update):
    # found by the bad-input campaign: partial merges towards a singular matrix amplify the
    # Woodbury error (1e-10 -> 1e-6 in five merges) before the scheduled correction comes
    lin = torch.nn.Linear(6, 6, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(6, dtype=torch.float64) + 0.1 * torch.randn(6, 6,
                                                                               dtype=torch.float64))
    pert = p4opt.register(lin, "weight", p4opt.Invertible(update=update, rank=2, seed=0))
    with torch.no_grad():  # what drift leaves: above validate()'s tolerance
        pert.inv.add_(3e-6 * torch.randn(6, 6, dtype=torch.float64))
    assert not pert.validate().ok
    with torch.no_grad():
        for p in pert.trainable():
            p.add_(1e-3 * torch.randn(p.shape, dtype=p.dtype))
    result = pert.merge()
    assert result.accepted and not result.corrected  # not the scheduled correction
    report = pert.validate()
    assert report.ok and report.figures["inverse_error"] < 1e-12, report
