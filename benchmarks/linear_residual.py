"""Constraint residual over a long float32 run and step cost of every linear structure.

Every structure trains an ``n x n`` float32 weight (no bias) with Adam through
``p4opt.P4Optimizer`` (default merge interval) on a regression task. After
*every* step the residual ``max |C vec(W) - d|`` of the current weight is
measured (outside the timer). All runs advance in lockstep, in chunks of
``--chunk`` steps; the time of each chunk is divided by the time of the same
chunk of a plain ``nn.Linear`` trained with plain Adam (interleaved, so load
changes hit both), and the median ratio is reported. The dense fallback
(``LinearStructure(C, d)``) needs a ``p x k`` basis, so it runs at
``--dense-n`` (default 32, ``n`` random constraints with unit-norm rows)
against its own ``nn.Linear`` of that size.

    python benchmarks/linear_residual.py                  # 10^4 steps, n = 256
    python benchmarks/linear_residual.py --steps 500      # quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import p4opt
from p4opt.studies.progress import Progress


def _structures(n: int, dense_n: int, gen: torch.Generator) -> dict[str, tuple[int, object]]:
    mask = torch.rand(n, n, generator=gen) < 0.5
    C = torch.randn(dense_n, dense_n * dense_n, generator=gen, dtype=torch.float64)
    C = C / C.norm(dim=1, keepdim=True)  # unit rows: the residual is a distance to each hyperplane
    d = torch.randn(dense_n, generator=gen, dtype=torch.float64)
    return {
        "Symmetric": (n, p4opt.Symmetric()),
        "ZeroSum(0, 1.0)": (n, p4opt.ZeroSum(dim=0, value=1.0)),
        "Circulant": (n, p4opt.Circulant()),
        "Circulant(total=1)": (n, p4opt.Circulant(total=1.0)),
        "Fixed(50%)": (n, p4opt.Fixed(mask)),
        f"dense C ({dense_n}x{dense_n * dense_n})": (dense_n, p4opt.LinearStructure(C, d)),
    }


class Run:
    """One model, its optimizer and its data, advanced one step at a time."""

    def __init__(self, n: int, structure: object | None, batch: int, lr: float, seed: int) -> None:
        torch.manual_seed(seed)
        self.n = n
        self.layer = nn.Linear(n, n, bias=False)
        self.pert = None if structure is None else p4opt.register(self.layer, "weight", structure)
        base = torch.optim.Adam(self.layer.parameters(), lr=lr)
        self.opt = base if structure is None else p4opt.P4Optimizer(base)
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, n, generator=gen)
        self.y = self.x @ torch.randn(n, n, generator=gen).mul_(n**-0.5)
        self.max_residual = 0.0
        self.seconds = 0.0

    def step(self) -> None:
        start = time.perf_counter()
        loss = (self.layer(self.x) - self.y).square().mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.seconds += time.perf_counter() - start
        self.loss = loss.item()
        if self.pert is not None:
            self.max_residual = max(self.max_residual, self.pert.residual())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256,
                        help="matrix size of the presets (default: %(default)s)")
    parser.add_argument("--dense-n", type=int, default=32,
                        help="matrix size of the dense case (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10_000,
                        help="training steps per run (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=50,
                        help="steps per timed chunk (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="batch (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the table as JSON here (default: not written)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    runs = {"nn.Linear": Run(args.n, None, args.batch, args.lr, 0)}
    if args.dense_n != args.n:
        runs[f"nn.Linear (n={args.dense_n})"] = Run(args.dense_n, None, args.batch, args.lr, 0)
    for name, (n, structure) in _structures(args.n, args.dense_n, gen).items():
        runs[name] = Run(n, structure, args.batch, args.lr, 0)
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    chunks = range(0, args.steps, args.chunk)
    report_every = max(1, len(chunks) // 20)  # about 20 progress lines on stderr
    progress = Progress(len(chunks), "linear_residual")
    for index, done in enumerate(chunks, start=1):
        spent = {}
        for name, run in runs.items():
            before = run.seconds
            for _ in range(args.chunk):
                run.step()
            spent[name] = run.seconds - before
        for name, run in runs.items():
            ref = "nn.Linear" if run.n == args.n else f"nn.Linear (n={args.dense_n})"
            ratios[name].append(spent[name] / spent[ref])
        if index % report_every == 0 or index == len(chunks):
            progress.done(f"{min(done + args.chunk, args.steps)}/{args.steps} steps",
                          units=index - progress.count)
    progress.close()

    rows = []
    print(f"{args.steps} Adam steps, float32, batch {args.batch}, threads {args.threads}")
    print(f"{'structure':<26}{'n':>5}{'free':>8}{'max residual':>15}{'final loss':>12}"
          f"{'step ratio':>12}")
    for name, run in runs.items():
        free = sum(p.numel() for p in run.layer.parameters() if p.requires_grad)
        ratio = statistics.median(ratios[name])
        res = run.max_residual if run.pert is not None else None  # no constraint to keep
        shown = "n/a" if res is None else f"{res:.2e}"
        print(f"{name:<26}{run.n:>5}{free:>8}{shown:>15}{run.loss:>12.4g}{ratio:>12.2f}")
        rows.append({"structure": name, "n": run.n, "free": free, "max_residual": res,
                     "final_loss": run.loss, "step_ratio": ratio,
                     "ms_per_step": 1e3 * run.seconds / args.steps})
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
