"""2-D density estimation: the paper's P⁴Inv flow against RealNVP of the same size.

For every dataset, trains a P⁴Inv flow (stacked 2×2 P⁴Inv layers with bent-identity
activations, ``p4opt.nn.InvertibleLinearStack``) and a RealNVP flow with the same
number of trainable parameters, with the same steps, batch and optimizer (Adam;
the P⁴Inv flow through ``p4opt.P4Optimizer``). Reports test NLL − entropy (an
estimate of KL(data ‖ model), 0 = perfect) on held-out samples and the wall time
per step, and saves a figure grid (rows: datasets; columns: data | RealNVP |
P⁴Inv densities) and a JSON file of the figures.

    PYTHONPATH=. python examples/density_2d.py                # small run, a few minutes
    PYTHONPATH=. python examples/density_2d.py --full         # paper-size training
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.distributions import Independent, Normal

import p4opt
import p4opt.datasets as D
from p4opt.nn import InvertibleLinearStack, flow_distribution, realnvp_with_params

LIM = 4.5


def log_likelihood(flow: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample log p(x) under a standard-normal base; the flow maps data to latent."""
    base = Independent(Normal(torch.zeros(2, dtype=x.dtype), torch.ones(2, dtype=x.dtype)), 1)
    return flow_distribution(flow, base).log_prob(x)


def train(
    flow: torch.nn.Module, opt: torch.optim.Optimizer, name: str, args: argparse.Namespace
) -> float:
    """Train on fresh batches; return the median wall time per step (seconds)."""
    g = torch.Generator().manual_seed(args.seed + 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    times = []
    for _ in range(args.steps):
        x = D.sample(name, args.batch, g).float()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = -log_likelihood(flow, x).mean()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        sched.step()
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def test_nll(flow: torch.nn.Module, x: torch.Tensor) -> float:
    return float(torch.cat([-log_likelihood(flow, c) for c in x.split(4096)]).mean())


@torch.no_grad()
def density_grid(flow: torch.nn.Module, res: int) -> torch.Tensor:
    axis = torch.linspace(-LIM, LIM, res)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    return torch.cat([log_likelihood(flow, c) for c in pts.split(8192)]).exp().reshape(res, res)


def run_dataset(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    p4 = InvertibleLinearStack(2, args.layers)
    size = sum(p.numel() for p in p4.parameters() if p.requires_grad)
    nvp = realnvp_with_params(2, size)
    flows = {
        "p4inv": (p4, p4opt.P4Optimizer(torch.optim.Adam(p4.parameters(), lr=args.lr))),
        "realnvp": (nvp, torch.optim.Adam(nvp.parameters(), lr=args.lr)),
    }
    test = D.sample(name, args.test, torch.Generator().manual_seed(args.seed + 2)).float()
    h = D.entropy(name)
    row: dict = {"dataset": name, "entropy": h.value, "entropy_stderr": h.stderr}
    for key, (flow, opt) in flows.items():
        step = train(flow, opt, name, args)
        nll = test_nll(flow, test)
        row[key] = {
            "params": sum(p.numel() for p in flow.parameters() if p.requires_grad),
            "test_nll": nll,
            "kl": nll - h.value,
            "ms_per_step": 1e3 * step,
        }
        if isinstance(opt, p4opt.P4Optimizer):
            row[key]["merges"] = opt.stats
        row[key]["grid"] = density_grid(flow, args.res)
    return row


def save_figure(rows: list[dict], path: Path, res: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows, strict=True):
        data = D.sample(row["dataset"], 100_000, torch.Generator().manual_seed(7))
        ax_row[0].hist2d(*data.T.numpy(), bins=res, range=[[-LIM, LIM]] * 2, cmap="viridis")
        for ax, key in zip(ax_row[1:], ("realnvp", "p4inv"), strict=True):
            grid = row[key]["grid"].numpy()
            ax.imshow(grid, origin="lower", extent=[-LIM, LIM] * 2, cmap="viridis")
            ax.set_title(f"{key}: KL {row[key]['kl']:.3f}", fontsize=8)
        ax_row[0].set_ylabel(row["dataset"], fontsize=9)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("data", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(D.NAMES), help="comma-separated names")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1000)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 256)")
    parser.add_argument("--layers", type=int, default=200, help="P⁴Inv layers (paper: 200)")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--test", type=int, default=20000, help="held-out samples")
    parser.add_argument("--res", type=int, default=120, help="density grid resolution")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--full", action="store_true", help="paper-size: 10000 steps, batch 1000")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    args = parser.parse_args()
    args.steps = args.steps or (10000 if args.full else 1000)
    args.batch = args.batch or (1000 if args.full else 256)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"steps={args.steps} batch={args.batch} layers={args.layers} lr={args.lr}")
    header = f"{'dataset':<16}{'entropy':>16}{'KL realnvp':>12}{'KL p4inv':>10}"
    print(header + f"{'ms/step nvp':>13}{'ms/step p4':>12}{'ratio':>7}")
    for name in args.datasets.split(","):
        row = run_dataset(name.strip(), args)
        rows.append(row)
        a, b = row["realnvp"], row["p4inv"]
        ent = f"{row['entropy']:.3f}±{row['entropy_stderr']:.3f}"
        print(
            f"{row['dataset']:<16}{ent:>16}{a['kl']:>12.3f}{b['kl']:>10.3f}"
            f"{a['ms_per_step']:>13.2f}{b['ms_per_step']:>12.2f}"
            f"{b['ms_per_step'] / a['ms_per_step']:>7.2f}",
            flush=True,
        )
    save_figure(rows, out / "density_2d.png", args.res)
    for row in rows:
        for key in ("realnvp", "p4inv"):
            row[key].pop("grid")
    (out / "density_2d.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"figure: {out / 'density_2d.png'}; numbers: {out / 'density_2d.json'}")


if __name__ == "__main__":
    main()
