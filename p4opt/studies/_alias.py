"""Keep the 0.1 import paths (``p4opt.tasks``, ``p4opt.baselines``, ...) working."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

__all__ = ["alias"]


def alias(old: str, new: str, submodules: tuple[str, ...] = ()) -> ModuleType:
    """Import ``new`` and make ``old`` (and ``old.<sub>`` for each submodule) name the same modules.

    ``import p4opt.tasks.runner`` then returns ``p4opt.studies.tasks.runner`` itself, so classes
    and module state are never duplicated under two names.
    """
    module = importlib.import_module(new)
    for sub in submodules:
        target = importlib.import_module(f"{new}.{sub}")
        sys.modules[f"{old}.{sub}"] = target
        setattr(sys.modules[old], sub, target)
    return module
