r"""The :class:`Perturbation` base class: one merge cycle, written once, for every family.

A perturbation family defines a map :math:`R_B : S \to S` on a feasible set :math:`S`,
parameterized by small trainable tensors :math:`B` with an identity element :math:`B_0`
(:math:`R_{B_0} = \mathrm{id}`). The frozen base tensor :math:`A` lives in the module
(``module.parametrizations[name].original``); ``module.<name>`` evaluates :math:`R_B(A)`.
"""

from __future__ import annotations

import abc
import functools
import warnings
import weakref
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from p4opt._typing import Tensor
from p4opt._validate import (
    check_choice,
    check_finite,
    check_floating,
    check_int,
    check_optional_int,
)
from p4opt.errors import RegistrationError
from p4opt.records import MergeResult, Proposal, Reason, ValidationReport

__all__ = ["Perturbation", "MergeResult", "Proposal", "Reason", "ValidationReport", "owner_of"]

OnReject = Literal["keep", "reset"]
#: Updates that can never be kept pending: the layer they give is already non-finite or
#: outside the feasible set.
_FORCED_DROPS = tuple(
    r.code for r in (Reason.NON_FINITE_UPDATE, Reason.NON_FINITE_RESULT, Reason.INFEASIBLE_RESULT)
)
#: id(tensor) -> (tensor, perturbation, role), all weak; filled by :func:`p4opt.register`, read
#: by the optimizer. Keyed by tensor identity, so two models never see each other.
_OWNERS: dict[int, tuple[weakref.ref[Tensor], weakref.ref[Perturbation], str]] = {}


def owner_of(tensor: Tensor) -> tuple[Perturbation, str] | None:
    """The registered perturbation owning a tensor, with its role (``"trainable"``/``"base"``)."""
    entry = _OWNERS.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        return None
    pert = entry[1]()
    return None if pert is None or not pert.is_registered else (pert, entry[2])


def _record(tensor: Tensor, pert: Perturbation, role: str) -> None:
    key = id(tensor)
    entry = _OWNERS.get(key)
    if entry is not None and entry[0]() is tensor:
        _OWNERS[key] = (entry[0], weakref.ref(pert), role)
        return
    _OWNERS[key] = (weakref.ref(tensor, lambda _, key=key: _OWNERS.pop(key, None)),
                    weakref.ref(pert), role)


def _forget(tensor: Tensor) -> None:
    entry = _OWNERS.get(id(tensor))
    if entry is not None and entry[0]() is tensor:
        del _OWNERS[id(tensor)]


def _mix(seed: int, draw: int) -> int:
    """A 63-bit seed for draw number ``draw`` of a perturbation seeded with ``seed``."""
    return (seed * 0x9E3779B97F4A7C15 + draw * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


class Perturbation(nn.Module, abc.ABC):
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
    #: Whether, after a restart, the optimizer's state of the trainable tensors is dropped
    #: (``P4Optimizer(reset_state=...)`` overrides it).
    reset_optimizer_state: ClassVar[bool] = True
    #: Buffers that keep their dtype under ``module.float()``/``.double()`` (bookkeeping).
    precise_buffers: ClassVar[tuple[str, ...]] = ()
    #: Trailing dimensions forming one element of a stack (``None``: the whole tensor).
    element_ndim: ClassVar[int | None] = None

    def __init__(
        self,
        *,
        seed: int | None = None,
        correct_every: int | None = None,
        on_reject: OnReject = "keep",
    ) -> None:
        super().__init__()
        seed = -1 if seed is None else check_int("seed", seed, minimum=0)
        self.correct_every = check_optional_int("correct_every", correct_every, minimum=1)
        self.on_reject: OnReject = check_choice("on_reject", on_reject, ("keep", "reset"))
        self.register_buffer("rng_seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("rng_draws", torch.zeros((), dtype=torch.long))
        self.register_buffer("merges", torch.zeros((), dtype=torch.long))
        self.where = "<unregistered>"
        self._layer_dtype: torch.dtype | None = None
        self._last_grads: dict[str, Tensor] = {}
        self._seen_versions: tuple[int, ...] = ()
        self._updates_since_merge = 0
        object.__setattr__(self, "_owner", None)
        object.__setattr__(self, "_context_ref", None)

    @property
    def _context(self) -> nn.Module | None:
        """The module the perturbation is being registered on (``None`` when unknown)."""
        ref = self._context_ref
        return None if ref is None else ref()

    def _set_context(self, module: nn.Module) -> None:
        object.__setattr__(self, "_context_ref", weakref.ref(module))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own_apply = cls.__dict__.get("apply")
        if own_apply is not None:  # ``model.apply(fn)`` must keep reaching nn.Module.apply

            @functools.wraps(own_apply)
            def apply(self: Perturbation, base: Any) -> Any:
                if callable(base) and not isinstance(base, Tensor):
                    return nn.Module.apply(self, base)
                if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                    self._watch_for_missing_merges()
                return own_apply(self, base)

            cls.apply = apply  # type: ignore[method-assign]

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

    def _watch_for_missing_merges(self) -> None:
        """Warn once when the trainable tensors keep changing but nothing merges them."""
        versions = tuple(p._version for p in self._parameters.values() if p is not None)
        if versions == self._seen_versions:
            return
        self._seen_versions = versions
        self._updates_since_merge += 1
        limit = max(100, 20 * self.default_merge_every)
        if self._updates_since_merge == limit and self.is_registered:
            warnings.warn(
                f"{self.where}: its {type(self).__name__} perturbation has changed {limit} times "
                "without a merge, so it stays a perturbation of the same base: wrap the "
                "optimizer in p4opt.P4Optimizer(...) (or call merge() yourself)",
                stacklevel=4,
            )

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
        self._updates_since_merge = 0
        self._last_grads = grads or {}
        shape = self._stack_shape()
        finite = self._finite_update(shape)
        proposal = self.propose() if bool(finite.any()) else Proposal()
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
            self.merges += 1
            every = self.correct_every
            if every is not None and int(self.merges) % every == 0:
                figures.update(self.correct())
                corrected = True
        full = ok & (scale >= 1)
        forced = torch.isin(codes, torch.tensor(_FORCED_DROPS))
        drop = ~ok & (forced | (self.on_reject == "reset"))
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

    def _finite_update(self, shape: torch.Size) -> Tensor:
        """Per stack element: whether every trainable tensor is finite there."""
        finite = torch.ones(shape, dtype=torch.bool)
        for p in self.trainable():
            flags = torch.isfinite(p.detach())
            if len(shape) and p.shape[: len(shape)] == shape:
                finite &= _per_element(flags, len(shape)).cpu()
            else:
                finite &= bool(flags.all())
        return finite

    def _stack_shape(self) -> torch.Size:
        if self.element_ndim is None:
            return torch.Size()
        return self.base.shape[: self.base.ndim - self.element_ndim]

    def _sync_dtype(self) -> None:
        """React to a change of the layer's dtype since registration (see :meth:`dtype_changed`)."""
        dtype = self.base.dtype
        if self._layer_dtype is not None and dtype != self._layer_dtype:
            old, self._layer_dtype = self._layer_dtype, dtype
            self.dtype_changed(old, dtype)

    def dtype_changed(self, old: torch.dtype, new: torch.dtype) -> None:
        """Bring the bookkeeping in line after ``module.to(dtype)``; default: nothing."""

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

    def rng(self) -> torch.Generator:
        """A CPU generator for the next random draw (seeded from ``rng_seed`` and ``rng_draws``).

        A perturbation built without a seed draws one from torch's global generator at its
        first draw (families that never draw leave the global generator alone).
        """
        if int(self.rng_seed) < 0:
            self.rng_seed.fill_(int(torch.randint(0, 2**62, (1,)).item()))
        generator = torch.Generator().manual_seed(_mix(int(self.rng_seed), int(self.rng_draws)))
        self.rng_draws += 1
        return generator

    def _bind(self, owner: nn.Module, name: str) -> None:
        object.__setattr__(self, "_owner", owner.parametrizations[name])  # type: ignore[index]
        self._claim()

    def _unbind(self) -> None:
        for tensor in [*self.trainable(), self._owner.original]:  # type: ignore[union-attr]
            _forget(tensor)
        object.__setattr__(self, "_owner", None)

    def _claim(self) -> None:
        """Record this perturbation as the owner of its tensors (read by the optimizer)."""
        if self._owner is None:
            return
        for tensor in self.trainable():
            _record(tensor, self, "trainable")
        base = getattr(self._owner, "__dict__", {}).get("_parameters", {}).get("original")
        if base is not None:  # absent while a deepcopy is still rebuilding the owner
            _record(base, self, "base")

    def __setstate__(self, state: dict[str, Any]) -> None:  # deepcopy and pickle
        super().__setstate__(state)
        self._claim()

    @property
    def is_registered(self) -> bool:
        return self._owner is not None

    @property
    def base(self) -> Tensor:
        """The frozen base tensor :math:`A` this perturbation acts on."""
        if self._owner is None:
            raise RegistrationError(
                f"{type(self).__name__} is not registered on any tensor; "
                "use p4opt.register(module, name, perturbation) first"
            )
        return self._owner.original

    def trainable(self) -> list[nn.Parameter]:
        """The trainable tensors :math:`B` (the ones whose optimizer state a merge makes stale)."""
        return list(self.parameters(recurse=False))

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

    def _apply(self, fn: Any, recurse: bool = True) -> Perturbation:
        # Bookkeeping buffers keep their dtype under ``model.float()``: they get the requested
        # device move (or ``to_empty``) only.
        order = list(self._buffers)
        saved = {n: self._buffers.pop(n) for n in self.precise_buffers if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in saved.items():
                if buf is not None:
                    probe = fn(torch.empty(0, dtype=buf.dtype, device=buf.device))
                    if probe.dtype == buf.dtype:
                        buf = fn(buf)
                    elif buf.device.type == "meta" or probe.device.type == "meta":
                        buf = torch.empty_like(buf, device=probe.device)
                    else:
                        buf = buf.to(probe.device)
                self._buffers[name] = buf
            self._buffers = {n: self._buffers[n] for n in order if n in self._buffers}
        self._claim()
        return self

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # checkpoints of 0.1 hold a generator state (draws now come from buffers) and no draw
        # or merge counters: ignore the one, keep the current values of the others
        state_dict.pop(prefix + "_extra_state", None)
        for name in ("rng_seed", "rng_draws", "merges"):
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._claim()


def _codes(ok: bool | Tensor, reason: Reason) -> Tensor:
    ok_t = torch.as_tensor(ok, dtype=torch.bool).cpu()
    return torch.where(ok_t, 0, reason.code)


def _per_element(flags: Tensor, stack_ndim: int) -> Tensor:
    """``flags.all()`` over each element of a stack with ``stack_ndim`` leading dimensions."""
    return flags.flatten(stack_ndim).all(-1) if flags.ndim > stack_ndim else flags
