r"""Iterative refinement of inverses and orthogonal factors (Schulz-type iterations).

Two fixed-point iterations share one driver: the hyperpower (Newton–Schulz
for order 2) iteration towards :math:`A^{-1}` and the Newton–Schulz iteration
towards the orthogonal polar factor. Both contract when the starting error is
below 1; the driver falls back to a direct factorization (LU inverse, SVD)
when the error is not below 1/2, and stops as soon as the error stops
decreasing or reaches the tolerance.

References
----------
- The Newton–Schulz iteration for the matrix inverse and its higher-order
   hyperpower generalisations (higher-order Schulz-type methods).
- The Newton–Schulz iteration for the polar decomposition, as analysed in
   *Functions of Matrices: Theory and Computation* (SIAM, 2008), chapter 8.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from p4opt._typing import Tensor
from p4opt.errors import P4ValueError
from p4opt.linalg._common import _eye_like
from p4opt.linalg.metrics import orthogonality_error

__all__ = [
    "inverse_residual",
    "newton_schulz_step",
    "hyperpower_step",
    "refine_inverse",
    "newton_schulz_polar_step",
    "refine_orthogonal",
    "polar_factor",
]


def inverse_residual(a: Tensor, x: Tensor) -> Tensor:
    r"""Residual :math:`R = I - A X` of an approximate inverse ``x`` of ``a``.

    Cost :math:`O(n^3)`. ``R.abs().amax()`` is the error figure
    :math:`\lVert A X - I \rVert_{\max}` reported by ``validate``.
    """
    return _eye_like(a) - a @ x


def newton_schulz_step(a: Tensor, x: Tensor) -> Tensor:
    r"""One Newton–Schulz step towards :math:`A^{-1}`.

    .. math:: X \leftarrow X (2I - A X) = X (I + R), \qquad R = I - A X

    The residual squares: :math:`I - A X_{new} = R^2`, so the step converges
    quadratically when :math:`\rho(R) < 1`. Cost: two :math:`n^3` products.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[4.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    >>> x = torch.linalg.inv(a) + 1e-4
    >>> err = lambda x: float((a @ x - torch.eye(2)).abs().max())
    >>> err(newton_schulz_step(a, x)) < err(x) ** 2 * 10
    True
    """
    return x + x @ inverse_residual(a, x)


def hyperpower_step(a: Tensor, x: Tensor, order: int = 3) -> Tensor:
    r"""One hyperpower step of order ``p`` towards :math:`A^{-1}`.

    .. math:: X \leftarrow X \sum_{i=0}^{p-1} R^i, \qquad R = I - A X

    so that :math:`I - A X_{new} = R^p`: order 2 is Newton–Schulz; the
    higher-order Schulz-type schemes of Soleymani and others are factorized
    members of this family that save products. Evaluated in Horner form with
    ``p`` products of cost :math:`n^3`.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[4.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    >>> x = torch.linalg.inv(a) + 1e-4
    >>> float((a @ hyperpower_step(a, x, 3) - torch.eye(2)).abs().max()) < 1e-9
    True
    """
    if not isinstance(order, int) or order < 2:
        raise P4ValueError(f"order must be an int >= 2, got {order!r}")
    r = inverse_residual(a, x)
    eye = _eye_like(r)
    s = eye + r
    for _ in range(order - 2):
        s = eye + r @ s
    return x @ s


def refine_inverse(
    a: Tensor, x: Tensor, order: int = 2, max_steps: int = 3, tol: float | None = None
) -> tuple[Tensor, float]:
    r"""Refine an approximate inverse by hyperpower steps; fall back to LU when it diverges.

    Parameters
    ----------
    a : Tensor, shape (*, n, n)
        The matrix (use float64 for bookkeeping accuracy).
    x : Tensor, shape (*, n, n)
        Current approximation of :math:`A^{-1}`.
    order : int
        2 for Newton–Schulz, larger for a higher-order step.
    max_steps : int
        Upper bound on steps; stops early once the residual is below ``tol``.
    tol : float, optional
        Target :math:`\lVert I - AX \rVert_{\max}`; default ``100 n`` machine epsilons.

    Returns
    -------
    x : Tensor, shape (*, n, n)
        The refined inverse.
    residual : float
        :math:`\lVert I - AX \rVert_{\max}` of the returned inverse. Cost
        :math:`O(p\, n^3)` per step.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[4.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    >>> x, res = refine_inverse(a, torch.linalg.inv(a) + 1e-5)
    >>> res < 1e-13
    True
    """
    n = a.shape[-1]
    tol = 100 * n * torch.finfo(a.dtype).eps if tol is None else tol

    def step(x: Tensor) -> Tensor:
        return newton_schulz_step(a, x) if order == 2 else hyperpower_step(a, x, order)

    return _refine(
        x,
        step=step,
        error=lambda x: float(inverse_residual(a, x).abs().amax()),
        fallback=lambda _: torch.linalg.inv(a),
        max_steps=max_steps,
        tol=tol,
    )


def polar_factor(a: Tensor, special: bool = False) -> Tensor:
    r"""The orthogonal matrix nearest to ``a`` in Frobenius norm (its polar factor).

    .. math:: A = U \Sigma V^T \;\Rightarrow\; Q = U D V^T,
              \quad D = \mathrm{diag}(1, \dots, 1, \pm 1)

    With ``special=True`` the sign of the last entry of :math:`D` (the
    smallest singular value) is chosen so that :math:`\det Q = +1`, which gives
    the nearest matrix of :math:`SO(n)`; otherwise :math:`D = I`. A rectangular
    ``a`` (thin SVD) gives the nearest matrix with orthonormal columns (``n > p``) or
    rows (``n < p``), a point of the Stiefel manifold; ``special`` needs a square ``a``.

    Parameters
    ----------
    a : Tensor, shape (*, n, p)
    special : bool

    Returns
    -------
    Tensor, shape (*, n, p)
        Same dtype as ``a``. Cost :math:`O(np\min(n, p))` (one thin SVD).

    Examples
    --------
    >>> import torch
    >>> a = torch.diag(torch.tensor([2.0, -0.5], dtype=torch.float64))
    >>> polar_factor(a)
    tensor([[ 1.,  0.],
            [ 0., -1.]], dtype=torch.float64)
    >>> torch.linalg.det(polar_factor(a, special=True)).item()
    1.0
    >>> polar_factor(torch.tensor([[3.0], [4.0]], dtype=torch.float64)).flatten().tolist()
    [0.6, 0.8]
    """
    if special and a.shape[-1] != a.shape[-2]:
        raise P4ValueError(f"special=True needs square matrices, got shape {tuple(a.shape)}")
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    if special:
        sign = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        u = torch.cat([u[..., :-1], u[..., -1:] * sign[..., None, None]], dim=-1)
    return u @ vh


def newton_schulz_polar_step(q: Tensor) -> Tensor:
    r"""One Newton–Schulz step towards the polar factor of a nearly orthogonal ``q``.

    .. math:: Q \leftarrow \tfrac{1}{2} Q (3I - Q^T Q)

    Every singular value :math:`\sigma = 1 + \epsilon` becomes
    :math:`1 - \tfrac{3}{2}\epsilon^2 + O(\epsilon^3)`, so the orthogonality error
    squares; it keeps the sign of the determinant. The same step moves a rectangular
    ``q`` (*, n, p) towards orthonormal columns or rows (its polar factor); cost
    :math:`O(np\min(n, p))`, two :math:`n^3` products for a square ``q``.

    Examples
    --------
    >>> import torch
    >>> q = torch.eye(3, dtype=torch.float64) * (1 + 1e-4)
    >>> float(orthogonality_error(newton_schulz_polar_step(q))) < 1e-7
    True
    """
    if q.shape[-2] < q.shape[-1]:  # wide: the small Gram matrix is q q^T
        return 1.5 * q - 0.5 * ((q @ q.mT) @ q)
    return 1.5 * q - 0.5 * (q @ (q.mT @ q))


def refine_orthogonal(
    q: Tensor, max_steps: int = 3, tol: float | None = None, special: bool = False
) -> tuple[Tensor, float]:
    r"""Re-orthonormalize ``q`` by Newton–Schulz polar steps; fall back to the SVD when far off.

    Parameters
    ----------
    q : Tensor, shape (*, n, p)
        A nearly orthogonal matrix, or a nearly orthonormal set of columns (``n > p``)
        or rows (``n < p``); use float64 for bookkeeping accuracy.
    max_steps : int
        Upper bound on Newton–Schulz steps; stops once the error is below ``tol``
        or stops decreasing.
    tol : float, optional
        Target orthogonality error; default ``10 max(n, p)`` machine epsilons.
    special : bool
        Passed to :func:`polar_factor` on the fallback path (error above 0.5),
        so that a matrix of :math:`SO(n)` stays there.

    Returns
    -------
    q : Tensor, shape (*, n, p)
    error : float
        Orthogonality error of the returned matrix (the largest over a batch). Cost
        :math:`O(np\min(n, p))` per step.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q0 = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    >>> q, err = refine_orthogonal(q0 + 1e-6 * torch.randn(8, 8, generator=g, dtype=torch.float64))
    >>> err < 1e-14
    True
    """
    tol = 10 * max(q.shape[-2:]) * torch.finfo(q.dtype).eps if tol is None else tol
    return _refine(
        q,
        step=newton_schulz_polar_step,
        error=lambda q: float(orthogonality_error(q).amax()),
        fallback=lambda q: polar_factor(q, special=special),
        max_steps=max_steps,
        tol=tol,
    )


def _refine(
    x: Tensor,
    step: Callable[[Tensor], Tensor],
    error: Callable[[Tensor], float],
    fallback: Callable[[Tensor], Tensor],
    max_steps: int,
    tol: float,
) -> tuple[Tensor, float]:
    """Iterate ``step`` from ``x`` while the ``error`` decreases and is above ``tol``.

    When the starting error is not below 1/2 (or is NaN) the iteration would not
    contract, and ``fallback(x)`` (a direct factorization) replaces ``x`` first.
    At most ``max_steps`` steps; a step that does not lower the error is discarded.
    Returns the final matrix and its error.
    """
    err = error(x)
    if not err < 0.5:  # also catches NaN
        x = fallback(x)
        err = error(x)
    for _ in range(max_steps):
        if err <= tol:
            break
        x_new = step(x)
        err_new = error(x_new)
        if not err_new < err:
            break
        x, err = x_new, err_new
    return x, err
