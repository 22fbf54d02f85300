"""Orthogonality error of ``p4opt.Orthogonal`` after many random merges (float64 default).

Each merge draws random reflection vectors (or Givens angles) of unit scale, folds them into the
base and resets; every ``correct_every`` merges the family re-orthonormalizes. Prints
``||Q^T Q - I||_max`` and ``det Q`` at the end (and along the way).

    python benchmarks/orthogonal_accuracy.py                 # 10^4 merges, n = 64
    python benchmarks/orthogonal_accuracy.py --merges 100000 # the full study
"""

from __future__ import annotations

import argparse
import time

import torch

import p4opt
from p4opt import linalg_orthogonal as lo


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--merges", type=int, default=10_000)
    parser.add_argument("--method", choices=["householder", "givens"], default="householder")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--correct-every", type=int, default=50)
    parser.add_argument("--scale", type=float, default=0.5, help="std of the random update")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    lin = torch.nn.Linear(args.n, args.n, bias=False, dtype=dtype)
    kwargs = {"rank": args.rank} if args.rank is not None else {}
    pert = p4opt.register(lin, "weight", p4opt.Orthogonal(
        args.method, correct_every=args.correct_every, seed=0, **kwargs))
    g = torch.Generator().manual_seed(1)
    (param,) = pert.trainable()
    t0, rejected, worst = time.perf_counter(), 0, 0.0
    for i in range(1, args.merges + 1):
        with torch.no_grad():
            param.add_(args.scale * torch.randn(param.shape, generator=g, dtype=torch.float64))
        rejected += not pert.merge().accepted
        if i % 97 == 0:  # sampled at all phases of the correction cycle
            worst = max(worst, float(lo.orthogonality_error(lin.weight.detach().to(torch.float64))))
        if i % max(1, args.merges // 10) == 0 or i == args.merges:
            q = lin.weight.detach().to(torch.float64)
            err = float(lo.orthogonality_error(q))
            worst = max(worst, err)
            print(f"merge {i:>7}: ||Q^T Q - I||_max = {err:.2e}, det = {float(torch.det(q)):+.12f}",
                  flush=True)
    print(f"{args.method} n={args.n} {args.dtype}: {args.merges} merges ({rejected} rejected), "
          f"final orthogonality error {err:.2e}, worst sampled {worst:.2e}, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
