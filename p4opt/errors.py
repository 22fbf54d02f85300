"""The errors p4opt raises on purpose: each subclasses :class:`P4Error` and the matching builtin.

``except p4opt.P4Error`` catches every deliberate error, while code that expects the builtin
(``except ValueError``) keeps working.
"""

from __future__ import annotations

__all__ = [
    "P4Error",
    "P4ValueError",
    "P4TypeError",
    "P4RuntimeError",
    "RegistrationError",
    "NotRegisteredError",
    "ShapeError",
    "SingularMatrixError",
    "describe",
]


class P4Error(Exception):
    """Base class of every error p4opt raises on purpose."""


class P4ValueError(P4Error, ValueError):
    """An argument has the right type but an inadmissible value."""


class P4TypeError(P4Error, TypeError):
    """An argument has the wrong type (or a tensor the wrong dtype)."""


class P4RuntimeError(P4Error, RuntimeError):
    """An operation was called in a state that does not allow it."""


class RegistrationError(P4ValueError):
    """A perturbation cannot be registered (or unregistered) on the named tensor."""


class NotRegisteredError(P4ValueError):
    """No p4opt perturbation is registered on the named tensor."""


class ShapeError(P4ValueError):
    """A tensor has the wrong shape for the requested operation."""


class SingularMatrixError(P4ValueError):
    """A matrix that must be invertible is singular or numerically singular."""


def describe(tensor: object) -> str:
    """Short description of a tensor for error messages (shape, dtype, device, never values).

    Examples
    --------
    >>> import torch
    >>> describe(torch.zeros(2, 3))
    'tensor of shape (2, 3), dtype torch.float32 on cpu'
    >>> describe("abc")
    'object of type str'
    """
    shape = getattr(tensor, "shape", None)
    if shape is None:
        return f"object of type {type(tensor).__name__}"
    dims = ", ".join(str(s) for s in shape)
    if len(shape) == 1:
        dims += ","
    return f"tensor of shape ({dims}), dtype {tensor.dtype} on {tensor.device}"  # type: ignore[attr-defined]
