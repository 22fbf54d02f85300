"""Invertible 1×1 convolutions: P⁴Inv (``p4opt.nn.InvertibleConv1x1``) against Glow's LU form.

Task: maximum likelihood of images whose channels are a fixed random mix of independent
Gaussians; the flow is one 1×1 convolution and the target is the relative excess negative
log-likelihood 1e-4 (the optimum is :math:`W = \\Sigma^{-1/2}` up to rotation). Reported, side
by side in one run and as ratios to the LU convolution: steps and wall time to the target (best
learning rate of a grid, median over seeds), the cost of a training step and of an inverse pass.

Examples
--------
python benchmarks/conv1x1.py                  # channels 16 and 64, 3 seeds
python benchmarks/conv1x1.py --channels 32 --seeds 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import p4opt
from p4opt.nn import InvertibleConv1x1
from p4opt.studies.timing import interleaved_median


class LUConv1x1(torch.nn.Module):
    """Glow's LU-decomposed 1×1 convolution: :math:`W = P L (U + \\mathrm{diag}(s))`."""

    def __init__(self, channels: int, generator: torch.Generator) -> None:
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels, generator=generator))[0]
        p, lower, upper = torch.linalg.lu(w)
        self.register_buffer("p", p)
        self.lower = torch.nn.Parameter(lower)
        self.upper = torch.nn.Parameter(torch.triu(upper, 1))
        self.log_s = torch.nn.Parameter(upper.diagonal().abs().log())
        self.register_buffer("sign_s", upper.diagonal().sign())
        eye = torch.eye(channels)
        self.register_buffer("mask_l", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", eye)

    def weight(self) -> torch.Tensor:
        lower = self.lower * self.mask_l + self.eye
        upper = self.upper * self.mask_l.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.p @ lower @ upper

    def forward_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = (x.movedim(1, -1) @ self.weight().mT).movedim(-1, 1)
        return y, (x[0, 0].numel() * self.log_s.sum()).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        lower = self.lower * self.mask_l + self.eye
        upper = self.upper * self.mask_l.T + torch.diag(self.sign_s * self.log_s.exp())
        flat = y.movedim(1, -1).reshape(-1, y.shape[1])
        cols = self.p.T @ flat.T  # P^T y for every position, then two triangular solves
        z = torch.linalg.solve_triangular(lower, cols, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper, z, upper=True)
        return x.T.reshape(y.movedim(1, -1).shape).movedim(-1, 1)


def data(channels: int, seed: int, batch: int = 64, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.rand(channels, generator=g) * 2 - 1)
    mix = torch.linalg.qr(torch.randn(channels, channels, generator=g))[0] * scales
    return torch.einsum("oc,bchw->bohw", mix, torch.randn(batch, channels, size, size, generator=g))


def build(method: str, channels: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    if method == "p4inv":
        layer = InvertibleConv1x1(channels)
        return layer, p4opt.P4Optimizer(torch.optim.Adam(layer.parameters(), lr=1e-2))
    layer = LUConv1x1(channels, torch.Generator().manual_seed(seed))
    return layer, torch.optim.Adam(layer.parameters(), lr=1e-2)


def nll(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    z, ladj = layer.forward_and_log_det(x)
    return (0.5 * z.square().sum((1, 2, 3)) - ladj).mean() / x[0, 0].numel()


def steps_to_target(method: str, channels: int, lr: float, seed: int, cap: int) -> tuple:
    x = data(channels, seed)
    cov = torch.einsum("bchw,bdhw->cd", x, x).double() / (x.shape[0] * x[0, 0].numel())
    best = 0.5 * channels + 0.5 * float(torch.linalg.slogdet(cov)[1])
    layer, opt = build(method, channels, seed)
    for group in opt.param_groups:
        group["lr"] = lr
    first = float(nll(layer, x).detach()) - best
    start = time.perf_counter()
    for step in range(cap):
        loss = nll(layer, x)
        if (float(loss.detach()) - best) / first < 1e-4:
            return step, time.perf_counter() - start
        opt.zero_grad()
        loss.backward()
        opt.step()
    return None, None


def timings(channels: int) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per training step and per inverse pass of both layers, timed side by side."""
    x = data(channels, 0)
    layers = {m: build(m, channels, 0) for m in ("lu", "p4inv")}

    def step(m: str) -> None:
        layer, opt = layers[m]
        loss = nll(layer, x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def inverse(m: str) -> None:
        with torch.no_grad():
            layers[m][0].inverse(x)

    cost = interleaved_median({m: (lambda m=m: step(m)) for m in layers})
    return cost, interleaved_median({m: (lambda m=m: inverse(m)) for m in layers})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 64],
                        help="channel counts (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (default: %(default)s)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1],
                        help="learning-rate grid (default: %(default)s)")
    parser.add_argument("--cap", type=int, default=600, help="step cap (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| channels | method | best lr | steps (median) | time to target / LU | step / LU "
          "| inverse pass / LU |")
    print("|---|---|---|---|---|---|---|")
    for c in args.channels:
        rows = {}
        for method in ("lu", "p4inv"):
            best = None
            for lr in args.lrs:
                runs = [steps_to_target(method, c, lr, s, args.cap) for s in range(args.seeds)]
                if all(r[0] is not None for r in runs):
                    steps = statistics.median(r[0] for r in runs)
                    secs = statistics.median(r[1] for r in runs)
                    if best is None or steps < best[1]:
                        best = (lr, steps, secs)
            rows[method] = best
        cost, inv = timings(c)
        for m in ("lu", "p4inv"):
            r = rows[m]
            lr, steps, secs = ("-", "-", None) if r is None else r
            ratio = "-" if secs is None or rows["lu"] is None else f"{secs / rows['lu'][2]:.2f}"
            print(f"| {c} | {m} | {lr} | {steps} | {ratio} | {cost[m] / cost['lu']:.2f} "
                  f"| {inv[m] / inv['lu']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
