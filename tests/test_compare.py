"""``p4opt compare`` end to end on a tiny setting, and its pieces."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from p4opt.studies import baselines, cli, tasks
from p4opt.studies.records import RunRecord, Study, read_json, to_json_dict, write_json
from p4opt.studies.tasks.runner import choose_lr, step_costs, summarize, train

METHOD_KEYS = {
    "name", "description", "p4", "status", "reason", "lr", "lr_grid", "trials",
    "steps_to_target", "seconds_to_target", "final_rel", "constraint", "step_seconds",
    "step_cost_ratio",
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
            (trial,) = entry["trials"]
            (run,) = trial["runs"]
            assert len(run["relative"]) == 7 == len(run["seconds"])
            assert entry["step_cost_ratio"] > 0
            start = run["relative"][0]
            assert entry["final_rel"] < start  # six steps at a sane lr make progress
            if task["family"] == "orthogonal":
                assert entry["constraint"]["orthogonality"] <= 1e-5
    for name in result["figures"]:
        assert (tmp_path / name).stat().st_size > 1000
    assert len(result["figures"]) == 3
    out = capsys.readouterr().out
    assert "procrustes n=8" in out and "geoopt-radam" in out and "results.json" in out
    assert Study.from_dict(result).tasks[0].methods[0].name == "p4-householder"


def test_compare_spd_task_has_a_row_per_method(tmp_path: Path, capsys) -> None:
    result = _compare(tmp_path, "--task", "spd", "--no-plot")
    (task,) = result["tasks"]
    assert (task["task"], task["family"], task["n"], task["batch"]) == ("spd", "spd", 8, 80)
    assert [m["name"] for m in task["methods"]] == ["p4-spd", "geoopt-spd", "cholesky"]
    for entry in task["methods"]:
        assert entry["status"] == "ok", entry["reason"]
        (trial,) = entry["trials"]
        (run,) = trial["runs"]
        assert run["relative"][0] == pytest.approx(1.0, abs=1e-5)  # all start at P = I
        assert entry["final_rel"] < 0.9 and entry["step_cost_ratio"] > 0
        assert entry["constraint"]["symmetry"] <= 1e-6
        assert entry["constraint"]["logdet_error"] <= 1e-4  # float32 weights
    out = capsys.readouterr().out
    assert "spd n=8 batch=80" in out and "sym " in out and "geoopt-spd" in out


def test_compare_spd_reaches_the_target_with_every_method(tmp_path: Path) -> None:
    argv = ["compare", "--task", "spd", "--n", "8", "--steps", "250", "--repeats", "1",
            "--no-plot", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    study = read_json(tmp_path / "results.json")
    (task,) = study.tasks
    for method in task.methods:
        assert method.lr in method.lr_grid and len(method.trials) == 3
        assert method.steps_to_target is not None and method.steps_to_target <= 250
        assert method.chosen().succeeded == 1


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


def test_train_reaches_target_and_records_the_run() -> None:
    task = tasks.make("gaussian", 6, dtype=torch.float64)
    run = train(baselines.get("dense"), task, 3e-2, 400, stop_at_target=True)
    assert run.steps_to_target is not None and run.relative[-1] <= task.target
    assert run.steps == run.steps_to_target and run.seconds_to_target is not None
    assert run.max_rel_after_target == run.final_rel <= task.target
    assert run.constraint["logdet_error"] <= 1e-9


class _BreaksAt(torch.optim.SGD):
    """SGD that raises ``error`` on its ``at``-th step (counting from 1)."""

    def __init__(self, params, lr: float, at: int, error: Exception) -> None:
        super().__init__(params, lr=lr)
        self.calls, self.at, self.error = 0, at, error

    def step(self, closure=None):  # type: ignore[override]
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return super().step(closure)


def _breaking_method(at: int, error: Exception) -> baselines.Method:
    class Holder(baselines.Cholesky):
        def optimizer(self, lr: float) -> torch.optim.Optimizer:
            return _BreaksAt(self.parameters(), lr, at, error)

    return baselines.Method("breaks", "spd", Holder, (1e-2,))


def test_train_counts_a_linear_algebra_breakdown_as_divergence() -> None:
    task = tasks.make("spd", 6, dtype=torch.float64)
    failed = torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
    run = train(_breaking_method(3, failed), task, 1e-2, 50)
    assert len(run.relative) == 4 and run.relative[-1] == float("inf") and run.steps == 3
    assert run.final_rel == float("inf") and run.steps_to_target is None
    assert summarize(1e-2, [run], task.target).succeeded == 0
    scripted = RuntimeError("TorchScript ... RuntimeError: linalg.eigh: failed to converge")
    assert train(_breaking_method(2, scripted), task, 1e-2, 50).final_rel == float("inf")
    with pytest.raises(RuntimeError, match="a bug"):  # other errors are not swallowed
        train(_breaking_method(3, RuntimeError("a bug")), task, 1e-2, 50)
    with pytest.raises(torch.linalg.LinAlgError):  # nor a failure of the very first step
        train(_breaking_method(1, failed), task, 1e-2, 50)


def _record(lr: float, relative: list[float], seed: int = 0) -> RunRecord:
    """A synthetic run (target 1e-4) with the figures ``train`` would derive."""
    reached = next((i for i, v in enumerate(relative) if v <= 1e-4), None)
    after = None if reached is None else max(relative[reached:])
    return RunRecord("t", 4, "m", lr, seed, steps=len(relative) - 1, steps_to_target=reached,
                     seconds_to_target=None if reached is None else 0.1 * reached,
                     final_rel=relative[-1] if relative[-1] == relative[-1] else float("inf"),
                     max_rel_after_target=after, relative=relative,
                     seconds=[0.1 * i for i in range(len(relative))])


def test_lr_rule_rejects_a_run_that_blows_up_after_reaching_the_target() -> None:
    target = 1e-4
    fast_then_blows_up = summarize(0.1, [_record(0.1, [1.0, 1e-8, 7e-2, 5e-5])], target)
    steady = summarize(0.03, [_record(0.03, [1.0, 1e-2, 1e-3, 5e-5])], target)
    assert fast_then_blows_up.unstable == 1 and fast_then_blows_up.succeeded == 0
    assert choose_lr([fast_then_blows_up, steady]) is steady
    # a bounce below 10x the target is tolerated: fewest steps wins
    bounce = summarize(0.3, [_record(0.3, [1.0, 5e-5, 9e-4, 9e-5])], target)
    assert choose_lr([steady, bounce]) is bounce
    # nobody reaches the target: lowest final loss; a diverged run ranks last
    slow = summarize(1.0, [_record(1.0, [1.0, 0.5])], target)
    slower = summarize(2.0, [_record(2.0, [1.0, 0.9])], target)
    nan = summarize(3.0, [_record(3.0, [1.0, float("nan")])], target)
    assert choose_lr([nan, slower, slow]) is slow
    with pytest.raises(ValueError, match="at least one"):
        choose_lr([])


def test_lr_rule_prefers_the_lr_that_succeeds_on_more_seeds() -> None:
    target = 1e-4
    lucky = summarize(0.1, [_record(0.1, [1.0, 1e-5, 1e-5]),
                            _record(0.1, [1.0, 1e-5, 1.0], 1),
                            _record(0.1, [1.0, 1e-5, float("nan")], 2)], target)
    robust = summarize(0.03, [_record(0.03, [1.0, 1e-2, 1e-3, 1e-5], s) for s in range(3)],
                       target)
    assert (lucky.succeeded, robust.succeeded) == (1, 3)
    assert lucky.median_steps_to_target is None and robust.median_steps_to_target == 3
    assert choose_lr([lucky, robust]) is robust


def test_records_round_trip_through_json(tmp_path: Path) -> None:
    result = _compare(tmp_path, "--task", "gaussian", "--methods", "dense", "--no-plot",
                      "--seeds", "2")
    study = read_json(tmp_path / "results.json")
    assert to_json_dict(study) == result
    write_json(study, tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == result
    (method,) = study.tasks[0].methods
    assert study.tasks[0].seeds == [0, 1] and len(method.trials[0].runs) == 2
    diverged = _record(0.1, [1.0, 1e-5, float("inf")])
    back = RunRecord.from_dict(json.loads(json.dumps(to_json_dict(diverged))))
    assert back.final_rel == float("inf") and back.unstable(1e-4)


def test_step_costs_reports_reference_and_methods() -> None:
    task = tasks.make("procrustes", 8)
    costs = step_costs([baselines.get("torch-cayley")], task, lrs={}, repeats=2, window=3)
    assert set(costs) == {"linear", "torch-cayley"} and all(c > 0 for c in costs.values())
