"""DDP load: two gloo ranks train one model of every family for many steps; are they identical?

Each rank seeds torch differently (``torch.manual_seed(1000 + rank)``, as many scripts do) and
reads its own data; ``DistributedDataParallel`` averages the gradients, ``p4opt.P4Optimizer``
merges on its schedule (``--merge-every``). At the end each rank saves the model's state dict
(bases, trainable tensors, float64 inverses and master copies, random draws), the wrapped
optimizer's state and the wrapper's counters; the script prints, per entry, the largest
difference between the ranks (goal: 0 everywhere) and the merge counts.

    python benchmarks/ddp_load.py                     # 1,000 steps, merge every 5 steps
    python benchmarks/ddp_load.py --steps 200 --merge-every 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import p4opt

__all__ = ["build", "compare", "run"]

FAMILIES = {
    "invertible": lambda: p4opt.Invertible(rank=4),
    "invertible_factored": lambda: p4opt.Invertible(update="factored", rank=2),
    "householder": lambda: p4opt.Orthogonal("householder", rank=4),
    "givens": lambda: p4opt.Orthogonal("givens"),
    "cayley": lambda: p4opt.Orthogonal("cayley"),
    "positive_definite": lambda: p4opt.PositiveDefinite(rank=4),
    "special_linear": lambda: p4opt.SpecialLinear(rank=4),
    "symmetric": lambda: p4opt.Symmetric(),
    "zerosum": lambda: p4opt.ZeroSum(dim=0, value=1.0),
    "circulant": lambda: p4opt.Circulant(),
}


def build(n: int) -> nn.Sequential:
    """One float32 layer per family (same start on every rank), tanh in between."""
    gen = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    for make in FAMILIES.values():
        lin = nn.Linear(n, n)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(n) + 0.2 * torch.randn(n, n, generator=gen))
            lin.bias.zero_()
        p4opt.register(lin, "weight", make())
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers)


def _worker(rank: int, world: int, init: str, out: str, steps: int, n: int, every: int) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(1000 + rank)  # a different seed per rank
    model = build(n)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = p4opt.P4Optimizer(torch.optim.Adam(ddp.parameters(), lr=1e-3), merge_every=every)
    gen = torch.Generator().manual_seed(rank)  # each rank its own data
    target = torch.randn(n, n, generator=torch.Generator().manual_seed(7)) / n**0.5
    for _ in range(steps):
        x = torch.randn(16, n, generator=gen)
        loss = (ddp(x) - torch.tanh(x @ target)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for pid, slot in opt.optimizer.state.items():
        for key, value in slot.items():
            if isinstance(value, torch.Tensor):
                state[f"optimizer.{_name(model, pid)}.{key}"] = value.clone()
    for key, value in opt.stats.items():
        state[f"counter.{key}"] = torch.tensor(value)
    for name, pert in p4opt.perturbations(model):
        state[f"validate.{name}"] = torch.tensor(pert.validate().ok)
        state[f"counter.{name}.merges"] = torch.as_tensor(pert.merges).clone()
    torch.save(state, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _name(model: nn.Module, param: torch.Tensor) -> str:
    for name, p in model.named_parameters():
        if p is param:
            return name
    return "?"


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference per entry (``inf`` for a missing entry or another shape)."""
    diffs = {}
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
            diffs[key] = float("inf")
        elif x.is_floating_point():
            diffs[key] = 0.0 if torch.equal(x, y) else float((x - y).abs().max())
        else:
            diffs[key] = 0.0 if torch.equal(x, y) else float("inf")
    return diffs


def run(steps: int = 1000, n: int = 16, every: int = 5) -> dict[str, object]:
    """Spawn two ranks, train, compare; return the differences and counters."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        mp.spawn(_worker, args=(2, init, tmp, steps, n, every), nprocs=2, join=True)
        r0, r1 = (torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2))
    diffs = compare(r0, r1)
    counters = {k: int(v) for k, v in r0.items() if k.startswith("counter.")}
    valid = {k: bool(r0[k]) and bool(r1[k]) for k in r0 if k.startswith("validate.")}
    return {"diffs": diffs, "counters": counters, "valid": valid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (1000)")
    parser.add_argument("--n", type=int, default=16, help="layer size (16)")
    parser.add_argument("--merge-every", type=int, default=5, help="merge interval (5)")
    args = parser.parse_args()
    result = run(args.steps, args.n, args.merge_every)
    diffs = result["diffs"]
    for key, diff in diffs.items():  # type: ignore[union-attr]
        print(f"{diff:10.3g}  {key}")
    groups: dict[str, float] = {}
    for key, diff in diffs.items():  # type: ignore[union-attr]
        kind = "buffer/base" if key.startswith("model.") else key.split(".")[0]
        groups[kind] = max(groups.get(kind, 0.0), diff)
    print("entries compared:", len(diffs))  # type: ignore[arg-type]
    print("max difference between ranks:", json.dumps(groups))
    print("counters:", json.dumps(result["counters"]))
    print("validate ok on both ranks:", all(result["valid"].values()))  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
