"""Comparisons of P⁴ families with their peers: tasks, baselines, runner, reports and the CLI.

This package depends on the core (:mod:`p4opt`), never the reverse. ``import p4opt`` does not
import it; ``p4opt compare`` and ``p4opt bench`` (:mod:`p4opt.studies.cli`) drive it.
"""

__all__: list[str] = []
