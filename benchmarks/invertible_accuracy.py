"""Accuracy of P⁴Inv bookkeeping after many random accepted merges.

A random walk of rank-k updates with a weak pull towards the identity (so the
matrix stays invertible but wanders far from its start) is merged ``--merges``
times; every ``--check-every`` merges the tracked inverse and log|det| are
compared with dense linear algebra on the layer's actual weight:
``max |W·W⁻¹ − I|`` and ``|log|det W| − slogdet(W)|``.

Example: ``python benchmarks/invertible_accuracy.py --n 256 --merges 100000``
(about a few minutes on 2 cores; the default is a short run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import p4opt


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--merges", type=int, default=10_000, help="accepted merges to run")
    parser.add_argument("--check-every", type=int, default=2_000)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="dtype of the layer (bookkeeping is always float64)")
    parser.add_argument("--correct-every", type=int, default=50)
    parser.add_argument("--step", type=float, default=0.05, help="size of the random updates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    return parser.parse_args()


def errors(lin: torch.nn.Linear, pert: p4opt.Invertible) -> dict[str, float]:
    w = lin.weight.detach().double()
    eye = torch.eye(w.shape[0], dtype=torch.float64)
    inv_err = float((w @ pert.inverse().detach() - eye).abs().amax())
    sign, lad = torch.linalg.slogdet(w)
    lad_err = float((pert.logabsdet().detach() - lad).abs())
    return {
        "inverse_error": inv_err,
        "logabsdet_error": lad_err if float(pert.sign()) == float(sign) else float("inf"),
        "condition": float(torch.linalg.cond(w)),
        "logabsdet": float(lad),
    }


def main() -> None:
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    n, k = args.n, args.rank
    lin = torch.nn.Linear(n, n, bias=False, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / n**0.5)
    pert = p4opt.register(
        lin, "weight",
        p4opt.Invertible(rank=k, update="factored", correct_every=args.correct_every,
                         seed=args.seed),
    )  # the factored rule: the walk writes U against the drawn V
    eye = torch.eye(n, dtype=torch.float64)
    history, accepted, rejected = [], 0, 0
    start = time.perf_counter()
    merge = 0
    while accepted < args.merges:
        merge += 1
        with torch.no_grad():
            v = pert.V.detach().double()
            noise = args.step * torch.randn(n, k, generator=gen, dtype=torch.float64) / n**0.5
            pull = -0.02 * (pert._matrix() - eye) @ v @ torch.linalg.pinv(v.mT @ v)
            pert.U.copy_(noise + pull)
        result = pert.merge()
        accepted += result.accepted
        rejected += not result.accepted
        if merge % args.check_every == 0 or accepted == args.merges:
            row = {"merges": merge, "accepted": accepted, "rejected": rejected, **errors(lin, pert)}
            history.append(row)
            print(
                f"merge {merge:>7}: inverse error {row['inverse_error']:.2e}, "
                f"log|det| error {row['logabsdet_error']:.2e}, cond {row['condition']:.1f}, "
                f"accepted {accepted}, rejected {rejected}",
                flush=True,
            )
    elapsed = time.perf_counter() - start
    final = history[-1]
    print(
        f"\nafter {accepted} accepted merges ({rejected} rejected; n={n}, rank={k}, "
        f"{args.dtype} layer, correction every {args.correct_every}): "
        f"max|W·W⁻¹ − I| = {final['inverse_error']:.2e}, "
        f"|log|det| − slogdet| = {final['logabsdet_error']:.2e}  ({elapsed:.0f} s)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                        "history": history}, indent=2))


if __name__ == "__main__":
    main()
