"""The ``p4opt`` command line: ``p4opt compare`` and ``p4opt bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``p4opt`` command (one sub-command per study)."""
    import p4opt
    from p4opt.studies import bench, compare

    parser = argparse.ArgumentParser(
        prog="p4opt",
        description="P⁴ perturbations versus their peers: studies and benchmarks.",
        epilog="Run 'p4opt COMMAND --help' for a command's options; "
        "'p4opt compare --quick' is a one-minute smoke run.",
    )
    parser.add_argument("--version", action="version", version=f"p4opt {p4opt.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (compare, bench):
        command = sub.add_parser(module.COMMAND, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``p4opt`` console script; returns the exit status.

    Without a command it prints the help and returns 0.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
