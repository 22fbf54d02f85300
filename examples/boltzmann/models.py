"""The two Boltzmann generators: RealNVP with channel swaps, and the same with P⁴Inv mixing.

Both flows are ``layers`` affine couplings (``p4opt.nn.AffineCoupling``, parity 0, identical
networks and initial weights) separated by a mixing layer: the fixed even/odd swap
(``p4opt.nn.Permutation``; the stack then equals ``p4opt.nn.realnvp``) or a
``p4opt.nn.P4InvMixing`` that starts as that swap and is trained by P⁴Inv. The flow maps
internal-coordinate features to a standard normal latent; sampling runs it backwards and then
the internal-coordinate transform to Cartesian coordinates.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import p4opt.nn as pnn

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boltzmann.coordinates import InternalCoordinates

__all__ = ["ModelConfig", "build_flow", "BoltzmannGenerator", "KINDS"]

KINDS = ("rnvp", "p4inv")


@dataclass(frozen=True)
class ModelConfig:
    """Flow sizes; ``invertible`` holds options for ``p4opt.Invertible`` (bounds, seed...)."""

    layers: int = 8
    hidden: int = 64
    depth: int = 2
    scale_bound: float = 2.0
    rank: int | None = None
    bias: bool = True
    seed: int = 0
    invertible: dict[str, Any] = field(default_factory=dict)


def build_flow(kind: str, n: int, cfg: ModelConfig) -> pnn.Flow:
    """``layers`` couplings with a swap (``kind="rnvp"``) or P⁴Inv mixing (``"p4inv"``) between.

    The coupling networks are drawn from a generator seeded by ``cfg.seed``, so both kinds
    start with identical couplings (and compute the same function before training).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    layers: list[nn.Module] = []
    with torch.random.fork_rng():  # the couplings initialize from torch's global generator
        torch.manual_seed(cfg.seed)
        couplings = [pnn.AffineCoupling(n, 0, cfg.hidden, cfg.depth, cfg.scale_bound)
                     for _ in range(cfg.layers)]
    for i, coupling in enumerate(couplings):
        layers.append(coupling)
        if i == cfg.layers - 1:
            break
        if kind == "rnvp":
            layers.append(pnn.Permutation(n))
        else:
            options = {"seed": cfg.seed * 1000 + i} | cfg.invertible
            layers.append(pnn.P4InvMixing(n, rank=cfg.rank, bias=cfg.bias, **options))
    return pnn.Flow(layers)


class BoltzmannGenerator(nn.Module):
    """Latent normal -> flow⁻¹ -> internal coordinates⁻¹ -> Cartesian, with exact log q(x).

    Parameters
    ----------
    flow : p4opt.nn.Flow
        Maps features ``(B, d)`` to latent ``(B, d)``.
    coordinates : InternalCoordinates
        The fitted Cartesian <-> feature transform (``d = coordinates.n_features``).
    """

    def __init__(self, flow: pnn.Flow, coordinates: InternalCoordinates) -> None:
        super().__init__()
        self.flow, self.coordinates = flow, coordinates
        self.dim = coordinates.n_features

    def _log_normal(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * z.square().sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)

    def log_prob_features(self, f: torch.Tensor) -> torch.Tensor:
        """Log-density of features ``(B, d)``; the maximum-likelihood objective. Shape ``(B,)``."""
        z, ladj = self.flow.forward_and_log_det(f)
        return self._log_normal(z) + ladj

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of Cartesian frames ``(B, 66)`` on the superposed manifold, ``(B,)``."""
        f, ladj = self.coordinates(x)
        return self.log_prob_features(f.to(x.dtype)) + ladj

    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x (n, 66) float64 in nm, log q(x) (n,))``; differentiable in the flow's weights."""
        dtype = next(self.flow.parameters()).dtype
        z = torch.randn(n, self.dim, generator=generator, dtype=dtype)
        f, ladj_flow = self.flow.inverse_and_log_det(z)
        x, ladj_ic = self.coordinates.inverse(f.to(torch.float64))
        return x, self._log_normal(z).double() - ladj_flow.double() - ladj_ic

    def mixing_layers(self) -> list[pnn.P4InvMixing]:
        return [m for m in self.flow if isinstance(m, pnn.P4InvMixing)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=ModelConfig.layers)
    parser.add_argument("--hidden", type=int, default=ModelConfig.hidden)
    parser.add_argument("--dim", type=int, default=60, help="feature dimension")
    args = parser.parse_args(argv)
    cfg = ModelConfig(layers=args.layers, hidden=args.hidden)
    for kind in KINDS:
        flow = build_flow(kind, args.dim, cfg)
        n_par = sum(p.numel() for p in flow.parameters() if p.requires_grad)
        n_coupling = sum(p.numel() for m in flow if isinstance(m, pnn.AffineCoupling)
                         for p in m.parameters())
        print(f"{kind}: {len(flow)} layers, {n_par} trainable parameters "
              f"({n_coupling} in couplings)")


if __name__ == "__main__":
    main()
