"""Tests of the linear-structure family: presets, dense fallback, merges, checkpoints, errors."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch import nn

import p4opt
from p4opt.exceptions import ShapeError
from p4opt.families.linear import LinearStructure

Case = tuple[Callable[[torch.dtype], nn.Module], Callable[[], LinearStructure]]


def _dense() -> LinearStructure:
    gen = torch.Generator().manual_seed(3)
    C = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    C = torch.cat([C, C[:1] + C[1:2]])  # a redundant row: rank 4
    d = C @ torch.randn(12, generator=gen, dtype=torch.float64)
    return p4opt.LinearStructure(C, d)


CASES: dict[str, Case] = {
    "symmetric": (lambda dt: nn.Linear(6, 6, bias=False, dtype=dt), lambda: p4opt.Symmetric()),
    "symmetric-stack": (
        lambda dt: nn.Conv1d(4, 3, 4, bias=False, dtype=dt),  # weight (3, 4, 4): 3 matrices
        lambda: p4opt.Symmetric(dims=(-2, -1)),
    ),
    "symmetric-conv": (
        lambda dt: nn.Conv1d(4, 4, 3, bias=False, dtype=dt),
        lambda: p4opt.Symmetric(),  # default dims (0, 1): the channel pair
    ),
    "zerosum": (lambda dt: nn.Linear(5, 7, bias=False, dtype=dt), lambda: p4opt.ZeroSum(0, 1.0)),
    "circulant": (lambda dt: nn.Linear(6, 6, bias=False, dtype=dt), lambda: p4opt.Circulant()),
    "circulant-total": (
        lambda dt: nn.Linear(6, 6, bias=False, dtype=dt),
        lambda: p4opt.Circulant(total=1.0),
    ),
    "fixed": (
        lambda dt: nn.Linear(5, 4, bias=False, dtype=dt),
        lambda: p4opt.Fixed(torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) > 0.4),
    ),
    "dense": (lambda dt: nn.Linear(4, 3, bias=False, dtype=dt), _dense),
    "intersection": (
        lambda dt: nn.Linear(5, 5, bias=False, dtype=dt),
        lambda: p4opt.LinearStructure.intersection(p4opt.Circulant(), p4opt.ZeroSum(0, 1.0)),
    ),
}


def _build(name: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    make_module, make_structure = CASES[name]
    module = make_module(dtype)
    pert = p4opt.register(module, "weight", make_structure())
    return module, pert


def _inputs(module: nn.Module, dtype: torch.dtype, batch: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if isinstance(module, nn.Conv1d):
        return torch.randn(batch, module.in_channels, 9, generator=gen, dtype=dtype)
    return torch.randn(batch, module.in_features, generator=gen, dtype=dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_basis_is_orthonormal_null_space_of_dense_constraints(name: str) -> None:
    module, pert = _build(name)
    space = pert.space
    C, d = space.constraints()
    zeros = torch.zeros(space.dim, dtype=torch.float64)
    basis = torch.func.jacrev(space.lift)(zeros).reshape(-1, space.dim)
    rank = int(torch.linalg.matrix_rank(C))
    assert space.dim == C.shape[1] - rank
    assert torch.allclose(basis.mT @ basis, torch.eye(space.dim, dtype=torch.float64), atol=1e-12)
    assert float((C @ basis).abs().max()) < 1e-12


@pytest.mark.parametrize("name", list(CASES))
def test_registration_projects_orthogonally(name: str) -> None:
    torch.manual_seed(0)
    module = CASES[name][0](torch.float64)
    raw = module.weight.detach().clone()
    pert = p4opt.register(module, "weight", CASES[name][1]())
    C, d = pert.space.constraints()
    expected = raw.reshape(-1) - torch.linalg.pinv(C) @ (C @ raw.reshape(-1) - d)
    assert torch.allclose(module.weight.reshape(-1), expected, atol=1e-10)
    assert pert.validate().figures["residual"] < 1e-12
    again = pert.space.project(module.weight.detach())
    assert torch.allclose(again, module.weight, atol=1e-13)  # feasible tensors stay put


@pytest.mark.parametrize("optim", ["sgd", "adam"])
@pytest.mark.parametrize("name", list(CASES))
def test_float32_residual_stays_small_during_training(name: str, optim: str) -> None:
    module, pert = _build(name, torch.float32)
    x = _inputs(module, torch.float32)
    shape = module(x).shape
    target = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    base = (torch.optim.SGD(module.parameters(), lr=0.05) if optim == "sgd"
            else torch.optim.Adam(module.parameters(), lr=0.02))
    opt = p4opt.P4Optimizer(base, merge_every=7)
    first, worst = None, 0.0
    for _ in range(300):
        loss = (module(x) - target).square().mean()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
        worst = max(worst, pert.residual())
    assert worst <= 1e-6
    # it did learn within the structure (a random target is mostly out of reach of a
    # circulant map with a fixed total, hence the modest margin)
    assert loss.item() < 0.98 * first
    assert opt.stats["merges_accepted"] == 300 // 7
    assert pert.validate().ok


@pytest.mark.parametrize("name", list(CASES))
def test_merge_leaves_outputs_unchanged(name: str) -> None:
    module, pert = _build(name)
    with torch.no_grad():
        pert.z.normal_(generator=torch.Generator().manual_seed(2))
    x = _inputs(module, torch.float64)
    before = module(x)
    result = pert.merge()
    assert result.accepted and result.stale == ()  # z keeps its coordinates: state stays
    assert float(pert.z.detach().abs().max()) == 0.0
    assert torch.allclose(module(x), before, atol=1e-12, rtol=0)


def test_merges_do_not_change_the_adam_trajectory() -> None:
    def run(merge_every: int) -> torch.Tensor:
        module, _ = _build("zerosum", seed=5)
        x = _inputs(module, torch.float64)
        opt = p4opt.P4Optimizer(torch.optim.Adam(module.parameters(), lr=1e-2), merge_every)
        for _ in range(40):
            (module(x) - 1.0).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return module.weight.detach()

    assert torch.allclose(run(3), run(10**6), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["symmetric", "circulant-total", "fixed", "dense"])
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    def train(module: nn.Module, opt: p4opt.P4Optimizer, steps: int) -> None:
        x = _inputs(module, torch.float64)
        for _ in range(steps):
            (module(x) - 0.5).square().mean().backward()
            opt.step()
            opt.zero_grad()

    module, _ = _build(name, seed=1)
    opt = p4opt.P4Optimizer(torch.optim.Adam(module.parameters(), lr=1e-2), merge_every=4)
    train(module, opt, 10)
    buffer = io.BytesIO()
    torch.save({"model": module.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_sd, opt_sd = saved["model"], saved["opt"]
    clone, _ = _build(name, seed=9)
    clone.load_state_dict(model_sd)
    clone_opt = p4opt.P4Optimizer(torch.optim.Adam(clone.parameters(), lr=1e-2), merge_every=4)
    clone_opt.load_state_dict(opt_sd)
    assert torch.equal(clone.weight, module.weight)
    train(module, opt, 9)
    train(clone, clone_opt, 9)
    assert torch.equal(clone.weight, module.weight)


def test_zerosum_linear_conserves_the_total_after_training() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 9, dtype=torch.float64)
    p4opt.register(lin, "weight", p4opt.ZeroSum(dim=0, value=1.0))
    p4opt.register(lin, "bias", p4opt.ZeroSum(dim=0))
    x = torch.randn(64, 6, dtype=torch.float64)
    target = torch.randn(64, 9, dtype=torch.float64)
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-2), merge_every=5)
    for _ in range(50):
        (lin(x) - target).square().mean().backward()
        opt.step()
        opt.zero_grad()
    y = lin(x)
    assert float((y.sum(-1) - x.sum(-1)).detach().abs().max()) < 1e-12
    assert float(lin.bias.detach().abs().max()) > 1e-3  # the bias did train


def test_rejected_merge_leaves_base_bit_for_bit() -> None:
    module, pert = _build("circulant")
    before = pert.base.clone()
    with torch.no_grad():
        pert.z[0] = float("nan")
    result = pert.merge()
    assert not result.accepted and result.dropped and result.stale == (pert.z,)
    assert torch.equal(pert.base, before)
    assert torch.isfinite(pert.z).all()


def test_dense_basis_stays_float64_under_float() -> None:
    module, pert = _build("dense")
    module.float()
    assert pert.space.N.dtype == torch.float64
    assert module.weight.dtype == torch.float32
    assert pert.validate().ok


def test_unregister_leaves_a_feasible_plain_parameter() -> None:
    module, pert = _build("symmetric")
    with torch.no_grad():
        pert.z.normal_()
    weight = p4opt.unregister(module, "weight")
    assert isinstance(weight, nn.Parameter) and torch.equal(weight, weight.T)


def test_circulant_total_equals_dense_intersection() -> None:
    torch.manual_seed(4)
    w = torch.randn(5, 5, dtype=torch.float64)
    a, b = nn.Linear(5, 5, bias=False, dtype=torch.float64), nn.Linear(5, 5, bias=False,
                                                                         dtype=torch.float64)
    a.weight.data.copy_(w)
    b.weight.data.copy_(w)
    p4opt.register(a, "weight", p4opt.Circulant(total=1.0))
    p4opt.register(b, "weight", CASES["intersection"][1]())
    assert torch.allclose(a.weight, b.weight, atol=1e-12)


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: p4opt.LinearStructure(torch.ones(6), torch.ones(1)), ShapeError, "2-dimensional"),
        (lambda: p4opt.LinearStructure(torch.ones(2, 6), torch.ones(3)), ShapeError, "rows"),
        (lambda: p4opt.LinearStructure(torch.ones(1, 6, dtype=torch.bool), [1.0]), TypeError,
         "real"),
        (lambda: p4opt.LinearStructure(torch.ones(1, 6, dtype=torch.cfloat), [1.0]), TypeError,
         "real"),
        (lambda: p4opt.LinearStructure([[float("nan")] * 6], [1.0]), ValueError, "NaN"),
        (lambda: p4opt.LinearStructure(), TypeError, "needs a constraint"),
        (lambda: p4opt.Symmetric(dims=(0,)), TypeError, "pair"),
        (lambda: p4opt.ZeroSum(dim=0.5), TypeError, "dim"),
        (lambda: p4opt.Circulant(total=float("inf")), TypeError, "total"),
        (lambda: p4opt.Fixed(torch.ones(2, 3)), TypeError, "bool"),
    ],
)
def test_bad_arguments_raise(make: Callable[[], object], error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        make()


@pytest.mark.parametrize(
    ("shape", "make", "error", "words"),
    [
        ((2, 3), lambda: p4opt.LinearStructure(torch.ones(1, 5), [1.0]), ShapeError, "columns"),
        ((2, 3), lambda: p4opt.LinearStructure(torch.ones(2, 6), [1.0, 2.0]), ValueError,
         "inconsistent"),
        ((2, 3), lambda: p4opt.LinearStructure(torch.eye(6), torch.ones(6)), ValueError,
         "fixes every entry"),
        ((2, 3), lambda: p4opt.Symmetric(), ShapeError, "equal size"),
        ((2, 3), lambda: p4opt.Circulant(), ShapeError, "square"),
        ((1, 3), lambda: p4opt.ZeroSum(dim=0), ValueError, "fixes every entry"),
        ((2, 3), lambda: p4opt.ZeroSum(dim=2), ShapeError, "out of range"),
        ((2, 3), lambda: p4opt.Fixed(torch.zeros(2, 3, dtype=torch.bool)), ValueError,
         "fixes every entry"),
        ((2, 3), lambda: p4opt.Fixed(torch.ones(3, 2, dtype=torch.bool)), ShapeError, "mask"),
    ],
)
def test_bad_registrations_raise_naming_the_tensor(shape, make, error, words) -> None:
    lin = nn.Linear(shape[1], shape[0], bias=False)
    with pytest.raises(error, match=words) as info:
        p4opt.register(lin, "weight", make())
    assert "Linear.weight" in str(info.value)
