"""The merge's safety checks, pinned by figures: each test fails if its check is skipped.

Every bound an :class:`~p4opt.Invertible` merge enforces (update log|det|, update condition,
absolute log|det|) is driven just past its limit and the folded change measured against it;
Orthogonal's periodic correction and LinearStructure's re-projection at merge are shown to remove
injected drift. The setups use the identity as base, so the capacitance :math:`C = I + V^TU`
of an update is known in closed form.
"""

from __future__ import annotations

import math

import pytest
import torch

import p4opt
from p4opt import Reason

N = 6


def _grid_floor(t: float) -> float:
    """The largest point of the partial-merge grid t_j = 2^(-j/2) at or below ``t``."""
    j = math.ceil(-2 * math.log2(t) - 1e-12)
    return 2.0 ** (-j / 2)


def _identity_layer(pert: p4opt.Perturbation, dtype: torch.dtype = torch.float64):
    lin = torch.nn.Linear(N, N, bias=False, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(N, dtype=dtype))
    return lin, p4opt.register(lin, "weight", pert)


def _set_factors(pert: p4opt.Invertible, diag: list[float]) -> None:
    """Pending update U V^T = diag(d) on the first k coordinates (so C = I + diag(d))."""
    with torch.no_grad():
        pert.U.zero_()
        pert.V.zero_()
        for i, d in enumerate(diag):
            pert.U[i, i] = d
            pert.V[i, i] = 1.0


def _base_logdet(lin: torch.nn.Linear) -> float:
    return float(torch.linalg.slogdet(lin.parametrizations.weight.original)[1])


@pytest.mark.parametrize("target", [1.5, -1.5])
def test_an_update_logdet_past_either_bound_is_cut_back_to_the_bound(target):
    lin, pert = _identity_layer(
        p4opt.Invertible(update="factored", rank=1, update_logdet_bounds=(-1.0, 1.0), seed=0)
    )
    d = math.exp(target) - 1  # C = 1 + d, log C = target
    _set_factors(pert, [d])
    before = lin.weight.detach().clone()
    result = pert.merge()
    assert result.reason == Reason.UPDATE_BOUNDS and result.partial == 1 and not result.accepted
    want = max(t for t in (2.0 ** (-j / 2) for j in range(24)) if abs(math.log1p(t * d)) <= 1)
    assert result.scale == pytest.approx(want, rel=1e-12)
    folded = _base_logdet(lin)
    assert abs(folded) <= 1.0 and abs(folded) > 0.5  # cut back, not dropped
    assert folded == pytest.approx(math.log1p(want * d), abs=1e-12)
    torch.testing.assert_close(lin.weight, before, rtol=0, atol=1e-12)  # remainder pending
    assert pert.validate().ok


def test_an_update_logdet_just_inside_the_bounds_is_folded_whole():
    lin, pert = _identity_layer(
        p4opt.Invertible(update="factored", rank=1, update_logdet_bounds=(-1.0, 1.0), seed=0)
    )
    _set_factors(pert, [math.exp(0.99) - 1])
    result = pert.merge()
    assert result.accepted and result.scale == 1.0 and result.folded == 1
    assert _base_logdet(lin) == pytest.approx(0.99, abs=1e-12)


def test_the_default_update_bounds_are_two_per_rank():
    lin, pert = _identity_layer(p4opt.Invertible(update="factored", rank=1, seed=0))
    assert pert.update_logdet_bounds == (-2.0, 2.0)
    _set_factors(pert, [math.exp(2.2) - 1])
    result = pert.merge()
    assert result.reason == Reason.UPDATE_BOUNDS
    assert 1.0 < _base_logdet(lin) <= 2.0


def test_an_ill_conditioned_update_is_cut_back_below_max_update_condition():
    pert = p4opt.Invertible(
        update="factored",
        rank=2,
        max_update_condition=10.0,
        update_logdet_bounds=(-20.0, 20.0),
        seed=0,
    )
    lin, pert = _identity_layer(pert)
    _set_factors(pert, [19.0, -0.5])  # C = diag(20, 0.5): condition 40, log|det| = log 10
    result = pert.merge()
    assert result.reason == Reason.ILL_CONDITIONED_UPDATE and result.partial == 1
    # cond(I + tM) = (1 + 19t) / (1 - t/2) <= 10  <=>  t <= 9/24
    assert result.scale == pytest.approx(_grid_floor(9 / 24), rel=1e-12)
    s = torch.linalg.svdvals(lin.parametrizations.weight.original)
    assert float(s[0] / s[-1]) <= 10.0


def test_an_update_within_max_update_condition_is_folded_whole():
    pert = p4opt.Invertible(
        update="factored", rank=2, max_update_condition=10.0, update_logdet_bounds=(-20, 20)
    )
    lin, pert = _identity_layer(pert)
    _set_factors(pert, [3.0, -0.5])  # condition 8
    assert pert.merge().accepted
    s = torch.linalg.svdvals(lin.parametrizations.weight.original)
    assert float(s[0] / s[-1]) == pytest.approx(8.0, rel=1e-12)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_base_logdet_never_leaves_logdet_bounds(sign):
    pert = p4opt.Invertible(update="factored", rank=1, logdet_bounds=(-0.5, 0.5), seed=0)
    lin, pert = _identity_layer(pert)
    seen = []
    for _ in range(6):
        _set_factors(pert, [math.exp(sign * 0.3) - 1])  # each update: log|det| +-0.3
        seen.append(pert.merge().reason)
        assert -0.5 <= _base_logdet(lin) <= 0.5
        assert pert.logabsdet_base.item() == pytest.approx(_base_logdet(lin), abs=1e-12)
    assert seen[0] == Reason.OK and Reason.LOGDET_BOUNDS in seen
    assert abs(_base_logdet(lin)) > 0.45  # it went up to the bound, not stopped early


def test_an_update_that_no_step_can_fit_is_rejected_and_leaves_the_base_bit_identical():
    pert = p4opt.Invertible(update="factored", rank=1, logdet_bounds=(-0.5, 0.5), seed=0)
    lin, pert = _identity_layer(pert)
    with torch.no_grad():  # base at the upper bound already
        pert.U[0, 0], pert.V[0, 0] = math.exp(0.5) - 1, 1.0
    assert pert.merge().accepted
    base = lin.parametrizations.weight.original.clone()
    inv = pert.inv.clone()
    _set_factors(pert, [0.5])
    result = pert.merge()
    assert result.rejected == 1 and result.scale == 0.0 and result.reason == Reason.LOGDET_BOUNDS
    assert torch.equal(lin.parametrizations.weight.original, base) and torch.equal(pert.inv, inv)


@pytest.mark.parametrize("bounds", [(-2.0, 2.0), (-math.inf, math.inf)])
def test_a_singular_update_is_cut_back_to_the_largest_non_singular_step(bounds):
    pert = p4opt.Invertible(update="factored", rank=1, update_logdet_bounds=bounds, seed=0)
    lin, pert = _identity_layer(pert)
    _set_factors(pert, [-1.0])  # C = 0 at t = 1, C = 1 - t below
    result = pert.merge()
    assert result.reason == Reason.SINGULAR_UPDATE and result.partial == 1
    assert result.scale == pytest.approx(2**-0.5, rel=1e-12)
    assert _base_logdet(lin) == pytest.approx(math.log1p(-(2**-0.5)), abs=1e-12)


def test_an_update_that_fits_only_below_the_last_grid_point_is_rejected():
    pert = p4opt.Invertible(update="factored", rank=1, update_logdet_bounds=(-1.0, 1.0), seed=0)
    lin, pert = _identity_layer(pert)
    d = (math.e - 1) * 2**12 * 0.99  # log(1 + t d) <= 1 only for t < 2^-12 (grid ends at 2^-11.5)
    _set_factors(pert, [d])
    result = pert.merge()
    assert result.rejected == 1 and result.scale == 0.0
    assert _base_logdet(lin) == 0.0


def test_an_update_that_would_overflow_the_float32_layer_is_rejected_as_non_finite():
    pert = p4opt.Invertible(update="factored", rank=1, update_logdet_bounds=(-math.inf, math.inf))
    lin, pert = _identity_layer(pert, dtype=torch.float32)
    base = lin.parametrizations.weight.original.clone()
    with torch.no_grad():
        pert.U.zero_()
        pert.V.zero_()
        pert.U[1, 0], pert.V[0, 0] = 1e39**0.5, 1e39**0.5  # C = 1, but A + UV^T overflows
    result = pert.merge()
    assert result.reason == Reason.NON_FINITE_RESULT and result.rejected == 1
    assert torch.equal(lin.parametrizations.weight.original, base)


def test_a_whole_step_that_would_overflow_the_float32_layer_is_rejected_as_non_finite():
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(2e38 * torch.eye(4))  # float32, well conditioned
    pert = p4opt.register(holder, "weight", p4opt.Invertible())  # rank n: the whole step
    base = holder.parametrizations.weight.original.clone()
    master, inv = pert.precise_base.clone(), pert.inv.clone()
    with torch.no_grad():
        pert.delta[0, 0] = 2e38  # finite in float32, but A + Delta is 4e38
    result = pert.merge()
    assert result.reason == Reason.NON_FINITE_RESULT and result.rejected == 1
    assert torch.equal(holder.parametrizations.weight.original, base)
    assert torch.equal(pert.precise_base, master) and torch.equal(pert.inv, inv)
    with torch.no_grad():
        pert.delta[0, 0] = 1e38  # 3e38 fits: folds, and the layer gets the rounded sum
    assert pert.merge().accepted
    assert float(holder.parametrizations.weight.original[0, 0]) == float(torch.tensor(3e38))
    assert pert.validate().ok


def test_the_check_codes_are_int64_reason_positions():
    from p4opt.linalg.merge import low_rank_check

    eye = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    u = torch.zeros(2, 3, 1, dtype=torch.float64)
    v = torch.zeros(2, 3, 1, dtype=torch.float64)
    u[1, 0, 0], v[1, 0, 0] = -1.0, 1.0  # element 1 singular
    check = low_rank_check(eye, eye, torch.zeros(2, dtype=torch.float64), u, v)
    assert check.codes.dtype == torch.int64
    assert check.codes.tolist() == [0, Reason.SINGULAR_UPDATE.code]


def test_a_non_finite_element_of_a_nested_stack_is_rejected_alone():
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(torch.eye(N, dtype=torch.float64).repeat(2, 3, 1, 1))
    pert = p4opt.register(holder, "weight", p4opt.Invertible(update="factored", rank=1))
    with torch.no_grad():
        pert.U.fill_(0.01)
        pert.U[1, 2, 0, 0] = math.nan
    base = holder.parametrizations.weight.original.clone()
    result = pert.merge()
    assert (result.folded, result.rejected) == (5, 1)
    after = holder.parametrizations.weight.original
    assert torch.equal(after[1, 2], base[1, 2]) and not torch.equal(after[0, 0], base[0, 0])


def test_projected_updates_obey_the_same_bounds():
    pert = p4opt.Invertible(rank=N, update_logdet_bounds=(-1.0, 1.0), seed=0)
    lin, pert = _identity_layer(pert)
    with torch.no_grad():
        pert.delta[0, 0] = math.exp(1.5) - 1
    result = pert.merge()
    assert result.reason == Reason.UPDATE_BOUNDS and 0 < result.scale < 1
    assert 0.5 < _base_logdet(lin) <= 1.0
    assert pert.validate().ok


def test_a_stack_cuts_back_only_the_element_past_its_bound():
    lin = torch.nn.Module()
    lin.weight = torch.nn.Parameter(torch.eye(N, dtype=torch.float64).repeat(2, 1, 1))
    pert = p4opt.register(
        lin, "weight", p4opt.Invertible(update="factored", rank=1, update_logdet_bounds=(-1, 1))
    )
    with torch.no_grad():
        pert.U.zero_()
        pert.V.zero_()
        pert.U[0, 0, 0], pert.V[0, 0, 0] = math.exp(0.5) - 1, 1.0
        pert.U[1, 0, 0], pert.V[1, 0, 0] = math.exp(3.0) - 1, 1.0
    result = pert.merge()
    assert (result.folded, result.partial, result.rejected) == (1, 1, 0)
    lad = torch.linalg.slogdet(lin.parametrizations.weight.original)[1]
    assert float(lad[0]) == pytest.approx(0.5, abs=1e-12) and 0.5 < float(lad[1]) <= 1.0


def test_bookkeeping_after_partial_merges_matches_dense_algebra():
    pert = p4opt.Invertible(update="factored", rank=2, update_logdet_bounds=(-0.7, 0.7), seed=0)
    lin, pert = _identity_layer(pert)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        with torch.no_grad():
            pert.U.copy_(torch.randn(N, 2, generator=g, dtype=torch.float64))
        pert.merge()
        w = lin.parametrizations.weight.original
        lad = float(torch.linalg.slogdet(w)[1])
        assert abs(float(pert.logabsdet_base) - lad) < 1e-10
        assert float((w @ pert.inv - torch.eye(N, dtype=torch.float64)).abs().max()) < 1e-10


# ------------------------------------------------------------------ corrections and projections
@pytest.mark.parametrize("method", ["householder", "givens", "cayley"])
def test_orthogonal_correction_after_correct_every_merges_removes_float32_drift(method):
    lin, pert = _identity_layer(
        p4opt.Orthogonal(method, rank=4 if method == "householder" else None, correct_every=5,
                         seed=0),
        dtype=torch.float32,
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # drift as from many rounded merges
        pert.base.add_(1e-3 * torch.randn(N, N, generator=g))
    errors = []
    for _ in range(5):
        errors.append(pert.validate().figures["orthogonality_error"])
        pert.merge()
    after = pert.validate().figures["orthogonality_error"]
    assert min(errors) > 1e-4  # untouched until the scheduled correction
    assert after < 1e-6 and pert.validate().ok


def test_orthogonal_without_corrections_keeps_its_drift():
    lin, pert = _identity_layer(
        p4opt.Orthogonal(rank=4, correct_every=None, seed=0), dtype=torch.float32
    )
    with torch.no_grad():
        pert.base.add_(1e-3 * torch.randn(N, N, generator=torch.Generator().manual_seed(1)))
    for _ in range(10):
        pert.merge()
    assert pert.validate().figures["orthogonality_error"] > 1e-4


@pytest.mark.parametrize(
    "make",
    [
        lambda: p4opt.Symmetric(),
        lambda: p4opt.ZeroSum(dim=0, value=1.0),
        lambda: p4opt.Circulant(),
    ],
)
def test_a_linear_structure_merge_removes_injected_drift(make):
    lin = torch.nn.Linear(N, N, bias=False, dtype=torch.float64)
    pert = p4opt.register(lin, "weight", make())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        pert.base.add_(1e-4 * torch.randn(N, N, generator=g, dtype=torch.float64))
    assert pert.residual() > 1e-6 and not pert.validate().ok
    result = pert.merge()
    assert result.figures["drift_removed"] > 1e-6
    assert pert.residual() < 1e-12 and pert.validate().ok


# ------------------------------------------------------------- found by the bad-input campaign
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_low_precision_non_orthogonal_start_is_projected(dtype):
    lin = torch.nn.Linear(4, 4, bias=False, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(2 * torch.eye(4))  # orthogonality error 3 > 100 n eps of bfloat16
    pert = p4opt.register(lin, "weight", p4opt.Orthogonal("givens"))
    assert pert.validate().figures["orthogonality_error"] < 1e-2


def test_a_structure_without_freedom_raises_a_p4_error():
    mask = torch.zeros(2, 2, dtype=torch.bool)
    with pytest.raises(p4opt.P4ValueError, match="fixes every entry"):
        p4opt.register(torch.nn.Linear(2, 2), "weight", p4opt.Fixed(mask))


@pytest.mark.parametrize("make", [
    lambda: p4opt.ZeroSum(dim=0, value=1.0),
    lambda: p4opt.LinearStructure(
        torch.randn(2, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
        torch.zeros(2, dtype=torch.float64),
    ),
])
def test_a_linear_structure_moved_to_float64_passes_float64_validation(make):
    lin = torch.nn.Linear(4, 4, bias=False)
    pert = p4opt.register(lin, "weight", make())
    lin.double()
    report = pert.validate()
    assert report.ok and report.figures["residual"] < 1e-12


def test_orthogonal_merges_a_float32_layer_in_float64_so_rounding_does_not_pile_up():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 32, bias=False)
    pert = p4opt.register(lin, "weight", p4opt.Orthogonal(correct_every=None, seed=0))
    g = torch.Generator().manual_seed(1)
    for _ in range(60):  # no correction: only the merge's own precision keeps Q orthogonal
        with torch.no_grad():
            pert.vectors.add_(0.3 * torch.randn(pert.vectors.shape, generator=g))
        pert.merge()
    base = pert.base.to(torch.float64)
    error = float((base.T @ base - torch.eye(32, dtype=torch.float64)).abs().max())
    assert error < 1e-6  # rotating in float32 instead gives about 7e-6 here
