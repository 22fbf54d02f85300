"""Old import path of :mod:`p4opt.studies.tasks` (kept for compatibility; same objects)."""

from p4opt.studies._alias import alias

alias(
    __name__,
    "p4opt.studies.tasks",
    ('base', 'gaussian', 'procrustes', 'rnn', 'report', 'runner'),
)

from p4opt.studies.tasks import *  # noqa: E402, F403
from p4opt.studies.tasks import __all__  # noqa: E402, F401
