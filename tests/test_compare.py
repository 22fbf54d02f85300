"""``p4opt compare`` end to end on a tiny setting, and its pieces."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from p4opt.studies import baselines, cli, tasks
from p4opt.studies.tasks.runner import Run, pick_best, step_costs, train

METHOD_KEYS = {
    "name", "description", "p4", "status", "reason", "lr", "lr_grid", "lr_trials",
    "steps_to_target", "seconds_to_target", "final_relative_loss", "constraint", "history",
    "step_seconds", "step_cost_ratio",
}


def _compare(tmp_path: Path, *extra: str) -> dict:
    argv = ["compare", "--n", "8", "--steps", "6", "--quick", "--repeats", "1", "--out",
            str(tmp_path), *extra]
    assert cli.main(argv) == 0
    return json.loads((tmp_path / "results.json").read_text())


def test_compare_end_to_end_writes_json_and_figures(tmp_path: Path, capsys) -> None:
    result = _compare(tmp_path)
    assert set(result) == {"config", "environment", "figures", "tasks"}
    assert [t["task"] for t in result["tasks"]] == ["procrustes", "gaussian", "rnn"]
    for task in result["tasks"]:
        assert task["n"] == 8 and task["steps"] == 6 and task["reference_step_seconds"] > 0
        family = baselines.methods(task["family"])
        assert [m["name"] for m in task["methods"]] == [m.name for m in family]
        for entry in task["methods"]:
            if entry["status"] != "ok":
                assert entry["status"] == "skipped" and entry["reason"]
                continue
            assert set(entry) == METHOD_KEYS
            assert len(entry["history"]["relative"]) == 7 == len(entry["history"]["seconds"])
            assert entry["step_cost_ratio"] > 0
            start = entry["history"]["relative"][0]
            assert entry["final_relative_loss"] < start  # six steps at a sane lr make progress
            if task["family"] == "orthogonal":
                assert entry["constraint"]["orthogonality"] <= 1e-5
    for name in result["figures"]:
        assert (tmp_path / name).stat().st_size > 1000
    assert len(result["figures"]) == 3
    out = capsys.readouterr().out
    assert "procrustes n=8" in out and "geoopt-radam" in out and "results.json" in out


def test_compare_skips_missing_geoopt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "geoopt", None)
    result = _compare(tmp_path, "--task", "procrustes", "--no-plot")
    entries = {m["name"]: m for m in result["tasks"][0]["methods"]}
    assert entries["geoopt-radam"]["status"] == "skipped"
    assert "geoopt" in entries["geoopt-radam"]["reason"]
    assert entries["torch-cayley"]["status"] == "ok"
    assert result["figures"] == []


def test_compare_without_matplotlib_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = _compare(tmp_path, "--task", "gaussian", "--methods", "dense", "lu")
    assert result["figures"] == []
    assert "p4opt[plot]" in capsys.readouterr().err
    assert [m["name"] for m in result["tasks"][0]["methods"]] == ["dense", "lu"]


def test_compare_steps_zero_times_only(tmp_path: Path) -> None:
    result = _compare(tmp_path, "--task", "procrustes", "--steps", "0", "--methods", "torch-cayley")
    (entry,) = result["tasks"][0]["methods"]
    assert entry["steps_to_target"] is None and entry["step_cost_ratio"] > 0


def test_train_reaches_target_and_pick_best_prefers_fewest_steps() -> None:
    task = tasks.make("gaussian", 6, dtype=torch.float64)
    run = train(baselines.get("dense"), task, 3e-2, 400, stop_at_target=True)
    assert run.steps_to_target is not None and run.relative[-1] <= task.target
    assert run.steps == run.steps_to_target and run.seconds_to_target is not None
    assert run.constraint["logdet_error"] <= 1e-9
    slow = Run("a", 1.0, [1.0, 0.5], [0, 1], steps_to_target=None)
    fast = Run("b", 2.0, [1.0, 1e-9], [0, 1], steps_to_target=1)
    bounced = Run("d", 4.0, [1.0, 1e-9, 1e-3], [0, 1, 2], steps_to_target=1)
    steady = Run("e", 5.0, [1.0, 1e-2, 1e-9], [0, 1, 2], steps_to_target=2)
    assert pick_best([slow, fast], 1e-4) is fast
    assert pick_best([bounced, steady], 1e-4) is steady
    assert pick_best([slow, bounced], 1e-4) is bounced
    assert pick_best([slow, Run("c", 3.0, [1.0, float("nan")], [0, 1])], 1e-4) is slow


def test_step_costs_reports_reference_and_methods() -> None:
    task = tasks.make("procrustes", 8)
    costs = step_costs([baselines.get("torch-cayley")], task, lrs={}, repeats=2, window=3)
    assert set(costs) == {"linear", "torch-cayley"} and all(c > 0 for c in costs.values())
