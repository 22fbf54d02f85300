"""The pure kernels of p4opt.linalg against torch.linalg."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_invertible

import p4opt
from p4opt import linalg
from p4opt.linalg import probe_inverse_residual


def _factors(n: int, k: int, batch=(), scale: float = 0.3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(2, *batch, n, k, generator=g, dtype=torch.float64) / n**0.5).unbind(
        0
    )


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch", [(), (4,)])
def test_woodbury_inverse_matches_dense(k, batch):
    a = random_invertible(12, batch=batch)
    u, v = _factors(12, k, batch)
    got = linalg.woodbury_inverse(torch.linalg.inv(a), u, v)
    want = torch.linalg.inv(a + u @ v.mT)
    assert (got - want).abs().max() < 1e-12


@pytest.mark.parametrize("k", [1, 2])
def test_woodbury_solve_matches_dense(k):
    a = random_invertible(10)
    u, v = _factors(10, k)
    y = torch.randn(3, 7, 10, dtype=torch.float64)
    x = linalg.woodbury_solve(torch.linalg.inv(a).mT, u, v, y)
    want = torch.linalg.solve(a + u @ v.mT, y.unsqueeze(-1)).squeeze(-1)
    assert x.shape == y.shape
    assert (x - want).abs().max() < 1e-12


@pytest.mark.parametrize("batch", [(), (5,)])
def test_lemma_slogdet_matches_dense(batch):
    a = random_invertible(9, batch=batch)
    a[..., 0, :] *= -1  # negative determinant
    u, v = _factors(9, 2, batch, scale=3.0)
    sign0, lad0 = torch.linalg.slogdet(a)
    sign, lad = linalg.lemma_slogdet(torch.linalg.inv(a), u, v, sign0, lad0)
    ref_sign, ref_lad = torch.linalg.slogdet(a + u @ v.mT)
    assert torch.equal(sign, ref_sign)
    assert (lad - ref_lad).abs().max() < 1e-12


def test_newton_schulz_squares_the_residual():
    a = random_invertible(16)
    x = torch.linalg.inv(a) + 1e-4 * torch.randn(16, 16, dtype=torch.float64)
    before = linalg.inverse_residual(a, x)
    after = linalg.inverse_residual(a, linalg.newton_schulz_step(a, x))
    # I - A X_new = R², so the new residual equals the square of the old one
    assert (after - before @ before).abs().max() < 1e-14
    assert after.abs().max() < 1e-3 * before.abs().max()


@pytest.mark.parametrize("order", [2, 3, 5])
def test_hyperpower_residual_is_power_of_order(order):
    a = random_invertible(8)
    x = torch.linalg.inv(a) + 1e-2 * torch.randn(8, 8, dtype=torch.float64)
    r = linalg.inverse_residual(a, x)
    got = linalg.inverse_residual(a, linalg.hyperpower_step(a, x, order))
    assert (got - torch.linalg.matrix_power(r, order)).abs().max() < 1e-13


def test_hyperpower_rejects_bad_order():
    with pytest.raises(ValueError, match="order"):
        linalg.hyperpower_step(torch.eye(2), torch.eye(2), 1)


def test_refine_inverse_recovers_from_garbage():
    a = random_invertible(20)
    x, res = linalg.refine_inverse(a, torch.full((20, 20), float("nan"), dtype=torch.float64))
    assert res < 1e-13
    assert (x - torch.linalg.inv(a)).abs().max() < 1e-12


def test_low_rank_merge_accepts_and_rejects_elementwise():
    a = random_invertible(6, batch=(3,))
    inv = torch.linalg.inv(a)
    sign, lad = torch.linalg.slogdet(a)
    u, v = _factors(6, 1, (3,))
    u = u.clone()
    u[1] = float("nan")  # element 1: non-finite update
    # element 2: nearly singular update, C = 1 + vᵀA⁻¹u = e^-5
    target = math.exp(-5) - 1
    u[2] = (a[2] @ v[2]) * target / float(v[2].mT @ v[2])
    before = [t.clone() for t in (a, inv, sign, lad)]
    code, update = linalg.low_rank_merge_(a, inv, sign, lad, u, v, update_bounds=(-2.0, 2.0))
    assert code.tolist() == [0, 1, 3]
    assert abs(float(update[2]) + 5) < 1e-12
    for new, old in zip((a, inv, sign, lad), before, strict=True):
        assert torch.equal(new[1:], old[1:])  # rejected elements keep their values
    merged = before[0][0] + u[0] @ v[0].mT
    assert torch.equal(a[0], merged)
    assert (inv[0] - torch.linalg.inv(merged)).abs().max() < 1e-12
    assert abs(lad[0] - torch.linalg.slogdet(merged)[1]) < 1e-12


def test_low_rank_merge_rejects_overflow_in_storage_dtype():
    a = torch.eye(2, dtype=torch.float64)
    u = torch.tensor([[1e39], [0.0]], dtype=torch.float64)
    v = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    sign, lad = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    code, _ = linalg.low_rank_merge_(a, a.clone(), sign, lad, u, v, out_dtype=torch.float32)
    assert linalg.MERGE_REJECTIONS[int(code)] == "non-finite merged tensor" and torch.equal(
        a, torch.eye(2, dtype=torch.float64)
    )
    assert float(lad) == 0.0



def test_full_update_without_v_matches_the_rank_n_update_with_the_identity():
    # v=None (V = I): the new inverse comes from one solve; codes, inverse and log-det must be
    # those of the general rank-n Woodbury update, element by element, rejections included
    a = random_invertible(5, batch=(3,))
    g = torch.Generator().manual_seed(3)
    delta = 0.2 * torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    delta[1] = float("inf")  # element 1: non-finite
    delta[2] = -a[2] + 1e-3 * torch.eye(5, dtype=torch.float64)  # element 2: log|det C| far out
    eye = torch.eye(5, dtype=torch.float64).expand(3, 5, 5)
    results = []
    for v in (None, eye):
        m, inv = a.clone(), torch.linalg.inv(a)
        sign, lad = torch.linalg.slogdet(a)
        code, _ = linalg.low_rank_merge_(m, inv, sign, lad, delta, v, update_bounds=(-4.0, 4.0))
        results.append((code, m, inv, sign, lad))
    (code, m, inv, sign, lad), general = results
    assert code.tolist() == [0, 1, 3] and torch.equal(code, general[0])
    assert torch.equal(m[1:], a[1:]) and torch.equal(inv[1:], torch.linalg.inv(a)[1:])
    merged = a[0] + delta[0]
    assert (inv[0] - torch.linalg.inv(merged)).abs().max() < 1e-12
    assert abs(lad[0] - torch.linalg.slogdet(merged)[1]) < 1e-12
    for mine, theirs in zip((m, inv, sign, lad), general[1:], strict=True):
        assert (mine - theirs).abs().max() < 1e-12
    scale = linalg.feasible_scale(torch.linalg.inv(a[2]), lad[2], delta[2], None, (-4.0, 4.0),
                                  (-math.inf, math.inf), math.inf)
    assert 0 < float(scale) < 1  # the cut-back grid understands v=None too

# ------------------------------------------------------------------ one refinement driver
@pytest.mark.parametrize("order", [2, 3])
def test_refine_inverse_reaches_the_tolerance_from_a_perturbed_inverse(order):
    n = 16
    a = random_invertible(n)
    g = torch.Generator().manual_seed(5)
    x0 = torch.linalg.inv(a) + 1e-6 * torch.randn(n, n, generator=g, dtype=torch.float64)
    start = float(linalg.inverse_residual(a, x0).abs().amax())
    x, res = linalg.refine_inverse(a, x0, order=order)
    eps = torch.finfo(torch.float64).eps
    assert res == float(linalg.inverse_residual(a, x).abs().amax())
    assert res < 100 * n * eps < start


def test_refine_inverse_falls_back_to_lu_when_far_off():
    a = random_invertible(8)
    x, res = linalg.refine_inverse(a, torch.zeros_like(a))
    assert res < 100 * 8 * torch.finfo(torch.float64).eps
    assert (x - torch.linalg.inv(a)).abs().max() < 1e-10


def test_refine_orthogonal_reaches_the_tolerance_and_keeps_the_polar_factor():
    n = 12
    q0 = linalg.random_orthogonal(n, generator=torch.Generator().manual_seed(3), det=1.0)
    g = torch.Generator().manual_seed(4)
    noisy = q0 + 1e-6 * torch.randn(n, n, generator=g, dtype=torch.float64)
    q, err = linalg.refine_orthogonal(noisy)
    assert err == float(linalg.orthogonality_error(q))
    assert err < 10 * n * torch.finfo(torch.float64).eps
    assert (q - linalg.polar_factor(noisy)).abs().max() < 1e-12
    # far off: the SVD fallback, with the determinant sign kept when asked
    far, err = linalg.refine_orthogonal(3 * noisy, special=True)
    assert err < 10 * n * torch.finfo(torch.float64).eps and torch.linalg.det(far) > 0


# ------------------------------------------------------------------ random_orthogonal
@pytest.mark.parametrize("det", [None, 1.0, -1.0])
def test_random_orthogonal_is_orthogonal_with_the_requested_determinant(det):
    q = linalg.random_orthogonal(7, generator=torch.Generator().manual_seed(0), det=det, batch=(5,))
    assert q.shape == (5, 7, 7) and q.dtype == torch.float64
    assert linalg.orthogonality_error(q).max() < 1e-12
    if det is not None:
        assert bool((torch.linalg.det(q).sign() == det).all())


def test_random_orthogonal_is_reproducible_and_matches_the_old_call_sites():
    from p4opt.nn import random_orthogonal as nn_random_orthogonal
    from p4opt.tasks import random_orthogonal as task_random_orthogonal

    def gen():
        return torch.Generator().manual_seed(11)

    a = linalg.random_orthogonal(6, generator=gen(), det=1.0)
    assert torch.equal(a, linalg.random_orthogonal(6, generator=gen(), det=1.0))
    assert not torch.equal(a, linalg.random_orthogonal(6, generator=torch.Generator(), det=1.0))
    assert torch.equal(a, task_random_orthogonal(6, gen(), det=1.0))
    b = nn_random_orthogonal(2, 6, 6, generator=gen(), dtype=torch.float64)
    assert torch.equal(b, linalg.random_orthogonal(6, generator=gen(), batch=(2,)))
    with pytest.raises(ValueError, match="det"):
        linalg.random_orthogonal(3, generator=gen(), det=2.0)


def test_merge_rejection_names_are_the_reasons_of_the_merge_cycle():
    reasons = [r.value for r in p4opt.Reason]
    assert list(linalg.MERGE_REJECTIONS) == reasons[: len(linalg.MERGE_REJECTIONS)]


def test_range_finder_recovers_low_rank_matrices_and_nearly_best_approximations():
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(2, 3, 40, 5, generator=g, dtype=torch.float64).unbind(0)
    delta = left @ right.mT  # a stack of three rank-5 matrices
    start = torch.randn(3, 40, 5, generator=g, dtype=torch.float64)
    u, v = linalg.range_finder(delta, start, power_iters=0)
    assert (u @ v.mT - delta).abs().max() < 1e-10
    assert (u.mT @ u - torch.eye(5, dtype=torch.float64)).abs().max() < 1e-12
    noisy = delta + 1e-3 * torch.randn(3, 40, 40, generator=g, dtype=torch.float64)
    u, v = linalg.range_finder(noisy, start, power_iters=1)
    best = torch.linalg.svdvals(noisy)[..., 5:].square().sum(-1).sqrt()  # optimal rank-5 error
    assert ((u @ v.mT - noisy).norm(dim=(-2, -1)) < 1.5 * best).all()


@pytest.mark.parametrize("k", [1, 3])
def test_feasible_scale_is_the_largest_grid_fraction_inside_the_bounds(k):
    g = torch.Generator().manual_seed(k)
    inv = torch.eye(6, dtype=torch.float64)
    u, v = torch.randn(2, 6, k, generator=g, dtype=torch.float64).unbind(0)
    u = 3 * u
    lad = torch.tensor(0.0, dtype=torch.float64)
    t = float(linalg.feasible_scale(inv, lad, u, v, (-0.5, 0.5), (-math.inf, math.inf), math.inf))

    def inside(s: float) -> bool:
        return abs(float(torch.linalg.slogdet(torch.eye(k) + s * v.mT @ u)[1])) <= 0.5

    assert 0 < t <= 1 and inside(t)
    if t < 1:
        assert not inside(min(1.0, t * 2**0.5))  # the next grid point up fails


def test_condition_check_agrees_with_the_svd_on_both_sides_of_the_cheap_bound():
    from p4opt.linalg._checks import _condition, _condition_exceeds

    g = torch.Generator().manual_seed(4)
    for scale in (1e-3, 0.1, 0.9, 3.0):
        cap = torch.eye(6, dtype=torch.float64) + scale * torch.randn(5, 6, 6, generator=g,
                                                                      dtype=torch.float64)
        for limit in (1.5, 10.0, 1e3):
            exceeds = _condition_exceeds(cap, limit)  # None: settled by a bound, none exceeds
            exceeds = torch.zeros(5, dtype=torch.bool) if exceeds is None else exceeds
            assert torch.equal(exceeds, _condition(cap) > limit)


@pytest.mark.parametrize("k", [32, 96])
def test_condition_estimate_is_a_close_lower_bound_and_settles_large_checks(k):
    from p4opt.linalg._checks import _condition, _condition_exceeds

    g = torch.Generator().manual_seed(k)
    q1, q2 = (linalg.random_orthogonal(k, generator=g, dtype=torch.float64) for _ in range(2))
    for exponent in (0.5, 2.0, 5.0):  # condition numbers 10^exponent, spread log-uniformly
        s = torch.logspace(0, -exponent, k, dtype=torch.float64)
        c = q1 @ torch.diag(s) @ q2
        estimate, exact = float(linalg.condition_estimate(c)), float(_condition(c))
        assert estimate <= exact * (1 + 1e-9) and estimate >= 0.7 * exact, (estimate, exact)
    stack = torch.eye(k, dtype=torch.float64) + 0.5 * torch.randn(6, k, k, generator=g,
                                                                   dtype=torch.float64)
    for limit in (10.0, 1e3, 1e6):
        exceeds = _condition_exceeds(stack, limit)
        exceeds = torch.zeros(6, dtype=torch.bool) if exceeds is None else exceeds
        assert torch.equal(exceeds, _condition(stack) > limit)


@pytest.mark.parametrize("n", [1, 5, 64, 256])
def test_spectral_norm_estimate_is_a_close_lower_bound(n):
    # the Cayley merge picks its precision by it: it must never overstate the norm, and must
    # come close for the spread spectra of random (skew) steps, stacked or not
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, n, generator=g, dtype=torch.float64)
    for m in (x, x - x.mT):
        estimate = linalg.spectral_norm_estimate(m)
        exact = torch.linalg.matrix_norm(m, 2)
        assert estimate.shape == (3,)
        assert bool((estimate <= exact * (1 + 1e-12)).all())
        assert bool((estimate >= 0.8 * exact).all()), (estimate, exact)
    assert float(linalg.spectral_norm_estimate(torch.zeros(4, 4))) == 0.0


@pytest.mark.parametrize("n", [1, 8, 64])
def test_spd_condition_is_a_tight_lower_bound_of_the_eigenvalue_ratio(n):
    g = torch.Generator().manual_seed(n)
    q = linalg.random_orthogonal(n, generator=g, dtype=torch.float64).expand(3, n, n)
    spread = torch.tensor([0.0, -3.0, -9.0], dtype=torch.float64)  # log10 of 1/condition
    steps = torch.linspace(0, 1, n, dtype=torch.float64)
    eig = torch.pow(10.0, spread[:, None] * steps)
    a = q @ torch.diag_embed(eig) @ q.mT
    estimate = linalg.spd_condition(a, torch.linalg.inv(a))
    true = eig.amax(-1) / eig.amin(-1)
    # at most the true ratio, up to the inverse's own rounding (condition x eps ~ 1e-7)
    assert bool((estimate <= true * (1 + 1e-6)).all()) and bool((estimate >= 0.7 * true).all())
    broken = -a[0]  # negative definite: no condition number of an SPD matrix
    assert math.isinf(float(linalg.spd_condition(broken, torch.linalg.inv(broken))))


def test_a_refused_stack_element_with_nan_factors_keeps_its_matrix_bit_for_bit():
    # found by the bad-input campaign: the masked fold zeroed U of a refused element but not V,
    # and 0 * NaN put NaN into the whole stack's base and inverse
    g = torch.Generator().manual_seed(0)
    a = torch.eye(5, dtype=torch.float64).repeat(2, 1, 1) + 0.1 * torch.randn(
        2, 5, 5, generator=g, dtype=torch.float64
    )
    inv = torch.linalg.inv(a)
    sign, lad = torch.linalg.slogdet(a)
    u = 0.1 * torch.randn(2, 5, 1, generator=g, dtype=torch.float64)
    v = 0.1 * torch.randn(2, 5, 1, generator=g, dtype=torch.float64)
    v[1, 0, 0] = float("nan")
    before = a.clone(), inv.clone()
    codes, _ = linalg.low_rank_merge_(a, inv, sign, lad, u, v)
    assert codes.tolist()[0] == 0 and codes.tolist()[1] != 0
    assert torch.isfinite(a).all() and torch.isfinite(inv).all()
    assert torch.equal(a[1], before[0][1]) and torch.equal(inv[1], before[1][1])
    expected = before[0][0] + u[0] @ v[0].mT
    assert (a[0] - expected).abs().max() < 1e-14
    assert (inv[0] @ a[0] - torch.eye(5, dtype=torch.float64)).abs().max() < 1e-12


def test_a_rank_one_update_whose_woodbury_sum_cancels_is_refused():
    # found by the bad-input campaign (lr 1.3e5, loss scale 1e7): a 1 x 1 capacitance is
    # always well-conditioned, yet A + u v^T with |u v^T| ~ 1e12 leaves a Woodbury inverse off
    # by ~1e-4; the fold must refuse it and leave A, A^-1 and log|det| as they were
    g = torch.Generator().manual_seed(1)
    a = torch.eye(4, dtype=torch.float64)
    x = torch.randn(4, 1, generator=g, dtype=torch.float64)
    u, v = 1e12 * x, x + 1e-3 * torch.randn(4, 1, generator=g, dtype=torch.float64)
    w = a + u @ v.mT
    woodbury = a - (a @ u) @ torch.linalg.solve(1 + v.mT @ u, v.mT @ a)
    assert (w @ woodbury - torch.eye(4, dtype=torch.float64)).abs().max() > 1e-6  # what it fixes
    inv, (sign, lad) = a.clone(), torch.linalg.slogdet(a)
    code, _ = linalg.low_rank_merge_(a, inv, sign, lad, u, v)
    assert linalg.MERGE_REJECTIONS[int(code)] == "ill-conditioned update"
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.equal(a, eye) and torch.equal(inv, eye) and float(lad) == 0.0


def test_probe_inverse_residual_tracks_the_full_residual_on_stacks():
    g = torch.Generator().manual_seed(4)
    a = torch.eye(16, dtype=torch.float64) + 0.2 * torch.randn(3, 16, 16, generator=g,
                                                                dtype=torch.float64)
    x = torch.linalg.inv(a)
    assert probe_inverse_residual(a, x).shape == (3,)
    assert float(probe_inverse_residual(a, x).amax()) < 1e-13
    for scale in (1e-10, 1e-6, 1e-3):
        noisy = x + scale * torch.randn(x.shape, generator=g, dtype=torch.float64)
        full = (a @ noisy - torch.eye(16, dtype=torch.float64)).abs().amax((-2, -1))
        probe = probe_inverse_residual(a, noisy)
        assert bool((probe <= 16 * 3 * full).all()) and bool((probe >= full / 16).all())
