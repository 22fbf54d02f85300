r"""Preset linear structures with closed-form bases: symmetric, zero-sum, circulant, fixed."""

from __future__ import annotations

import math
from typing import Any

import torch

from p4opt._typing import Tensor
from p4opt.errors import P4TypeError, P4ValueError, ShapeError, describe
from p4opt.families.affine import AffineSpace, sum_complement
from p4opt.families.linear import LinearStructure

__all__ = ["Symmetric", "ZeroSum", "Circulant", "Fixed"]


def _dim(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise P4TypeError(f"{name} must be an int, got {value!r}")
    return value


def _normalize(dim: int, ndim: int, where: str) -> int:
    if not -ndim <= dim < ndim:
        raise ShapeError(f"dim {dim} is out of range for {where}, which has {ndim} dimensions")
    return dim % ndim


def _no_freedom(where: str, why: str) -> P4ValueError:
    return P4ValueError(
        f"the structure fixes every entry of {where} ({why}): nothing left to train"
    )


class _SymmetricSpace(AffineSpace):
    """θ = θᵀ over the dims pair (a, b); z = upper triangles (diagonal ×1, off-diagonal ×1/√2)."""

    def __init__(self, shape: torch.Size, dims: tuple[int, int], where: str) -> None:
        super().__init__()
        a, b = (_normalize(d, len(shape), where) for d in dims)
        if a == b:
            raise P4ValueError(f"Symmetric needs two different dims, got {dims} for {where}")
        n = shape[a]
        if shape[b] != n:
            raise ShapeError(f"Symmetric needs dims {dims} of equal size, but {where} has shape "
                             f"{tuple(shape)}")
        self.shape, self.dims, self.n = tuple(shape), (a, b), n
        iu = torch.triu_indices(n, n)
        self.register_buffer("flat", iu[0] * n + iu[1])
        # uint8 rather than bool: weight averaging (swa_utils.AveragedModel) cannot average bools
        self.register_buffer("diag", (iu[0] == iu[1]).to(torch.uint8))
        self.batch = math.prod(shape) // max(n * n, 1)
        self.dim = self.batch * iu.shape[1]

    def _moved(self, theta: Tensor) -> Tensor:
        return theta.movedim(self.dims, (-2, -1))

    def lift(self, z: Tensor) -> Tensor:
        n = self.n
        scale = torch.where(self.diag.bool(), 0.5, math.sqrt(0.5)).to(z.dtype)
        half = z.reshape(self.batch, -1) * scale
        m = z.new_zeros(self.batch, n * n).index_copy(1, self.flat, half).reshape(-1, n, n)
        moved = tuple(s for i, s in enumerate(self.shape) if i not in self.dims) + (n, n)
        return (m + m.mT).reshape(moved).movedim((-2, -1), self.dims)

    def project(self, theta: Tensor) -> Tensor:
        m = self._moved(theta)
        return (0.5 * (m + m.mT)).movedim((-2, -1), self.dims)

    def violation(self, theta: Tensor) -> Tensor:
        m = self._moved(theta)
        return (m - m.mT).reshape(-1)


class _ZeroSumSpace(AffineSpace):
    """Every fiber along ``dim`` sums to ``value``; z = fibers in the ``sum_complement`` basis."""

    def __init__(self, shape: torch.Size, dim: int, value: float, where: str) -> None:
        super().__init__()
        self.shape, self.axis, self.value = tuple(shape), _normalize(dim, len(shape), where), value
        self.m = shape[self.axis]
        if self.m < 2:
            raise _no_freedom(where, f"dimension {dim} has size {self.m}")
        self.dim = math.prod(shape) // self.m * (self.m - 1)

    def lift(self, z: Tensor) -> Tensor:
        rest = tuple(s for i, s in enumerate(self.shape) if i != self.axis)
        return sum_complement(z.reshape(*rest, self.m - 1)).movedim(-1, self.axis)

    def project(self, theta: Tensor) -> Tensor:
        return theta - (theta.sum(self.axis, keepdim=True) - self.value) / self.m

    def finish(self, w: Tensor) -> Tensor:
        # Low precision: recompute each fiber's last entry from the others in float64, so the
        # fiber sums are off by one rounding of one entry instead of the sum of m roundings.
        if w.dtype == torch.float64:
            return w
        head = w.narrow(self.axis, 0, self.m - 1)
        total = head.sum(self.axis, keepdim=True, dtype=torch.float64)
        return torch.cat([head, (self.value - total).to(w.dtype)], dim=self.axis)

    def violation(self, theta: Tensor) -> Tensor:
        return (theta.sum(self.axis) - self.value).reshape(-1)


class _CirculantSpace(AffineSpace):
    """W[..., i, j] = c[(i - j) mod n] / √n; optionally Σ c = total (z = c in 1⊥ coordinates)."""

    def __init__(self, shape: torch.Size, total: float | None, where: str) -> None:
        super().__init__()
        if len(shape) < 2 or shape[-1] != shape[-2]:
            raise ShapeError(f"Circulant needs square matrices (*, n, n), but {where} has shape "
                             f"{tuple(shape)}")
        n = shape[-1]
        if total is not None and n < 2:
            raise _no_freedom(where, "a 1x1 circulant with a fixed total")
        self.shape, self.n, self.total = tuple(shape), n, total
        ar = torch.arange(n)
        self.register_buffer("index", (ar[:, None] - ar[None, :]) % n)
        self.batch = math.prod(shape) // max(n * n, 1)
        self.dim = self.batch * (n if total is None else n - 1)

    def _expand(self, c: Tensor) -> Tensor:
        return c[:, self.index].reshape(self.shape)

    def lift(self, z: Tensor) -> Tensor:
        c = z.reshape(self.batch, -1)
        if self.total is not None:
            c = sum_complement(c)
        return self._expand(c / math.sqrt(self.n))

    def project(self, theta: Tensor) -> Tensor:
        flat = theta.reshape(self.batch, self.n * self.n)
        c = flat.new_zeros(self.batch, self.n).index_add(1, self.index.reshape(-1), flat) / self.n
        if self.total is not None:
            c = c - (c.sum(-1, keepdim=True) - self.total) / self.n
        return self._expand(c)

    def violation(self, theta: Tensor) -> Tensor:
        shift = (theta - theta.roll((1, 1), dims=(-2, -1))).reshape(-1)
        if self.total is None:
            return shift
        return torch.cat([shift, (theta[..., 0].sum(-1) - self.total).reshape(-1)])


class _FixedSpace(AffineSpace):
    """Entries outside ``mask`` equal their registered values; z = the free entries."""

    def __init__(self, value: Tensor, mask: Tensor, where: str) -> None:
        super().__init__()
        if mask.shape != value.shape:
            raise ShapeError(f"Fixed mask has shape {tuple(mask.shape)} but {where} has shape "
                             f"{tuple(value.shape)}")
        flat = mask.to(value.device).reshape(-1)
        if not bool(flat.any()):
            raise _no_freedom(where, "the mask is all False")
        self.shape = tuple(value.shape)
        self.register_buffer("free", flat.nonzero().squeeze(-1))
        self.register_buffer("fixed", (~flat).nonzero().squeeze(-1))
        self.register_buffer("frozen", value.reshape(-1)[self.fixed].to(torch.float64))
        self.dim = int(self.free.numel())

    def lift(self, z: Tensor) -> Tensor:
        return z.new_zeros(math.prod(self.shape)).index_copy(0, self.free, z).reshape(self.shape)

    def project(self, theta: Tensor) -> Tensor:
        flat = theta.reshape(-1).index_copy(0, self.fixed, self.frozen.to(theta))
        return flat.reshape(self.shape)

    def violation(self, theta: Tensor) -> Tensor:
        return theta.reshape(-1)[self.fixed] - self.frozen.to(theta)


class Symmetric(LinearStructure):
    r"""Symmetric weights :math:`\theta = \theta^T` over the pair ``dims`` (other dims batch).

    ``z`` holds the upper triangles (diagonal as is, off-diagonal scaled by
    :math:`1/\sqrt2` so the basis is orthonormal). Cost per step and per
    merge :math:`O(p)` for ``p`` entries; ``p (n+1) / (2n)`` trainable numbers.

    Parameters
    ----------
    dims : (int, int)
        The two dimensions that must be interchangeable. The default ``(0, 1)``
        is the (out, in) pair of ``nn.Linear`` and ``nn.ConvNd`` weights (every
        tap of a ``Conv1d`` weight ``(c, c, k)`` becomes symmetric); use
        ``(-2, -1)`` for a stack of matrices ``(*, n, n)``.

    Examples
    --------
    >>> import torch, p4opt
    >>> lin = torch.nn.Linear(4, 4, bias=False)
    >>> pert = p4opt.register(lin, "weight", p4opt.Symmetric())
    >>> pert.z.numel(), torch.equal(lin.weight, lin.weight.T)
    (10, True)
    """

    def __init__(self, dims: tuple[int, int] = (0, 1), *, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        if not isinstance(dims, tuple | list) or len(dims) != 2:
            raise P4TypeError(f"dims must be a pair of ints, got {dims!r}")
        self.dims = (_dim(dims[0], "dims[0]"), _dim(dims[1], "dims[1]"))

    def _make_space(self, value: Tensor) -> AffineSpace:
        return _SymmetricSpace(value.shape, self.dims, self.where).to(value.device)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, {super().extra_repr()}"


class ZeroSum(LinearStructure):
    r"""Every slice along ``dim`` sums to ``value``: :math:`\sum_i \theta_{\dots i \dots} = v`.

    On an ``nn.Linear`` weight ``(out, in)``, ``ZeroSum(dim=0, value=1.0)``
    makes every column sum to one, so ``sum(W x) == sum(x)`` (mass
    conservation; with a bias, the bias must sum to zero, e.g. ``ZeroSum(0)``
    on it). ``z`` holds each fiber in an orthonormal basis of
    :math:`\mathbf 1^\perp` (:func:`sum_complement`); projection is mean
    subtraction. In float32/float16 each fiber's last entry is recomputed from
    the others in float64 (:math:`O(p)`), which keeps the sums exact to the
    rounding of one entry (~1e-9) rather than of the whole fiber. Cost per step
    and per merge :math:`O(p)`.

    Examples
    --------
    >>> import torch, p4opt
    >>> lin = torch.nn.Linear(3, 5, bias=False, dtype=torch.float64)
    >>> _ = p4opt.register(lin, "weight", p4opt.ZeroSum(dim=0, value=1.0))
    >>> x = torch.randn(2, 3, dtype=torch.float64)
    >>> torch.allclose(lin(x).sum(-1), x.sum(-1))
    True
    """

    def __init__(self, dim: int = -1, value: float = 0.0, *, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        self.dim = _dim(dim, "dim")
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise P4TypeError(f"value must be a finite number, got {value!r}")
        self.value = float(value)

    def _make_space(self, value: Tensor) -> AffineSpace:
        return _ZeroSumSpace(value.shape, self.dim, self.value, self.where)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, value={self.value}, {super().extra_repr()}"


class Circulant(LinearStructure):
    r"""Circulant (periodic translation-equivariant) matrices :math:`W_{ij} = c_{(i-j) \bmod n}`.

    ``z`` holds the ``n`` generating coefficients (scaled by :math:`1/\sqrt n`
    so the basis is orthonormal). With ``total``, the coefficients also sum
    to ``total``, i.e. every row and column sums to ``total`` (``total=1``:
    mass-conserving and translation-equivariant); ``z`` then has ``n - 1``
    entries per matrix. Works on ``(*, n, n)``. Cost per step :math:`O(p)`
    (one gather), per merge :math:`O(p)` (diagonal means by ``index_add``).

    Examples
    --------
    >>> import torch, p4opt
    >>> lin = torch.nn.Linear(5, 5, bias=False, dtype=torch.float64)
    >>> pert = p4opt.register(lin, "weight", p4opt.Circulant(total=1.0))
    >>> w = lin.weight.detach()
    >>> pert.z.numel(), torch.equal(w.roll((1, 1), (0, 1)), w), round(float(w[:, 0].sum()), 12)
    (4, True, 1.0)
    """

    def __init__(self, total: float | None = None, *, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        if total is not None and (not isinstance(total, int | float) or not math.isfinite(total)):
            raise P4TypeError(f"total must be a finite number or None, got {total!r}")
        self.total = None if total is None else float(total)

    def _make_space(self, value: Tensor) -> AffineSpace:
        return _CirculantSpace(value.shape, self.total, self.where).to(value.device)

    def extra_repr(self) -> str:
        return f"total={self.total}, {super().extra_repr()}"


class Fixed(LinearStructure):
    r"""Entries outside ``mask`` stay at their registered values; ``z`` = the free entries.

    Assigning ``module.<name> = X`` later re-freezes the masked-out entries at
    ``X``'s values. Cost per step and per merge :math:`O(p)` (one scatter).

    Parameters
    ----------
    mask : Tensor of bool, same shape as the tensor
        ``True`` marks the trainable entries.

    Examples
    --------
    >>> import torch, p4opt
    >>> lin = torch.nn.Linear(3, 3, bias=False)
    >>> mask = torch.eye(3, dtype=torch.bool).logical_not()  # freeze the diagonal
    >>> pert = p4opt.register(lin, "weight", p4opt.Fixed(mask))
    >>> pert.z.numel()
    6
    """

    def __init__(self, mask: Tensor, *, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise P4TypeError(f"mask must be a bool tensor, got {describe(mask)}")
        self.mask = mask.detach().clone()

    def _make_space(self, value: Tensor) -> AffineSpace:
        return _FixedSpace(value, self.mask, self.where)

    def extra_repr(self) -> str:
        return f"mask={tuple(self.mask.shape)}, {super().extra_repr()}"
