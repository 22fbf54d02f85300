"""``p4opt compare``: P⁴ families versus their peers on the built-in tasks."""

from __future__ import annotations

import argparse

__all__ = ["COMMAND", "HELP", "add_arguments", "run"]

COMMAND = "compare"
HELP = "compare P⁴ families with geoopt, geotorch and torch parametrizations on built-in tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options on ``parser``."""
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the comparison described by ``args``."""
    raise SystemExit("p4opt compare is not available yet")
