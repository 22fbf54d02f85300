r"""A nonlinear task: an orthogonal recurrent network learns a teacher network's dynamics."""

from __future__ import annotations

from typing import ClassVar

import torch

from p4opt._typing import Tensor
from p4opt.studies.tasks.base import Task, random_orthogonal
from p4opt.studies.types import Family

__all__ = ["TeacherRNN"]


class TeacherRNN(Task):
    r"""Teacher–student orthogonal RNN: recover the recurrent matrix from hidden trajectories.

    .. math:: h_{t+1} = \tanh(W h_t + u_t), \qquad h_0 = 0, \quad t < T,

    with ``T = 16`` steps and ``batch = 32`` Gaussian input sequences
    :math:`u_t`. The teacher uses a Haar-random orthogonal :math:`W_*`; the
    student starts at another one (same determinant sign) and minimizes

    .. math:: L(W) = \sum_{t,b} \lVert h_t(W) - h_t(W_*)\rVert^2 \big/
              \sum_{t,b} \lVert h_t(W_*)\rVert^2,

    already a relative loss (optimum 0 at :math:`W_*`). Nonconvex through
    ``tanh`` and the recurrence. Cost per evaluation :math:`O(T\,\text{batch}\,n^2)`.

    Examples
    --------
    >>> task = TeacherRNN(6, dtype=torch.float64)
    >>> float(task.objective(task.solution()))
    0.0
    """

    name: ClassVar[str] = "rnn"
    family: ClassVar[Family] = "orthogonal"
    description: ClassVar[str] = "orthogonal RNN fits a teacher RNN's hidden states (nonlinear)"
    target: ClassVar[float] = 1e-4
    default_steps: ClassVar[int] = 300
    steps_in_time: ClassVar[int] = 16

    def __init__(self, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n, seed, dtype)
        self.batch = 32
        self.truth = random_orthogonal(n, self.generator, det=1.0)
        self.start = random_orthogonal(n, self.generator, det=1.0)
        shape = (self.steps_in_time, self.batch, n)
        self.inputs = torch.randn(shape, generator=self.generator, dtype=torch.float64).to(dtype)
        with torch.no_grad():
            self.states = self.unroll(self.truth.to(dtype))
        self.norm = float(self.states.double().square().sum())
        self.optimum = 0.0
        self.scale = 1.0

    def unroll(self, weight: Tensor) -> Tensor:
        """Hidden states ``(T, batch, n)`` of the network with recurrent matrix ``weight``."""
        inputs = self.inputs.to(weight.dtype)
        h = torch.zeros(inputs.shape[1:], dtype=weight.dtype)
        states = []
        for u in inputs:
            h = torch.tanh(torch.addmm(u, h, weight.mT))
            states.append(h)
        return torch.stack(states)

    def initial(self) -> Tensor:
        return self.start.to(self.dtype)

    def solution(self) -> Tensor:
        return self.truth.clone()

    def objective(self, weight: Tensor, logabsdet: Tensor | None = None) -> Tensor:
        return (self.unroll(weight) - self.states.to(weight.dtype)).square().sum() / self.norm
