"""Boltzmann generator of alanine dipeptide in vacuum: RealNVP with and without P⁴Inv mixing.

Run the modules as scripts (``python examples/boltzmann/run.py --help``); ``run.py --quick``
goes end to end in a few minutes on two CPU cores. See ``docs/boltzmann.md``.
"""
