r"""The base class of p4opt's hand-written autograd functions (private).

``torch.autograd.Function.apply`` binds its arguments with :func:`inspect.signature` on every
call when the class defines ``setup_context`` (which :mod:`torch.func` transforms need). On
CPU that binding costs as much as the products of a small layer (measured in the changelog's
"Per-call costs" and on the benchmarks page). :class:`Function`
binds nothing (every p4opt function is called with all its arguments, positionally) and,
when no :mod:`torch.func` transform is active, enters the C++ ``apply`` directly, as
``torch.autograd.Function.apply`` does after its binding step. Under a transform it defers
to ``torch.autograd.Function.apply`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Function"]

try:  # private torch hooks, present since torch 2.0; without them the standard path is used
    from torch._C import _are_functorch_transforms_active as _transforms_active
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap
except ImportError:  # pragma: no cover - depends on the torch build
    _transforms_active = None


class Function(torch.autograd.Function):
    """``torch.autograd.Function`` whose ``apply`` skips the per-call argument binding.

    Subclasses define ``forward`` without ``ctx``, ``setup_context`` and ``backward`` as usual
    and must be called with every argument given positionally.
    """

    @classmethod
    def apply(cls, *args: Any) -> Any:  # type: ignore[override]
        if _transforms_active is None or _transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*_unwrap(args))  # type: ignore[misc]
