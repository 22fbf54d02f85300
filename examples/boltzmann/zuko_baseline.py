"""The RealNVP a Boltzmann-generator user installs today: ``zuko.flows.RealNVP`` of the same size.

Wrapped with the interface of :class:`boltzmann.models.BoltzmannGenerator` so that the same
trainer and evaluation run it: ``layers`` couplings with alternating masks and SiLU networks of
the same widths, hence the same number of parameters as the ``rnvp`` model. zuko bounds the
coupling scales with its own monotonic affine map and samples from torch's global generator.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boltzmann.coordinates import InternalCoordinates
from boltzmann.models import ModelConfig

__all__ = ["ZukoGenerator"]


class ZukoGenerator(nn.Module):
    """Latent normal -> zuko RealNVP⁻¹ -> internal coordinates⁻¹ -> Cartesian."""

    def __init__(self, coordinates: InternalCoordinates, cfg: ModelConfig) -> None:
        super().__init__()
        import zuko

        self.coordinates, self.dim = coordinates, coordinates.n_features
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            self.flow = zuko.flows.RealNVP(self.dim, transforms=cfg.layers,
                                           hidden_features=[cfg.hidden] * cfg.depth,
                                           activation=nn.SiLU)

    def log_prob_features(self, f: torch.Tensor) -> torch.Tensor:
        return self.flow().log_prob(f)

    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x (n, 66), log q(x))``; ``generator`` is ignored (zuko draws from torch's)."""
        f, log_q = self.flow().rsample_and_log_prob((n,))
        x, ladj = self.coordinates.inverse(f.to(torch.float64))
        return x, log_q.double() - ladj

    def mixing_layers(self) -> list[nn.Module]:
        return []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=ModelConfig.layers)
    parser.add_argument("--hidden", type=int, default=ModelConfig.hidden)
    args = parser.parse_args(argv)
    model = ZukoGenerator(InternalCoordinates(), ModelConfig(layers=args.layers,
                                                             hidden=args.hidden))
    n = sum(p.numel() for p in model.flow.parameters())
    log_p0 = float(model.log_prob_features(torch.zeros(1, model.dim)).detach())
    print(f"zuko RealNVP: {n} parameters; log p(0) = {log_p0:.3f} "
          f"(standard normal: {-0.5 * model.dim * math.log(2 * math.pi):.3f})")


if __name__ == "__main__":
    main()
