"""Givens strategy: rotations by trainable angles on disjoint coordinate pairs."""

from __future__ import annotations

import torch
from torch import nn

from p4opt import linalg as rotations
from p4opt._typing import Tensor
from p4opt.errors import P4ValueError
from p4opt.families.rotations.base import Rotation

__all__ = ["Givens"]


class Givens(Rotation):
    r"""Rotations by ``n // 2`` angles on disjoint coordinate pairs, re-paired at every restart.

    The pairing is the perturbation's ``pairing`` buffer (kept by ``state_dict`` and device
    moves). Cost :math:`O(Bn)` per application.
    """

    def __init__(self, pert, rank):  # type: ignore[no-untyped-def]
        if rank is not None:
            raise P4ValueError("rank applies to method='householder' only; leave it out for givens")
        super().__init__(pert, rank)

    def create(self, like: Tensor, n: int) -> None:
        pert = self.pert
        if "angles" not in pert._parameters:
            pert.angles = nn.Parameter(torch.zeros(n // 2, dtype=like.dtype, device=like.device))
            pert.register_buffer("pairing", torch.arange(n, device=like.device))

    @torch.no_grad()
    def identity(self) -> None:
        pert = self.pert
        pert.angles.zero_()
        pert.pairing.copy_(torch.randperm(pert.pairing.numel(), generator=pert.rng()))

    def rotate(self, x: Tensor) -> Tensor:
        pert = self.pert
        return rotations.givens_apply(x, pert.angles.to(x.dtype), pert.pairing)
