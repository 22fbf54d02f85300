"""P4Optimizer: schedule, optimizer-state hygiene, checkpoints and torch.optim compatibility."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import random_invertible

import p4opt

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


class TwoBranch(torch.nn.Module):
    """A registered invertible branch and an independent plain branch."""

    def __init__(self, n: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inv = torch.nn.Linear(n, n, dtype=torch.float64)
        self.plain = torch.nn.Linear(n, n, dtype=torch.float64)
        with torch.no_grad():
            self.inv.weight.copy_(random_invertible(n, seed=seed))

    def loss(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(2, 16, self.inv.in_features, generator=g, dtype=torch.float64)
        return (self.inv(x[0]) - 2 * x[0]).square().mean() + (
            self.plain(x[1]) + x[1]
        ).square().mean()


def _registered(seed=0, **kw):
    model = TwoBranch(seed=seed)
    pert = p4opt.register(model.inv, "weight", p4opt.Invertible(update="factored", seed=7, **kw))
    return model, pert


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        model.loss(step).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_unregistered_parameters_follow_the_plain_optimizer_exactly(name):
    model_a, _ = _registered()
    model_b, _ = _registered()
    wrapped = p4opt.P4Optimizer(OPTIMIZERS[name](model_a.parameters()), merge_every=3)
    plain = OPTIMIZERS[name](model_b.parameters())
    _train(model_a, wrapped, 10)
    _train(model_b, plain, 10)
    assert wrapped.stats["merges_accepted"] == 3
    for p_a, p_b in zip(model_a.plain.parameters(), model_b.plain.parameters(), strict=True):
        assert torch.equal(p_a, p_b)
        state_a, state_b = wrapped.state[p_a], plain.state[p_b]
        assert state_a.keys() == state_b.keys()
        assert all(
            torch.equal(torch.as_tensor(state_a[k]), torch.as_tensor(state_b[k])) for k in state_a
        )


def test_merge_resets_state_of_merged_tensors_only():
    model, pert = _registered()
    other = torch.nn.Linear(6, 6, dtype=torch.float64)
    other_pert = p4opt.register(other, "weight", p4opt.Invertible(update="factored", seed=3))
    other_pert.default_merge_every = 1000
    params = list(model.parameters()) + list(other.parameters())
    opt = p4opt.P4Optimizer(torch.optim.Adam(params, lr=1e-3), reset_state=True)
    assert opt.interval(pert) == p4opt.Invertible.default_merge_every == 10
    for step in range(10):
        (model.loss(step) + other(torch.ones(6, dtype=torch.float64)).sum()).backward()
        opt.step()
        opt.zero_grad()
    assert opt.stats["merges_accepted"] == 1
    assert pert.U not in opt.state and pert.V not in opt.state  # reset after its merge
    assert int(opt.state[other_pert.U]["step"]) == 10  # untouched
    assert int(opt.state[model.plain.weight]["step"]) == 10


def test_invertible_keeps_moments_by_default_but_drops_them_after_nan():
    model, pert = _registered()
    opt = p4opt.P4Optimizer(torch.optim.Adam(model.parameters(), lr=1e-3), merge_every=2)
    _train(model, opt, 2)
    assert opt.stats["merges_accepted"] == 1
    assert int(opt.state[pert.U]["step"]) == 2
    model.loss(2).mul(float("nan")).backward()
    opt.step()
    opt.zero_grad()
    model.loss(3).backward()
    opt.step()  # merge of a NaN update: rejected, state dropped
    assert opt.stats["merges_rejected"] == 1
    assert pert.U not in opt.state and pert.validate().ok


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_mid_cycle_checkpoint_resumes_exactly(name):
    reference, _ = _registered()
    opt_ref = p4opt.P4Optimizer(OPTIMIZERS[name](reference.parameters()), merge_every=4)
    _train(reference, opt_ref, 15)

    model, _ = _registered()
    opt = p4opt.P4Optimizer(OPTIMIZERS[name](model.parameters()), merge_every=4)
    _train(model, opt, 7)  # stop between two merges
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed, _ = _registered(seed=1)  # different initial values, same structure
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed = p4opt.P4Optimizer(OPTIMIZERS[name](resumed.parameters()), merge_every=4)
    opt_resumed.load_state_dict(checkpoint["opt"])
    _train(resumed, opt_resumed, 8, start=7)

    assert opt_resumed.stats == opt_ref.stats
    for (key, a), b in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key


def test_lr_scheduler_closure_and_zero_grad():
    model, pert = _registered()
    opt = p4opt.P4Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_every=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        model.loss(step).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=False)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert pert.U.grad is not None and torch.count_nonzero(pert.U.grad) == 0

    lbfgs = p4opt.P4Optimizer(
        torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), merge_every=1
    )

    def closure():
        lbfgs.zero_grad()
        loss = model.loss(0)
        loss.backward()
        return loss

    first = float(model.loss(0).detach())
    for _ in range(3):
        lbfgs.step(closure)
    assert float(model.loss(0).detach()) < first
    assert lbfgs.stats["merges_accepted"] == 3
    assert pert.validate().ok


def test_forced_merge_and_stats():
    model, pert = _registered()
    opt = p4opt.P4Optimizer(torch.optim.Adam(model.parameters(), lr=1e-3), merge_every=100)
    _train(model, opt, 5)
    results = opt.merge()
    assert [where for where, _ in results] == ["Linear.weight"]
    assert opt.stats == {
        "steps": 5,
        "merges_accepted": 1,
        "merges_partial": 0,
        "merges_rejected": 0,
        "corrections": 0,
        "steps_skipped": 0,
    }
    assert opt.last_results == results


def test_corrections_are_counted():
    model, _ = _registered(correct_every=2)
    opt = p4opt.P4Optimizer(torch.optim.Adam(model.parameters(), lr=1e-3), merge_every=1)
    _train(model, opt, 6)
    assert opt.stats["corrections"] == 3


def test_bad_arguments():
    model, _ = _registered()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        p4opt.P4Optimizer(list(model.parameters()))
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="merge_every"):
        p4opt.P4Optimizer(adam, merge_every=0)
    with pytest.raises(TypeError, match="already a P4Optimizer"):
        p4opt.P4Optimizer(p4opt.P4Optimizer(adam))
    with pytest.raises(ValueError, match="state_dict"):
        p4opt.P4Optimizer(adam).load_state_dict(adam.state_dict())


def test_warns_when_optimizer_was_built_before_register():
    lin = torch.nn.Linear(4, 4)
    adam = torch.optim.Adam(lin.parameters())
    p4opt.register(lin, "weight", p4opt.Invertible())
    with pytest.warns(UserWarning, match="after p4opt.register"), pytest.warns(
        UserWarning, match="found no p4opt perturbation"
    ):
        p4opt.P4Optimizer(adam)


def test_regression_with_invertible_weight_converges():
    n = 16
    g = torch.Generator().manual_seed(0)
    target = random_invertible(n, seed=11) + 0.5 * torch.randn(
        n, n, generator=g, dtype=torch.float64
    )
    x = torch.randn(256, n, generator=g, dtype=torch.float64)
    y = x @ target.mT
    lin = torch.nn.Linear(n, n, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n, dtype=torch.float64))
    pert = p4opt.register(lin, "weight", p4opt.Invertible(update="factored", rank=4, seed=0))
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=3e-2), merge_every=10)
    initial = float((lin(x) - y).square().mean().detach())
    for _ in range(1000):
        loss = (lin(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    final = float((lin(x) - y).square().mean().detach())
    assert final < 1e-8 * initial, (initial, final, opt.stats)
    assert pert.validate().ok
