"""``p4opt bench``: step-cost ratios of P⁴ layers against plain and dense baselines."""

from __future__ import annotations

import argparse

__all__ = ["COMMAND", "HELP", "add_arguments", "run"]

COMMAND = "bench"
HELP = "measure step-cost ratios of P⁴ layers against nn.Linear and dense slogdet/solve"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options on ``parser``."""
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``."""
    raise SystemExit("p4opt bench is not available yet")
