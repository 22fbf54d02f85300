"""Attach perturbations to module tensors (built on ``torch.nn.utils.parametrize``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from p4opt.errors import NotRegisteredError, P4TypeError, RegistrationError
from p4opt.perturbation import Perturbation

__all__ = ["register", "unregister", "perturbation_of", "perturbations"]


def _class_name(module: nn.Module) -> str:
    """The user's class name (not torch's ``Parametrized<Name>`` subclass)."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized"):
        cls = cls.__bases__[0]
    return cls.__name__


def _where(module: nn.Module, name: str) -> str:
    return f"{_class_name(module)}.{name}"


def register(module: nn.Module, name: str, perturbation: Perturbation) -> Perturbation:
    """Train ``module.<name>`` through a P⁴ perturbation.

    After the call ``module.<name>`` evaluates :math:`R_B(A)`: the original tensor :math:`A`
    is frozen and stored as ``module.parametrizations.<name>.original``; the perturbation's
    trainable tensors are parameters of ``module``, so build the optimizer *after*
    registering. A frozen parameter (``requires_grad=False``) stays frozen: its perturbation's
    tensors are created frozen too.

    Parameters
    ----------
    module : torch.nn.Module
        Module owning the tensor.
    name : str
        Name of an ``nn.Parameter`` of ``module`` (e.g. ``"weight"``).
    perturbation : Perturbation
        A fresh family instance such as ``p4opt.Invertible()``; one instance serves one tensor.

    Returns
    -------
    Perturbation
        ``perturbation``, now bound to the tensor.

    Raises
    ------
    TypeError
        Wrong argument types (including a family class passed instead of an instance).
    RegistrationError
        The tensor does not exist, is not a parameter, is already parametrized, or the
        perturbation is already in use.
    ValueError
        The tensor is not admissible for the family (e.g. singular for
        :class:`~p4opt.Invertible`, or NaN entries); the message names module and parameter.

    Examples
    --------
    >>> import torch, p4opt
    >>> _ = torch.manual_seed(0)
    >>> lin = torch.nn.Linear(4, 4)
    >>> pert = p4opt.register(lin, "weight", p4opt.Invertible())
    >>> p4opt.perturbation_of(lin, "weight") is pert
    True
    """
    if not isinstance(module, nn.Module):
        raise P4TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise P4TypeError(f"name must be a str, got {type(name).__name__}")
    if isinstance(perturbation, type) and issubclass(perturbation, Perturbation):
        family = perturbation.__name__
        raise P4TypeError(
            f"perturbation must be an instance: pass p4opt.{family}(), not the class p4opt.{family}"
        )
    if not isinstance(perturbation, Perturbation):
        raise P4TypeError(
            "perturbation must be a p4opt.Perturbation instance such as p4opt.Invertible(), "
            f"got {type(perturbation).__name__}"
        )
    where = _where(module, name)
    if perturbation.is_registered:
        raise RegistrationError(
            f"this {type(perturbation).__name__} is already registered on {perturbation.where}; "
            "create one instance per tensor"
        )
    if parametrize.is_parametrized(module, name):
        owner = _find(module, name)
        what = f"a p4opt {type(owner).__name__}" if owner else "a parametrization"
        raise RegistrationError(
            f"{where} already has {what}; call p4opt.unregister(module, {name!r}) first"
        )
    tensor = getattr(module, name, None)
    if not isinstance(tensor, nn.Parameter):
        got = "nothing" if tensor is None else type(tensor).__name__
        raise RegistrationError(f"{where} must be an nn.Parameter, found {got}")
    if is_sharded(tensor):
        raise RegistrationError(
            f"{where} is sharded (FSDP / DTensor); p4opt's merges need the whole tensor on every "
            "rank: use DistributedDataParallel, or register on a module that is not sharded"
        )
    trainable = tensor.requires_grad
    perturbation.where = where
    perturbation._set_context(module)
    parametrize.register_parametrization(module, name, perturbation)
    module.parametrizations[name].original.requires_grad_(False)  # type: ignore[index]
    for param in perturbation.trainable():
        param.requires_grad_(trainable)
    perturbation._bind(module, name)
    return perturbation


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a distributed shard (a ``DTensor``, as made by ``fully_shard``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # builds without distributed support
        return False
    return isinstance(tensor, DTensor)


def _find(module: nn.Module, name: str) -> Perturbation | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:  # type: ignore[index]
        if isinstance(p, Perturbation):
            return p
    return None


def perturbation_of(module: nn.Module, name: str) -> Perturbation:
    """Return the perturbation registered on ``module.<name>``.

    Raises
    ------
    NotRegisteredError
        If none is registered there.
    """
    found = _find(module, name)
    if found is None:
        raise NotRegisteredError(f"no p4opt perturbation is registered on {_where(module, name)}")
    return found


def perturbations(model: nn.Module) -> Iterator[tuple[str, Perturbation]]:
    """Yield ``(qualified_name, perturbation)`` for every perturbation inside ``model``.

    ``qualified_name`` is e.g. ``"layers.0.weight"``.
    """
    for prefix, mod in model.named_modules():
        if not parametrize.is_parametrized(mod):
            continue
        for name in mod.parametrizations:  # type: ignore[union-attr]
            found = _find(mod, name)
            if found is not None:
                yield (f"{prefix}.{name}" if prefix else name), found


def unregister(module: nn.Module, name: str) -> nn.Parameter:
    """Remove the perturbation and leave the current tensor :math:`R_B(A)` as a plain parameter.

    The pending update is kept exactly (the resulting parameter equals ``module.<name>``
    before the call), no validation can reject it, and the parameter object is the original
    one with its ``requires_grad`` flag as it was before :func:`register`, so an optimizer
    built on the unregistered model keeps working.

    Returns
    -------
    torch.nn.Parameter
        The plain parameter now stored as ``module.<name>``.

    Raises
    ------
    RegistrationError
        When the current tensor is not finite (nothing is changed then).
    """
    pert = perturbation_of(module, name)
    with torch.no_grad():
        if not bool(torch.isfinite(pert.current()).all()):
            raise RegistrationError(
                f"{pert.where}: the current tensor is not finite (a non-finite pending update); "
                "call merge() first, which drops it, then unregister"
            )
    trainable = any(p.requires_grad for p in pert.trainable())
    with torch.no_grad():  # evaluates the layer one last time: the perturbation is still bound
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    pert._unbind()
    param = getattr(module, name)
    param.requires_grad_(trainable)
    return param
