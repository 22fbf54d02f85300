"""SpecialLinear: det W = +1 on the invertible bookkeeping."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

import p4opt

RULES = {
    "projected": lambda **kw: p4opt.SpecialLinear(seed=0, **kw),
    "projected-rank2": lambda **kw: p4opt.SpecialLinear(rank=2, seed=0, **kw),
    "factored": lambda **kw: p4opt.SpecialLinear(update="factored", rank=2, seed=0, **kw),
}


def _matrix(n: int, batch=(), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(*batch, n, n, generator=g, dtype=torch.float64) / n**0.5
    return 3.0 * (torch.eye(n, dtype=torch.float64) + 0.3 * noise)  # det far from 1


def _layer(rule: str, n: int = 5, batch=(), **kw):
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(_matrix(n, batch))
    return holder, p4opt.register(holder, "weight", RULES[rule](**kw))


def _perturb(pert, std: float = 0.1, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pert.trainable():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _logdet(w: torch.Tensor) -> torch.Tensor:
    sign, lad = torch.linalg.slogdet(w.detach())
    assert bool((sign > 0).all())
    return lad


@pytest.mark.parametrize("rule", sorted(RULES))
def test_training_keeps_det_one(rule):
    holder, pert = _layer(rule, correct_every=7)
    g = torch.Generator().manual_seed(5)
    target = torch.linalg.matrix_exp(0.3 * torch.randn(5, 5, generator=g, dtype=torch.float64))
    opt = p4opt.P4Optimizer(torch.optim.Adam(holder.parameters(), lr=0.02), merge_every=2)
    losses = []
    for _ in range(40):
        loss = (holder.weight - target).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert _logdet(holder.weight).abs() < 1e-10
    assert losses[-1] < 0.7 * losses[0]
    assert int(pert.merges) == 20 and pert.logabsdet_base.abs() < 1e-12
    report = pert.validate()
    assert report.ok, report


@pytest.mark.parametrize("rule", ["projected", "factored"])  # the whole update is folded
def test_merge_leaves_the_matrix_unchanged(rule):
    holder, pert = _layer(rule)
    _perturb(pert)
    before = holder.weight.detach().clone()
    inv = pert.inverse().detach()
    assert pert.merge().accepted
    assert (holder.weight - before).abs().max() < 1e-13
    assert (pert.inverse() - inv).abs().max() < 1e-12
    assert pert.logabsdet_base.abs() < 1e-13  # the base itself is in SL(n)


def test_registration_scales_to_det_one_and_refuses_negative_det():
    raw = _matrix(4)
    holder, pert = _layer("projected", n=4)
    w = holder.weight.detach()
    assert _logdet(w).abs() < 1e-13
    scale = w / raw  # the same matrix, scaled
    assert (scale - scale[0, 0]).abs().max() < 1e-14
    assert pert.validate().ok
    flipped = torch.nn.Module()
    flipped.weight = torch.nn.Parameter(raw * torch.tensor([-1.0, 1, 1, 1])[:, None])
    with pytest.raises(p4opt.SingularMatrixError, match="determinant <= 0"):
        p4opt.register(flipped, "weight", p4opt.SpecialLinear())


@pytest.mark.parametrize("rule", sorted(RULES))
def test_inverse_and_solve_match_dense_algebra(rule):
    holder, pert = _layer(rule)
    for _ in range(2):  # at the identity, then with a pending update
        w = holder.weight.detach()
        assert (pert.inverse() - torch.linalg.inv(w)).abs().max() < 1e-12
        y = torch.randn(3, 5, dtype=torch.float64)
        assert (pert.solve(y) - torch.linalg.solve(w, y.mT).mT).abs().max() < 1e-12
        assert float(pert.logabsdet()) == 0.0 and float(pert.sign()) == 1.0
        _perturb(pert)


@contextlib.contextmanager
def _trainable_as(pert, name: str, value: torch.Tensor):
    saved = pert._parameters[name]
    pert._parameters[name] = value
    try:
        yield
    finally:
        pert._parameters[name] = saved


@pytest.mark.parametrize("at_zero", [True, False])
def test_normalized_matrix_and_inverse_pass_gradcheck(at_zero):
    holder, pert = _layer("projected", n=4)
    start = torch.zeros(4, 4, dtype=torch.float64) if at_zero else 0.1 * torch.randn(4, 4).double()

    def outputs(delta):
        with _trainable_as(pert, "delta", delta):
            return holder.weight, pert.inverse()

    assert torch.autograd.gradcheck(outputs, (start.requires_grad_(),))


def test_stack_elements_each_keep_det_one():
    holder, pert = _layer("projected", n=3, batch=(4,))
    _perturb(pert, std=0.3)
    base = pert.base.detach().clone()
    with torch.no_grad():
        pert.delta[2] = float("nan")
    result = pert.merge()
    assert (result.folded, result.rejected) == (3, 1)
    assert torch.equal(pert.base[2], base[2])
    assert _logdet(holder.weight).abs().max() < 1e-12
    assert pert.validate().ok


def test_float32_layer_keeps_det_one_to_rounding():
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(_matrix(6).float())
    pert = p4opt.register(holder, "weight", p4opt.SpecialLinear(seed=0))
    _perturb(pert, std=0.05)
    pert.merge()
    assert _logdet(holder.weight.double()).abs() < 1e-5
    assert pert.validate().ok


def test_docs_example_runs_and_recovers_the_target():
    page = Path(__file__).resolve().parents[1] / "docs" / "families" / "special_linear.md"
    block = re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)[1]
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, "special_linear.md", "exec"), namespace)  # noqa: S102
    w, target = namespace["lin"].weight.detach(), namespace["target"]
    assert _logdet(w).abs() < 1e-12 and (w - target).abs().max() < 1e-5
    assert namespace["pert"].validate().ok


def test_conv1x1_weight_is_one_channel_mixing_matrix_with_det_one():
    conv = torch.nn.Conv2d(4, 4, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(_matrix(4).reshape(4, 4, 1, 1))
    pert = p4opt.register(conv, "weight", p4opt.SpecialLinear(update="factored", rank=2, seed=0))
    _perturb(pert)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    before = conv(x).detach()
    assert _logdet(conv.weight.reshape(4, 4)).abs() < 1e-12
    assert pert.merge().accepted
    assert (conv(x) - before).abs().max() < 1e-12
    assert _logdet(conv.weight.reshape(4, 4)).abs() < 1e-12 and pert.validate().ok


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


@pytest.mark.parametrize("update", ["projected", "factored"])
def test_a_merge_never_flips_the_determinant_sign(update):
    # found by the bad-input campaign (SGD at lr 7.9): a partial merge folded an update whose
    # |det| was inside the bounds but whose sign was negative; det = +1 cannot be recovered by
    # rescaling, and the layer's determinant became -1
    lin = torch.nn.Linear(2, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2, dtype=torch.float64))
    pert = p4opt.register(lin, "weight", p4opt.SpecialLinear(update=update, rank=2, seed=0))
    with torch.no_grad():  # A + change = diag(-1, 1): |det| 1, sign -1
        if update == "projected":
            pert.delta.copy_(torch.diag(torch.tensor([-2.0, 0.0], dtype=torch.float64)))
        else:
            pert.U.copy_(torch.tensor([[-2.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
            pert.V.copy_(torch.eye(2, dtype=torch.float64))
    result = pert.merge()
    assert not result.accepted  # cut back or refused, never folded whole
    assert float(torch.linalg.det(pert.base)) == pytest.approx(1.0, abs=1e-12)
    pert.identity()
    assert pert.validate().ok


def test_unregister_with_a_pending_update_leaves_the_current_unit_determinant_weight():
    # found by the bad-input campaign: unregister unbound the perturbation before torch
    # evaluated it one last time, and SpecialLinear's normalization needs its base: the layer
    # was left half unregistered
    lin = torch.nn.Linear(3, 3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.add_(2 * torch.eye(3, dtype=torch.float64))
    pert = p4opt.register(lin, "weight", p4opt.SpecialLinear(seed=0))
    with torch.no_grad():
        pert.delta.normal_(std=0.1)
    current = lin.weight.detach().clone()
    param = p4opt.unregister(lin, "weight")
    assert not list(p4opt.perturbations(lin)) and lin.weight is param
    assert torch.allclose(param, current, rtol=0, atol=1e-15)
    assert float(torch.linalg.det(param.detach())) == pytest.approx(1.0, abs=1e-12)
