"""Old import path of :mod:`p4opt.studies.compare` (kept for compatibility; same objects)."""

from p4opt.studies._alias import alias

alias(__name__, "p4opt.studies.compare", ())

from p4opt.studies.compare import *  # noqa: E402, F403
from p4opt.studies.compare import __all__  # noqa: E402, F401
