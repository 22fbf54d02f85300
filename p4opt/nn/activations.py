r"""Bijective elementwise activations: :class:`BentIdentity` and its inverse."""

from __future__ import annotations

from p4opt._typing import Tensor
from p4opt.nn import functional as BF
from p4opt.nn.base import Bijection

__all__ = ["BentIdentity", "InverseBentIdentity"]


class BentIdentity(Bijection):
    r"""The bent identity :math:`f(x) = (\sqrt{x^2+1} - 1)/2 + x`, elementwise.

    A smooth bijection of :math:`\mathbb{R}` with slope in :math:`(1/2, 3/2)`;
    its inverse has the closed form of :func:`p4opt.nn.functional.bent_identity_inverse`.
    Per-sample log-det: :math:`\sum_i \log f'(x_i)`, cost :math:`O(Bn)`.

    Examples
    --------
    >>> import torch
    >>> act = BentIdentity()
    >>> x = torch.randn(3, 2, dtype=torch.float64)
    >>> y, ladj = act.forward_and_log_det(x)
    >>> torch.allclose(act.inverse(y), x), tuple(ladj.shape)
    (True, (3,))
    """

    def forward(self, x: Tensor) -> Tensor:
        return BF.bent_identity(x)

    def inverse(self, y: Tensor) -> Tensor:
        return BF.bent_identity_inverse(y)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return BF.bent_identity(x), BF.bent_identity_log_derivative(x).sum(-1)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = BF.bent_identity_inverse(y)
        return x, -BF.bent_identity_log_derivative(x).sum(-1)


class InverseBentIdentity(Bijection):
    r"""The inverse of :class:`BentIdentity`: :math:`f^{-1}(y) = \tfrac23(2y+1-\sqrt{y^2+y+1})`.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(3, 2, dtype=torch.float64)
    >>> torch.allclose(InverseBentIdentity()(BentIdentity()(x)), x)
    True
    """

    def forward(self, x: Tensor) -> Tensor:
        return BF.bent_identity_inverse(x)

    def inverse(self, y: Tensor) -> Tensor:
        return BF.bent_identity(y)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = BF.bent_identity_inverse(x)
        return y, -BF.bent_identity_log_derivative(y).sum(-1)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return BF.bent_identity(y), BF.bent_identity_log_derivative(y).sum(-1)
