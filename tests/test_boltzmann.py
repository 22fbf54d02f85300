"""The alanine-dipeptide Boltzmann generator example: energy bridge, coordinates, a tiny run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openmm")
pytest.importorskip("openmmtools")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from boltzmann import data as D  # noqa: E402
from boltzmann import run as R  # noqa: E402
from boltzmann.coordinates import BLOCK, InternalCoordinates, kabsch_align  # noqa: E402
from boltzmann.energy import OpenMMEnergy  # noqa: E402
from boltzmann.system import alanine_dipeptide, kT_kj_per_mol  # noqa: E402

F64 = torch.float64


@pytest.fixture(scope="module")
def molecule():
    return alanine_dipeptide(None)


@pytest.fixture(scope="module")
def frames(molecule) -> torch.Tensor:
    """Minimized structure plus 0.005 nm noise, randomly rotated and shifted: 64 frames."""
    import openmm

    ctx = openmm.Context(molecule.system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(molecule.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx)
    x0 = torch.as_tensor(ctx.getState(getPositions=True).getPositions(asNumpy=True)._value)
    g = torch.Generator().manual_seed(0)
    x = x0 + 0.005 * torch.randn(64, 22, 3, generator=g, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(64, 3, 3, generator=g, dtype=F64))
    return (x @ q + torch.randn(64, 1, 3, generator=g, dtype=F64)).reshape(64, 66)


def test_energies_match_openmm(molecule, frames) -> None:
    import openmm
    from openmm import unit

    bridge = OpenMMEnergy(molecule, temperature=300.0)
    u = bridge(frames[:5])
    ctx = openmm.Context(molecule.system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"})
    for x, ui in zip(frames[:5], u, strict=True):
        ctx.setPositions(x.reshape(22, 3).numpy())
        e = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        assert float(ui) == pytest.approx(e / kT_kj_per_mol(300.0), rel=1e-5, abs=1e-3)


def test_forces_match_finite_differences(molecule, frames) -> None:
    bridge = OpenMMEnergy(molecule)
    x = frames[:3].clone().requires_grad_()
    bridge(x).sum().backward()
    g = torch.Generator().manual_seed(1)
    h = 1e-5
    for i in range(3):
        d = torch.randn(66, generator=g, dtype=F64)
        d /= d.norm()
        up, down = bridge(frames[i] + h * d), bridge(frames[i] - h * d)
        fd = float((up - down) / (2 * h))
        assert float(x.grad[i] @ d) == pytest.approx(fd, rel=1e-4, abs=1e-2)
    assert float(x.grad.abs().max()) > 10.0  # the frames are off the minimum: real forces


def test_internal_coordinates_round_trip(frames) -> None:
    ic = InternalCoordinates.fit(frames)
    f, ladj = ic(frames)
    assert f.shape == (64, 60)
    x_back, ladj_back = ic.inverse(f)
    aligned = kabsch_align(frames.reshape(64, 22, 3), ic.ref, BLOCK).reshape(64, 66)
    assert float((x_back - aligned).abs().max()) < 1e-10
    assert torch.allclose(ladj_back, -ladj, atol=1e-10)
    # the energy-relevant geometry is the same: pairwise distances agree
    dist = torch.cdist(frames.reshape(64, 22, 3), frames.reshape(64, 22, 3))
    dist_back = torch.cdist(x_back.reshape(64, 22, 3), x_back.reshape(64, 22, 3))
    assert float((dist - dist_back).abs().max()) < 1e-10
    f_new = torch.randn(4, 60, dtype=F64)
    assert torch.allclose(ic(ic.inverse(f_new)[0])[0], f_new, atol=1e-8)


def test_internal_coordinates_log_det_matches_autograd(frames) -> None:
    ic = InternalCoordinates.fit(frames)
    f = ic(frames[:3])[0]
    for fi in f:
        jac = torch.autograd.functional.jacobian(lambda v: ic.inverse(v[None])[0][0], fi)
        expected = 0.5 * torch.logdet(jac.T @ jac)  # volume factor of R^60 -> R^66
        assert float(ic.inverse(fi[None])[1][0]) == pytest.approx(float(expected), abs=1e-8)


def test_torsion_seam_is_placed_in_the_gap(frames) -> None:
    # trans amide torsions sit at +-pi; after the shift they must be far from the seam
    ic = InternalCoordinates.fit(frames)
    f = ic(frames)[0]
    sl = ic.torsion_features()
    raw = f[:, sl] * ic.ic_scale[sl.start - ic.n_block_dims:]
    assert float(raw.abs().max()) < math.pi / 2


def test_tiny_end_to_end_run_resumes(tmp_path: Path) -> None:
    argv = ["--quick", "--out", str(tmp_path / "run"), "--data-root", str(tmp_path),
            "--frames", "40", "--layers", "2", "--hidden", "8", "--ml-steps", "3",
            "--kl-steps", "2", "--kl-batch", "16", "--samples", "32"]
    tiny = D.DataConfig(**(vars(D.QUICK) | {"equilibration": 200, "stride": 20}))
    orig = R.PRESETS["quick"]["data"]
    R.PRESETS["quick"]["data"] = tiny
    try:
        report = R.run(R.parse(argv))
        report = R.run(R.parse([*argv[:-6], "--ml-steps", "5", *argv[-4:]]))
    finally:
        R.PRESETS["quick"]["data"] = orig
    saved = torch.load(tmp_path / "run" / "ckpt_ml.pt", weights_only=False)
    assert saved["p4inv"]["step"] == 5 and len(saved["p4inv"]["times"]) == 5
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    stats = on_disk["kl"]["energies"]
    assert set(stats) == {"data", "data + 0.004 nm", "rnvp", "p4inv"}
    assert stats["data + 0.004 nm"]["median_shift"] > 5.0  # 0.004 nm noise costs energy
    assert report["kl"]["inverse_error_max"]["p4inv"] < 1e-5
    for name in ("energies_kl.png", "ramachandran_kl.png", "samples.npz"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert np.isfinite(report["ml"]["test_nll"]["rnvp"])


def test_the_papers_layer_is_one_flag_away() -> None:
    from boltzmann.models import build_flow

    default = R.configure(R.parse(["--full"]))["model"]
    paper = R.configure(R.parse(["--full", "--rank", "1", "--update", "factored"]))["model"]
    (mixing, *_) = [m for m in build_flow("p4inv", 60, default) if hasattr(m, "perturbation")]
    assert mixing.perturbation.update == "projected" and mixing.perturbation.rank == 16
    (mixing, *_) = [m for m in build_flow("p4inv", 60, paper) if hasattr(m, "perturbation")]
    assert mixing.perturbation.update == "factored" and mixing.perturbation.rank == 1
    assert sum(p.numel() for p in mixing.parameters() if p.requires_grad) == 3 * 60  # U, V, bias
