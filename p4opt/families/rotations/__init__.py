"""Strategies for :class:`~p4opt.Orthogonal`: how the rotation :math:`G(B)` is parameterized."""

from p4opt.families.rotations.base import Rotation
from p4opt.families.rotations.cayley import Cayley
from p4opt.families.rotations.givens import Givens
from p4opt.families.rotations.householder import Householder, default_rank

__all__ = ["Rotation", "Householder", "Givens", "Cayley", "default_rank", "METHODS"]

#: ``Orthogonal(method=...)`` names and their strategies.
METHODS: dict[str, type[Rotation]] = {
    "householder": Householder,
    "givens": Givens,
    "cayley": Cayley,
}
