"""Rectangular (Stiefel) and stacked weights of :class:`p4opt.Orthogonal`."""

from __future__ import annotations

import re

import pytest
import torch

import p4opt
from p4opt import linalg


def _gram_error(w: torch.Tensor) -> float:
    """max|WᵀW - I| on the short side of every matrix of a stack, in float64."""
    w = w.detach().to(torch.float64)
    gram = w @ w.mT if w.shape[-2] < w.shape[-1] else w.mT @ w
    return float((gram - torch.eye(gram.shape[-1], dtype=w.dtype)).abs().amax())


def _stiefel(shape: tuple[int, ...], seed: int, dtype=torch.float64) -> torch.Tensor:
    """Random points of the Stiefel manifold (QR of Gaussian matrices); square ones in SO(n)."""
    g = torch.Generator().manual_seed(seed)
    *stack, n, p = shape
    a = torch.randn(*stack, max(n, p), min(n, p), generator=g, dtype=torch.float64)
    q = torch.linalg.qr(a)[0]
    if n == p:
        q[..., 0] *= torch.linalg.det(q).sign()[..., None]
    return (q if n >= p else q.mT).to(dtype)


class Weight(torch.nn.Module):
    """A bare weight (*, n, p) acting on the last dimension of ``x`` as ``x @ Wᵀ``."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(init.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.mT


def _fit(shape, steps=60, merge_every=5, seed=0, lr=0.05, **kwargs):
    """Train a registered weight towards a random Stiefel target; return module, pert, losses."""
    module = Weight(_stiefel(shape, seed))
    pert = p4opt.register(module, "weight", p4opt.Orthogonal(seed=seed, **kwargs))
    target = _stiefel(shape, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(*shape[:-2], 4 * shape[-1], shape[-1], generator=g, dtype=torch.float64)
    y = x @ target.mT
    opt = p4opt.P4Optimizer(torch.optim.Adam(module.parameters(), lr=lr), merge_every=merge_every)
    losses = []
    for _ in range(steps):
        loss = (module(x) - y).square().mean()
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return module, pert, opt, losses


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (3, 7, 4), (2, 3, 4, 6)])
def test_property_holds_after_training(shape):
    module, pert, opt, losses = _fit(shape)
    assert opt.stats["merges_accepted"] == 12
    assert losses[-1] < 0.3 * losses[0]
    assert _gram_error(module.weight) < 1e-12
    report = pert.validate()
    assert report.ok and report.figures["orthogonality_error"] < 1e-12, report


@pytest.mark.parametrize("shape", [(20, 10), (10, 20)])
def test_rectangular_reaches_every_stiefel_point(shape):
    """Rotating the long side reaches a target whose column (row) span differs."""
    _, _, _, losses = _fit(shape, steps=300, merge_every=7, rank=8, lr=0.1)
    assert losses[-1] < 1e-5 * losses[0]


@pytest.mark.parametrize("shape", [(20, 10), (10, 20), (3, 8, 8)])
def test_cayley_reaches_every_stiefel_point_merging_every_step(shape):
    module, pert, opt, losses = _fit(shape, steps=300, merge_every=1, lr=0.03, method="cayley")
    assert losses[-1] < 1e-5 * losses[0]
    assert opt.stats["merges_accepted"] == 300
    assert _gram_error(module.weight) < 1e-12 and pert.validate().ok


@pytest.mark.parametrize("stack", [(), (3,)])
def test_cayley_stiefel_kernel_is_the_dense_cayley_rotation_of_its_generator(stack):
    # S = V^T Z - Z^T V: the rank-2k formula must give the dense Cayley rotation of S, an
    # orthogonal matrix, and autograd's gradients of it must pass gradcheck
    g = torch.Generator().manual_seed(31)
    k, m = 3, 10
    v = _stiefel((*stack, m, k), 31).mT  # orthonormal rows (*, k, m)
    z = torch.randn(*stack, k, m, generator=g, dtype=torch.float64)
    s = v.mT @ z - z.mT @ v
    eye = torch.eye(m, dtype=torch.float64).expand(*stack, m, m)
    dense = linalg.cayley_apply(eye, s / 2)  # generator X = S/2: X - X^T = S
    fast = linalg.cayley_stiefel_apply(eye, v, z)
    assert float((fast - dense).abs().max()) < 1e-13
    assert float(linalg.orthogonality_error(fast).amax()) < 1e-13
    x = torch.randn(*stack, 4, m, generator=g, dtype=torch.float64, requires_grad=True)
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, z: linalg.cayley_stiefel_apply(x, v, z), (x, z))


@pytest.mark.parametrize("stack", [(), (2,)])
def test_cayley_stiefel_at_zero_has_the_exact_gradient_at_zero(stack):
    g = torch.Generator().manual_seed(32)
    v = _stiefel((*stack, 9, 3), 32).mT
    for x in (torch.randn(*stack, 5, 9, generator=g, dtype=torch.float64), v.clone()):
        probe = torch.randn(x.shape, generator=g, dtype=torch.float64)
        grads = []
        for fn in (linalg.cayley_stiefel_apply, linalg.cayley_stiefel_apply_at_zero):
            z = torch.zeros(v.shape, dtype=torch.float64, requires_grad=True)
            xx = x.clone().requires_grad_()
            out = fn(xx, v, z)
            assert float((out.detach() - x).abs().max()) < 1e-15
            (out * probe).sum().backward()
            grads.append((z.grad, xx.grad))
        (z_exact, x_exact), (z_fast, x_fast) = grads
        assert float((z_exact - z_fast).abs().max()) < 1e-13
        assert float((x_exact - x_fast).abs().max()) < 1e-13


@pytest.mark.parametrize("shape", [(20, 6), (6, 20), (3, 8, 5)])
def test_cayley_on_a_stiefel_weight_trains_k_by_m_entries(shape):
    # the generator of a rectangular weight is Z (k, m), not a dense m x m matrix
    module, pert, opt, losses = _fit(shape, steps=40, merge_every=1, lr=0.03, method="cayley")
    k, m = min(shape[-2:]), max(shape[-2:])
    assert tuple(pert.tangent.shape) == (*shape[:-2], k, m)
    assert not hasattr(pert, "skew") or "skew" not in pert._parameters
    assert losses[-1] < 0.2 * losses[0]
    assert _gram_error(module.weight) < 1e-12 and pert.validate().ok


@pytest.mark.parametrize("method", ["householder", "givens", "cayley"])
@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (3, 6, 6)])
def test_merge_leaves_the_output_unchanged(shape, method):
    if len(shape) > 2 and method == "givens":
        pytest.skip("givens takes single matrices")
    module, pert, _, _ = _fit(shape, steps=4, merge_every=1000, method=method)
    x = torch.randn(*shape[:-2], 5, shape[-1], dtype=torch.float64)
    before = module(x).detach()
    assert pert.merge().accepted
    assert (module(x) - before).abs().max() < 1e-13
    assert pert.validate().ok


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (4, 10, 10)])
def test_float32_near_orthonormal_start_is_projected(shape):
    g = torch.Generator().manual_seed(5)
    start = _stiefel(shape, 3) + 3e-4 * torch.randn(shape, generator=g, dtype=torch.float64)
    module = Weight(start.float())
    assert _gram_error(module.weight) > 1e-4
    pert = p4opt.register(module, "weight", p4opt.Orthogonal(seed=0))
    report = pert.validate()
    assert report.ok, report
    stored = start.float().double()
    nearest = linalg.polar_factor(stored, special=shape[-1] == shape[-2])  # group "SO"
    assert (module.weight.double() - nearest).abs().max() < 1e-6
    assert (module.weight.double() - start).abs().max() < 1e-3  # the nearest point, not any


def test_an_exactly_orthonormal_start_is_kept_bit_for_bit():
    start = _stiefel((3, 8, 5), 0)
    module = Weight(start)
    pert = p4opt.register(module, "weight", p4opt.Orthogonal(seed=0))
    assert torch.equal(pert.base, start)


@pytest.mark.parametrize("method", ["householder", "cayley"])
def test_stack_with_one_nonfinite_gradient_merges_element_by_element(method):
    module, pert, _, _ = _fit((4, 6, 3), steps=3, merge_every=1000, method=method)
    base = pert.base.detach().clone()
    (trained,) = pert.trainable()
    with torch.no_grad():
        trained[2].fill_(float("nan"))
    result = pert.merge()
    assert result.folded == 3 and result.rejected == 1 and not result.accepted
    assert torch.equal(pert.base[2], base[2])  # the bad element keeps its base bit for bit
    assert all(not torch.equal(pert.base[i], base[i]) for i in (0, 1, 3))
    assert torch.isfinite(module.weight).all()
    assert pert.validate().ok


@pytest.mark.filterwarnings("ignore:merge_every=")  # a mechanism test, not learning
def test_stack_training_survives_one_nonfinite_gradient():
    """Through P4Optimizer: a NaN gradient in one element; the others keep folding."""
    module = Weight(_stiefel((3, 5, 5), 0))
    pert = p4opt.register(module, "weight", p4opt.Orthogonal(rank=4, seed=0))
    opt = p4opt.P4Optimizer(torch.optim.SGD(module.parameters(), lr=0.1), merge_every=2)
    x = torch.randn(3, 8, 5, dtype=torch.float64)
    first = pert.base.detach().clone()
    for step in range(4):
        (module(x) - x.flip(-1)).square().sum().backward()
        if step == 1:
            pert.vectors.grad[1].fill_(float("nan"))
        opt.step()
        opt.zero_grad()
    assert opt.stats["merges_accepted"] >= 1
    assert not torch.equal(pert.base[0], first[0]) and not torch.equal(pert.base[2], first[2])
    assert torch.isfinite(module.weight).all() and pert.validate().ok


@pytest.mark.parametrize("method", ["householder", "cayley"])
def test_stack_elements_are_independent(method):
    """Each element of a stack is the single-matrix problem: batched equals looped."""
    w = _stiefel((3, 7, 4), 0)
    rank = {"rank": 4} if method == "householder" else {}
    single = Weight(w[1].clone())
    pert = p4opt.register(single, "weight", p4opt.Orthogonal(method, seed=0, **rank))
    stack = Weight(w.clone())
    spert = p4opt.register(stack, "weight", p4opt.Orthogonal(method, seed=0, **rank))
    (one,), (many,) = pert.trainable(), spert.trainable()
    with torch.no_grad():
        one.normal_()
        many[1].copy_(one)
    x = torch.randn(6, 4, dtype=torch.float64)
    out = stack(x.expand(3, 6, 4))
    assert (out[1] - single(x)).abs().max() < 1e-13


def test_conv_weight_is_a_stack_of_kernels():
    conv = torch.nn.Conv2d(2, 3, 4, dtype=torch.float64)
    pert = p4opt.register(conv, "weight", p4opt.Orthogonal(seed=0))
    assert pert.vectors.shape[:2] == (3, 2)
    assert _gram_error(conv.weight) < 1e-12 and pert.validate().ok


def test_group_defaults_to_so_for_square_and_none_for_rectangular():
    square = p4opt.register(torch.nn.Linear(4, 4), "weight", p4opt.Orthogonal())
    wide = p4opt.register(torch.nn.Linear(6, 4), "weight", p4opt.Orthogonal())
    assert square.group == "SO" and wide.group is None
    assert "det_sign_error" not in wide.validate().figures
    lin = torch.nn.Linear(6, 4)
    assert p4opt.register(lin, "weight", p4opt.Orthogonal(group="O")).validate().ok


@pytest.mark.parametrize(("method", "rank", "name"),
                         [("householder", 4, "vectors"), ("cayley", None, "tangent")])
@pytest.mark.parametrize("shape", [(8, 3), (3, 8)])
def test_autocast_bfloat16_and_torch_func_grad(shape, method, rank, name):
    lin = torch.nn.Linear(shape[1], shape[0], bias=False)
    pert = p4opt.register(lin, "weight", p4opt.Orthogonal(method, rank, seed=0))
    x = torch.randn(5, shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    trained = getattr(pert, name)
    assert torch.isfinite(trained.grad).all() and trained.grad.abs().sum() > 0

    from torch.func import functional_call, grad

    lin64 = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=torch.float64)
    pert64 = p4opt.register(lin64, "weight", p4opt.Orthogonal(method, rank, seed=0))
    x64 = x.double()
    params = dict(lin64.named_parameters())

    def loss(p):
        return functional_call(lin64, p, (x64,)).square().sum()

    via_func = grad(loss)(params)[f"parametrizations.weight.0.{name}"]
    loss(params).backward()
    assert (via_func - getattr(pert64, name).grad).abs().max() < 1e-12


def test_the_orthogonal_page_example_runs_and_keeps_the_property(capsys):
    from pathlib import Path

    page = Path(__file__).parents[1] / "docs" / "families" / "orthogonal.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)
    (block,) = [b for b in blocks if "Conv2d" in b]
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(block, "orthogonal.md", "exec"), namespace)  # noqa: S102
    assert capsys.readouterr().out.split() == ["True", "True"]
    assert _gram_error(namespace["lin"].weight) < 1e-5
    assert namespace["lin"].weight.shape == (64, 256)


@pytest.mark.parametrize("shape", [(30, 8), (8, 30), (3, 9, 9)])
def test_correction_reorthonormalizes_a_drifted_base(shape):
    module = Weight(_stiefel(shape, 0))
    pert = p4opt.register(module, "weight", p4opt.Orthogonal(seed=0, correct_every=1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # rounding drift of many merges, exaggerated
        pert.base.add_(1e-6 * torch.randn(shape, generator=g, dtype=torch.float64))
    drifted = pert.base.detach().clone()
    assert _gram_error(drifted) > 1e-7
    figures = pert.correct()
    assert figures["orthogonality_error"] < 1e-14 and _gram_error(pert.base) < 1e-14
    assert (pert.base - drifted).abs().max() < 1e-5  # a small fix, not a new point
    assert pert.merge().corrected  # and on the merge schedule


def test_cayley_stiefel_kernels_name_mismatched_shapes():
    from p4opt.errors import ShapeError

    x, rows = torch.zeros(3, 5), torch.zeros(2, 5)
    for fn in (linalg.cayley_stiefel_apply, linalg.cayley_stiefel_apply_at_zero):
        with pytest.raises(ShapeError, match=fn.__name__ + r".*tangent \(2, 4\)"):
            fn(x, rows, torch.zeros(2, 4))
        with pytest.raises(ShapeError, match=r"x \(3, 4\)"):
            fn(torch.zeros(3, 4), rows, torch.zeros(2, 5))


@pytest.mark.parametrize("fill", [1e6, 1e12])
def test_cayley_stiefel_huge_tangent_gives_nan_and_a_refused_merge_not_an_error(fill):
    # found by the bad-input campaign: a float32 tangent filled with 1e12 makes
    # M = I - J U^T U / 2 singular in float32 (invertible in exact arithmetic); the forward
    # pass and the merge raised LinAlgError from the solve
    module = Weight(_stiefel((7, 8), 0, torch.float32))
    pert = p4opt.register(module, "weight", p4opt.Orthogonal("cayley", seed=0))
    before = pert.base.clone()
    with torch.no_grad():
        pert.tangent.fill_(fill)
    module(torch.randn(3, 8))  # no error, whatever the values
    result = pert.merge()
    if result.accepted:  # merged in float64 and re-orthonormalized
        assert _gram_error(module.weight) < 1e-5
    else:
        assert torch.equal(pert.base, before)
    pert.identity()
    assert pert.validate().ok


def test_cayley_stiefel_at_zero_gradient_with_batch_dims_over_a_stack():
    """x (L, *, B, m) against a stack (*, k, m): the tangent's gradient is the sum over L of
    the per-batch gradients, each element against its own rows (not mixed across the stack)."""
    g = torch.Generator().manual_seed(3)
    rows = torch.linalg.qr(torch.randn(3, 5, 2, generator=g, dtype=torch.float64))[0].mT
    x = torch.randn(4, 3, 6, 5, generator=g, dtype=torch.float64)
    weights = torch.randn(4, 3, 6, 5, generator=g, dtype=torch.float64)

    def grad_of(xs: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(3, 2, 5, dtype=torch.float64, requires_grad=True)
        (linalg.cayley_stiefel_apply_at_zero(xs, rows, z) * cs).sum().backward()
        return z.grad

    expected = sum(grad_of(x[i], weights[i]) for i in range(4))
    assert (grad_of(x, weights) - expected).abs().max() < 1e-12


def test_cayley_stiefel_large_tangent_with_small_generator_merges_in_float64():
    """A tangent Z = AV with A symmetric leaves S = V^T Z - Z^T V = 0, yet the merge's
    2k x 2k system grows with Z: the merge must not run in float32."""
    torch.manual_seed(0)
    for n_out, n_in in ((4, 64), (64, 4)):
        lin = torch.nn.Linear(n_in, n_out, bias=False)
        pert = p4opt.register(lin, "weight", p4opt.Orthogonal(method="cayley"))
        rows = pert.strategy._rows(torch.float32)
        a = torch.randn(4, 4)
        a = a + a.T
        a *= 30 / torch.linalg.matrix_norm(a, 2)
        with torch.no_grad():
            pert.tangent.copy_(a @ rows)
        assert pert.strategy.merge_plan(torch.float32)[0] == torch.float64
        before = lin.weight.detach().clone()
        pert.merge()
        report = pert.validate()
        assert report.ok, report
        assert report.figures["orthogonality_error"] < 1e-6
        assert (lin.weight.detach() - before).abs().max() < 1e-4  # S = 0: G = I up to rounding
