"""Evaluation: energy statistics of generated samples, Ramachandran plots, P⁴Inv inverse error.

The reference columns are the training data and the training data perturbed by Gaussian noise
of 0.004 nm on every coordinate. "Low-energy fraction" is the fraction of samples whose
reduced energy lies below the training set's maximum.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boltzmann.data import dihedral
from boltzmann.energy import OpenMMEnergy
from boltzmann.models import BoltzmannGenerator
from boltzmann.system import PHI, PSI

__all__ = ["energy_stats", "sample", "evaluate", "plot_energies", "plot_ramachandran"]

NOISE_NM = 0.004


@torch.no_grad()
def sample(model: BoltzmannGenerator, n: int, gen: torch.Generator,
           chunk: int = 2000) -> np.ndarray:
    """``n`` Cartesian samples ``(n, 66)`` in nm (float64)."""
    parts = [model.sample(min(chunk, n - i), gen)[0] for i in range(0, n, chunk)]
    return torch.cat(parts).numpy()


def energy_stats(u: np.ndarray, u_max_train: float, u_median_train: float) -> dict[str, float]:
    """Median, mean of finite energies, low-energy fraction and median shift (kT)."""
    finite = u[np.isfinite(u)]
    return {
        "median": float(np.median(u)),
        "median_shift": float(np.median(u) - u_median_train),
        "mean_finite": float(finite.mean()) if finite.size else math.inf,
        "low_energy_fraction": float((u < u_max_train).mean()),
        "finite_fraction": float(finite.size / u.size),
    }


def torsions(x: np.ndarray) -> np.ndarray:
    """Backbone ``(phi, psi)`` in radians, shape ``(N, 2)``."""
    pos = x.reshape(len(x), -1, 3)
    return np.stack([dihedral(pos, PHI), dihedral(pos, PSI)], -1)


def evaluate(
    models: dict[str, BoltzmannGenerator], x_train: np.ndarray, x_test: np.ndarray,
    energy: OpenMMEnergy, n_samples: int, seed: int = 0,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Figures (JSON-ready) and the sample arrays for the plots.

    Energies of ``n_samples`` samples per model, of ``n_samples`` training frames and of the
    same frames perturbed by 0.004 nm; test-set negative log-likelihood (features, nats; mean
    and median over frames) and the largest ``||W W^-1 - I||_max`` over each model's P⁴Inv layers.
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    u_train_all = energy.energies_and_forces(x_train)[0]
    ref = x_train[rng.choice(len(x_train), min(n_samples, len(x_train)), replace=False)]
    noisy = ref + NOISE_NM * rng.standard_normal(ref.shape)
    xs = {"data": ref, "data + 0.004 nm": noisy}
    xs |= {name: sample(m, n_samples, gen) for name, m in models.items()}
    us = {name: energy.energies_and_forces(x)[0] for name, x in xs.items()}
    u_max, u_med = float(u_train_all.max()), float(np.median(u_train_all))
    figures: dict[str, Any] = {"train_max_energy": u_max, "train_median_energy": u_med,
                               "energies": {k: energy_stats(u, u_max, u_med)
                                            for k, u in us.items()}}
    figures["phi_positive"] = {k: float((torsions(x)[:, 0] > 0).mean()) for k, x in xs.items()}
    nll, nll_median, inv_err = {}, {}, {}
    with torch.no_grad():
        for name, m in models.items():
            f = m.coordinates(torch.as_tensor(x_test))[0].float()
            per_frame = -m.log_prob_features(f)
            nll[name], nll_median[name] = float(per_frame.mean()), float(per_frame.median())
            layers = m.mixing_layers()
            if layers:
                inv_err[name] = max(layer.inverse_error() for layer in layers)
    figures["test_nll"], figures["test_nll_median"] = nll, nll_median
    figures["inverse_error_max"] = inv_err
    arrays = {f"x/{k}": v for k, v in xs.items()} | {f"u/{k}": v for k, v in us.items()}
    return figures, arrays


def plot_energies(us: dict[str, np.ndarray], u_max: float, path: Path,
                  title: str = "") -> None:
    """Violin plot of reduced energies per column, clipped at ``u_max + 60`` for display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = u_max + 60.0
    names = list(us)
    clipped = [np.clip(np.nan_to_num(us[k], nan=top, posinf=top), None, top) for k in names]
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 1, 4))
    ax.violinplot(clipped, showmedians=True)
    ax.axhline(u_max, color="k", lw=0.8, ls="--", label="max energy of the training set")
    for i, k in enumerate(names):
        low = float((us[k] < u_max).mean())
        ax.text(i + 1, top + 3, f"{100 * low:.0f}%", ha="center", fontsize=9)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylabel("reduced energy u [kT] (clipped)")
    ax.set_ylim(None, top + 12)
    ax.set_title(title or "energies of samples (numbers: low-energy fraction)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ramachandran(xs: dict[str, np.ndarray], path: Path) -> None:
    """Joint histograms of (phi, psi), one panel per entry, log colour scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, len(xs), figsize=(3.2 * len(xs), 3.2), squeeze=False)
    for ax, (name, x) in zip(axes[0], xs.items(), strict=True):
        t = torsions(x)
        ax.hist2d(t[:, 0], t[:, 1], bins=60, range=[[-np.pi, np.pi]] * 2, norm=LogNorm(),
                  cmap="viridis")
        ax.set_title(name)
        ax.set_xlabel("phi")
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("psi")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__ + "\nRedraws the figures of a finished run from its samples.npz.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="e.g. results/boltzmann/quick")
    args = parser.parse_args(argv)
    with np.load(args.run_dir / "samples.npz") as f:
        arrays = dict(f)
    for stage in ("ml", "kl"):
        us = {k.split("/", 2)[2]: v for k, v in arrays.items() if k.startswith(f"{stage}/u/")}
        xs = {k.split("/", 2)[2]: v for k, v in arrays.items()
              if k.startswith(f"{stage}/x/") and not k.endswith("nm")}
        if us:
            u_max = float(arrays["train_max_energy"])
            plot_energies(us, u_max, args.run_dir / f"energies_{stage}.png")
            plot_ramachandran(xs, args.run_dir / f"ramachandran_{stage}.png")
    print(f"figures redrawn in {args.run_dir}")


if __name__ == "__main__":
    main()
