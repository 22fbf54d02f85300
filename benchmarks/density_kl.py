"""KL of 2-D density flows: the P⁴Inv flow, the same architecture with dense weights, RealNVP.

The P⁴Inv flow is ``p4opt.nn.InvertibleLinearStack`` (200 layers of 2×2 weights with bent
identities between them) at the library's defaults, trained through ``p4opt.P4Optimizer``. The
"dense" flow is the same architecture with unconstrained weights and ``torch.linalg.slogdet``
(the ceiling the P⁴Inv flow approaches). RealNVP has the same number of trainable parameters.
Every flow trains with Adam and a cosine schedule on fresh batches; each takes its best
learning rate from one grid (by median KL over seeds); the KL is the test NLL minus the
dataset's entropy.

Examples
--------
python benchmarks/density_kl.py --steps 300 --datasets two_moons     # a quick look
python benchmarks/density_kl.py --steps 3000 --seeds 2                # the documented run
python benchmarks/density_kl.py --methods dense --jitter 1e-7          # the spread chaos gives
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import p4opt
from p4opt import datasets as D
from p4opt.nn import InvertibleLinearStack, realnvp_with_params

METHODS = ("p4inv", "dense", "realnvp")


class DenseStack(InvertibleLinearStack):
    """The P⁴Inv flow's architecture with plain weights: log|det| by ``slogdet`` per step."""

    def __init__(self, n: int, layers: int) -> None:
        super().__init__(n, layers)
        p4opt.unregister(self, "weight")

    def log_det(self) -> torch.Tensor:
        return torch.linalg.slogdet(self.weight)[1]


def build(method: str, layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
    if method == "p4inv":
        return InvertibleLinearStack(2, layers), None
    if method == "dense":
        return DenseStack(2, layers), None
    size = sum(p.numel() for p in InvertibleLinearStack(2, layers).parameters() if p.requires_grad)
    return realnvp_with_params(2, size), None


def log_likelihood(flow: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    z, ladj = flow.forward_and_log_det(x)
    return -0.5 * z.square().sum(-1) - math.log(2 * math.pi) + ladj


def run(method: str, name: str, lr: float, seed: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    flow, _ = build(method, args.layers)
    if args.jitter and method in ("p4inv", "dense"):
        # a perturbation at the level of float32 rounding: how far training's own chaos
        # spreads the final KL, the yardstick for differences between the two stack flows
        noise = torch.Generator().manual_seed(20_000 + seed)
        with torch.no_grad():
            flow.bias.add_(args.jitter * torch.randn(flow.bias.shape, generator=noise))
    inner = torch.optim.Adam(flow.parameters(), lr=lr)
    opt = p4opt.P4Optimizer(inner) if method == "p4inv" else inner
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    g = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    for _ in range(args.steps):
        x = D.sample(name, args.batch, g).float()
        loss = -log_likelihood(flow, x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    test = D.sample(name, args.test, torch.Generator().manual_seed(10_000 + seed)).float()
    with torch.no_grad():
        nll = float(torch.cat([-log_likelihood(flow, c) for c in test.split(4096)]).mean())
    kl = nll - D.entropy(name).value
    record = {"method": method, "dataset": name, "lr": lr, "seed": seed, "kl": kl,
              "jitter": args.jitter,
              "ms_per_step": 1e3 * seconds / args.steps}
    if method == "p4inv":
        record["merges"] = opt.stats  # type: ignore[union-attr]
        record["validate_ok"] = flow.perturbation.validate().ok
    return record


def best_rows(records: list[dict]) -> list[dict]:
    """Per (dataset, method): the lr with the lowest median KL over seeds."""
    rows = []
    for name in dict.fromkeys(r["dataset"] for r in records):
        row = {"dataset": name}
        for method in METHODS:
            mine = [r for r in records if r["dataset"] == name and r["method"] == method]
            by_lr: dict[float, list[float]] = {}
            for r in mine:
                kl = r["kl"] if math.isfinite(r["kl"]) else math.inf
                by_lr.setdefault(r["lr"], []).append(kl)
            if by_lr:
                lr, kls = min(by_lr.items(), key=lambda item: statistics.median(item[1]))
                row[method] = {"lr": lr, "kl": statistics.median(kls)}
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(D.NAMES),
                        help="comma-separated names (default: all six)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    parser.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--layers", type=int, default=200, help="linear layers (default 200)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 5e-3, 1e-2],
                        help="learning-rate grid (default 2e-3 5e-3 1e-2)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per setting (default 1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="first seed: runs seeds first..first+seeds-1 (default 0)")
    parser.add_argument("--test", type=int, default=20_000, help="held-out samples")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--jitter", type=float, default=0.0,
                        help="add this times N(0, 1) noise to the stack flows' initial biases "
                             "(e.g. 1e-7, float32 rounding: the spread chaos alone gives)")
    parser.add_argument("--out", default="results/density_kl.json", help="JSON output")
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = []
    names, methods = args.datasets.split(","), args.methods.split(",")
    total = len(names) * len(methods) * len(args.lrs) * args.seeds
    for name in names:
        for method in methods:
            for lr in args.lrs:
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    records.append(run(method, name, lr, seed, args))
                    r = records[-1]
                    print(f"[{len(records)}/{total}] {name} {method} lr={lr:g} seed={seed}: "
                          f"KL {r['kl']:.4f} ({r['ms_per_step']:.1f} ms/step)",
                          file=sys.stderr, flush=True)
    rows = best_rows(records)
    print(f"\nKL (test NLL - entropy), best lr per method, median over {args.seeds} seed(s), "
          f"{args.steps} steps, batch {args.batch}")
    print("| dataset | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for row in rows:
        cells = [f"{row[m]['kl']:.3f} (lr {row[m]['lr']:g})" for m in methods if m in row]
        print(f"| {row['dataset']} | " + " | ".join(cells) + " |")
    if "p4inv" in methods and "realnvp" in methods:
        wins = sum(row["p4inv"]["kl"] <= row["realnvp"]["kl"] for row in rows)
        print(f"\nP4Inv flow at or below RealNVP's KL on {wins} of {len(rows)} datasets")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "records": records, "best": rows}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
