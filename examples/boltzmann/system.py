"""The molecular system: vacuum alanine dipeptide (22 atoms) from openmmtools, and its constants."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Molecule", "alanine_dipeptide", "kT_kj_per_mol", "PHI", "PSI", "ATOMS"]

#: Atom names in the order of the openmmtools topology (index = position in coordinate arrays).
ATOMS = (
    "H1", "CH3", "H2", "H3", "C", "O", "N", "H", "CA", "HA", "CB",
    "HB1", "HB2", "HB3", "C", "O", "N", "H", "C", "H1", "H2", "H3",
)
#: Backbone torsion phi: C(4)-N(6)-CA(8)-C(14).
PHI = (4, 6, 8, 14)
#: Backbone torsion psi: N(6)-CA(8)-C(14)-N(16).
PSI = (6, 8, 14, 16)

BOLTZMANN_KJ_PER_MOL_K = 0.00831446261815324


def kT_kj_per_mol(temperature: float) -> float:
    """Thermal energy :math:`k_B T` in kJ/mol at ``temperature`` kelvin."""
    return BOLTZMANN_KJ_PER_MOL_K * temperature


@dataclass(frozen=True)
class Molecule:
    """An OpenMM system with its topology and starting positions (nm, shape (22, 3))."""

    system: Any
    topology: Any
    positions: np.ndarray


def alanine_dipeptide(constraints: str | None = "HBonds") -> Molecule:
    """Vacuum alanine dipeptide (amber force field of openmmtools' test system).

    Parameters
    ----------
    constraints : {"HBonds", None}
        Bond constraints of the system; they matter for dynamics only, energies of given
        positions are the same either way.

    Raises
    ------
    ModuleNotFoundError
        When ``openmm``/``openmmtools`` are missing (``pip install "p4opt[bg]"``).
    """
    from openmm import app, unit

    with contextlib.redirect_stderr(io.StringIO()):  # openmmtools' dependencies print banners
        from openmmtools import testsystems

    if constraints not in ("HBonds", None):
        raise ValueError(f"constraints must be 'HBonds' or None, got {constraints!r}")
    kind = app.HBonds if constraints == "HBonds" else None
    test = testsystems.AlanineDipeptideVacuum(constraints=kind)
    names = tuple(atom.name for atom in test.topology.atoms())
    if names != ATOMS:
        raise RuntimeError(f"unexpected atom order in the test system: {names}")
    positions = np.asarray(test.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    return Molecule(test.system, test.topology, positions)
