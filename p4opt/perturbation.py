r"""The :class:`Perturbation` base class: one merge cycle, written once, for every family.

A perturbation family defines a map :math:`R_B : S \to S` on a feasible set :math:`S`,
parameterized by small trainable tensors :math:`B` with an identity element :math:`B_0`
(:math:`R_{B_0} = \mathrm{id}`). The frozen base tensor :math:`A` lives in the module
(``module.parametrizations[name].original``); ``module.<name>`` evaluates :math:`R_B(A)`.
"""

from __future__ import annotations

import abc
from typing import ClassVar, Literal

import torch

from p4opt._typing import Tensor
from p4opt._validate import (
    check_choice,
    check_finite,
    check_floating,
    check_int,
    check_optional_int,
)
from p4opt.binding import Bound, owner_of
from p4opt.records import MergeResult, Proposal, Reason, ValidationReport

__all__ = ["Perturbation", "MergeResult", "Proposal", "Reason", "ValidationReport", "owner_of"]

OnReject = Literal["keep", "reset"]
#: Updates that can never be kept pending: the layer they give is already non-finite or
#: outside the feasible set.
_FORCED_DROPS = tuple(
    r.code for r in (Reason.NON_FINITE_UPDATE, Reason.NON_FINITE_RESULT, Reason.INFEASIBLE_RESULT)
)


class Perturbation(Bound, abc.ABC):
    r"""Abstract base of every P⁴ family; owns the merge cycle as a template.

    A family implements:

    ``attach(value)``
        Check or project the tensor being registered (already known to be finite and
        floating) and create the trainable tensors; return the base tensor to store.
    ``identity()``
        Return the trainable tensors to :math:`B_0`, in place.
    ``apply(base)``
        :math:`R_B(A)`, differentiable in the trainable tensors.
    ``validate()``
        A :class:`ValidationReport` of the invariants.

    and, when the defaults do not fit, ``propose()`` (the candidate and per-element checks;
    default: :math:`R_B(A)` itself, checked by ``check``), ``fold(proposal, ok)`` (write it
    into the base; default: copy), ``restart(mask, folded)`` (default: ``identity()``) and
    ``correct()`` (periodic numerical correction; default: none).

    :meth:`merge` runs the cycle: finite check of :math:`B` → ``propose`` → acceptance →
    ``fold`` → merge count and correction on one schedule → ``restart`` → a
    :class:`MergeResult` naming the exact tensors whose optimizer state is stale. A rejected
    element of a stack keeps its base bit for bit.

    Parameters
    ----------
    seed : int, optional
        Seed (>= 0) of the perturbation's random draws. Left out, one is drawn from torch's
        global generator at the first draw. Draw number ``i`` uses a generator seeded
        from ``(seed, i)``; both numbers are buffers, so checkpoints resume the same draws
        and data-parallel ranks (which synchronize buffers) draw the same values whatever
        each rank's own seeding.
    correct_every : int or None
        Merges between numerical corrections (``None``: never).
    on_reject : {"keep", "reset"}
        What happens to a finite update that cannot be folded: kept pending (the layer's
        function does not change) or dropped (its optimizer state with it).
    """

    default_merge_every: ClassVar[int] = 10
    #: Fewest steps between merges with which the family was measured to learn;
    #: ``P4Optimizer(merge_every=...)`` below it warns (Householder ``Orthogonal``: 3).
    min_merge_every: int = 1
    #: Whether, after a restart, the optimizer's state of the trainable tensors is dropped
    #: (``P4Optimizer(reset_state=...)`` overrides it).
    reset_optimizer_state: ClassVar[bool] = True
    #: Trailing dimensions forming one element of a stack (``None``: the whole tensor).
    element_ndim: ClassVar[int | None] = None
    #: Whether :meth:`propose` itself refuses, per element with ``Reason.NON_FINITE_UPDATE``,
    #: trainable tensors that are not finite; :meth:`merge` then skips its own pass over them.
    proposes_finite_only: ClassVar[bool] = False

    def __init__(
        self,
        *,
        seed: int | None = None,
        correct_every: int | None = None,
        on_reject: OnReject = "keep",
    ) -> None:
        super().__init__(-1 if seed is None else check_int("seed", seed, minimum=0))
        self.correct_every = check_optional_int("correct_every", correct_every, minimum=1)
        self.on_reject: OnReject = check_choice("on_reject", on_reject, ("keep", "reset"))
        self._last_grads: dict[str, Tensor] = {}

    # ----------------------------------------------------------------- contract
    @abc.abstractmethod
    def identity(self) -> None:
        """Reset the trainable tensors to the identity element, in place."""

    @abc.abstractmethod
    def apply(self, base: Tensor) -> Tensor:  # type: ignore[override]
        """Return :math:`R_B(A)` for the base tensor ``base``."""

    @abc.abstractmethod
    def validate(self) -> ValidationReport:
        """Measure the invariants of the current (perturbed) tensor."""

    def attach(self, value: Tensor) -> Tensor:
        """Check the (finite, floating) tensor being registered; return the base to store."""
        return value

    def propose(self) -> Proposal:
        """The merged tensor :math:`R_B(A)`, checked by :meth:`check`."""
        candidate = self.apply(self.base)
        ok = self.check(candidate)
        codes = None if ok is True else _codes(ok, Reason.INFEASIBLE_RESULT)
        return Proposal(candidate=candidate, codes=codes)

    def check(self, candidate: Tensor) -> bool | Tensor:
        """Whether a candidate lies in the feasible set (per stack element); default ``True``."""
        return True

    def fold(self, proposal: Proposal, ok: Tensor) -> None:
        """Write the accepted elements of ``proposal.candidate`` into the base, in place."""
        if proposal.candidate is None:
            name = type(self).__name__
            raise NotImplementedError(f"{name} proposes no candidate: override fold()")
        base = self.base
        if ok.ndim == 0:
            base.copy_(proposal.candidate)
        else:
            mask = ok.reshape(*ok.shape, *([1] * (base.ndim - ok.ndim)))
            base.copy_(torch.where(mask, proposal.candidate.to(base.dtype), base))

    def restart(self, mask: Tensor, folded: bool) -> None:
        """Return the elements selected by ``mask`` to the identity (after a fold or a drop)."""
        self.identity()

    def correct(self) -> dict[str, float]:
        """Periodic numerical correction of the base (after every ``correct_every`` merges)."""
        return {}

    # -------------------------------------------------------------- the cycle
    @torch.no_grad()
    def merge(
        self, *, reset_state: bool | None = None, grads: dict[str, Tensor] | None = None
    ) -> MergeResult:
        """Validate and fold the pending update into the base; restart; report.

        Parameters
        ----------
        reset_state : bool, optional
            Whether a restart makes the trainable tensors' optimizer state stale; left
            out, the family's ``reset_optimizer_state``.
        grads : dict, optional
            The trainable tensors' last gradients by name, for families whose restart
            uses them (handed over by :class:`~p4opt.P4Optimizer`).
        """
        self.base  # noqa: B018 - raises a clear error when not registered
        self._sync_dtype()
        object.__setattr__(self, "_updates_since_merge", 0)  # plain attributes (see binding)
        object.__setattr__(self, "_last_grads", grads or {})
        shape = self._stack_shape()
        nonfinite = None if self.proposes_finite_only else self._nonfinite_update(shape)
        all_finite = nonfinite is None
        proposal = self.propose() if all_finite or not bool(nonfinite.all()) else Proposal()
        if all_finite and _folds_whole(proposal):
            policy = self.reset_optimizer_state if reset_state is None else reset_state
            return self._fold_whole(proposal, shape, policy)
        finite = torch.ones(shape, dtype=torch.bool) if all_finite else ~nonfinite
        codes = torch.zeros(shape, dtype=torch.long)
        if proposal.codes is not None:
            codes = proposal.codes.to(torch.long).cpu().expand(shape).clone()
        codes = torch.where(finite, codes, Reason.NON_FINITE_UPDATE.code)
        if proposal.candidate is not None:
            done = _per_element(torch.isfinite(proposal.candidate), len(shape)).cpu()
            codes = torch.where((codes == 0) & ~done, Reason.NON_FINITE_RESULT.code, codes)
        ok = codes == 0
        scale = torch.ones(shape, dtype=torch.float64)
        if proposal.scale is not None:
            scale = proposal.scale.to(torch.float64).cpu().expand(shape)
        corrected = False
        figures = dict(proposal.figures)
        if bool(ok.any()):
            self.fold(proposal, ok.to(self.base.device))
            self.merges.add_(1)  # in place: no new tensor, no module lookup
            every = self.correct_every
            if every is not None and int(self.merges) % every == 0:
                figures.update(self.correct())
                corrected = True
        full = ok & (scale >= 1)
        forced = torch.isin(codes, torch.tensor(_FORCED_DROPS))
        drop = ~ok & (forced | (self.on_reject == "reset"))
        kept = ~ok & ~drop
        if bool(kept.any()):  # an update may stay pending only while the layer it gives is finite
            current = torch.isfinite(self.apply(self.base).detach())
            drop |= kept & ~_per_element(current, len(shape)).cpu()
        if bool(full.any()):
            self.restart(full.to(self.base.device), folded=True)
        if bool(drop.any()):
            self.restart(drop.to(self.base.device), folded=False)
        policy = self.reset_optimizer_state if reset_state is None else reset_state
        stale = bool(drop.any()) or (bool(full.any()) and policy)
        first = codes[codes != 0]
        if not first.numel() and proposal.cut is not None:
            first = proposal.cut.cpu()[proposal.cut.cpu() != 0]
        return MergeResult(
            accepted=bool(full.all()),
            reason=Reason.from_code(int(first[0])) if first.numel() else Reason.OK,
            folded=int(full.sum()),
            partial=int((ok & ~full).sum()),
            rejected=int((~ok).sum()),
            scale=float(torch.where(ok, scale, 0.0).amin()) if scale.numel() else 1.0,
            corrected=corrected,
            stale=tuple(self.trainable()) if stale else (),
            dropped=bool(drop.any()),
            figures=figures,
        )

    def _fold_whole(self, proposal: Proposal, shape: torch.Size, reset: bool) -> MergeResult:
        """The usual case, without per-element bookkeeping: every element folds its whole update."""
        ok = torch.ones(shape, dtype=torch.bool, device=self.base.device)
        self.fold(proposal, ok)
        self.merges.add_(1)  # in place: no new tensor, no module lookup
        figures = dict(proposal.figures)
        every = self.correct_every
        corrected = every is not None and int(self.merges) % every == 0
        if corrected:
            figures.update(self.correct())
        self.restart(ok, folded=True)
        stale = tuple(self.trainable()) if reset else ()
        return MergeResult(
            accepted=True, folded=ok.numel(), corrected=corrected, stale=stale, figures=figures
        )

    def _nonfinite_update(self, shape: torch.Size) -> Tensor | None:
        """Per stack element: whether some trainable tensor is not finite there; ``None`` if
        every tensor is finite everywhere (the usual case, one sum per tensor)."""
        bad = None
        for p in self.trainable():
            if bool(torch.isfinite(p.detach().sum())):  # one pass, no mask, in the usual case
                continue
            flags = torch.isfinite(p.detach())
            if len(shape) and p.shape[: len(shape)] == shape:
                element = ~_per_element(flags, len(shape)).cpu()
            else:
                element = torch.full(shape, not bool(flags.all()))
            bad = element if bad is None else bad | element
        return None if bad is None or not bool(bad.any()) else bad

    def _stack_shape(self) -> torch.Size:
        if self.element_ndim is None:
            return torch.Size()
        return self.base.shape[: self.base.ndim - self.element_ndim]

    # ------------------------------------------------------------- plumbing
    def forward(self, base: Tensor) -> Tensor:
        return self.apply(base)

    def right_inverse(self, value: Tensor) -> Tensor:
        """torch.nn.utils.parametrize hook: checks ``value`` and calls :meth:`attach`."""
        check_floating(self.where, value)
        check_finite(self.where, value)
        base = self.attach(value)
        self._layer_dtype = value.dtype
        return base

    def current(self) -> Tensor:
        """The current perturbed tensor :math:`R_B(A)`."""
        self._sync_dtype()
        return self.apply(self.base)

    @torch.no_grad()
    def refresh(self) -> None:
        """Fold the pending update, project onto the feasible set and rebuild all bookkeeping.

        Registration's checks and projection run again on :math:`R_B(A)` (cost as at
        registration, e.g. :math:`O(n^3)`). Use it after the tensors were changed from outside
        the merge cycle, for example in a weight-averaged copy of the model
        (``torch.optim.swa_utils.AveragedModel``): an average of feasible tensors need not be
        feasible, and averaged bookkeeping (an average of inverses) is not the bookkeeping of
        the average.
        """
        current = self.current().detach().clone()
        self.base.copy_(self.right_inverse(current))


def _codes(ok: bool | Tensor, reason: Reason) -> Tensor:
    ok_t = torch.as_tensor(ok, dtype=torch.bool).cpu()
    return torch.where(ok_t, 0, reason.code)


def _folds_whole(proposal: Proposal) -> bool:
    """Whether a proposal accepts every element's whole update (finite candidate, no codes)."""
    if proposal.codes is not None and bool(proposal.codes.ne(0).any()):
        return False
    if proposal.scale is not None and bool(proposal.scale.lt(1).any()):
        return False
    return proposal.candidate is None or bool(torch.isfinite(proposal.candidate.sum()))


def _per_element(flags: Tensor, stack_ndim: int) -> Tensor:
    """``flags.all()`` over each element of a stack with ``stack_ndim`` leading dimensions."""
    return flags.flatten(stack_ndim).all(-1) if flags.ndim > stack_ndim else flags
