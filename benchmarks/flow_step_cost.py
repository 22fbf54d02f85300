"""Step cost of the paper's P⁴Inv flow (200 layers of 2×2) ÷ a RealNVP flow of equal size.

One training step = zero_grad, log-likelihood of a batch under a standard-normal
base, backward, optimizer step (the P⁴Inv flow through ``P4Optimizer`` with its
merges). The flows are timed side by side in one run with interleaved
repetitions; the reported figure is the ratio of medians. Also timed: the same
stack with the torch-only loops (``native=False``, 4 tiny kernels per layer) and
the unfused reference (``Flow`` of 200 ``InvertibleLinear`` + ``BentIdentity``).

    PYTHONPATH=. python benchmarks/flow_step_cost.py --help
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

import p4opt
from p4opt.nn import (
    BentIdentity,
    Flow,
    InvertibleLinear,
    InvertibleLinearStack,
    _native,
    realnvp_with_params,
)
from p4opt.studies.timing import interleaved_median


def log_likelihood(flow: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    z, ladj = flow.forward_and_log_det(x)
    return (-0.5 * z.square().sum(-1) - math.log(2 * math.pi) + ladj).mean()


def make_step(
    flow: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad()
        (-log_likelihood(flow, x)).backward()
        opt.step()

    return step


def n_trainable(flow: torch.nn.Module) -> int:
    return sum(p.numel() for p in flow.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=200, help="P⁴Inv layers (2×2 each)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repetition")
    parser.add_argument("--no-unfused", action="store_true", help="skip the unfused reference")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 2)
    stack = InvertibleLinearStack(2, args.layers)
    size = n_trainable(stack)
    nvp = realnvp_with_params(2, size)
    flows: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {
        "p4inv_stack": (stack, p4opt.P4Optimizer(torch.optim.Adam(stack.parameters(), lr=1e-3))),
        "realnvp": (nvp, torch.optim.Adam(nvp.parameters(), lr=1e-3)),
    }
    eager = InvertibleLinearStack(2, args.layers, native=False)
    opt = p4opt.P4Optimizer(torch.optim.Adam(eager.parameters(), lr=1e-3))
    flows["p4inv_stack_eager"] = (eager, opt)
    if not args.no_unfused:
        mods: list[torch.nn.Module] = []
        for i in range(args.layers):
            mods += [InvertibleLinear(2)] + ([BentIdentity()] if i < args.layers - 1 else [])
        looped = Flow(mods)
        opt = p4opt.P4Optimizer(torch.optim.Adam(looped.parameters(), lr=1e-3))
        flows["p4inv_unfused"] = (looped, opt)
    steps = {name: make_step(f, o, x) for name, (f, o) in flows.items()}
    med = interleaved_median(steps, calls=args.steps, repeats=args.reps, warmup=3)
    native = _native.available(x)
    print(
        f"threads={torch.get_num_threads()} batch={args.batch} layers={args.layers} "
        f"compiled loops available={native}"
    )
    print(f"{'flow':<18}{'params':>8}{'ms/step':>10}{'÷ realnvp':>11}")
    for name, (flow, _) in flows.items():
        ratio = med[name] / med["realnvp"]
        print(f"{name:<18}{n_trainable(flow):>8}{1e3 * med[name]:>10.3f}{ratio:>11.2f}")


if __name__ == "__main__":
    main()
