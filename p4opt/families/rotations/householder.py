"""Householder strategy: products of reflection pairs in compact WY form."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from p4opt import linalg as rotations
from p4opt._typing import Tensor
from p4opt._validate import check_int
from p4opt.errors import P4ValueError
from p4opt.families.rotations.base import Rotation

__all__ = ["Householder", "default_rank"]


def default_rank(n: int, p: int | None = None) -> int:
    """Default number of reflections for an ``n × p`` weight (square when ``p`` is left out).

    ``min(2m, max(m // 2, 65536 // m), 3s)`` rounded down to even, with ``m = max(n, p)``
    the size of the rotation and ``s = min(n, p)``: ``2m`` for small weights, ``m`` at
    ``m = 256`` and ``m / 2`` beyond, where forming :math:`QG` (:math:`O(m^2 k)` per step)
    stays below a Riemannian step's :math:`O(m^3)` while the steps to a target, which grow
    about as ``m / k``, stay near the fewest (measurements: the Orthogonal page). A
    rectangular weight needs fewer reflections, the Stiefel manifold having about ``m s``
    dimensions (the third bound never binds for a square weight).

    Examples
    --------
    >>> [default_rank(n) for n in (8, 64, 128, 256, 512, 2048)]
    [16, 128, 256, 256, 256, 1024]
    >>> default_rank(256, 64), default_rank(64, 256), default_rank(20, 10)
    (192, 192, 30)
    """
    p = n if p is None else p
    m, s = max(n, p), min(n, p)
    k = min(2 * m, max(m // 2, 65536 // m), 3 * s)
    return max(2, k - k % 2)


class Householder(Rotation):
    r""":math:`G = H(w_1)\cdots H(w_k)`, :math:`H(w) = I - 2ww^T/\lVert w\rVert^2`, ``k`` even.

    The vectors come in pairs that restart equal (:math:`H(w)H(w) = I`); a pair is a plane
    rotation by twice the angle between its vectors, so :math:`G \in SO(n)`. Applied in
    compact WY form (one triangular solve): :math:`O(Bnk)` for ``B`` vectors.

    After a merge each pair :math:`(a_i, b_i)` restarts at :math:`(v_i, v_i)` with
    :math:`v_i` along its direction of travel :math:`b_i - a_i` and the pair's current length
    (so the scale of the optimizer's steps keeps its meaning); a pair that did not move
    restarts at its first vector.

    A stack (*, n, p) has one product per element: ``vectors`` has shape (*, n, k).

    References
    ----------
    R. Schreiber, C. Van Loan, "A storage-efficient WY representation for products of
    Householder transformations", SIAM J. Sci. Stat. Comput. 10 (1989).
    """

    stacks: ClassVar[bool] = True
    #: restarting the pairs after every step leaves Adam's moments pointing along the previous
    #: step's directions and the layer stops learning (measured; see the Orthogonal page)
    min_merge_every: ClassVar[int] = 3

    def __init__(self, pert, rank):  # type: ignore[no-untyped-def]
        if rank is not None:
            check_int("rank", rank, minimum=2, even=True)
        super().__init__(pert, rank)

    def create(self, like: Tensor, n: int) -> None:
        pert = self.pert
        k = self.rank if self.rank is not None else default_rank(n, min(like.shape[-2:]))
        if k > 4 * n:
            raise P4ValueError(f"rank {k} exceeds 4 n = {4 * n} for {pert.where}")
        if "vectors" not in pert._parameters:
            shape = (*like.shape[:-2], n, k)
            pert.vectors = nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device))

    @torch.no_grad()
    def identity(self, mask: Tensor | None = None) -> None:
        pert = self.pert
        *stack, n, k = pert.vectors.shape
        fresh = torch.randn(*stack, n, k // 2, generator=pert.rng(), dtype=torch.float64)
        self._write(fresh.mul_(pert.init_scale), mask)

    @torch.no_grad()
    def restart(self, mask: Tensor | None = None) -> None:
        pert = self.pert
        k = pert.vectors.shape[-1]
        pairs = pert.vectors.to(torch.float64).unflatten(-1, (k // 2, 2))
        travel = pairs[..., 1] - pairs[..., 0]
        # keep each pair's current length: the optimizer's steps were sized for it (a reset to
        # the initial length would turn the planes by ~1 radian per step at large learning rates)
        scale = pairs.norm(dim=-3).mean(-1).unsqueeze(-2)
        norms = travel.norm(dim=-2, keepdim=True)
        still = norms < 1e-3 * scale
        # a pair that barely moved stays where it is: a fresh random direction would receive
        # the optimizer's kept moments of another direction and turn at random, which threw
        # converged runs back up (see the Orthogonal page of the documentation)
        anchors = torch.where(still, pairs[..., 0], travel * (scale / norms.clamp_min(1e-300)))
        self._write(anchors, mask)

    def _write(self, anchors: Tensor, mask: Tensor | None) -> None:
        """Set the selected elements' pairs to ``(v, v)`` for the columns ``v`` of ``anchors``."""
        vectors = self.pert.vectors
        new = anchors.repeat_interleave(2, dim=-1).to(vectors.dtype)
        if mask is not None:
            new = torch.where(mask[..., None, None].to(vectors.device), new, vectors)
        vectors.copy_(new)

    def rotate(self, x: Tensor) -> Tensor:
        vectors = self.pert.vectors
        n, k = vectors.shape[-2:]
        # with more than n/2 reflections a float32 product loses orthogonality in proportion
        # to k, up to validate()'s tolerance in long runs: the ill-conditioned solve goes to
        # float64 (measurements: the Orthogonal page of the documentation)
        precise = torch.float64 if x.dtype == torch.float32 and 2 * k > n else None
        return rotations.householder_apply(x, vectors.to(x.dtype), precise)

    def describe(self) -> str:
        vectors = self.pert._parameters.get("vectors")
        return "" if vectors is None else f", rank={vectors.shape[-1]}"
