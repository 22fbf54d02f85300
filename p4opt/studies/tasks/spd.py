r"""Gaussian precision maximum likelihood: a symmetric positive-definite weight and its log det."""

from __future__ import annotations

from typing import ClassVar

import torch

from p4opt._typing import Tensor
from p4opt.studies.tasks.base import Task, random_orthogonal
from p4opt.studies.types import Family

__all__ = ["PrecisionML"]


class PrecisionML(Task):
    r"""Fit the precision matrix :math:`P` of a zero-mean Gaussian by maximum likelihood.

    Data: ``batch = samples_per_dim * n`` draws :math:`x = C^{1/2} z`,
    :math:`z \sim \mathcal{N}(0, I)`, with :math:`C = Q\,\mathrm{diag}(\lambda)\,Q^T`,
    :math:`Q` Haar-random and :math:`\lambda_i = 10^{u_i}`, :math:`u_i \sim U(-1, 1)`
    (log-uniform in :math:`[0.1, 10]`). With :math:`S` the sample covariance (float64),
    the negative log-likelihood per sample is, up to a constant,

    .. math:: L(P) = \tfrac12\,\overline{x^T P x} - \tfrac12\log\det P
              = \tfrac12\mathrm{tr}(PS) - \tfrac12\log\det P,

    strictly convex on the SPD cone with minimizer :math:`P_* = S^{-1}` and minimum
    :math:`L^* = n/2 + \tfrac12\log\det S`. The start point is :math:`I`; the relative
    loss is :math:`(L - L^*)/(L(I) - L^*)`. Each method supplies its own
    :math:`\log\det P` (passed as ``logabsdet``). One evaluation costs :math:`O(n^2)`
    given the log-determinant (:math:`O(n^3)` when it is computed here).

    Parameters
    ----------
    n : int
        Size of :math:`P`, ``n >= 2``.
    seed : int
        Seed of the covariance and of the sample.
    dtype : torch.dtype
        Dtype of :math:`S` as the loss sees it and of the start point.
    samples_per_dim : int
        Samples per dimension, ``>= 2`` (``batch = samples_per_dim * n``, so :math:`S`
        is non-singular almost surely).

    Raises
    ------
    ValueError
        When ``samples_per_dim`` is not an int ``>= 2`` (or ``n`` is bad, see :class:`Task`).

    Examples
    --------
    >>> task = PrecisionML(8, dtype=torch.float64)
    >>> p = task.solution()
    >>> abs(float(task.objective(p)) - task.optimum) < 1e-10, float(task.relative(
    ...     float(task.objective(task.initial()))))
    (True, 1.0)
    """

    name: ClassVar[str] = "spd"
    family: ClassVar[Family] = "spd"
    description: ClassVar[str] = (
        "Gaussian precision maximum likelihood, min tr(P S)/2 - log det(P)/2 over SPD P"
    )
    target: ClassVar[float] = 1e-4
    default_steps: ClassVar[int] = 600
    needs_logdet: ClassVar[bool] = True

    def __init__(
        self,
        n: int,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        *,
        samples_per_dim: int = 10,
    ) -> None:
        super().__init__(n, seed, dtype)
        if isinstance(samples_per_dim, bool) or not isinstance(samples_per_dim, int) \
                or samples_per_dim < 2:
            raise ValueError(f"samples_per_dim must be an int >= 2, got {samples_per_dim!r}")
        self.batch = samples_per_dim * n
        g = self.generator
        basis = random_orthogonal(n, g)
        eigenvalues = 10 ** (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
        root = (basis * eigenvalues.sqrt()) @ basis.mT  # C^{1/2}
        x = torch.randn(self.batch, n, generator=g, dtype=torch.float64) @ root
        #: float64 sample covariance S, shape (n, n).
        self.covariance = x.mT @ x / self.batch
        self._s = self.covariance.to(dtype)
        self.optimum = n / 2 + 0.5 * float(torch.linalg.slogdet(self.covariance)[1])
        self.scale = 0.5 * float(torch.trace(self.covariance)) - self.optimum

    def initial(self) -> Tensor:
        return torch.eye(self.n, dtype=self.dtype)

    def solution(self) -> Tensor:
        return torch.cholesky_inverse(torch.linalg.cholesky(self.covariance))

    def objective(self, weight: Tensor, logabsdet: Tensor | None = None) -> Tensor:
        r"""The loss :math:`\tfrac12\mathrm{tr}(PS) - \tfrac12\log\det P` at ``weight`` (n, n).

        ``logabsdet`` defaults to ``slogdet`` of ``weight`` (:math:`O(n^3)`); the trace
        term costs :math:`O(n^2)` (``weight`` is symmetric on the methods' side).
        """
        if weight.shape[-2:] != self.shape:
            raise ValueError(f"weight must have shape {self.shape}, got {tuple(weight.shape)}")
        if logabsdet is None:
            logabsdet = torch.linalg.slogdet(weight)[1]
        return 0.5 * (weight * self._s.to(weight.dtype)).sum() - 0.5 * logabsdet
