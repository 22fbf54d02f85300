r"""Two-dimensional toy densities (the usual flow benchmarks) with exact or quadrature densities.

Each generator ``name(n, generator=None)`` returns ``n`` i.i.d. samples of shape
``(n, 2)`` (float64 by default) drawn with the given :class:`torch.Generator`.
``log_prob_<name>(x)`` evaluates the density at ``x[..., 2]``: in closed form
(eight Gaussians, checkerboard, rings) or by a midpoint rule over the curve
parameter (two moons, two spirals), accurate to far below Monte-Carlo noise.
The pinwheel's density has no closed form at arbitrary points;
``pinwheel_with_log_prob`` returns it at its own samples by change of variables.
"""

from __future__ import annotations

import math

import torch

from p4opt._typing import Tensor

__all__ = [
    "two_moons",
    "eight_gaussians",
    "checkerboard",
    "pinwheel",
    "pinwheel_with_log_prob",
    "two_spirals",
    "rings",
    "log_prob_two_moons",
    "log_prob_eight_gaussians",
    "log_prob_checkerboard",
    "log_prob_two_spirals",
    "log_prob_rings",
]

_F64 = torch.float64
_LOG_2PI = math.log(2 * math.pi)


def _randn(n: int, g: torch.Generator | None, d: int = 2) -> Tensor:
    return torch.randn(n, d, generator=g, dtype=_F64)


def _rand(n: int, g: torch.Generator | None, d: int = 1) -> Tensor:
    return torch.rand(n, d, generator=g, dtype=_F64)


def _gauss_mixture_log_prob(x: Tensor, centers: Tensor, sigma: float) -> Tensor:
    """log of the equal-weight mixture of isotropic Gaussians N(c, sigma^2 I), c in ``centers``."""
    flat = x.reshape(-1, 2)
    d2 = torch.cdist(flat, centers).square().reshape(*x.shape[:-1], centers.shape[0])
    log_k = -d2 / (2 * sigma**2) - _LOG_2PI - 2 * math.log(sigma)
    return torch.logsumexp(log_k, dim=-1) - math.log(centers.shape[0])


# ------------------------------------------------------------------ two moons
_MOON_NOISE, _MOON_SCALE, _MOON_SHIFT = 0.1, 2.0, (-1.0, -0.2)


def _moon_curve(t: Tensor, upper: Tensor) -> Tensor:
    c, s = torch.cos(t), torch.sin(t)
    xy = torch.where(upper, torch.stack([c, s], -1), torch.stack([1 - c, 0.5 - s], -1))
    return _MOON_SCALE * xy + torch.tensor(_MOON_SHIFT, dtype=_F64)


def two_moons(n: int, generator: torch.Generator | None = None) -> Tensor:
    r"""Two interleaved half circles, :math:`t \sim U[0, \pi]`, noise std 0.2 (after scaling)."""
    t = math.pi * _rand(n, generator)[:, 0]
    upper = (_rand(n, generator)[:, 0] < 0.5).unsqueeze(-1)
    return _moon_curve(t, upper) + _MOON_SCALE * _MOON_NOISE * _randn(n, generator)


def log_prob_two_moons(x: Tensor, nodes: int = 128) -> Tensor:
    """Density of :func:`two_moons`: midpoint rule over the arc parameter (``2 nodes`` kernels)."""
    t = (torch.arange(nodes, dtype=_F64) + 0.5) * (math.pi / nodes)
    upper, lower = torch.tensor([[True]]), torch.tensor([[False]])
    centers = torch.cat([_moon_curve(t, upper), _moon_curve(t, lower)])
    return _gauss_mixture_log_prob(x.to(_F64), centers, _MOON_SCALE * _MOON_NOISE)


# ------------------------------------------------------------ eight gaussians
_EIGHT_SIGMA = 0.5 / 1.414


def _eight_centers() -> Tensor:
    angles = torch.arange(8, dtype=_F64) * (math.pi / 4)
    return (4 / 1.414) * torch.stack([torch.cos(angles), torch.sin(angles)], -1)


def eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Equal mixture of 8 Gaussians (std 0.354) on a circle of radius 2.83."""
    k = torch.randint(0, 8, (n,), generator=generator)
    return _eight_centers()[k] + _EIGHT_SIGMA * _randn(n, generator)


def log_prob_eight_gaussians(x: Tensor) -> Tensor:
    """Exact density of :func:`eight_gaussians`."""
    return _gauss_mixture_log_prob(x.to(_F64), _eight_centers(), _EIGHT_SIGMA)


# --------------------------------------------------------------- checkerboard
def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the 8 dark squares (side 2) of a 4×4 board on :math:`[-4, 4]^2`; H = log 32."""
    x1 = 4 * _rand(n, generator)[:, 0] - 2
    x2 = _rand(n, generator)[:, 0] - 2 * torch.randint(0, 2, (n,), generator=generator)
    x2 = x2 + torch.floor(x1).remainder(2)
    return 2 * torch.stack([x1, x2], -1)


def log_prob_checkerboard(x: Tensor) -> Tensor:
    """Exact density: :math:`-\\log 32` on the dark squares, :math:`-\\infty` elsewhere."""
    x = x.to(_F64) / 2
    inside = (x.abs() <= 2).all(-1)
    dark = (torch.floor(x[..., 0]) + torch.floor(x[..., 1])).remainder(2) == 0
    full = torch.full(x.shape[:-1], -math.log(32.0), dtype=_F64)
    return torch.where(inside & dark, full, torch.full_like(full, -math.inf))


# ------------------------------------------------------------------- pinwheel
_PIN_ARMS, _PIN_RADIAL, _PIN_TANGENTIAL, _PIN_RATE = 5, 0.3, 0.1, 0.25


def pinwheel_with_log_prob(
    n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    r"""Samples of :func:`pinwheel` and their log-density by change of variables.

    :math:`x = 2 R(\theta) f`, :math:`f \sim N((1, 0), \mathrm{diag}(0.3^2, 0.1^2))`,
    :math:`\theta = 2\pi k / 5 + 0.25\, e^{f_0}`, so
    :math:`\log p(x) = \log\tfrac15 + \log N(f) - \log|4 (1 - 0.25 e^{f_0} f_1)|`.
    This assumes the arms do not overlap (true up to far-tail events); where they
    would, it under-states the density, so entropies from it are upper bounds.
    """
    f = _randn(n, generator) * torch.tensor([_PIN_RADIAL, _PIN_TANGENTIAL], dtype=_F64)
    f[:, 0] += 1
    k = torch.randint(0, _PIN_ARMS, (n,), generator=generator).to(_F64)
    theta = 2 * math.pi * k / _PIN_ARMS + _PIN_RATE * torch.exp(f[:, 0])
    c, s = torch.cos(theta), torch.sin(theta)
    x = 2 * torch.stack([c * f[:, 0] - s * f[:, 1], s * f[:, 0] + c * f[:, 1]], -1)
    z = (f - torch.tensor([1.0, 0.0], dtype=_F64)) / torch.tensor([_PIN_RADIAL, _PIN_TANGENTIAL])
    log_f = -0.5 * z.square().sum(-1) - _LOG_2PI - math.log(_PIN_RADIAL * _PIN_TANGENTIAL)
    jac = 4 * (1 - _PIN_RATE * torch.exp(f[:, 0]) * f[:, 1])
    return x, log_f - math.log(_PIN_ARMS) - jac.abs().log()


def pinwheel(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Five curved arms (radial std 0.3, tangential std 0.1, twist rate 0.25), scaled by 2."""
    return pinwheel_with_log_prob(n, generator)[0]


# ---------------------------------------------------------------- two spirals
_SPIRAL_TURN, _SPIRAL_BOX, _SPIRAL_NOISE = 3 * math.pi, 0.5 / 3, 0.1


def _spiral_curve(v: Tensor) -> Tensor:
    t = _SPIRAL_TURN * torch.sqrt(v)
    return torch.stack([-t * torch.cos(t), t * torch.sin(t)], -1) / 3


def two_spirals(n: int, generator: torch.Generator | None = None) -> Tensor:
    r"""Two opposite spirals :math:`\pm t(-\cos t, \sin t)/3`, :math:`t = 3\pi\sqrt{v}`, plus a
    uniform offset in :math:`\pm[0, 1/6]^2` and Gaussian noise 0.1."""
    sign = torch.where(_rand(n, generator) < 0.5, -1.0, 1.0).to(_F64)
    base = _spiral_curve(_rand(n, generator)[:, 0]) + _SPIRAL_BOX * _rand(n, generator, 2)
    return sign * base + _SPIRAL_NOISE * _randn(n, generator)


def log_prob_two_spirals(x: Tensor, nodes: int = 768) -> Tensor:
    r"""Density of :func:`two_spirals`: box ⊛ Gaussian in closed form, midpoint rule on the curve.

    The curve parameter :math:`w = \sqrt{v} \in [0, 1]` (density :math:`2w`) keeps the
    nodes evenly spaced in arc length, at most 0.06 apart against a kernel width of 0.1.
    """
    x = x.to(_F64)
    w = (torch.arange(nodes, dtype=_F64) + 0.5) / nodes
    curve, log_weight = _spiral_curve(w * w), torch.log(2 * w / nodes)
    out = []
    for sign in (1.0, -1.0):
        # sign * (c + u) + e = x  <=>  u + sign * e = sign * x - c, with u ~ U[0, w]^2
        d = (sign * x).unsqueeze(-2) - curve
        ndtr = torch.special.ndtr
        mass = ndtr(d / _SPIRAL_NOISE) - ndtr((d - _SPIRAL_BOX) / _SPIRAL_NOISE)
        dens = (mass.clamp_min(1e-300) / _SPIRAL_BOX).log().sum(-1)
        out.append(torch.logsumexp(dens + log_weight, -1))
    return torch.logsumexp(torch.stack(out), 0) - math.log(2)


# ---------------------------------------------------------------------- rings
_RING_RADII, _RING_NOISE = (3.0, 2.25, 1.5, 0.75), 0.08


def rings(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Four concentric circles (radii 3, 2.25, 1.5, 0.75) with Gaussian noise 0.08."""
    radii = torch.tensor(_RING_RADII, dtype=_F64)
    r = radii[torch.randint(0, len(_RING_RADII), (n,), generator=generator)]
    phi = 2 * math.pi * _rand(n, generator)[:, 0]
    return r.unsqueeze(-1) * torch.stack([torch.cos(phi), torch.sin(phi)], -1) + (
        _RING_NOISE * _randn(n, generator)
    )


def log_prob_rings(x: Tensor) -> Tensor:
    r"""Exact density of :func:`rings` (a Gaussian smeared over a circle, via :math:`I_0`)."""
    rho = x.to(_F64).norm(dim=-1, keepdim=True)
    r = torch.tensor(_RING_RADII, dtype=_F64)
    s2 = _RING_NOISE**2
    arg = rho * r / s2
    log_k = -(rho - r).square() / (2 * s2) + torch.special.i0e(arg).log() - _LOG_2PI - math.log(s2)
    return torch.logsumexp(log_k, -1) - math.log(len(_RING_RADII))
