"""Training data: OpenMM parallel tempering of alanine dipeptide, frames of the 300 K replica.

Langevin dynamics (1 fs, no constraints, friction 1/ps) of several replicas on a
geometric temperature ladder; neighbours exchange configurations with the Metropolis
criterion, so the lowest replica samples the Boltzmann distribution at its temperature while
the hot ones carry it over the barrier between the two phi basins. Cached under
``results/boltzmann/``.

    PYTHONPATH=. python examples/boltzmann/data.py            # small default, about a minute
    PYTHONPATH=. python examples/boltzmann/data.py --full     # the size of the full study
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boltzmann.progress import Progress
from boltzmann.system import PHI, alanine_dipeptide, kT_kj_per_mol

__all__ = ["DataConfig", "QUICK", "DEFAULT", "FULL", "generate", "load_or_generate", "dihedral"]

RESULTS = Path("results/boltzmann")


@dataclass(frozen=True)
class DataConfig:
    """Sizes of a parallel-tempering run (``stride`` MD steps of ``timestep_fs`` between frames).

    ``constraints="HBonds"`` freezes the 12 bonds to hydrogen (their spread in the data is then
    about 1e-7 nm), a density the flow cannot match against the flexible-bond energy of the
    reverse-KL target; the default leaves every bond free and uses a 1 fs step instead.
    """

    frames: int = 4000
    stride: int = 250
    equilibration: int = 20000
    t_min: float = 300.0
    t_max: float = 600.0
    replicas: int = 4
    seed: int = 0
    platform: str = "Reference"
    constraints: str | None = None
    timestep_fs: float = 1.0

    def temperatures(self) -> np.ndarray:
        return np.geomspace(self.t_min, self.t_max, self.replicas)

    def tag(self) -> str:
        c = self.constraints or "free"
        return f"f{self.frames}_s{self.stride}_r{self.replicas}_{c}_seed{self.seed}"


QUICK = DataConfig(frames=1500, stride=250, equilibration=10000)
DEFAULT = DataConfig()
FULL = DataConfig(frames=20000, stride=250)


def dihedral(x: np.ndarray, idx: tuple[int, int, int, int]) -> np.ndarray:
    """Torsion angles (radians, in (-pi, pi]) of atoms ``idx`` in ``x[..., n_atoms, 3]``."""
    a, b, c, d = (x[..., i, :] for i in idx)
    b0, b1, b2 = a - b, c - b, d - c
    b1 = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - (b0 * b1).sum(-1, keepdims=True) * b1
    w = b2 - (b2 * b1).sum(-1, keepdims=True) * b1
    return np.arctan2((np.cross(b1, v) * w).sum(-1), (v * w).sum(-1))


def generate(cfg: DataConfig, every: int = 250) -> dict[str, np.ndarray]:
    """Run parallel tempering; return frames ``x (frames, 66)`` in nm and the run's figures.

    Cost: ``replicas * (equilibration + frames * stride)`` MD steps.
    """
    import openmm
    from openmm import unit

    mol = alanine_dipeptide(cfg.constraints)
    temps = cfg.temperatures()
    rng = np.random.default_rng(cfg.seed)
    plat = openmm.Platform.getPlatformByName(cfg.platform)
    contexts, integrators = [], []
    for r, t in enumerate(temps):
        integ = openmm.LangevinMiddleIntegrator(t * unit.kelvin, 1 / unit.picosecond,
                                                cfg.timestep_fs * unit.femtosecond)
        integ.setRandomNumberSeed(cfg.seed * 1000 + r + 1)
        ctx = openmm.Context(mol.system, integ, plat)
        ctx.setPositions(mol.positions)
        openmm.LocalEnergyMinimizer.minimize(ctx)
        ctx.setVelocitiesToTemperature(t * unit.kelvin, cfg.seed * 1000 + r + 1)
        integ.step(cfg.equilibration)
        contexts.append(ctx)
        integrators.append(integ)
    betas = 1.0 / np.array([kT_kj_per_mol(t) for t in temps])
    frames = np.empty((cfg.frames, mol.positions.size))
    energies = np.empty(cfg.frames)
    tried = accepted = 0
    with Progress(cfg.frames, "parallel tempering", every=every) as bar:
        for k in range(cfg.frames):
            for integ in integrators:
                integ.step(cfg.stride)
            states = [c.getState(getPositions=True, getVelocities=True, getEnergy=True)
                      for c in contexts]
            pot = np.array([s.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                            for s in states])
            for i in range(k % 2, cfg.replicas - 1, 2):  # alternate even and odd pairs
                j = i + 1
                tried += 1
                if np.log(rng.random()) < (betas[i] - betas[j]) * (pot[i] - pot[j]):
                    accepted += 1
                    for dst, src in ((i, j), (j, i)):
                        contexts[dst].setPositions(states[src].getPositions())
                        scale = np.sqrt(temps[dst] / temps[src])
                        contexts[dst].setVelocities(states[src].getVelocities() * scale)
                    states[i], states[j] = states[j], states[i]
                    pot[i], pot[j] = pot[j], pot[i]
            frames[k] = states[0].getPositions(asNumpy=True).value_in_unit(unit.nanometer).ravel()
            energies[k] = pot[0] * betas[0]
            bar.update(1)
    phi = dihedral(frames.reshape(cfg.frames, -1, 3), PHI)
    return {
        "x": frames,
        "energy": energies,
        "temperatures": temps,
        "acceptance": np.array(accepted / max(tried, 1)),
        "phi_positive": np.array((phi > 0).mean()),
    }


def load_or_generate(cfg: DataConfig, root: Path = RESULTS) -> dict[str, np.ndarray]:
    """The cached data of ``cfg`` under ``root`` (generated and saved when absent)."""
    path = root / f"data_{cfg.tag()}.npz"
    if path.exists():
        with np.load(path) as f:
            if json.loads(str(f["config"])) == asdict(cfg):
                return {k: f[k] for k in f.files if k != "config"}
    data = generate(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, config=json.dumps(asdict(cfg)), **data)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smallest data (CI, first look)")
    size.add_argument("--full", action="store_true", help="the full study's data")
    parser.add_argument("--frames", type=int, help="override the number of frames")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL if args.full else DEFAULT
    changes = {"seed": args.seed} | ({"frames": args.frames} if args.frames else {})
    cfg = DataConfig(**(asdict(cfg) | changes))
    data = load_or_generate(cfg)
    print(f"{len(data['x'])} frames at {cfg.t_min:g} K; exchange acceptance "
          f"{float(data['acceptance']):.2f}; phi > 0 in {float(data['phi_positive']):.3f} of "
          f"frames; median energy {np.median(data['energy']):.2f} kT")


if __name__ == "__main__":
    main()
