"""Former home of p4opt's errors (0.1): re-exports :mod:`p4opt.errors`."""

from p4opt.errors import (
    NotRegisteredError,
    P4Error,
    P4RuntimeError,
    P4TypeError,
    P4ValueError,
    RegistrationError,
    ShapeError,
    SingularMatrixError,
    describe,
)

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
