"""Real training jobs: data parallelism, dtype moves, meta init, LBFGS, averaging, hooks, input."""

from __future__ import annotations

import copy
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.optim.swa_utils import AveragedModel

import p4opt

N = 6
FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = {
    "invertible": lambda: p4opt.Invertible(seed=1),
    "invertible-factored": lambda: p4opt.Invertible(update="factored", rank=2, seed=1),
    "orthogonal": lambda: p4opt.Orthogonal(rank=4, seed=1),
    "givens": lambda: p4opt.Orthogonal("givens", seed=1),
    "cayley": lambda: p4opt.Orthogonal("cayley", seed=1),
    "symmetric": lambda: p4opt.Symmetric(),
    "zerosum": lambda: p4opt.ZeroSum(dim=0, value=1.0),
}


def _layer(
    family: str, dtype: torch.dtype = torch.float64
) -> tuple[torch.nn.Linear, p4opt.Perturbation]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(N, N, dtype=dtype)
    with torch.no_grad():
        lin.weight.add_(torch.eye(N, dtype=dtype))
    return lin, p4opt.register(lin, "weight", FAMILIES[family]())


def _train(lin: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(lin.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, N, generator=g, dtype=torch.float64).to(dtype)
        (lin(x) - x.flip(-1)).square().mean().backward()
        opt.step()
        opt.zero_grad()


# ----------------------------------------------------------------------- 1. data parallel
def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(1000 + rank)  # a different seed per rank, as many scripts do
    model = torch.nn.Sequential(torch.nn.Linear(N, N, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.add_(3 * torch.eye(N, dtype=torch.float64))
    p4opt.register(model[0], "weight", p4opt.Invertible(update="factored", rank=2))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = p4opt.P4Optimizer(torch.optim.Adam(ddp.parameters(), lr=1e-2), merge_every=3)
    g = torch.Generator().manual_seed(rank)  # each rank sees its own data
    for _ in range(12):
        x = torch.randn(8, N, generator=g, dtype=torch.float64)
        (ddp(x) - x.flip(-1)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["validate_ok"] = torch.tensor(p4opt.perturbation_of(model[0], "weight").validate().ok)
    state["merges"] = torch.tensor(opt.stats["merges_accepted"])
    torch.save(state, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_ranks_with_different_seeds_stay_bit_identical(tmp_path):
    init = f"file://{tmp_path}/rendezvous"
    mp.spawn(_ddp_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert int(r0["merges"]) == 4 and bool(r0["validate_ok"]) and bool(r1["validate_ok"])
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key


def test_fully_sharded_models_are_refused_with_a_clear_error(tmp_path):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rv", rank=0, world_size=1)
    try:
        sharded = torch.nn.Linear(N, N, dtype=torch.float64)
        fsdp.fully_shard(sharded)
        with pytest.raises(p4opt.RegistrationError, match="sharded"):
            p4opt.register(sharded, "weight", p4opt.Invertible())
        lin, _ = _layer("invertible")  # registered first, sharded afterwards
        fsdp.fully_shard(lin)
        with pytest.raises(p4opt.P4RuntimeError, match="sharded"):
            p4opt.P4Optimizer(torch.optim.Adam(lin.parameters()))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------ 2. dtype moves
def test_float_after_float64_registration_keeps_exact_bookkeeping():
    lin, pert = _layer("invertible")
    lin.float()  # e.g. a model built in float64 and trained in float32
    assert lin.weight.dtype == torch.float32 and pert.inv.dtype == torch.float64
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-2))
    _train(lin, opt, 5)
    assert opt.stats["merges_accepted"] == 5 and pert.validate().ok
    lin.double()  # and back: the float64 master copy returns to the layer
    report = pert.validate()
    assert report.ok and report.figures["base_rounding"] == 0.0


def test_double_after_float32_registration_passes_float64_validation():
    lin, pert = _layer("orthogonal", torch.float32)
    lin.double()
    report = pert.validate()
    assert report.ok and report.figures["orthogonality_error"] < 1e-12


# ---------------------------------------------------------------------- 3. meta-device init
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_meta_device_init_then_load_state_dict(family):
    real, _ = _layer(family)
    with torch.device("meta"):
        lin = torch.nn.Linear(N, N, dtype=torch.float64)
    pert = p4opt.register(lin, "weight", FAMILIES[family]())
    lin.to_empty(device="cpu")
    lin.load_state_dict(real.state_dict())
    x = torch.randn(3, N, dtype=torch.float64)
    assert torch.equal(lin(x), real(x)) and pert.validate().ok


# ------------------------------------------------------------------------------ 4. LBFGS
def test_lbfgs_curvature_pairs_are_dropped_when_a_merge_makes_them_stale():
    lin, pert = _layer("invertible-factored")
    opt = p4opt.P4Optimizer(torch.optim.LBFGS(lin.parameters(), lr=0.5), reset_state=True)
    x = torch.randn(32, N, dtype=torch.float64)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (lin(x) - x.flip(-1)).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.optimizer.state  # LBFGS keeps its history under one parameter
    results = opt.merge()
    assert results[0][1].stale and not opt.optimizer.state
    opt.step(closure)
    assert pert.validate().ok


# --------------------------------------------------------------- 5. validate never raises
def test_validate_reports_a_singular_pending_update_instead_of_raising():
    lin, pert = _layer("invertible")
    with torch.no_grad():
        pert.delta.copy_(-pert.base)  # W = A + Δ = 0
    report = pert.validate()
    assert not report.ok and "singular" in report.problem and "FAILED" in str(report)
    result = pert.merge()  # the merge folds only a fraction that keeps W invertible
    assert result.partial == 1 and result.scale < 1 and pert.validate().ok


# ------------------------------------------------------------ 6. non-finite initial weights
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_initial_weights_are_refused_with_one_message(family, bad):
    lin = torch.nn.Linear(N, N, dtype=torch.float64)
    with torch.no_grad():
        lin.weight[1, 2] = bad
    with pytest.raises(p4opt.P4ValueError, match=r"Linear\.weight has 1 non-finite"):
        p4opt.register(lin, "weight", FAMILIES[family]())


# ---------------------------------------------------------------- 7. requires_grad flags
@pytest.mark.parametrize("trainable", [True, False])
def test_register_and_unregister_keep_the_users_requires_grad(trainable):
    lin = torch.nn.Linear(N, N, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.add_(torch.eye(N, dtype=torch.float64))
    lin.weight.requires_grad_(trainable)
    pert = p4opt.register(lin, "weight", p4opt.Invertible())
    assert all(p.requires_grad == trainable for p in pert.trainable())
    assert p4opt.unregister(lin, "weight").requires_grad == trainable


# ---------------------------------------------------------------------- 8. weight averaging
@pytest.mark.filterwarnings("ignore:merge_every=")  # a mechanism test, not learning
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_weight_averaging_then_refresh_gives_a_feasible_model(family):
    lin, _ = _layer(family)
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-2), merge_every=2)
    swa = AveragedModel(lin, use_buffers=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(8, N, generator=g, dtype=torch.float64)
        (lin(x) - x.flip(-1)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        swa.update_parameters(lin)
    averaged = p4opt.perturbation_of(swa.module, "weight")
    averaged.refresh()  # average, then project and rebuild the bookkeeping
    assert averaged.validate().ok


# --------------------------------------------------------------------- 9. hooks fire once
def test_global_and_own_optimizer_hooks_fire_once_per_call():
    lin, _ = _layer("invertible")
    opt = p4opt.P4Optimizer(torch.optim.SGD(lin.parameters(), lr=1e-2))
    calls: list[str] = []
    handles = [
        register_optimizer_step_pre_hook(lambda *a: calls.append("gpre")),
        register_optimizer_step_post_hook(lambda *a: calls.append("gpost")),
        opt.register_step_pre_hook(lambda o, *a: calls.append(f"pre:{type(o).__name__}")),
        opt.register_step_post_hook(lambda o, *a: calls.append("post")),
        opt.register_state_dict_pre_hook(lambda o: calls.append("sd")),
        opt.register_load_state_dict_post_hook(lambda o: calls.append("load")),
    ]
    try:
        _train(lin, opt, 1)
        opt.load_state_dict(opt.state_dict())
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(calls) == sorted(["gpre", "gpost", "pre:P4Optimizer", "post", "sd", "load"])


# ------------------------------------------------------------------ 10. skip non-finite steps
def test_skip_nonfinite_keeps_the_moments_of_ordinary_parameters_clean():
    lin, pert = _layer("invertible")
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-2), skip_nonfinite=True)
    _train(lin, opt, 2)
    lin(torch.full((1, N), math.nan, dtype=torch.float64)).sum().backward()
    opt.step()
    opt.zero_grad()
    _train(lin, opt, 2)
    assert opt.stats["steps_skipped"] == 1 and opt.stats["steps"] == 4
    assert torch.isfinite(opt.state[lin.bias]["exp_avg"]).all() and pert.validate().ok


def test_skip_nonfinite_steps_with_huge_finite_gradients():
    w = torch.nn.Parameter(torch.zeros(4))
    with pytest.warns(UserWarning, match="no p4opt perturbation"):
        opt = p4opt.P4Optimizer(torch.optim.SGD([w], lr=1e-40), skip_nonfinite=True)
    w.grad = torch.tensor([3e38, 3e38, 0.0, 0.0])  # finite entries whose float32 sum is inf
    opt.step()
    assert opt.stats["steps_skipped"] == 0 and w[0] < 0
    w.grad = torch.tensor([1.0, math.inf, 0.0, 0.0])
    opt.step()
    assert opt.stats["steps_skipped"] == 1


# ----------------------------------------------------------------------- 11. safetensors
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_state_dict_entry_is_a_tensor_and_safetensors_round_trips(family):
    safetensors = pytest.importorskip("safetensors.torch")
    lin, _ = _layer(family)
    _train(lin, p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-2)), 4)
    assert all(isinstance(v, torch.Tensor) for v in lin.state_dict().values())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        safetensors.save_model(lin, path)
        other, pert = _layer(family)
        safetensors.load_model(other, path)
    x = torch.randn(3, N, dtype=torch.float64)
    assert torch.equal(other(x), lin(x)) and pert.validate().ok


# -------------------------------------------------------------------- 0.1 checkpoints load
@pytest.mark.parametrize(
    "family",
    ["invertible", "invertible_float32", "orthogonal_householder", "orthogonal_givens",
     "symmetric", "zerosum"],
)
def test_checkpoints_written_by_version_0_1_still_load(family):
    saved = torch.load(FIXTURES / "checkpoints_v0_1_0.pt", weights_only=True)[family]
    dtype = torch.float32 if family.endswith("float32") else torch.float64
    make = {
        "invertible": lambda: p4opt.Invertible(update="factored", rank=2),
        "invertible_float32": lambda: p4opt.Invertible(update="factored", rank=2),
        "orthogonal_householder": lambda: p4opt.Orthogonal("householder", rank=4),
        "orthogonal_givens": lambda: p4opt.Orthogonal("givens"),
        "symmetric": lambda: p4opt.Symmetric(),
        "zerosum": lambda: p4opt.ZeroSum(dim=0, value=1.0),
    }[family]
    lin = torch.nn.Linear(N, N, dtype=dtype)
    with torch.no_grad():
        lin.weight.add_(torch.eye(N, dtype=dtype))
    pert = p4opt.register(lin, "weight", make())
    lin.load_state_dict(saved["model"])
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-2), merge_every=3)
    if family == "orthogonal_givens":  # 0.1 had one Givens layer: its Adam moments restart
        with pytest.warns(UserWarning, match="angles has another shape"):
            opt.load_state_dict(saved["optimizer"])
        assert not opt.optimizer.state.get(pert.angles)
    else:
        opt.load_state_dict(saved["optimizer"])
    assert torch.allclose(lin(saved["x"]), saved["y"], atol=1e-6, rtol=0)
    assert opt.stats["steps"] == saved["stats"]["steps"] and pert.validate().ok
    _train(lin, opt, 3)  # and training goes on
    assert pert.validate().ok


def test_a_deepcopied_model_gets_its_own_optimizer():
    lin, _ = _layer("invertible")
    twin = copy.deepcopy(lin)
    opt = p4opt.P4Optimizer(torch.optim.Adam(twin.parameters(), lr=1e-2))
    assert [p.where for p in opt.perturbations] == ["Linear.weight"]
    assert opt.perturbations[0] is p4opt.perturbation_of(twin, "weight")
    original = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-2))
    assert original.perturbations[0] is p4opt.perturbation_of(lin, "weight")


# ------------------------------------------------------------------------ silent misuse
def test_training_with_an_unwrapped_optimizer_warns_once():
    lin, _ = _layer("invertible")
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3)  # P4Optimizer forgotten
    with pytest.warns(UserWarning, match="wrap the optimizer in p4opt.P4Optimizer") as caught:
        _train(lin, opt, 120)
    assert len([w for w in caught if "P4Optimizer" in str(w.message)]) == 1


def test_wrapped_training_does_not_warn(recwarn):
    lin, _ = _layer("orthogonal")
    _train(lin, p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=1e-3)), 200)
    assert not [w for w in recwarn if "P4Optimizer" in str(w.message)]


def test_an_optimizer_without_perturbations_warns():
    with pytest.warns(UserWarning, match="found no p4opt perturbation"):
        p4opt.P4Optimizer(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))


def test_passing_the_family_class_says_to_pass_an_instance():
    with pytest.raises(p4opt.P4TypeError, match=r"pass p4opt\.Invertible\(\), not the class"):
        p4opt.register(torch.nn.Linear(3, 3), "weight", p4opt.Invertible)  # type: ignore[arg-type]


def test_double_registration_names_the_users_class_once():
    lin, _ = _layer("invertible")
    with pytest.raises(p4opt.RegistrationError) as info:
        p4opt.register(lin, "weight", p4opt.Invertible())
    message = str(info.value)
    assert "Parametrized" not in message and message.count("Linear.weight") == 1
    assert "p4opt.unregister" in message


def test_invertible_on_a_conv_kernel_larger_than_one_is_refused():
    conv = torch.nn.Conv2d(4, 4, 3)
    with pytest.raises(p4opt.ShapeError, match="1x1"):
        p4opt.register(conv, "weight", p4opt.Invertible())


@pytest.mark.parametrize("other", [5, "orthogonal"])
def test_a_mismatched_checkpoint_is_refused_before_anything_is_copied(other):
    lin, pert = _layer("invertible")
    if other == "orthogonal":
        source, _ = _layer("orthogonal")
    else:
        source = torch.nn.Linear(other, other, dtype=torch.float64)
        with torch.no_grad():
            source.weight.add_(3 * torch.eye(other, dtype=torch.float64))
        p4opt.register(source, "weight", p4opt.Invertible())
    before = {k: v.clone() for k, v in lin.state_dict().items() if "parametrizations" in k}
    with pytest.raises(p4opt.RegistrationError, match="nothing of the perturbation was loaded"):
        lin.load_state_dict(source.state_dict())
    after = lin.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()) and pert.validate().ok


def test_unregister_refuses_a_non_finite_current_tensor():
    lin, pert = _layer("invertible-factored", torch.float32)
    with torch.no_grad():
        pert.U.fill_(1e20)
        pert.V.fill_(1e20)
    with pytest.raises(p4opt.RegistrationError, match="not finite"):
        p4opt.unregister(lin, "weight")
    assert pert.is_registered and torch.isfinite(pert.base).all()
    pert.merge()  # drops the overflowing update
    assert torch.isfinite(p4opt.unregister(lin, "weight")).all()


def test_a_structure_the_dtype_cannot_hold_is_refused_at_registration():
    # the projection of this float16 weight needs -1e5 in each column, beyond float16's range:
    # the overflow gave an infinite tolerance, and -inf registered as the base
    lin = torch.nn.Linear(6, 6, bias=False, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.fill_(6e4)
        lin.weight[5].fill_(-6e4)
    with pytest.raises(p4opt.P4ValueError, match="cannot hold the structure"):
        p4opt.register(lin, "weight", p4opt.ZeroSum(dim=0))
    assert torch.isfinite(lin.weight).all() and not list(p4opt.perturbations(lin))


def test_large_bfloat16_entries_hold_a_zero_sum_to_their_own_rounding():
    # a case the bad-input campaign found: bfloat16 entries near 1e30 cannot sum to zero
    # exactly; the tolerance is relative to the entries (four epsilons), so they register
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        noise = 0.3 * torch.randn(6, 6, generator=g, dtype=torch.float64)
        value = (noise + 2 * torch.eye(6, dtype=torch.float64)) * 1e30
        lin = torch.nn.Linear(6, 6, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(value)
        pert = p4opt.register(lin, "weight", p4opt.ZeroSum(dim=0))
        report = pert.validate()
        assert report.ok and 0 < report.figures["residual"] < 0.05 * 3e30, report


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_float32_householder_weight_stays_orthogonal_with_more_reflections_than_n_over_2(scale):
    # k = 2n reflection vectors in pairs that drifted apart (what long training produces): the
    # WY product in float32 was off by ~1e-6; the layer's weight must stay within a few float32
    # epsilons of orthogonal, as the soak's goal of 1e-6 requires with room to spare
    lin = torch.nn.Linear(64, 64, bias=False)
    pert = p4opt.register(lin, "weight", p4opt.Orthogonal(seed=0))
    n, k = pert.vectors.shape
    assert k == 2 * n
    g = torch.Generator().manual_seed(1)
    anchors = torch.randn(n, k // 2, generator=g).repeat_interleave(2, 1)
    with torch.no_grad():
        pert.vectors.copy_(scale * (anchors + 0.01 * torch.randn(n, k, generator=g)))
    w = lin.weight.detach().double()
    error = float((w.mT @ w - torch.eye(n, dtype=torch.float64)).abs().max())
    assert error < 3e-7
    assert pert.validate().ok


# ------------------------------------------------------------------ half-precision layers
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "make",
    [
        lambda: p4opt.Invertible(seed=0),
        lambda: p4opt.Invertible(rank=1, seed=0),  # the range finder's Cholesky QR
        lambda: p4opt.SpecialLinear(seed=0),
        lambda: p4opt.PositiveDefinite(seed=0),
        lambda: p4opt.ZeroSum(dim=0, value=1.0, seed=0),
        lambda: p4opt.Orthogonal("cayley", seed=0),
    ],
    ids=["invertible", "invertible-rank1", "special-linear", "positive-definite", "zerosum",
         "orthogonal-cayley"],
)
def test_half_precision_layers_train_and_pass_validation(make, dtype):
    # found by trying every family on float16 / bfloat16 weights: log|det| of Invertible and
    # SpecialLinear (its gradient, from the pending LU factors) had no half-precision solve, and
    # ZeroSum's fixed 1e-3 tolerance sat below one bfloat16 rounding of its entries
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8, bias=False, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(2 * torch.eye(8, dtype=dtype) + 0.1 * torch.randn(8, 8).to(dtype))
    pert = p4opt.register(lin, "weight", make())
    assert pert.validate().ok
    opt = p4opt.P4Optimizer(torch.optim.SGD(lin.parameters(), lr=1e-2), merge_every=5)
    x = torch.randn(16, 8).to(dtype)
    y = x.flip(-1).float()
    first = None
    for _ in range(40):
        loss = (lin(x).float() - y).square().mean()
        if hasattr(pert, "logabsdet"):
            loss = loss - pert.logabsdet().float().sum()
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.stats["merges_accepted"] >= 4 and opt.stats["merges_rejected"] == 0
    assert float(loss.detach()) < first
    report = pert.validate()
    assert report.ok, report


def test_a_dtype_move_that_would_overflow_the_base_is_refused():
    # found by the bad-input campaign: a float64 Fixed layer trained with a huge learning rate
    # held entries of 1e41; model.float() turned its base into inf
    lin = torch.nn.Linear(4, 4, bias=False, dtype=torch.float64)
    mask = torch.eye(4, dtype=torch.bool)
    pert = p4opt.register(lin, "weight", p4opt.Fixed(mask))
    with torch.no_grad():
        pert.base.mul_(1e41)
    before = pert.base.clone()
    with pytest.raises(p4opt.P4ValueError, match="would round its base to infinity"):
        lin.float()
    assert pert.base.dtype == torch.float64 and torch.equal(pert.base, before)
    with torch.no_grad():
        pert.base.div_(1e41)
    lin.float()  # in range: moves
    assert pert.base.dtype == torch.float32 and pert.validate().ok


def test_a_checkpoint_of_another_structure_with_the_same_shapes_is_refused_before_copying():
    # found by the bad-input campaign: Fixed's state dict loaded into a ZeroSum layer raised
    # torch's "unexpected keys" only after copying the shared base, which broke the zero sum
    source = torch.nn.Linear(3, 3, bias=False, dtype=torch.float64)
    p4opt.register(source, "weight", p4opt.Fixed(torch.eye(3, dtype=torch.bool)))
    lin = torch.nn.Linear(3, 3, bias=False, dtype=torch.float64)
    pert = p4opt.register(lin, "weight", p4opt.ZeroSum(dim=0))
    before = pert.base.clone()
    with pytest.raises(p4opt.RegistrationError, match="entries this perturbation does not have"):
        lin.load_state_dict(source.state_dict())
    assert torch.equal(pert.base, before) and pert.validate().ok
