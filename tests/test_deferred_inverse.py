"""The whole-step merge keeps LU factors and solves for the inverse only when it is read."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_invertible

import p4opt

F64 = torch.float64


def _trained(n=12, dtype=torch.float32, stack=(), steps=3, family=p4opt.Invertible, seed=0,
             options=None):
    """A layer trained for a few whole-step merges (defaults: rank n), left with a pending
    inverse."""
    holder = torch.nn.Module()
    start = random_invertible(n, dtype=F64, seed=seed)
    if family is p4opt.SpecialLinear and torch.linalg.det(start) < 0:
        start[0].neg_()
    holder.weight = torch.nn.Parameter(start.expand(*stack, n, n).clone().to(dtype))
    pert = p4opt.register(holder, "weight", family(**(options or {})))
    opt = p4opt.P4Optimizer(torch.optim.Adam(holder.parameters(), lr=0.05))
    x = torch.randn(32, n, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        w = holder.weight
        loss = (x @ w.mT).square().mean() - pert.logabsdet().sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return holder, pert


def _master(pert):
    return pert._matrix().detach().to(F64)


def _inverse_error(pert, inv):
    eye = torch.eye(inv.shape[-1], dtype=F64)
    return float((_master(pert) @ inv.to(F64) - eye).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("stack", [(), (3,)])
def test_reading_inv_solves_the_pending_inverse_exactly(dtype, stack):
    _, pert = _trained(dtype=dtype, stack=stack)
    assert pert._inverse_pending
    stale = pert._buffers["inv"].clone()
    assert _inverse_error(pert, stale) > 1e-3  # the buffer itself is from before the merges
    inv = pert.inv
    assert not pert._inverse_pending
    assert _inverse_error(pert, inv) < 1e-12
    sign, lad = torch.linalg.slogdet(_master(pert))
    assert torch.equal(pert.sign_base, sign)
    assert (pert.logabsdet_base - lad).abs().max() < 1e-12
    assert pert.validate().ok


def test_training_gradient_comes_from_the_factors_in_the_layer_dtype():
    holder, pert = _trained(dtype=torch.float32)
    w = holder.weight.detach().clone().requires_grad_(True)
    torch.linalg.slogdet(w)[1].backward()
    lad = pert.logabsdet()
    (grad,) = torch.autograd.grad(lad, pert.delta)
    assert pert._inverse_pending  # the gradient did not need the float64 inverse
    assert (grad - w.grad).abs().max() < 1e-5 * w.grad.abs().max()
    again = pert._inverse_transposed(torch.float32)
    assert again is pert._inverse_transposed(torch.float32)  # one solve per merge


def test_state_dict_holds_the_solved_inverse_and_loading_replaces_the_pending_one():
    holder, pert = _trained()
    state = holder.state_dict()
    key = next(k for k in state if k.endswith(".inv"))
    assert _inverse_error(pert, state[key]) < 1e-12
    other_holder, other = _trained(steps=5)
    assert other._inverse_pending
    other_holder.load_state_dict(state)
    assert not other._inverse_pending
    assert torch.equal(other.inv, state[key])  # not overwritten by the old factors
    assert other.validate().ok
    _, third = _trained(steps=4)  # the perturbation's own load_state_dict, no owner hooks
    assert third._inverse_pending
    third.load_state_dict(pert.state_dict())
    assert torch.equal(third.inv, pert.inv)
    _, fourth = _trained(steps=2)  # an assigned buffer replaces the pending inverse too
    assert fourth._inverse_pending
    fourth.inv = pert.inv.clone()
    assert torch.equal(fourth.inv, pert.inv)


def test_moves_copies_and_pickles_keep_an_exact_inverse():
    holder, pert = _trained()
    clone = copy.deepcopy(holder)
    clone_pert = p4opt.perturbation_of(clone, "weight")
    assert _inverse_error(clone_pert, clone_pert.inv) < 1e-12
    holder.double()  # a dtype move takes the buffer: it is solved first
    assert not pert._inverse_pending
    assert _inverse_error(pert, pert.inv) < 1e-12
    assert pert.validate().ok


def test_correction_has_nothing_to_refine_while_the_inverse_is_pending():
    _, pert = _trained()
    buffers = {k: v.clone() for k, v in pert._buffers.items() if v is not None}
    assert pert.correct() == {}
    assert all(torch.equal(pert._buffers[k], v) for k, v in buffers.items())
    pert.inv  # noqa: B018 - solves it
    assert pert.correct()["inverse_residual"] < 1e-12


def test_special_linear_scales_the_pending_inverse_with_the_base():
    holder, pert = _trained(family=p4opt.SpecialLinear, dtype=F64, steps=4)
    assert pert._inverse_pending
    w = holder.weight.detach()
    assert abs(float(torch.linalg.slogdet(w)[1])) < 1e-10
    assert (pert.inverse() - torch.linalg.inv(w)).abs().max() < 1e-10
    assert pert.validate().ok


def test_a_refused_stack_element_keeps_the_inverse_of_the_previous_merge():
    holder, pert = _trained(stack=(2,), dtype=F64)
    assert pert._inverse_pending
    with torch.no_grad():
        pert.delta[0].normal_(std=1e-3)
        pert.delta[1].fill_(float("nan"))
    result = pert.merge()
    assert result.folded == 1 and result.rejected == 1
    assert not pert._inverse_pending  # refusals take the eager path, solving the old one
    assert _inverse_error(pert, pert.inv) < 1e-12
    assert pert.validate().ok


@pytest.mark.parametrize("family", [p4opt.Invertible, p4opt.SpecialLinear])
def test_float32_bookkeeping_passes_its_own_validation(family):
    _, pert = _trained(n=256, steps=20, family=family, options={"dtype": torch.float32})
    report = pert.validate()
    assert report.ok, report
    assert 1e-7 < report.figures["inverse_error"] < 1e-3  # float32 level, not float64's
