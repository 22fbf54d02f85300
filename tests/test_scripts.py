"""Every benchmark and example script runs end to end at its smallest settings.

The studies themselves are too slow for the unit suite; these runs catch a script that the
library has moved away from (an attribute renamed, a default changed) before a user does.
Each runs in a fresh interpreter, in a temporary folder so that nothing lands in the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: script (relative to the repository) -> the smallest arguments that exercise it
RUNS: dict[str, list[str]] = {
    "benchmarks/bad_input_campaign.py": ["--cases", "3", "--seed", "0"],
    "benchmarks/conv1x1.py": ["--channels", "4", "--seeds", "1", "--lrs", "0.1", "--cap", "10"],
    "benchmarks/ddp_load.py": ["--steps", "10", "--n", "4", "--merge-every", "5"],
    "benchmarks/density_kl.py": ["--datasets", "two_moons", "--steps", "5", "--batch", "32",
                                 "--layers", "4", "--lrs", "0.01", "--test", "256",
                                 "--jitter", "1e-7", "--out", "density_kl.json"],
    "benchmarks/flow_step_cost.py": ["--layers", "4", "--batch", "32", "--reps", "1",
                                     "--steps", "1"],
    "benchmarks/givens_layers.py": ["--n", "8", "--layers", "1", "--rules", "keep", "--seeds", "1",
                                    "--lrs", "0.1", "--max-steps", "10"],
    "benchmarks/householder_rank.py": ["--n", "8", "--ranks", "4", "8", "--lrs", "0.1",
                                       "--peers", "geoopt-rsgd", "--seeds", "1", "--steps",
                                       "10", "--repeats", "1"],
    "benchmarks/invertible_accuracy.py": ["--n", "8", "--merges", "10", "--check-every", "5",
                                          "--out", "accuracy.json"],
    "benchmarks/invertible_speed.py": ["--n", "8", "--seeds", "1", "--cap", "10", "--lrs", "0.1",
                                       "--methods", "dense", "p4inv", "lowmem", "p4inv-r1-0.1",
                                       "lu"],
    "benchmarks/linear_residual.py": ["--n", "8", "--dense-n", "4", "--steps", "20", "--chunk",
                                      "10", "--batch", "8", "--out", "residual.json"],
    "benchmarks/orthogonal_accuracy.py": ["--n", "8", "--merges", "10"],
    "benchmarks/orthogonal_tuning.py": ["--n", "8", "--max-steps", "10", "--lrs", "0.1", "--full"],
    "benchmarks/readme_fit.py": [],
    "benchmarks/soak.py": ["--steps", "20", "--n", "8"],
    "benchmarks/spd_fit.py": ["--sizes", "4", "--seeds", "1", "--lrs", "0.1", "--max-steps", "10",
                              "--out", "spd.json"],
    "benchmarks/step_cost.py": ["--sizes", "8", "--repeats", "1", "--out", "bench.json"],
    "examples/density_2d.py": ["--datasets", "two_moons", "--steps", "5", "--batch", "32",
                               "--layers", "4", "--test", "256", "--res", "20", "--out", "d2d"],
}


def test_every_script_has_a_smoke_run() -> None:
    scripts = {str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.py")}
    scripts |= {"examples/density_2d.py"}
    # structure_preservation.py has no size option (24 s); the Boltzmann study has its own tests
    assert scripts == set(RUNS), sorted(scripts ^ set(RUNS))


@pytest.mark.parametrize("script", sorted(RUNS))
def test_script_runs_at_its_smallest_settings(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / script), *RUNS[script]], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the script printed nothing"


def test_invertible_speed_times_steps_only_on_request(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["--n", "8", "--cost-only", "--lrs", "0.1", "--methods", "dense", "p4inv"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/invertible_speed.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 8 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["dense", "p4inv"]
    assert "steps=" not in done.stdout  # no runs to the target
