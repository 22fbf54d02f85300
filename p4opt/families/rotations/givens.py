"""Givens strategy: layers of rotations by trainable angles on disjoint coordinate pairs."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from p4opt import linalg as rotations
from p4opt._typing import Tensor
from p4opt._validate import check_choice, check_int
from p4opt.errors import P4ValueError
from p4opt.families.rotations.base import Rotation

__all__ = ["Givens", "default_layers"]

Restart = Literal["keep", "advance", "shuffle"]


def default_layers(n: int) -> int:
    """Default number of Givens layers for rotations of size ``n``: a whole tournament.

    ``n - 1`` layers for even ``n`` and ``n`` for odd ``n`` rotate every pair of coordinates
    once, so that the rotation reaches every direction of :math:`SO(n)` at every merge.

    Examples
    --------
    >>> [default_layers(n) for n in (1, 2, 3, 8, 64, 257)]
    [1, 1, 3, 7, 63, 257]
    """
    return max(1, n - 1 + n % 2)


class Givens(Rotation):
    r""":math:`G = G_1 \cdots G_L`: ``L`` layers of ``n // 2`` rotations on disjoint pairs.

    The pairings come from a round-robin tournament (:func:`~p4opt.linalg.round_robin`) on
    coordinates relabeled at random: ``L`` consecutive rounds. With the default ``L = n - 1``
    (:func:`default_layers`) the layers rotate every pair once, and a restart keeps the
    pairing (``restart="keep"``), so each angle keeps meaning the same plane and the
    optimizer's moments stay valid across merges. With fewer layers a restart moves on to the
    next ``L`` rounds (``"advance"``), so that ``ceil((n - 1) / L)`` merges cover every pair,
    or draws a fresh labeling (``"shuffle"``). Measured choices are on the documentation's
    Orthogonal page.

    Trainable ``angles`` of shape (L, n // 2); buffers ``pairing`` (L, n) and ``labels`` (n,)
    and ``next_round`` (kept by ``state_dict`` and device moves). Cost :math:`O(BnL)` per
    application to ``B`` vectors, :math:`O(n^2L)` to form :math:`QG`.
    """

    stacks: ClassVar[bool] = False

    def __init__(self, pert, rank, restart: Restart | None = None):  # type: ignore[no-untyped-def]
        if rank is not None:
            check_int("rank", rank, minimum=1)
        if restart is not None:
            check_choice("restart", restart, ("keep", "advance", "shuffle"))
        super().__init__(pert, rank)
        self.restart_rule = restart

    def create(self, like: Tensor, n: int) -> None:
        pert = self.pert
        if "angles" in pert._parameters:
            return
        full = default_layers(n)
        layers = full if self.rank is None else self.rank
        if layers > 4 * full:
            raise P4ValueError(
                f"rank (Givens layers) {layers} exceeds 4 tournaments ({4 * full}) for "
                f"{pert.where}"
            )
        if self.restart_rule is None:
            self.restart_rule = "keep" if layers >= full else "advance"
        like_ = {"dtype": like.dtype, "device": like.device}
        pert.angles = nn.Parameter(torch.zeros(layers, n // 2, **like_))
        long_ = {"dtype": torch.long, "device": like.device}
        pert.register_buffer("pairing", torch.zeros(layers, n, **long_))
        pert.register_buffer("labels", torch.arange(n, **long_))
        pert.register_buffer("next_round", torch.zeros((), **long_))

    @torch.no_grad()
    def identity(self) -> None:
        """Zero the angles; new labels and a random first round."""
        pert = self.pert
        n = pert.labels.numel()
        g = pert.rng()
        pert.labels.copy_(torch.randperm(n, generator=g))
        pert.next_round.fill_(int(torch.randint(default_layers(n), (), generator=g)))
        self._pair()

    @torch.no_grad()
    def restart(self) -> None:
        """Zero the angles; the pairing as ``restart_rule`` says (see the class)."""
        if self.restart_rule == "shuffle":
            self.identity()
        elif self.restart_rule == "advance":
            self._pair()
        else:
            self.pert.angles.zero_()

    def _pair(self) -> None:
        """Zero the angles and pair by the next ``L`` rounds of the tournament."""
        pert = self.pert
        layers, n = pert.pairing.shape
        pert.angles.zero_()
        if pert.pairing.device.type == "meta":  # shapes only; load_state_dict brings the rest
            return
        first = int(pert.next_round)
        rounds = torch.arange(first, first + layers, device=pert.labels.device)
        pert.pairing.copy_(rotations.round_robin(n, rounds, pert.labels))
        pert.next_round.fill_((first + layers) % default_layers(n))

    def upgrade_state_dict(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """0.1 saved one layer (``angles`` (m,), ``pairing`` (n,)): make it the first of ``L``.

        The other layers keep zero angles, so the loaded layer computes what it computed.
        """
        angles, pairing = state_dict.get(prefix + "angles"), state_dict.get(prefix + "pairing")
        if angles is None or pairing is None or angles.ndim != 1 or pairing.ndim != 1:
            return
        pert = self.pert
        layers = pert.angles.new_zeros(pert.angles.shape, dtype=angles.dtype)
        layers[0] = angles
        order = pert.pairing.clone()
        order[0] = pairing
        state_dict[prefix + "angles"], state_dict[prefix + "pairing"] = layers, order
        for name in ("labels", "next_round"):
            state_dict.setdefault(prefix + name, getattr(pert, name))

    def rotate(self, x: Tensor) -> Tensor:
        pert = self.pert
        # every layer rounds, so a float32 product of n - 1 layers drifts from orthogonal;
        # formed in float64 and rounded once it stays at float32 rounding (see the soak in
        # the documentation's robustness page)
        precise = torch.float64 if x.dtype == torch.float32 else None
        return rotations.givens_layers_apply(x, pert.angles.to(x.dtype), pert.pairing, precise)

    def describe(self) -> str:
        angles = self.pert._parameters.get("angles")
        return "" if angles is None else f", rank={angles.shape[0]} (layers)"
