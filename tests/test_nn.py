"""Flow layers: inverses, log-determinants against dense Jacobians, merges, torch.distributions."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch.distributions import Independent, Normal, TransformedDistribution

import p4opt
from p4opt.nn import (
    AffineCoupling,
    BentIdentity,
    Flow,
    InverseBentIdentity,
    InvertibleLinear,
    InvertibleLinearStack,
    _native,
    flow_distribution,
    realnvp,
)
from p4opt.nn import functional as BF
from p4opt.nn.fused import linear_bent_chain

F64 = torch.float64



def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every P⁴ update and bias a non-trivial value (fresh layers are too simple)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, pert in p4opt.perturbations(module):
            pending = pert.trainable()[0]  # U (factored) or the pending change (projected)
            pending.copy_(0.3 * torch.randn(pending.shape, generator=g, dtype=F64))
        for name, p in module.named_parameters():
            if name.endswith("bias") or "net" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
    return module


def _linear() -> torch.nn.Module:
    return InvertibleLinear(3, dtype=F64)


def _coupling() -> torch.nn.Module:
    return AffineCoupling(3, parity=1, hidden=8).double()


def _flow() -> torch.nn.Module:
    lin = InvertibleLinear(3, dtype=F64)
    return Flow([lin, BentIdentity(), _coupling(), InverseBentIdentity()])


def _stack() -> torch.nn.Module:
    return InvertibleLinearStack(3, layers=4, dtype=F64)


LAYERS: dict[str, Callable[[], torch.nn.Module]] = {
    "linear": _linear,
    "bent": BentIdentity,
    "inverse_bent": InverseBentIdentity,
    "coupling": _coupling,
    "flow": _flow,
    "stack": _stack,
}


@pytest.fixture(params=list(LAYERS))
def layer(request: pytest.FixtureRequest) -> torch.nn.Module:
    torch.manual_seed(0)
    return _perturb(LAYERS[request.param](), seed=1)


def _points(n: int = 6, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_inverse_round_trip(layer: torch.nn.Module) -> None:
    x = _points()
    y = layer(x)
    assert (layer.inverse(y) - x).abs().max() < 1e-10
    assert (layer.forward_and_log_det(x)[0] - y).abs().max() < 1e-12


def test_log_det_matches_dense_jacobian(layer: torch.nn.Module) -> None:
    x = _points()
    _, ladj = layer.forward_and_log_det(x)
    y = layer(x)
    _, ladj_inv = layer.inverse_and_log_det(y)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0], x[i])
        sign, ref = torch.linalg.slogdet(jac)
        assert sign != 0
        assert abs(float(ladj[i].detach() - ref)) < 1e-9
        jac_inv = torch.autograd.functional.jacobian(lambda v: layer.inverse(v[None])[0], y[i])
        assert abs(float(ladj_inv[i].detach() - torch.linalg.slogdet(jac_inv)[1])) < 1e-9
    assert (ladj + ladj_inv).abs().max() < 1e-10


@torch.no_grad()
def test_batched_equals_looped(layer: torch.nn.Module) -> None:
    x = _points(5)
    y, ladj = layer.forward_and_log_det(x)
    for i in range(5):
        yi, li = layer.forward_and_log_det(x[i : i + 1])
        assert (yi[0] - y[i]).abs().max() < 1e-12 and abs(float(li[0] - ladj[i])) < 1e-12
    y3, l3 = layer.forward_and_log_det(x.reshape(5, 1, 3))  # extra batch dimensions
    assert l3.shape == (5, 1) and (y3.reshape(5, 3) - y).abs().max() < 1e-12


def test_stack_equals_flow_of_layers() -> None:
    torch.manual_seed(0)
    stack = _perturb(InvertibleLinearStack(2, layers=6, dtype=F64), seed=3)
    mods: list[torch.nn.Module] = []
    for i in range(6):
        lin = InvertibleLinear(2, dtype=F64)
        with torch.no_grad():
            lin.weight = stack.weight[i].detach().clone()  # re-bases the registered layer
            lin.bias.copy_(stack.bias[i])
        mods += [lin] + ([BentIdentity()] if i < 5 else [])
    x = _points(7)[:, :2]
    y, ladj = stack.forward_and_log_det(x)
    y_ref, ladj_ref = Flow(mods).forward_and_log_det(x)
    assert (y - y_ref).abs().max() < 1e-12
    assert (ladj - ladj_ref).abs().max() < 1e-10
    x_back, ladj_inv = stack.inverse_and_log_det(y)
    x_ref, ladj_inv_ref = Flow(mods).inverse_and_log_det(y)
    assert (x_back - x_ref).abs().max() < 1e-10 and (ladj_inv - ladj_inv_ref).abs().max() < 1e-10


BACKENDS = [False] + ([True] if _native.available(torch.zeros(1)) else [])


@pytest.mark.parametrize("native", BACKENDS)
def test_fused_chain_gradcheck(native: bool) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(4, 2, 2, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(4, 2, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: linear_bent_chain(*a, native=native), (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: linear_bent_chain(*a, native=native)[1], (x, w, b))


@pytest.mark.skipif(len(BACKENDS) < 2, reason="no C compiler: only the torch loops exist")
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-11), (torch.float32, 2e-3)])
def test_compiled_loops_match_torch_loops(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(33, 3, generator=g, dtype=F64).to(dtype).requires_grad_()
    w = torch.linalg.qr(torch.randn(300, 3, 3, generator=g, dtype=F64))[0].to(dtype)
    w.requires_grad_()
    b = torch.randn(300, 3, generator=g, dtype=F64).to(dtype).requires_grad_()
    results = []
    for native in (False, True):
        y, ladj = linear_bent_chain(x, w, b, native=native)
        grads = torch.autograd.grad(y.sin().sum() + ladj.cos().sum(), (x, w, b))
        results.append((y, ladj, *grads))
    for ref, got in zip(*results, strict=True):
        ref, got = ref.detach(), got.detach()
        assert float((got - ref).abs().max()) <= tol * float(ref.abs().max())


def test_bent_identity_round_trip_to_float64_precision() -> None:
    x = torch.linspace(-50, 50, 200001, dtype=F64)
    eps = torch.finfo(F64).eps
    scale = x.abs().clamp_min(1e-300)
    back = BF.bent_identity_inverse(BF.bent_identity(x))
    assert float(((back - x).abs() / scale).max()) < 8 * eps
    forth = BF.bent_identity(BF.bent_identity_inverse(x))
    assert float(((forth - x).abs() / scale).max()) < 8 * eps
    # the closed forms agree with the defining formulas where those do not cancel
    pos = x[x > 1]
    assert (BF.bent_identity(pos) - ((torch.sqrt(pos * pos + 1) - 1) / 2 + pos)).abs().max() < 1e-12
    y = BF.bent_identity(pos)
    direct = (2 / 3) * (2 * y + 1 - torch.sqrt(y * y + y + 1))
    assert (BF.bent_identity_inverse(y) - direct).abs().max() < 1e-12


def _base(dtype: torch.dtype = F64) -> Independent:
    return Independent(Normal(torch.zeros(2, dtype=dtype), torch.ones(2, dtype=dtype)), 1)


def _train(flow: torch.nn.Module, steps: int, merge_every: int = 5) -> p4opt.P4Optimizer:
    g = torch.Generator().manual_seed(5)
    opt = p4opt.P4Optimizer(torch.optim.Adam(flow.parameters(), lr=1e-2), merge_every=merge_every)
    for _ in range(steps):
        k = torch.randint(0, 4, (128,), generator=g)
        centers = torch.tensor([[2.0, 0], [-2, 0], [0, 2], [0, -2]], dtype=F64)[k]
        x = centers + 0.5 * torch.randn(128, 2, generator=g, dtype=F64)
        loss = -flow_distribution(flow, _base()).log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def test_transformed_distribution_integrates_to_one() -> None:
    torch.manual_seed(0)
    flow = InvertibleLinearStack(2, layers=8, dtype=F64)
    opt = _train(flow, steps=60)
    assert opt.stats["merges_accepted"] > 0
    dist = flow_distribution(flow, _base())
    axis = torch.linspace(-60, 60, 1201, dtype=F64)  # the bent identity's inverse has wide tails
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    with torch.no_grad():
        mass = float(dist.log_prob(pts).exp().sum()) * float(axis[1] - axis[0]) ** 2
    assert abs(mass - 1) < 1e-3
    samples = dist.sample((1000,))
    assert samples.shape == (1000, 2) and torch.isfinite(samples).all()
    # the transform adapter, used directly, gives the same density
    direct = TransformedDistribution(_base(), [flow.transform().inv]).log_prob(pts[:50])
    assert (direct - dist.log_prob(pts[:50])).abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["stack", "layers"])
def test_merge_keeps_log_prob(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "stack":
        flow: torch.nn.Module = InvertibleLinearStack(2, layers=10, dtype=F64)
    else:
        lins = [InvertibleLinear(2, dtype=F64) for _ in range(2)]
        flow = Flow([lins[0], BentIdentity(), lins[1]])
    opt = _train(flow, steps=7, merge_every=1000)  # updates pending, no merge yet
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    dist = flow_distribution(flow, _base())
    with torch.no_grad():
        before = dist.log_prob(x)
        results = opt.merge()
        after = dist.log_prob(x)
    assert all(r.accepted for _, r in results) and len(results) >= 1
    assert float((after - before).abs().max()) < 1e-10
    pending = [p.trainable()[0].detach() for _, p in p4opt.perturbations(flow)]
    assert all(float(t.abs().max()) == 0 for t in pending)


def test_realnvp_parameter_matching_and_identity_start() -> None:
    flow = realnvp(2, layers=4, hidden=15)
    assert sum(p.numel() for p in flow.parameters()) == 1208
    x = torch.randn(10, 2)
    y, ladj = flow.forward_and_log_det(x)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(10))


def test_shape_errors_name_the_expected_shape() -> None:
    with pytest.raises(p4opt.ShapeError, match=r"\(\.\.\., 3\)"):
        InvertibleLinear(3).forward_and_log_det(torch.zeros(4, 2))
    with pytest.raises(p4opt.ShapeError):
        linear_bent_chain(torch.zeros(4, 2), torch.zeros(3, 2, 2), torch.zeros(2, 2))
    assert math.isfinite(float(InvertibleLinear(2).log_det().detach()))


def test_native_loops_refuse_bad_arguments_and_warn_when_they_fall_back(monkeypatch):
    if not _native.available(torch.zeros(1)):
        pytest.skip("no C compiler here")
    mt = torch.zeros(3, 2, 5, dtype=F64)
    with pytest.raises(p4opt.P4ValueError, match="states must have shape"):
        _native.forward_states(mt, torch.zeros(3, 5, 7, dtype=F64), torch.zeros(7, dtype=F64))
    with pytest.raises(p4opt.P4ValueError, match="contiguous CPU"):
        _native.forward_states(mt.mT.contiguous().mT, torch.zeros(4, 5, 7), torch.zeros(7))
    _native._library.cache_clear()
    monkeypatch.setenv("CC", "no-such-compiler-anywhere")
    monkeypatch.setattr(_native.shutil, "which", lambda name: None)
    try:
        with pytest.warns(RuntimeWarning, match="compiled chain loops unavailable"):
            assert not _native.available(torch.zeros(1))
    finally:
        _native._library.cache_clear()
