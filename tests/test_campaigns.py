"""Smoke runs of the campaign scripts in ``benchmarks/`` (the full runs are documented there)."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings

import p4opt

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import bad_input_campaign as campaign  # noqa: E402
import spd_fit  # noqa: E402

EVERYDAY = ("float32", "float64")


@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(campaign.draw_case().filter(
    lambda c: c["dtype"] in EVERYDAY and c["misuse"] in (None, "register-twice")
))
def test_bad_input_ends_in_a_clear_error_or_a_feasible_model(case):
    outcome, detail = campaign.run_case(case)
    assert outcome in ("clear error", "recovered"), (outcome, detail)


def test_a_wrong_shape_is_a_clear_error():
    case = {"family": "invertible", "n": 3, "shape": "rectangular", "dtype": "float64",
            "rank": None, "init": "good", "optimizer": "sgd", "lr": 1.0, "loss_scale": 1.0,
            "steps": 1, "merge_every": None, "skip_nonfinite": False, "inject": None,
            "inject_step": 0, "update": None, "misuse": None, "seed": 0}
    outcome, detail = campaign.run_case(case)
    assert outcome == "clear error" and detail.startswith(p4opt.ShapeError.__name__)


def test_spd_fit_runs_the_library_task_and_methods():
    task = spd_fit.problem(8, 10, 0)
    assert task.batch == 80 and task.covariance.dtype.is_floating_point
    for name, lr in (("p4", 0.03), ("p4-rank-n/4", 0.03), ("geoopt", 0.3), ("cholesky", 0.1)):
        steps = spd_fit.steps_to_target(task, spd_fit.METHODS[name](task, lr), 300, 1e-4)
        assert steps <= 300, name
