r"""Pure elementwise functions of the bent identity (no state, no modules).

.. math:: f(x) = \tfrac12\left(\sqrt{x^2 + 1} - 1\right) + x, \qquad
          f'(x) = 1 + \frac{x}{2\sqrt{x^2 + 1}} \in (\tfrac12, \tfrac32)

and its closed-form inverse

.. math:: f^{-1}(y) = \tfrac23\left(2y + 1 - \sqrt{y^2 + y + 1}\right).

Both are evaluated in forms without cancellation, so the pair round-trips to a
few ulps over the whole real line.
"""

from __future__ import annotations

import torch

from p4opt._typing import Tensor

__all__ = [
    "bent_identity",
    "bent_identity_inverse",
    "bent_identity_log_derivative",
    "bent_identity_log_derivative_grad",
]


def bent_identity(x: Tensor) -> Tensor:
    r"""The bent identity :math:`f(x) = (\sqrt{x^2+1} - 1)/2 + x`, elementwise.

    Uses :math:`\sqrt{x^2+1} - 1 = x^2 / (\sqrt{x^2+1} + 1)` to avoid cancellation
    near 0. Shape ``(*)`` to ``(*)``; cost :math:`O(\text{numel})`.

    Examples
    --------
    >>> import torch
    >>> bent_identity(torch.tensor([0.0, 1.0]))
    tensor([0.0000, 1.2071])
    """
    h = torch.hypot(x, torch.ones_like(x))
    return x + 0.5 * x * x / (h + 1)


def bent_identity_inverse(y: Tensor) -> Tensor:
    r"""The inverse :math:`f^{-1}(y) = \tfrac23(2y + 1 - \sqrt{y^2+y+1})`, elementwise.

    For :math:`2y + 1 \ge 0` the difference is rationalized,
    :math:`2y + 1 - r = 3y(y+1)/(2y + 1 + r)` with :math:`r = \sqrt{y^2+y+1}`,
    so neither branch cancels. Shape ``(*)`` to ``(*)``.

    Examples
    --------
    >>> import torch
    >>> x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    >>> torch.allclose(bent_identity_inverse(bent_identity(x)), x)
    True
    """
    r = torch.sqrt(y * y + y + 1)
    s = 2 * y + 1
    positive = s >= 0
    # Each branch sees only inputs where it is well defined, so gradients stay finite.
    denom = torch.where(positive, s + r, torch.ones_like(s))
    rational = 2 * y * (y + 1) / denom
    direct = (2.0 / 3.0) * (s - r)
    return torch.where(positive, rational, direct)


def bent_identity_log_derivative(x: Tensor) -> Tensor:
    r""":math:`\log f'(x) = \log\left(1 + x / (2\sqrt{x^2+1})\right)`, elementwise.

    Lies in :math:`(-\log 2, \log \tfrac32)`. Sum it over the last dimension
    for the per-sample log-determinant of the elementwise map.

    Examples
    --------
    >>> import torch
    >>> bent_identity_log_derivative(torch.tensor([0.0]))
    tensor([0.])
    """
    return torch.log1p(0.5 * x / torch.hypot(x, torch.ones_like(x)))


def bent_identity_log_derivative_grad(x: Tensor) -> Tensor:
    r"""Derivative of :math:`\log f'(x)`: :math:`f''(x) / f'(x)`, elementwise.

    With :math:`h = \sqrt{x^2+1}`, :math:`f''(x) = 1/(2h^3)` and
    :math:`f'(x) = 1 + x/(2h)`, so the ratio is :math:`1 / (h^2 (2h + x))`.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    >>> g, = torch.autograd.grad(bent_identity_log_derivative(x).sum(), x)
    >>> torch.allclose(g, bent_identity_log_derivative_grad(x.detach()))
    True
    """
    h = torch.hypot(x, torch.ones_like(x))
    return 1.0 / (h * h * (2 * h + x))
