"""The ``p4opt`` command line: ``p4opt compare`` and ``p4opt bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``p4opt`` command (one sub-command per study)."""
    from p4opt.studies import bench, compare

    parser = argparse.ArgumentParser(
        prog="p4opt", description="P⁴ perturbations versus their peers: studies and benchmarks."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (compare, bench):
        command = sub.add_parser(module.COMMAND, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``p4opt`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
