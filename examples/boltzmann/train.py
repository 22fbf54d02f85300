"""Training, side by side: maximum likelihood on MD frames, then energy-based (reverse KL) training.

Every model gets its own ``Trainer``; ``train_side_by_side`` alternates their steps, so both
see the same machine load and their step times can be compared as a ratio. Checkpoints of all
trainers (weights, optimizer with its P⁴ schedule, data generator, step counter, step times)
are written every ``checkpoint_every`` steps and picked up again when the run restarts.

Reverse KL: :math:`\\mathbb{E}_{x \\sim q}[u(x) + \\log q(x)]` with the energy :math:`u` (kT)
from OpenMM, softened above ``energy_cut`` (linear below, logarithmic above) so that clashing
samples do not dominate the gradient; samples with a non-finite energy are left out.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import p4opt

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boltzmann.energy import OpenMMEnergy
from boltzmann.models import BoltzmannGenerator
from boltzmann.progress import Progress

__all__ = ["PhaseConfig", "Trainer", "train_side_by_side", "linlog_cut"]


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase: ``"ml"`` (density estimation) or ``"kl"`` (energy-based).

    In the ``"kl"`` phase, ``ml_weight`` adds that multiple of the maximum-likelihood loss on a
    data batch of ``batch`` frames (0 = pure reverse KL).
    """

    kind: str = "ml"
    steps: int = 1000
    batch: int = 256
    lr: float = 1e-3
    ml_weight: float = 0.0
    energy_cut: float = 1e3
    clip: float | None = 1e3
    merge_every: int | None = None


def linlog_cut(u: torch.Tensor, cut: float) -> torch.Tensor:
    """:math:`u` below ``cut``, :math:`c + \\log(1 + u - c)` above (continuous, monotone)."""
    return torch.where(u < cut, u, cut + torch.log1p((u - cut).clamp_min(0.0)))


class Trainer:
    """One model in one phase: ``step()`` runs one optimizer step and returns its figures."""

    def __init__(
        self, model: BoltzmannGenerator, cfg: PhaseConfig, features: torch.Tensor,
        energy: OpenMMEnergy | None = None, seed: int = 0,
    ) -> None:
        if cfg.kind not in ("ml", "kl"):
            raise ValueError(f"PhaseConfig.kind must be 'ml' or 'kl', got {cfg.kind!r}")
        if cfg.kind == "kl" and energy is None:
            raise ValueError("the 'kl' phase needs an energy")
        self.model, self.cfg, self.features, self.energy = model, cfg, features, energy
        params = [p for p in model.flow.parameters() if p.requires_grad]
        kwargs = {} if cfg.merge_every is None else {"merge_every": cfg.merge_every}
        adam = torch.optim.Adam(params, lr=cfg.lr)
        has_p4 = any(True for _ in p4opt.perturbations(model.flow))
        self.opt = p4opt.P4Optimizer(adam, **kwargs) if has_p4 else adam
        self.gen = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.times: list[float] = []

    def _ml_loss(self) -> torch.Tensor:
        idx = torch.randint(len(self.features), (self.cfg.batch,), generator=self.gen)
        return -self.model.log_prob_features(self.features[idx]).mean()

    def _kl_loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        x, log_q = self.model.sample(self.cfg.batch, self.gen)
        u = self.energy(x)
        ok = torch.isfinite(u) & torch.isfinite(log_q)
        loss = (linlog_cut(u[ok], self.cfg.energy_cut) + log_q[ok]).mean()
        figures = {"median_u": float(u.detach().median()), "finite": float(ok.float().mean())}
        if self.cfg.ml_weight > 0:
            loss = loss + self.cfg.ml_weight * self._ml_loss()
        return loss, figures

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self.opt.zero_grad()
        if self.cfg.kind == "ml":
            loss, figures = self._ml_loss(), {}
        else:
            loss, figures = self._kl_loss()
        loss.backward()
        if self.cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.opt.param_groups[0]["params"], self.cfg.clip)
        if math.isfinite(float(loss.detach())):
            self.opt.step()
        self.times.append(time.perf_counter() - t0)
        self.step_count += 1
        return {"loss": float(loss.detach())} | figures

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "gen": self.gen.get_state(), "step": self.step_count, "times": self.times}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        self.step_count, self.times = state["step"], list(state["times"])


def train_side_by_side(
    trainers: dict[str, Trainer], steps: int, checkpoint: Path | None = None,
    checkpoint_every: int = 200, every: int = 100, desc: str = "train",
) -> dict[str, list[float]]:
    """Alternate one step of each trainer until each has ``steps``; return losses per name.

    Resumes from ``checkpoint`` when it exists (same names), and writes it every
    ``checkpoint_every`` steps and at the end.
    """
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        if set(saved) == set(trainers):
            for name, trainer in trainers.items():
                trainer.load_state_dict(saved[name])
    start = min(t.step_count for t in trainers.values())
    losses: dict[str, list[float]] = {name: [] for name in trainers}
    with Progress(steps, desc, every=every, initial=start) as bar:
        for k in range(start, steps):
            figures = {}
            for name, trainer in trainers.items():
                out = trainer.step()
                losses[name].append(out["loss"])
                figures[name] = out["loss"]
            bar.update(1, **figures)
            done = k + 1 == steps or (k + 1) % checkpoint_every == 0
            if checkpoint is not None and done:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                tmp = checkpoint.with_suffix(".tmp")
                torch.save({n: t.state_dict() for n, t in trainers.items()}, tmp)
                tmp.replace(checkpoint)
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__ + "\nThe whole study (data, training, evaluation) is run.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print("nothing to do on its own: run examples/boltzmann/run.py (--quick or --full)")


if __name__ == "__main__":
    main()
