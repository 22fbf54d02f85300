"""Cayley strategy: a dense skew-symmetric generator, merged after every step."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from p4opt import linalg as rotations
from p4opt._typing import Tensor
from p4opt.errors import P4ValueError
from p4opt.families.rotations.base import Rotation

__all__ = ["Cayley"]

#: Norm of the skew generator above which a merge re-orthonormalizes its result (see
#: :meth:`Cayley.merge_plan`); healthy training stays far below (Adam's steps of
#: size ``lr`` per entry give about ``lr * n``).
_REFINE_ABOVE = 1e3
#: Largest spectral norm of the skew generator merged in float32 by a float32 layer (see
#: :meth:`Cayley.merge_plan`).
_FLOAT32_MERGE_BELOW = 4.0


class Cayley(Rotation):
    r""":math:`G = (I + S/2)(I - S/2)^{-1}`, :math:`S = X - X^T`, :math:`X` trainable (n, n).

    Every direction of :math:`SO(n)` at once, the whole tangent space: the optimizer updates
    the generator :math:`X` (restarted at zero) as it would update a dense weight, and the
    merge after the step folds the exact rotation into the base. Between merges the generator
    is zero, so the layer's forward pass is the base itself and the backward pass costs one
    product (:func:`~p4opt.linalg.cayley_apply_at_zero`, the exact gradient at zero); the
    :math:`O(n^3)` LU solve runs once per merge, in the layer's dtype (float32 at least; see
    :meth:`merge_plan`). A generator that is not zero
    (merges less often than every step, an update left pending) goes through the LU solve
    (:func:`~p4opt.linalg.cayley_apply`) in the forward pass as well.

    Whether the generator is zero is tested on its values (one reduction), so an optimizer
    that writes ``param.data`` directly is followed as exactly as any other.

    A rectangular (Stiefel) weight, :math:`k` orthonormal rows :math:`V` of length :math:`m`
    (the transpose of a tall weight), is rotated by the rank-:math:`2k` generator
    :math:`S = V^TZ - Z^TV` with :math:`Z` trainable (``tangent``, shape (*, k, m)), which
    spans every tangent direction at :math:`V`: forward pass, backward pass and merge cost
    :math:`O(mk^2 + k^3)` beyond the layer's product
    (:func:`~p4opt.linalg.cayley_stiefel_apply`), not :math:`O(m^3)`.

    A stack (*, n, p) has one generator per element: ``skew`` has shape (*, n, n), or
    ``tangent`` shape (*, k, m) for rectangular elements.
    """

    stacks: ClassVar[bool] = True
    merge_every: ClassVar[int] = 1
    min_merge_every: ClassVar[int] = 1

    def __init__(self, pert, rank):  # type: ignore[no-untyped-def]
        if rank is not None:
            raise P4ValueError(
                f"method='cayley' has no rank (its generator is a dense n × n matrix), got "
                f"rank={rank!r}: leave rank out"
            )
        super().__init__(pert, rank)

    def create(self, like: Tensor, n: int) -> None:
        pert = self.pert
        k = min(like.shape[-2:])
        if k == n:  # square: a dense generator X
            if "skew" not in pert._parameters:
                shape = (*like.shape[:-2], n, n)
                pert.skew = nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device))
        elif "tangent" not in pert._parameters:  # Stiefel: Z of the rows' shape (*, k, m)
            shape = (*like.shape[:-2], k, n)
            pert.tangent = nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device))

    def _generator(self) -> Tensor:
        """The trainable tensor: ``skew`` (square weights) or ``tangent`` (Stiefel)."""
        params = self.pert._parameters
        return params["skew"] if "skew" in params else params["tangent"]  # type: ignore[return-value]

    def _rows(self, dtype: torch.dtype) -> Tensor:
        """The base as orthonormal rows :math:`V` (*, k, m): the base of a wide weight, the
        transpose of a tall one's."""
        base = self.pert.base
        rows = base if base.shape[-2] < base.shape[-1] else base.mT
        return rows.detach().to(dtype)

    @torch.no_grad()
    def identity(self, mask: Tensor | None = None) -> None:
        skew = self._generator()
        if mask is None or bool(mask.all()):
            skew.zero_()
        else:
            skew.masked_fill_(mask[..., None, None].to(skew.device), 0.0)

    def restart(self, mask: Tensor | None = None) -> None:
        """Back to a zero generator (the optimizer's moments keep their meaning: the
        generator's coordinates are those of the tangent space at the merged base)."""
        self.identity(mask)

    def merge_plan(self, dtype: torch.dtype) -> tuple[torch.dtype, bool]:
        r"""The merge's dtype and whether its result is re-orthonormalized, from one norm.

        **Dtype**: the layer's, float32 at least, for the steps of ordinary training; float64
        for a large rotation. :func:`~p4opt.linalg.cayley_apply` rounds only the increment
        :math:`Q(G - I)`, with an error of about
        :math:`\varepsilon\,\kappa(I - S/2)\lVert G - I\rVert`, where
        :math:`\kappa(I - S/2) = (1 + \lVert S\rVert_2^2/4)^{1/2}`: for
        :math:`\lVert S\rVert_2 \le 4` a few machine epsilons, the size of the rounding of the
        merged matrix into the layer's dtype, so float64 would buy nothing. A larger step (an
        exploding learning rate, momentum at a large rate) would leave errors that add up
        over the merges until the next correction, so it is merged in float64. The norm is
        bounded by :math:`2\lVert X\rVert_F`, and where that bound exceeds 4 estimated by
        four power iterations, :math:`O(n^2)` (:func:`~p4opt.linalg.spectral_norm_estimate`,
        a lower bound: the float32 path can take a norm somewhat above 4, where the error is
        still a few epsilons).

        **Refining**: when :math:`\lVert S\rVert_F` may exceed ``1e3``, where the LU solve's
        error (about :math:`\varepsilon\,\kappa(I - S/2)`) can leave rounding level: a wild
        update (an exploding learning rate or loss scale) whose skew matrix also has a zero
        eigenvalue, as every odd-sized one does, put 1e-4 of orthogonality error into a
        float64 base per merge.

        Both decisions read the one reduction :math:`2\lVert X\rVert_F`
        (:math:`\ge \lVert S\rVert_F \ge \lVert S\rVert_2`; an optimizer's step of a skew
        gradient is skew, and then it is :math:`\lVert S\rVert_F` itself; for Stiefel
        weights :math:`\lVert V^TZ - Z^TV\rVert_F \le 2\lVert Z\rVert_F`, :math:`V` having
        orthonormal rows). A Stiefel weight whose bound exceeds 4 merges in float64 without an
        estimate: its merge solves a :math:`2k \times 2k` system whose conditioning grows with
        :math:`\lVert Z\rVert` itself, not only with :math:`S`.
        """
        working = torch.promote_types(dtype, torch.float32)
        generator = self._generator().detach().to(working)
        bound = 2 * torch.linalg.vector_norm(generator, dim=(-2, -1))
        refine = bool((bound > _REFINE_ABOVE).any())  # a NaN element: no (the merge refuses it)
        if working == torch.float64 or bool((bound <= _FLOAT32_MERGE_BELOW).all()):
            return working, refine
        if "skew" not in self.pert._parameters:
            # Stiefel: the 2k x 2k matrix solved by the merge grows with Z itself, including
            # the part of Z that leaves S unchanged (a large Z with a small S missed validate()'s
            # float32 tolerance), so the bound on Z decides alone
            return torch.float64, refine
        skew = generator - generator.mT
        if bool((rotations.spectral_norm_estimate(skew) <= _FLOAT32_MERGE_BELOW).all()):
            return working, refine
        return torch.float64, refine

    def rotate_rows(self, rows: Tensor) -> Tensor:
        if "tangent" in self.pert._parameters:
            return self._rotate_stiefel(rows, rows.detach())
        return self.rotate(rows)

    def rotate(self, x: Tensor) -> Tensor:
        if "tangent" in self.pert._parameters:
            return self._rotate_stiefel(x, self._rows(x.dtype))
        skew = self.pert.skew
        # the usual case between merges: no LU solve (a meta tensor has shapes only)
        if skew.device.type == "meta" or not bool(skew.detach().any()):
            return rotations.cayley_apply_at_zero(x, skew)
        return rotations.cayley_apply(x, skew.to(x.dtype))

    def _rotate_stiefel(self, x: Tensor, rows: Tensor) -> Tensor:
        """:math:`xG` for a Stiefel weight: a copy of ``x`` with the exact gradient while
        the tangent is zero (between merges), else :math:`O(Bmk + mk^2 + k^3)`."""
        tangent = self.pert.tangent
        if tangent.device.type == "meta" or not bool(tangent.detach().any()):
            return rotations.cayley_stiefel_apply_at_zero(x, rows, tangent)
        return rotations.cayley_stiefel_apply(x, rows, tangent.to(x.dtype))
