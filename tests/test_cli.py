"""The ``p4opt`` command line as a new user meets it: help, version, errors, legend, progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import p4opt
import p4opt.cli
from p4opt.studies import cli, compare

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, check=False)


def test_import_p4opt_warns_about_nothing() -> None:
    done = _run("-W", "error", "-c", "import p4opt")
    assert done.returncode == 0, done.stderr


def test_version_and_bare_command_print_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"p4opt {p4opt.__version__}"
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "usage: p4opt" in out and "compare" in out and "bench" in out


@pytest.mark.parametrize("command", ["compare", "bench"])
def test_every_option_has_a_description_and_a_default(command: str) -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings} has no description"
        assert "default" in action.help, f"{command} {action.option_strings} states no default"


def test_empty_selection_is_an_error_that_names_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["compare", "--methods", "dense", "--task", "procrustes",
                       "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2
    assert "no chosen method applies to task 'procrustes'" in err and "p4-householder" in err
    assert not (tmp_path / "results.json").exists()


def test_compare_prints_legend_table_verdict_and_progress_lines(tmp_path: Path) -> None:
    done = _run("-m", "p4opt.studies.cli", "compare", "--task", "gaussian", "--methods",
                "p4-invertible", "dense", "--n", "6", "--steps", "60", "--quick", "--repeats",
                "1", "--no-plot", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    out, err = done.stdout, done.stderr
    assert out.startswith("legend:") and "- = target not reached" in out
    assert "steps→tgt" in out and "final rel" in out
    (verdict,) = [line for line in out.splitlines() if line.startswith("  → gaussian n=6:")]
    assert "dense" in verdict or "p4-invertible" in verdict
    progress = [line for line in err.splitlines() if line.startswith("p4opt compare [")]
    assert [line.split("]")[0] for line in progress] == [
        "p4opt compare [1/3", "p4opt compare [2/3", "p4opt compare [3/3"]
    assert "\r" not in err  # no progress bar in a log


def test_skip_reasons_are_printed_once_below_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "geoopt", None)
    argv = ["compare", "--task", "procrustes", "--task", "rnn", "--n", "4", "--steps", "2",
            "--quick", "--repeats", "1", "--no-plot", "--methods", "geoopt-radam",
            "torch-cayley", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("geoopt is not available") == 1
    (row,) = [line for line in out.splitlines() if line.startswith("geoopt-radam")][:1]
    assert row.rstrip().endswith("skipped (see note)")


def test_help_states_the_lr_rule() -> None:
    assert "10x the target" in compare.LR_RULE
    text = " ".join(compare.LR_RULE.split())
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["compare"]
    assert text in " ".join(sub.format_help().split())


def test_old_import_paths_name_the_moved_modules() -> None:
    import p4opt.tasks.runner

    import p4opt.baselines
    import p4opt.bench
    import p4opt.compare
    from p4opt.studies import baselines, bench
    from p4opt.studies.tasks import runner

    assert p4opt.baselines.Method is baselines.Method
    assert p4opt.tasks.runner is runner and p4opt.bench.step_cost is bench.step_cost
    assert p4opt.compare.run is compare.run and p4opt.cli.main is cli.main


def test_bench_runs_every_mode_and_its_inverse_pass_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--sizes", "8", "--inverse-batches", "3", "--repeats", "1",
                     "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "low-mem" in text and "dense+slogdet" in text
    results = json.loads(out.read_text())
    step, inverse = results["step"][0], results["inverse"][0]
    # the default mode merges after every step, the low-memory one every 10; nothing refused
    assert step["p4inv_merges"]["merges_accepted"] == step["p4inv_merges"]["steps"] > 0
    assert step["lowmem_merges"]["merges_accepted"] == step["lowmem_merges"]["steps"] // 10
    assert step["p4inv_merges"]["merges_rejected"] == step["lowmem_merges"]["merges_rejected"] == 0
    for mode in ("p4inv", "lowmem"):
        assert 0 < step[f"{mode}_over_linear"] < float("inf")
        assert inverse[f"{mode}_roundtrip_error"] < 1e-4  # solve(f(x) - b) gives x back
