"""One set of argument validators; each raises a :mod:`p4opt.errors` error naming the argument."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from p4opt._typing import Tensor
from p4opt.errors import P4TypeError, P4ValueError, describe

__all__ = [
    "check_int",
    "check_optional_int",
    "check_number",
    "check_choice",
    "check_bounds",
    "check_dtype",
    "check_floating",
    "check_finite",
]


def check_int(name: str, value: Any, minimum: int | None = None, even: bool = False) -> int:
    """``value`` as an int (bools and strings refused: TypeError), at least ``minimum``.

    Examples
    --------
    >>> check_int("rank", 3, minimum=1)
    3
    >>> check_int("rank", "2")
    Traceback (most recent call last):
    ...
    p4opt.errors.P4TypeError: rank must be an int, got str '2'
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise P4TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise P4ValueError(f"{name} must be an int >= {minimum}, got {value}")
    if even and value % 2:
        raise P4ValueError(f"{name} must be even, got {value}")
    return value


def check_optional_int(name: str, value: Any, minimum: int | None = None) -> int | None:
    """Like :func:`check_int`, with ``None`` allowed (and returned)."""
    return None if value is None else check_int(name, value, minimum)


def check_number(
    name: str, value: Any, *, positive: bool = False, minimum: float | None = None
) -> float:
    """``value`` as a float (no bools, no NaN; infinities pass), optionally > 0 or >= a minimum."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise P4TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise P4ValueError(f"{name} must not be NaN")
    if positive and not value > 0:
        raise P4ValueError(f"{name} must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise P4ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices`` (else ValueError listing them)."""
    options = tuple(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise P4ValueError(f"{name} must be one of {listed}; got {value!r}")
    return value


def check_bounds(name: str, bounds: Any) -> tuple[float, float]:
    """``(low, high)`` floats with ``low < high``; ``None`` means unbounded."""
    if bounds is None:
        return (-math.inf, math.inf)
    try:
        low, high = (check_number(name, b) for b in bounds)
    except (TypeError, ValueError) as error:
        message = f"{name} must be a pair (low, high) of numbers, got {bounds!r}"
        raise P4ValueError(message) from error
    if not low < high:
        raise P4ValueError(f"{name} must be (low, high) with low < high, got {bounds!r}")
    return low, high


def check_dtype(name: str, dtype: Any) -> torch.dtype:
    """A floating :class:`torch.dtype`."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise P4TypeError(f"{name} must be a floating torch.dtype, got {dtype!r}")
    return dtype


def check_floating(where: str, value: Any) -> Tensor:
    """``value`` if it is a real floating-point tensor (TypeError otherwise)."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise P4TypeError(f"{where} must be a real floating-point tensor, got {describe(value)}")
    return value


def check_finite(where: str, value: Tensor) -> Tensor:
    """``value`` if every entry is finite (ValueError naming the tensor and the count otherwise)."""
    if value.device.type == "meta":
        return value
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise P4ValueError(
            f"{where} has {bad} non-finite (NaN or Inf) entries; initialize it with finite values"
        )
    return value
