"""P4InvMixing: a drop-in replacement for the channel swap between couplings."""

from __future__ import annotations

import pytest
import torch

import p4opt
from p4opt.nn import AffineCoupling, Flow, P4InvMixing, Permutation, realnvp, swap_permutation

F64 = torch.float64


def test_swap_stack_equals_alternating_realnvp() -> None:
    torch.manual_seed(0)
    reference = realnvp(6, layers=3, hidden=8).double()
    for layer in reference:
        torch.nn.init.normal_(layer.net[-1].weight, std=0.3)
    stack: list[torch.nn.Module] = []
    for i, layer in enumerate(reference):
        coupling = AffineCoupling(6, parity=0, hidden=8).double()
        coupling.load_state_dict(layer.state_dict())
        if i > 0:
            stack.append(Permutation(6))
        stack.append(coupling)
    # coupling i of the swapped stack sees the channels swapped i times, like parity i % 2
    stack_flow, x = Flow(stack), torch.randn(5, 6, dtype=F64)
    y, ladj = stack_flow.forward_and_log_det(x)
    y_ref, ladj_ref = reference.forward_and_log_det(x)
    assert torch.allclose(ladj, ladj_ref)
    assert torch.allclose(y, y_ref)  # two swaps cancel


def test_starts_as_the_permutation_and_inverts() -> None:
    perm = [3, 1, 0, 2]
    layer = P4InvMixing(perm, dtype=F64, seed=1)
    x = torch.randn(7, 4, dtype=F64)
    assert torch.equal(layer(x), Permutation(perm)(x))
    y, ladj = layer.forward_and_log_det(x)
    x_back, ladj_inv = layer.inverse_and_log_det(y)
    assert torch.allclose(x_back, x, atol=1e-12)
    assert torch.allclose(ladj, -ladj_inv)
    assert float(ladj.detach()[0]) == pytest.approx(0.0, abs=1e-12)


def test_stays_consistent_through_training_and_merges() -> None:
    torch.manual_seed(0)
    flow = Flow([AffineCoupling(6, hidden=8), P4InvMixing(6, seed=0), AffineCoupling(6, hidden=8)])
    flow = flow.double()
    opt = p4opt.P4Optimizer(torch.optim.Adam(flow.parameters(), lr=3e-2), merge_every=5)
    scales = torch.tensor([3.0, 0.2, 1.0, 1.0, 0.5, 2.0], dtype=F64)
    target = torch.randn(256, 6, dtype=F64) * scales
    first = None
    for _ in range(60):
        z, ladj = flow.forward_and_log_det(target)
        loss = (0.5 * z.square().sum(-1) - ladj).mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert opt.stats["merges_accepted"] >= 10
    assert float(loss.detach()) < first - 0.5  # it learned the scales
    mixing = flow.layers[1]
    w = mixing.weight.detach()
    assert mixing.inverse_error() < 1e-8
    expected = float(torch.linalg.slogdet(w)[1])
    assert float(mixing.log_det().detach()) == pytest.approx(expected, abs=1e-8)
    assert not torch.allclose(w, torch.eye(6, dtype=F64)[swap_permutation(6)])
    x_back = flow.inverse(flow(target))
    assert torch.allclose(x_back, target, atol=1e-8)


def test_rejects_a_non_permutation() -> None:
    with pytest.raises(ValueError, match="perm"):
        P4InvMixing([0, 0, 1])
    with pytest.raises(p4opt.ShapeError):
        Permutation(3)(torch.zeros(2, 4))
