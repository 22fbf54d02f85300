r"""Invertible map between Cartesian coordinates and normalized internal coordinates, log|det J|.

Five backbone atoms (N, CA, HA, CB, C) form a rigid block: the frames are superposed on a
reference by the Kabsch algorithm, and the block's 15 coordinates are whitened by principal
components, keeping 9 (the 6 dropped ones are the global rotation and translation). The other
17 atoms are placed one after the other from a Z-matrix (bond length to ``j``, angle with ``k``,
torsion with ``l``; natural extension reference frame). Bonds and angles are standardized;
torsions are shifted so that the emptiest angle of the training data sits at :math:`\pm\pi`
(the periodic seam), then scaled. Features: ``[block (9) | bonds (17) | angles (17) |
torsions (17)]`` = 60 for 22 atoms.

The generative direction ``features -> x`` is a map :math:`g: \mathbb{R}^{60} \to
\mathbb{R}^{66}`; its log-volume factor :math:`\tfrac12 \log\det(J^T J)` is

.. math:: \sum_{\text{Z-matrix atoms}} (2 \log r + \log|\sin\theta|)
          + \sum \log(\text{feature scales}) + \sum_{k \le 9} \log s_k .

Run as a script to check the round trip on cached data.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

Tensor = torch.Tensor

__all__ = ["ZMATRIX", "BLOCK", "InternalCoordinates", "dihedral", "kabsch_align"]

#: (atom, bond partner j, angle partner k, torsion partner l); every partner is placed before.
ZMATRIX = (
    (4, 6, 8, 14),  # C: torsion = phi
    (5, 4, 6, 8),
    (1, 4, 6, 8),
    (0, 1, 4, 6),
    (2, 1, 4, 0),
    (3, 1, 4, 0),
    (7, 6, 4, 5),
    (16, 14, 8, 6),  # N: torsion = psi
    (15, 14, 8, 16),
    (17, 16, 14, 15),
    (18, 16, 14, 8),
    (19, 18, 16, 14),
    (20, 18, 16, 19),
    (21, 18, 16, 19),
    (11, 10, 8, 6),
    (12, 10, 8, 11),
    (13, 10, 8, 11),
)
#: Atoms of the rigid, whitened block (N, CA, HA, CB, C).
BLOCK = (6, 8, 9, 10, 14)


def dihedral(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Torsion angle of points ``(*, 3)`` in (-pi, pi]; symmetric under reversing the order."""
    b0, b1, b2 = a - b, c - b, d - c
    b1 = b1 / b1.norm(dim=-1, keepdim=True)
    v = b0 - (b0 * b1).sum(-1, keepdim=True) * b1
    w = b2 - (b2 * b1).sum(-1, keepdim=True) * b1
    return torch.atan2((torch.linalg.cross(b1, v) * w).sum(-1), (v * w).sum(-1))


def _angle(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    u, v = a - b, c - b
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
    return torch.acos(cos.clamp(-1.0, 1.0))


def _place(j: Tensor, k: Tensor, l: Tensor, r: Tensor, theta: Tensor, phi: Tensor) -> Tensor:
    """Point at distance ``r`` from ``j``, angle ``theta`` at ``j`` with ``k``, torsion ``phi``."""
    bc = j - k
    bc = bc / bc.norm(dim=-1, keepdim=True)
    n = torch.linalg.cross(k - l, bc)
    n = n / n.norm(dim=-1, keepdim=True)
    m = torch.linalg.cross(n, bc)
    r, theta, phi = r.unsqueeze(-1), theta.unsqueeze(-1), phi.unsqueeze(-1)
    return (j - r * torch.cos(theta) * bc + r * torch.sin(theta) * torch.cos(phi) * m
            + r * torch.sin(theta) * torch.sin(phi) * n)


def kabsch_align(x: Tensor, ref: Tensor, atoms: tuple[int, ...]) -> Tensor:
    """Superpose frames ``x (B, n_atoms, 3)`` on ``ref (len(atoms), 3)`` (centred) by ``atoms``."""
    sel = x[:, list(atoms)]
    centre = sel.mean(1, keepdim=True)
    h = (sel - centre).mT @ ref
    u, _, vt = torch.linalg.svd(h)
    sign = torch.sign(torch.linalg.det(u @ vt))
    d = torch.ones_like(h[..., 0])
    d[..., -1] = sign
    rot = (u * d.unsqueeze(-2)) @ vt
    return (x - centre) @ rot


class InternalCoordinates(nn.Module):
    """The fitted transform; build it with :meth:`fit` on training frames ``(N, 66)`` in nm.

    ``forward(x)`` maps Cartesian ``(B, 66)`` to features ``(B, 60)`` and returns
    ``(features, ladj)`` with the log-volume factor of that direction; ``inverse(f)`` maps back
    and returns ``(x, ladj)`` of the generative direction. Both compute in float64 and return
    the input's dtype. Cost: :math:`O(B \\cdot n_{atoms})`, sequential over the 17 Z-matrix atoms.
    """

    def __init__(self, n_atoms: int = 22, n_block_dims: int = 9) -> None:
        super().__init__()
        nz, nb = len(ZMATRIX), len(BLOCK)
        self.n_atoms, self.n_block_dims = n_atoms, n_block_dims
        self.n_features = n_block_dims + 3 * nz
        if 3 * n_atoms != 3 * nb + 3 * nz:
            raise ValueError(f"Z-matrix and block cover {nb + nz} atoms, expected {n_atoms}")
        f64 = {"dtype": torch.float64}
        self.register_buffer("ref", torch.zeros(nb, 3, **f64))
        self.register_buffer("mean", torch.zeros(3 * nb, **f64))
        self.register_buffer("basis", torch.zeros(3 * nb, n_block_dims, **f64))
        self.register_buffer("scale", torch.ones(n_block_dims, **f64))
        self.register_buffer("ic_shift", torch.zeros(3 * nz, **f64))
        self.register_buffer("ic_scale", torch.ones(3 * nz, **f64))

    @classmethod
    def fit(cls, x: Tensor, n_block_dims: int = 9, bins: int = 90) -> InternalCoordinates:
        """Reference, principal components and normalization from frames ``x (N, 66)``."""
        x = x.to(torch.float64).reshape(len(x), -1, 3)
        ic = cls(x.shape[1], n_block_dims)
        ref = x[0, list(BLOCK)] - x[0, list(BLOCK)].mean(0)
        for _ in range(2):  # superpose on the first frame, then on the mean
            block = kabsch_align(x, ref, BLOCK)[:, list(BLOCK)]
            ref = block.mean(0) - block.mean((0, 1))
        ic.ref.copy_(ref)
        flat = kabsch_align(x, ref, BLOCK)[:, list(BLOCK)].reshape(len(x), -1)
        ic.mean.copy_(flat.mean(0))
        evals, evecs = torch.linalg.eigh(torch.cov((flat - ic.mean).T))
        ic.basis.copy_(evecs[:, -n_block_dims:].flip(-1))
        ic.scale.copy_(evals[-n_block_dims:].flip(-1).sqrt())
        bonds, angles, torsions = ic._raw_ics(x)
        nz = len(ZMATRIX)
        ic.ic_shift[:nz], ic.ic_scale[:nz] = bonds.mean(0), bonds.std(0)
        ic.ic_shift[nz:2 * nz], ic.ic_scale[nz:2 * nz] = angles.mean(0), angles.std(0)
        for t in range(nz):  # put the seam in the widest gap of the data, then standardize
            seam = _widest_gap(torsions[:, t], bins)
            ic.ic_shift[2 * nz + t] = seam + math.pi
            ic.ic_scale[2 * nz + t] = _wrap(torsions[:, t] - seam - math.pi).std()
        return ic

    def _raw_ics(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        i, j, k, l = (list(c) for c in zip(*ZMATRIX, strict=True))
        xi, xj, xk, xl = x[:, i], x[:, j], x[:, k], x[:, l]
        return (xi - xj).norm(dim=-1), _angle(xi, xj, xk), dihedral(xi, xj, xk, xl)

    def _ladj_generative(self, bonds: Tensor, angles: Tensor) -> Tensor:
        const = self.scale.log().sum() + self.ic_scale.log().sum()
        return (2 * bonds.abs().log() + torch.sin(angles).abs().log()).sum(-1) + const

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian ``(B, 66)`` -> ``(features (B, 60), log-volume factor (B,))``."""
        dtype, nz = x.dtype, len(ZMATRIX)
        x = kabsch_align(x.to(torch.float64).reshape(len(x), -1, 3), self.ref, BLOCK)
        block = x[:, list(BLOCK)].reshape(len(x), -1)
        fb = (block - self.mean) @ self.basis / self.scale
        bonds, angles, torsions = self._raw_ics(x)
        raw = torch.cat([bonds, angles, torsions], -1) - self.ic_shift
        raw = torch.cat([raw[:, :2 * nz], _wrap(raw[:, 2 * nz:])], -1)
        f = torch.cat([fb, raw / self.ic_scale], -1)
        return f.to(dtype), -self._ladj_generative(bonds, angles).to(dtype)

    def inverse(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``(B, 60)`` -> ``(Cartesian (B, 66) in the reference frame, ladj (B,))``."""
        dtype, nz, nb = f.dtype, len(ZMATRIX), self.n_block_dims
        f = f.to(torch.float64)
        block = (self.mean + (f[:, :nb] * self.scale) @ self.basis.T).reshape(len(f), -1, 3)
        ics = f[:, nb:] * self.ic_scale + self.ic_shift
        bonds, angles, torsions = ics[:, :nz], ics[:, nz:2 * nz], ics[:, 2 * nz:]
        pos: dict[int, Tensor] = {a: block[:, n] for n, a in enumerate(BLOCK)}
        for n, (i, j, k, l) in enumerate(ZMATRIX):
            pos[i] = _place(pos[j], pos[k], pos[l], bonds[:, n], angles[:, n], torsions[:, n])
        x = torch.stack([pos[a] for a in range(self.n_atoms)], 1).reshape(len(f), -1)
        return x.to(dtype), self._ladj_generative(bonds, angles).to(dtype)

    def torsion_features(self) -> slice:
        """Where the torsions sit in the feature vector."""
        start = self.n_block_dims + 2 * len(ZMATRIX)
        return slice(start, start + len(ZMATRIX))


def _wrap(t: Tensor) -> Tensor:
    return torch.remainder(t + math.pi, 2 * math.pi) - math.pi


def _widest_gap(angles: Tensor, bins: int) -> float:
    """Centre of the longest circular run of least-populated histogram bins of ``angles``."""
    hist = torch.histc(angles, bins, -math.pi, math.pi)
    low = (hist == hist.min()).tolist()
    best_len, best_end, run = 0, 0, 0
    for i in range(2 * bins):  # twice round the circle so runs may wrap
        run = run + 1 if low[i % bins] else 0
        if min(run, bins) > best_len:
            best_len, best_end = min(run, bins), i
    centre = best_end - (best_len - 1) / 2
    return -math.pi + (centre + 0.5) * 2 * math.pi / bins


def main(argv: list[str] | None = None) -> None:
    from boltzmann.data import QUICK, load_or_generate

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    x = torch.as_tensor(load_or_generate(QUICK)["x"])
    ic = InternalCoordinates.fit(x)
    f, ladj = ic(x)
    x_back, ladj_back = ic.inverse(f)
    f_back, _ = ic(x_back)
    aligned = kabsch_align(x.reshape(len(x), -1, 3), ic.ref, BLOCK).reshape(len(x), -1)
    print(f"features {tuple(f.shape)}; |f - f(x(f))|_max = {float((f - f_back).abs().max()):.2e}; "
          f"|ladj_fwd + ladj_inv|_max = {float((ladj + ladj_back).abs().max()):.2e}; "
          f"|x - x(f(x))|_max after superposition = "
          f"{float((aligned - x_back).abs().max()):.2e} nm")


if __name__ == "__main__":
    main()
