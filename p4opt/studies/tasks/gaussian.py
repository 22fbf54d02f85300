r"""Gaussian maximum likelihood of a linear flow: a loss that needs :math:`\log|\det W|`."""

from __future__ import annotations

from typing import ClassVar

import torch

from p4opt._typing import Tensor
from p4opt.studies.tasks.base import Task, random_orthogonal
from p4opt.studies.types import Family

__all__ = ["GaussianML"]


class GaussianML(Task):
    r"""Fit :math:`W` so that :math:`z = W x` is standard normal (negative log-likelihood).

    Data :math:`x = M z`, :math:`z \sim \mathcal{N}(0, I)`, ``batch = 4 n``
    samples, with :math:`M = Q_1 \,\mathrm{diag}(e^{c})\, Q_2`,
    :math:`c \sim U(-1, 1)`. Up to a constant the negative log-likelihood is

    .. math:: L(W) = \tfrac12\,\overline{\lVert W x\rVert^2} - \log|\det W|
              = \tfrac12 \mathrm{tr}(W \Sigma W^T) - \log|\det W|,

    with :math:`\Sigma` the sample covariance. Its minimum
    :math:`L^* = n/2 + \tfrac12 \log\det\Sigma` is reached at
    :math:`W_* = \Sigma^{-1/2}` (and at :math:`O\,\Sigma^{-1/2}` for any
    orthogonal :math:`O`). The start point is :math:`I`; the relative loss is
    :math:`(L - L^*)/(L(I) - L^*)`. Each method supplies its own log|det|.

    Examples
    --------
    >>> task = GaussianML(8, dtype=torch.float64)
    >>> w = task.solution()
    >>> abs(float(task.objective(w, torch.linalg.slogdet(w)[1])) - task.optimum) < 1e-12
    True
    """

    name: ClassVar[str] = "gaussian"
    family: ClassVar[Family] = "invertible"
    description: ClassVar[str] = "Gaussian maximum likelihood, min mean |Wx|^2/2 - log|det W|"
    target: ClassVar[float] = 1e-4
    default_steps: ClassVar[int] = 400
    needs_logdet: ClassVar[bool] = True

    def __init__(self, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n, seed, dtype)
        self.batch = 4 * n
        g = self.generator
        scales = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        mixing = random_orthogonal(n, g) @ torch.diag(scales.exp()) @ random_orthogonal(n, g)
        z = torch.randn(self.batch, n, generator=g, dtype=torch.float64)
        x = z @ mixing.T
        self.x = x.to(dtype)
        self.covariance = self.x.double().mT @ self.x.double() / self.batch
        self.optimum = n / 2 + 0.5 * float(torch.linalg.slogdet(self.covariance)[1])
        eye = torch.eye(n, dtype=torch.float64)
        self.scale = float(self.objective(eye, torch.zeros((), dtype=torch.float64))) - self.optimum

    def initial(self) -> Tensor:
        return torch.eye(self.n, dtype=self.dtype)

    def solution(self) -> Tensor:
        values, vectors = torch.linalg.eigh(self.covariance)
        return vectors @ torch.diag(values.rsqrt()) @ vectors.mT

    def objective(self, weight: Tensor, logabsdet: Tensor | None = None) -> Tensor:
        if logabsdet is None:
            logabsdet = torch.linalg.slogdet(weight)[1]
        z = self.x.to(weight.dtype) @ weight.mT
        return 0.5 * z.square().sum() / self.batch - logabsdet

