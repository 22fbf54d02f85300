"""A complete P⁴ family: diagonal matrices with positive entries, R_s(A) = A diag(exp(s))."""

import torch

import p4opt


class PositiveDiagonal(p4opt.Perturbation):
    """Keep a square weight diagonal with a positive diagonal (so log|det| is a plain sum)."""

    default_merge_every = 20

    def attach(self, value: torch.Tensor) -> torch.Tensor:
        if value.ndim != 2 or value.shape[0] != value.shape[1] or not (value.diagonal() > 0).all():
            raise p4opt.ShapeError(f"{self.where} must be square with a positive diagonal")
        if "s" not in self._parameters:
            self.s = torch.nn.Parameter(torch.zeros_like(value.diagonal()))
        return torch.diag_embed(value.diagonal())  # project: drop the off-diagonal entries

    def identity(self) -> None:
        torch.nn.init.zeros_(self.s)  # in place, so optimizer state keyed by tensor stays valid

    def apply(self, base: torch.Tensor) -> torch.Tensor:
        return base * self.s.exp()  # column j times exp(s_j): diagonal and positive for any s

    def check(self, candidate: torch.Tensor) -> bool:
        return bool((candidate.diagonal() > 0).all())  # a merge that underflowed is rejected

    @torch.no_grad()
    def validate(self) -> p4opt.ValidationReport:
        w = self.current()
        off = float((w - torch.diag_embed(w.diagonal())).abs().amax())
        return p4opt.ValidationReport(self.where, {"off_diagonal": off}, {"off_diagonal": 0.0})
