"""Bad-input campaign: generated misuse and hostile training runs over every family.

Hypothesis draws each case: a family (Invertible projected and factored, Orthogonal householder,
givens and cayley, PositiveDefinite, SpecialLinear, Symmetric, ZeroSum, Circulant, Fixed, a dense
LinearStructure), a tensor shape (square, rectangular, 1-D, stacks), a dtype (float16, bfloat16,
float32, float64, int32), a rank, an optimizer with a learning rate up to 1e6 and a loss scale up
to 1e8, NaN/Inf injected at a random step, a singular or near-singular update put in place before a
merge, and one kind of misuse (a state dict from another model, registering twice, unregistering
twice). Every case ends in one of four outcomes:

* ``clear error``: a ``p4opt.P4Error`` that also subclasses the matching builtin, with the
  model's bases still finite and feasible;
* ``recovered``: no error, every base finite and feasible (its pending update dropped, the
  report of ``validate()`` passing);
* ``other error``: an exception that is not a ``P4Error`` (for example torch's own size check
  in ``load_state_dict``), with the model's bases still finite and feasible (listed);
* ``corrupted``: some base is non-finite or infeasible (listed; goal 0).

Each failure is printed with the case's parameters as JSON; ``--case JSON`` replays one.

    python benchmarks/bad_input_campaign.py                 # 1,000 cases
    python benchmarks/bad_input_campaign.py --cases 200 --seed 3
    python benchmarks/bad_input_campaign.py --case '{"family": "symmetric", ...}'
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import traceback
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import p4opt

__all__ = ["FAMILY_NAMES", "draw_case", "run_case", "campaign"]

FAMILY_NAMES = (
    "invertible",
    "invertible-factored",
    "orthogonal-householder",
    "orthogonal-givens",
    "orthogonal-cayley",
    "positive-definite",
    "special-linear",
    "symmetric",
    "zerosum",
    "circulant",
    "fixed",
    "linear-dense",
)
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int32": torch.int32,
}
BUILTINS = (ValueError, TypeError, RuntimeError)


# --------------------------------------------------------------------------- drawing
@st.composite
def draw_case(draw: Any) -> dict[str, Any]:
    """One case's parameters (JSON-serializable, so a failure can be replayed)."""
    n = draw(st.integers(2, 7))
    shape = draw(
        st.sampled_from(["square"] * 6 + ["rectangular", "vector", "stack", "scalar"])
    )
    return {
        "family": draw(st.sampled_from(FAMILY_NAMES)),
        "n": n,
        "shape": shape,
        "dtype": draw(st.sampled_from(["float64"] * 3 + ["float32"] * 3 + list(DTYPES))),
        "rank": draw(st.one_of(st.none(), st.integers(0, n + 2))),
        "init": draw(st.sampled_from(["good"] * 4 + ["zeros", "huge", "tiny", "nonfinite"])),
        "optimizer": draw(st.sampled_from(["sgd", "adam"])),
        "lr": 10.0 ** draw(st.floats(-4, 6)),
        "loss_scale": 10.0 ** draw(st.floats(0, 8)),
        "steps": draw(st.integers(1, 10)),
        "merge_every": draw(st.one_of(st.none(), st.integers(1, 4))),
        "skip_nonfinite": draw(st.booleans()),
        "inject": draw(st.sampled_from([None, None, "nan-loss", "inf-loss", "nan-grad"])),
        "inject_step": draw(st.integers(0, 9)),
        "update": draw(st.sampled_from([None, None, "singular", "near-singular", "huge"])),
        "misuse": draw(
            st.sampled_from(
                [None] * 4
                + ["load-other-n", "load-other-family", "load-optimizer-other",
                   "register-twice", "unregister-twice", "dtype-move"]
            )
        ),
        "seed": draw(st.integers(0, 2**16)),
    }


# --------------------------------------------------------------------------- building
def _family(name: str, case: dict[str, Any], numel: int) -> p4opt.Perturbation:
    rank, seed = case["rank"], case["seed"]
    gen = torch.Generator().manual_seed(seed)
    if name == "invertible":
        return p4opt.Invertible(rank=rank, seed=seed)
    if name == "invertible-factored":
        return p4opt.Invertible(rank=rank, update="factored", seed=seed)
    if name == "orthogonal-householder":
        return p4opt.Orthogonal("householder", rank=rank, seed=seed)
    if name == "orthogonal-givens":
        return p4opt.Orthogonal("givens", rank=rank, seed=seed)
    if name == "orthogonal-cayley":  # no rank: the generator is dense
        return p4opt.Orthogonal("cayley", seed=seed)
    if name == "positive-definite":
        return p4opt.PositiveDefinite(rank=rank, seed=seed)
    if name == "special-linear":
        return p4opt.SpecialLinear(rank=rank, seed=seed)
    if name == "symmetric":
        return p4opt.Symmetric(seed=seed)
    if name == "zerosum":
        return p4opt.ZeroSum(dim=seed % 2, value=1.0, seed=seed)
    if name == "circulant":
        return p4opt.Circulant(seed=seed)
    if name == "fixed":
        n = case["n"]
        return p4opt.Fixed(torch.rand(n, n, generator=gen) > 0.5, seed=seed)
    n = case["n"]
    rows = 1 + seed % 3
    c = torch.randn(rows, n * n, generator=gen, dtype=torch.float64)
    return p4opt.LinearStructure(c, torch.zeros(rows, dtype=torch.float64), seed=seed)


def _tensor(case: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    n, shape = case["n"], case["shape"]
    dims = {
        "square": (n, n),
        "rectangular": (n, n + 1),
        "vector": (n,),
        "stack": (2, n, n),
        "scalar": (),
    }[shape]
    eye = torch.eye(n, dtype=torch.float64)
    value = 0.3 * torch.randn(dims, generator=gen, dtype=torch.float64)
    if len(dims) >= 2 and dims[-1] == dims[-2]:
        value = value + 2 * eye
    init = case["init"]
    if init == "zeros":
        value = torch.zeros(dims, dtype=torch.float64)
    elif init == "huge":
        value = value * 1e30
    elif init == "tiny":
        value = value * 1e-30
    elif init == "nonfinite" and value.numel():
        value.view(-1)[0] = math.nan
    dtype = DTYPES[case["dtype"]]
    return value.to(dtype) if dtype.is_floating_point else value.round().to(dtype)


class _Model(nn.Module):
    """A weight of the drawn shape and a bias-free readout, so every shape can be trained."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=weight.is_floating_point())
        self.extra = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.ndim >= 2 and w.shape[-1] == x.shape[-1]:
            out = (x.to(w.dtype) @ w.mT).to(torch.float64)
        else:
            out = w.to(torch.float64).sum().expand(x.shape[0], 1) * x
        return out.square().mean() + self.extra.sum() ** 2


def _build(case: dict[str, Any], family: str | None = None) -> tuple[_Model, Any]:
    gen = torch.Generator().manual_seed(case["seed"])
    model = _Model(_tensor(case, gen))
    numel = model.weight.numel()
    pert = p4opt.register(model, "weight", _family(family or case["family"], case, numel))
    return model, pert


# --------------------------------------------------------------------------- one case
def _bad_update(pert: p4opt.Perturbation, how: str) -> None:
    """Put a singular, near-singular or huge pending update in place (families that allow it)."""
    with torch.no_grad():
        if isinstance(pert, p4opt.Invertible):
            a = torch.nan_to_num(pert._matrix())
            if pert.update == "factored":
                v = torch.nan_to_num(pert.V.to(torch.float64))  # V may hold an earlier NaN
                try:
                    u = -(a @ v) @ torch.linalg.pinv(v.mT @ v)  # C = I + V^T A^-1 U = 0
                except torch.linalg.LinAlgError:  # the harness's own SVD: no such update here
                    return
                factor = {"singular": 1.0, "near-singular": 1 - 1e-9, "huge": -1e12}[how]
                pert.U.copy_((factor * u).to(pert.U.dtype))
            else:
                col = torch.zeros_like(a)
                col[..., :, 0] = a[..., :, 0]  # A + delta has a zero (or tiny) first column
                factor = {"singular": -1.0, "near-singular": -(1 - 1e-9), "huge": 1e12}[how]
                pert.delta.copy_((factor * col).to(pert.delta.dtype))
        else:
            for p in pert.trainable():
                fill = {"singular": 0.0, "near-singular": 1e-300, "huge": 1e12}[how]
                p.fill_(min(fill, torch.finfo(p.dtype).max))


def _step_all(model: _Model, opt: torch.optim.Optimizer, case: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    n = case["n"]
    for step in range(case["steps"]):
        if case["update"] and step == case["steps"] - 1:
            _bad_update(p4opt.perturbation_of(model, "weight"), case["update"])
        x = torch.randn(8, n, generator=gen, dtype=torch.float64)
        loss = model(x) * case["loss_scale"]
        if case["inject"] == "nan-loss" and step == case["inject_step"]:
            loss = loss * math.nan
        if case["inject"] == "inf-loss" and step == case["inject_step"]:
            loss = loss * math.inf
        opt.zero_grad()
        loss.backward()
        if case["inject"] == "nan-grad" and step == case["inject_step"]:
            for p in p4opt.perturbation_of(model, "weight").trainable():
                if p.grad is not None:
                    p.grad.view(-1)[0] = math.nan
        opt.step()


def _optimizer(model: nn.Module, case: dict[str, Any]) -> p4opt.P4Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if case["optimizer"] == "sgd":
        inner: torch.optim.Optimizer = torch.optim.SGD(params, lr=case["lr"], momentum=0.9)
    else:
        inner = torch.optim.Adam(params, lr=case["lr"])
    return p4opt.P4Optimizer(
        inner, merge_every=case["merge_every"], skip_nonfinite=case["skip_nonfinite"]
    )


def _misuse(model: _Model, opt: p4opt.P4Optimizer, case: dict[str, Any]) -> None:
    misuse = case["misuse"]
    if misuse == "register-twice":
        p4opt.register(model, "weight", _family(case["family"], case, model.weight.numel()))
    elif misuse == "unregister-twice":
        p4opt.unregister(model, "weight")
        p4opt.unregister(model, "weight")
    elif misuse == "load-other-n":
        other, _ = _build(dict(case, n=case["n"] + 1))
        model.load_state_dict(other.state_dict())
    elif misuse == "load-other-family":
        names = [f for f in FAMILY_NAMES if f != case["family"]]
        other, _ = _build(case, family=names[case["seed"] % len(names)])
        model.load_state_dict(other.state_dict())
    elif misuse == "load-optimizer-other":
        other, _ = _build(dict(case, n=case["n"] + 1))
        other_opt = _optimizer(other, case)
        _step_all(other, other_opt, dict(case, inject=None, update=None, steps=2))
        opt.load_state_dict(other_opt.state_dict())
    elif misuse == "dtype-move":
        model.to(torch.float32 if case["dtype"] == "float64" else torch.float64)
        opt.optimizer.state.clear()  # moments of the old dtype (torch's Adam cannot mix them)


def _feasible(model: _Model) -> tuple[bool, str]:
    """Every base finite and feasible: drop the pending update, then the family's report."""
    for _, pert in list(p4opt.perturbations(model)):
        if not bool(torch.isfinite(pert.base).all()):
            return False, f"{pert.where}: non-finite base"
        pert.identity()
        report = pert.validate()
        if not report.ok:
            return False, f"{pert.where}: {report}"
    weight = model.weight
    if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
        return False, "model.weight is non-finite after unregistering"
    return True, ""


def run_case(case: dict[str, Any]) -> tuple[str, str]:
    """Run one case; return ``(outcome, detail)`` with outcome one of the four in the doc."""
    model = None
    error: BaseException | None = None
    torch.manual_seed(case["seed"])
    try:
        model, _ = _build(case)
        opt = _optimizer(model, case)
        _step_all(model, opt, case)
        _misuse(model, opt, case)
        _step_all(model, opt, dict(case, inject=None, update=None, steps=2))
    except Exception as exc:  # noqa: BLE001 - every exception is classified below
        error = exc
    if model is not None:
        try:
            ok, why = _feasible(model)
        except Exception as exc:  # noqa: BLE001
            ok, why = False, "checking the model raised " + "".join(
                traceback.format_exception_only(exc)
            ).strip()
        if not ok:
            return "corrupted", why
    if error is None:
        return "recovered", ""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, p4opt.P4Error) and isinstance(error, BUILTINS):
        return "clear error", text
    return "other error", text


# --------------------------------------------------------------------------- campaign
def campaign(cases: int, seed: int = 0, verbose: bool = False) -> dict[str, Any]:
    """Run ``cases`` generated cases; return the counts and every failure with its case."""
    counts: collections.Counter[str] = collections.Counter()
    failures: list[dict[str, Any]] = []
    errors: collections.Counter[str] = collections.Counter()

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        phases=[__import__("hypothesis").Phase.generate],
    )
    @given(draw_case())
    def one(case: dict[str, Any]) -> None:
        outcome, detail = run_case(case)
        counts[outcome] += 1
        if outcome == "clear error":
            errors[detail.split(":")[0]] += 1
        if outcome in ("other error", "corrupted"):
            failures.append({"outcome": outcome, "detail": detail, "case": case})
            if verbose:
                print(outcome, detail, json.dumps(case))

    one = __import__("hypothesis").seed(seed)(one)
    one()
    return {"cases": sum(counts.values()), "counts": dict(counts), "errors": dict(errors),
            "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="generated cases (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed")
    parser.add_argument("--case", type=str, default=None, help="replay one case given as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.case:
        print(run_case(json.loads(args.case)))
        return
    result = campaign(args.cases, args.seed, verbose=True)
    counts = result["counts"]
    print(f"cases: {result['cases']}")
    for key in ("clear error", "recovered", "other error", "corrupted"):
        print(f"  {key:12s} {counts.get(key, 0)}")
    print("clear errors by type:", json.dumps(result["errors"], sort_keys=True))
    for failure in result["failures"]:
        print(json.dumps(failure))


if __name__ == "__main__":
    main()
