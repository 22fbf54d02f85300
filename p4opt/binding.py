"""How a perturbation lives in a module: binding, the owner map, draws, dtype moves, checkpoints.

:class:`Bound` is the torch plumbing under :class:`p4opt.Perturbation`; the merge cycle and
the family contract live in :mod:`p4opt.perturbation`.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, ClassVar

import torch
from torch import nn

from p4opt._typing import Tensor
from p4opt.errors import P4ValueError, RegistrationError

__all__ = ["Bound", "owner_of"]

#: id(tensor) -> (tensor, perturbation, role), all weak; filled by :func:`p4opt.register`, read
#: by the optimizer. Keyed by tensor identity, so two models never see each other.
_OWNERS: dict[int, tuple[weakref.ref[Tensor], weakref.ref[Any], str]] = {}


def owner_of(tensor: Tensor) -> tuple[Any, str] | None:
    """The registered perturbation owning a tensor, with its role (``"trainable"``/``"base"``)."""
    entry = _OWNERS.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        return None
    pert = entry[1]()
    return None if pert is None or not pert.is_registered else (pert, entry[2])


def _record(tensor: Tensor, pert: Any, role: str) -> None:
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


class Bound(nn.Module):
    """Module plumbing of a perturbation (see :class:`p4opt.Perturbation` for the contract)."""

    #: Buffers that keep their dtype under ``model.float()``/``.double()`` (bookkeeping).
    precise_buffers: ClassVar[tuple[str, ...]] = ()
    default_merge_every: ClassVar[int] = 10

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.register_buffer("rng_seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("rng_draws", torch.zeros((), dtype=torch.long))
        self.register_buffer("merges", torch.zeros((), dtype=torch.long))
        self.where = "<unregistered>"
        self._layer_dtype: torch.dtype | None = None
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
            def apply(self: Bound, base: Any) -> Any:
                if callable(base) and not isinstance(base, Tensor):
                    return nn.Module.apply(self, base)
                if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                    self._watch_for_missing_merges()
                return own_apply(self, base)

            cls.apply = apply  # type: ignore[method-assign]

    def _watch_for_missing_merges(self) -> None:
        """Warn once when the trainable tensors keep changing but nothing merges them."""
        versions = tuple(p._version for p in self._parameters.values() if p is not None)
        if versions == self._seen_versions:
            return
        # plain attributes, set on every forward pass: skip nn.Module.__setattr__'s lookups
        object.__setattr__(self, "_seen_versions", versions)
        object.__setattr__(self, "_updates_since_merge", self._updates_since_merge + 1)
        limit = max(100, 20 * self.default_merge_every)
        if self._updates_since_merge == limit and self.is_registered:
            warnings.warn(
                f"{self.where}: its {type(self).__name__} perturbation has changed {limit} times "
                "without a merge, so it stays a perturbation of the same base: wrap the "
                "optimizer in p4opt.P4Optimizer(...) (or call merge() yourself)",
                stacklevel=4,
            )

    def _sync_dtype(self) -> None:
        """React to a change of the layer's dtype since registration (see :meth:`dtype_changed`)."""
        dtype = self.base.dtype
        if self._layer_dtype is not None and dtype != self._layer_dtype:
            old, self._layer_dtype = self._layer_dtype, dtype
            self.dtype_changed(old, dtype)

    def dtype_changed(self, old: torch.dtype, new: torch.dtype) -> None:
        """Bring the bookkeeping in line after ``module.to(dtype)``; default: nothing."""

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
        plist = owner.parametrizations[name]  # type: ignore[index]
        object.__setattr__(self, "_owner", plist)
        handle = plist._register_load_state_dict_pre_hook(self._refuse_mismatched_state)
        object.__setattr__(self, "_load_hook", handle)
        self._claim()

    def _refuse_mismatched_state(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
        *args: Any,
    ) -> None:
        """Refuse, before anything is copied, a checkpoint whose entries do not fit (a partial
        copy would leave the base and its bookkeeping out of step)."""
        mine = next(k for k, m in self._owner.named_children() if m is self)  # type: ignore[union-attr]
        self.upgrade_state_dict(state_dict, f"{prefix}{mine}.")
        ours = self._owner.state_dict(keep_vars=True)  # type: ignore[union-attr]
        optional = ("rng_seed", "rng_draws", "merges", "_extra_state")
        if strict:  # torch would copy the shared entries (the base) before it complains
            extra = sorted(
                k for k in state_dict
                if k.startswith(prefix) and k[len(prefix):] not in ours
                and not k.endswith("_extra_state")
            )
            if extra:
                raise RegistrationError(
                    f"{self.where}: the state dict has entries this perturbation does not have "
                    f"({', '.join(map(repr, extra[:3]))}{', ...' if len(extra) > 3 else ''}; "
                    "saved from another family or options?); nothing of the perturbation was "
                    "loaded"
                )
        for key, tensor in ours.items():
            given = state_dict.get(prefix + key)
            if given is None:
                if strict and not key.endswith(optional):
                    raise RegistrationError(
                        f"{self.where}: the state dict has no entry {prefix + key!r} (saved from "
                        "another family or options?); nothing of the perturbation was loaded"
                    )
                continue
            if isinstance(given, Tensor) and isinstance(tensor, Tensor):
                if given.shape != tensor.shape:
                    raise RegistrationError(
                        f"{self.where}: the state dict's {prefix + key!r} has shape "
                        f"{tuple(given.shape)}, this model's {tuple(tensor.shape)}; nothing of the "
                        "perturbation was loaded"
                    )

    def upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Rewrite, in place, entries an older p4opt saved in another layout (default: none).

        Called before a checkpoint is checked and loaded; ``prefix`` leads this
        perturbation's keys.
        """

    def _unbind(self) -> None:
        handle = self.__dict__.get("_load_hook")
        if handle is not None:
            handle.remove()
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

    def _apply(self, fn: Any, recurse: bool = True) -> Bound:
        self._refuse_overflowing_move(fn)
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

    def _refuse_overflowing_move(self, fn: Any) -> None:
        """Raise before a dtype move (``model.float()``, ``.half()``, ``.to(dtype)``) would
        round the base to infinity; torch converts the base after this module (its owner is
        the parent), so the layer is left as it was. One reduction, on dtype changes only."""
        owner = self._owner
        if owner is None or "original" not in owner._parameters:
            return
        base = owner.original
        if base.device.type == "meta" or not base.is_floating_point():
            return
        target = fn(torch.empty(0, dtype=base.dtype, device=base.device)).dtype
        if target == base.dtype or not target.is_floating_point:
            return
        largest = float(base.detach().abs().amax()) if base.numel() else 0.0
        if largest > torch.finfo(target).max:
            raise P4ValueError(
                f"{self.where}: moving to {target} would round its base to infinity (largest "
                f"entry {largest:.3g}, {target} holds up to {torch.finfo(target).max:.3g}); "
                "the layer keeps its dtype (modules converted before it keep theirs)"
            )

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
