"""Old import path of :mod:`p4opt.studies.baselines` (kept for compatibility; same objects)."""

from p4opt.studies._alias import alias

alias(__name__, "p4opt.studies.baselines", ('base', 'dense', 'p4', 'peers'))

from p4opt.studies.baselines import *  # noqa: E402, F403
from p4opt.studies.baselines import __all__  # noqa: E402, F401
