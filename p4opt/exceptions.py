"""Errors raised by p4opt: every one is a ``ValueError`` or ``TypeError`` subclass."""

from __future__ import annotations

__all__ = [
    "P4Error",
    "RegistrationError",
    "NotRegisteredError",
    "ShapeError",
    "SingularMatrixError",
    "describe",
]


class P4Error(Exception):
    """Base class of every error p4opt raises on purpose."""


class RegistrationError(P4Error, ValueError):
    """A perturbation cannot be registered (or unregistered) on the named tensor."""


class NotRegisteredError(P4Error, ValueError):
    """No p4opt perturbation is registered on the named tensor."""


class ShapeError(P4Error, ValueError):
    """A tensor has the wrong shape for the requested operation."""


class SingularMatrixError(P4Error, ValueError):
    """A matrix that must be invertible is singular or numerically singular."""


def describe(tensor: object) -> str:
    """Short description of a tensor for error messages (shape, dtype, device, never values).

    Examples
    --------
    >>> import torch
    >>> describe(torch.zeros(2, 3))
    'tensor of shape (2, 3), dtype torch.float32 on cpu'
    """
    shape = getattr(tensor, "shape", None)
    if shape is None:
        return f"object of type {type(tensor).__name__}"
    dims = ", ".join(str(s) for s in shape)
    if len(shape) == 1:
        dims += ","
    return f"tensor of shape ({dims}), dtype {tensor.dtype} on {tensor.device}"  # type: ignore[attr-defined]
