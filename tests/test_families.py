"""One contract, every family: the property tests each P⁴ family must pass.

Each case registers a family on a small float64 ``nn.Linear`` weight and checks what the
design promises of every perturbation: the constraint holds at registration and after steps of
SGD and Adam with merges; a merge does not change the layer's output; a checkpoint resumes to
the identical trajectory; ``unregister`` leaves the current weight; non-finite updates never
reach the base; ``model.apply`` still reaches the perturbation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import p4opt
from p4opt import linalg

N = 6

FAMILIES: dict[str, Callable[[], p4opt.Perturbation]] = {
    "invertible": lambda: p4opt.Invertible(seed=1),  # projected, rank n: exact steps
    "invertible-factored-rank1": lambda: p4opt.Invertible(update="factored", rank=1, seed=1),
    "invertible-factored-rank3": lambda: p4opt.Invertible(update="factored", rank=3, seed=1),
    "orthogonal-householder": lambda: p4opt.Orthogonal("householder", rank=4, seed=1),
    "orthogonal-givens": lambda: p4opt.Orthogonal("givens", seed=1),
    "orthogonal-stiefel-tall": lambda: p4opt.Orthogonal("householder", rank=4, seed=1),
    "orthogonal-stiefel-wide": lambda: p4opt.Orthogonal("householder", rank=4, seed=1),
    "orthogonal-givens-stiefel": lambda: p4opt.Orthogonal("givens", seed=1),
    "orthogonal-cayley": lambda: p4opt.Orthogonal("cayley", seed=1),
    "orthogonal-cayley-stiefel": lambda: p4opt.Orthogonal("cayley", seed=1),
    "orthogonal-cayley-stack": lambda: p4opt.Orthogonal("cayley", seed=1),
    "orthogonal-stack": lambda: p4opt.Orthogonal("householder", rank=4, seed=1),
    "positive-definite": lambda: p4opt.PositiveDefinite(seed=1),  # projected, rank n
    "positive-definite-factored": lambda: p4opt.PositiveDefinite(update="factored", rank=2, seed=1),
    "special-linear": lambda: p4opt.SpecialLinear(seed=1),
    "special-linear-factored": lambda: p4opt.SpecialLinear(update="factored", rank=2, seed=1),
    "symmetric": lambda: p4opt.Symmetric(seed=1),
    "zerosum": lambda: p4opt.ZeroSum(dim=0, value=1.0, seed=1),
    "circulant": lambda: p4opt.Circulant(seed=1),
    "fixed": lambda: p4opt.Fixed(
        torch.rand(N, N, generator=torch.Generator().manual_seed(2)) > 0.5
    ),
    "dense-constraint": lambda: p4opt.LinearStructure(
        torch.randn(4, N * N, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
    ),
}
#: Weight shapes other than (N, N): (out, in) of the layer, or a stack (S, N, N) of weights.
SHAPES: dict[str, tuple[int, ...]] = {
    "orthogonal-stiefel-tall": (N + 3, N),
    "orthogonal-stiefel-wide": (N - 2, N),
    "orthogonal-givens-stiefel": (N - 2, N),
    "orthogonal-cayley-stiefel": (N + 3, N),
    "orthogonal-cayley-stack": (3, N, N),
    "orthogonal-stack": (3, N, N),
}
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
}


class StackedLinear(torch.nn.Module):
    """A sum of ``S`` linear maps: ``weight`` is a stack (S, N, N), plus one bias."""

    def __init__(self, stack: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(0.1 * torch.randn(stack, N, N, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.zeros(N, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,sji->bj", x, self.weight) + self.bias


def _model(family: str) -> tuple[torch.nn.Module, p4opt.Perturbation]:
    torch.manual_seed(0)
    shape = SHAPES.get(family, (N, N))
    if len(shape) == 2:
        lin = torch.nn.Linear(shape[1], shape[0], dtype=torch.float64)
    else:
        lin = StackedLinear(shape[0])
    with torch.no_grad():  # feasible-ish start for every family: near the identity
        lin.weight.add_(torch.eye(*shape[-2:], dtype=torch.float64))
    return lin, p4opt.register(lin, "weight", FAMILIES[family]())


def _batch(step: int, out: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, N, generator=g, dtype=torch.float64)
    target = torch.cat([x.flip(-1), x], dim=-1)[:, :out]
    return x, target + 0.1 * torch.randn(16, out, generator=g, dtype=torch.float64)


def _out(lin: torch.nn.Module) -> int:
    """The layer's output size."""
    return lin.weight.shape[-2]


def _train(lin, opt, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        x, y = _batch(step, _out(lin))
        (lin(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_constraint_holds_while_training(family, optimizer):
    lin, pert = _model(family)
    assert pert.validate().ok, pert.validate()
    opt = p4opt.P4Optimizer(OPTIMIZERS[optimizer](lin.parameters()), merge_every=3)
    x, y = _batch(-1, _out(lin))
    before = float((lin(x) - y).square().mean().detach())
    _train(lin, opt, 12)
    assert opt.stats["merges_accepted"] == 4, opt.last_results
    report = pert.validate()
    assert report.ok, report
    assert float((lin(x) - y).square().mean().detach()) < before


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merge_leaves_the_output_unchanged(family):
    lin, pert = _model(family)
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-2), merge_every=1000)
    _train(lin, opt, 5)  # a pending, non-trivial update
    x, _ = _batch(0)
    before = lin(x).detach()
    result = pert.merge()
    assert result.accepted
    assert (lin(x) - before).abs().max() < 1e-12


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_resumes_the_same_trajectory(family):
    reference, _ = _model(family)
    opt_ref = p4opt.P4Optimizer(torch.optim.Adam(reference.parameters(), lr=1e-2), merge_every=3)
    _train(reference, opt_ref, 10)

    lin, _ = _model(family)
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-2), merge_every=3)
    _train(lin, opt, 5)
    model_state, opt_state = copy.deepcopy(lin.state_dict()), copy.deepcopy(opt.state_dict())
    resumed, _ = _model(family)
    resumed.load_state_dict(model_state)
    opt_resumed = p4opt.P4Optimizer(torch.optim.Adam(resumed.parameters(), lr=1e-2), merge_every=3)
    opt_resumed.load_state_dict(opt_state)
    _train(resumed, opt_resumed, 5, start=5)
    assert torch.equal(resumed.weight, reference.weight)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nan_update_is_rejected_and_unregister_keeps_the_weight(family):
    lin, pert = _model(family)
    base = pert.base.detach().clone()
    with torch.no_grad():
        pert.trainable()[0].fill_(float("nan"))
    result = pert.merge()
    assert not result.accepted and result.state_invalid
    assert torch.equal(pert.base, base)
    assert torch.isfinite(lin.weight).all()  # the perturbation is back at its identity
    calls = []
    lin.apply(lambda m: calls.append(type(m).__name__))
    assert type(pert).__name__ in calls
    current = lin.weight.detach().clone()
    assert torch.equal(p4opt.unregister(lin, "weight"), current)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    k=st.integers(1, 4),
    batch=st.sampled_from([(), (3,)]),
    seed=st.integers(0, 2**16),
)
def test_woodbury_and_lemma_agree_with_dense_algebra(n, k, batch, seed):
    g = torch.Generator().manual_seed(seed)
    a = (
        torch.eye(n, dtype=torch.float64)
        + 0.3 * torch.randn(*batch, n, n, generator=g, dtype=torch.float64) / n**0.5
    )
    u, v = (0.3 * torch.randn(2, *batch, n, k, generator=g, dtype=torch.float64) / n**0.5).unbind(0)
    w = a + u @ v.mT
    inv = torch.linalg.inv(a)
    assert (linalg.woodbury_inverse(inv, u, v) - torch.linalg.inv(w)).abs().max() < 1e-10
    sign, lad = linalg.lemma_slogdet(inv, u, v, *torch.linalg.slogdet(a))
    ref_sign, ref_lad = torch.linalg.slogdet(w)
    assert torch.equal(sign, ref_sign) and (lad - ref_lad).abs().max() < 1e-10


@pytest.mark.filterwarnings("ignore:merge_every=")  # a mechanism test, not learning
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_recovers_after_one_nan_gradient(family):
    lin, pert = _model(family)
    # merging every step catches the NaN before the next forward pass spreads it to the bias
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-2), merge_every=1)
    for step in range(8):
        x, y = _batch(step, _out(lin))
        (lin(x) - y).square().mean().backward()
        if step == 2:  # a NaN gradient on the perturbation (the plain bias stays clean)
            pert.trainable()[0].grad.fill_(float("nan"))
        opt.step()
        opt.zero_grad()
    # the NaN update is rejected and its optimizer state dropped; training then goes on
    assert opt.stats["merges_rejected"] == 1 and opt.stats["merges_accepted"] == 7
    assert torch.isfinite(lin.weight).all() and pert.validate().ok
