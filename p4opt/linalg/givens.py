r"""Givens rotations on disjoint coordinate pairs, and permutation inverses.

Row-vector convention: :func:`givens_apply` returns :math:`x\,G` for vectors ``x[..., n]``.
"""

from __future__ import annotations

from typing import Any

import torch

from p4opt._autograd import Function
from p4opt._typing import Tensor

__all__ = ["givens_apply", "givens_layers_apply", "invert_permutation", "round_robin"]


def invert_permutation(perm: Tensor) -> Tensor:
    r"""Inverse of a permutation given as an index tensor: its ``argsort``.

    ``x[..., perm][..., invert_permutation(perm)]`` equals ``x``. Cost :math:`O(n \log n)`.

    Examples
    --------
    >>> import torch
    >>> invert_permutation(torch.tensor([2, 0, 3, 1]))
    tensor([1, 3, 0, 2])
    """
    return torch.argsort(perm)


def givens_apply(x: Tensor, angles: Tensor, perm: Tensor, inverse: Tensor | None = None) -> Tensor:
    r"""Right-multiply vectors by rotations on disjoint coordinate pairs.

    The pairs are :math:`(a_i, b_i) = (p_{2i}, p_{2i+1})` for the permutation
    :math:`p` = ``perm``; the rotation by :math:`\theta_i` maps

    .. math:: (x G)_{a_i} = x_{a_i}\cos\theta_i + x_{b_i}\sin\theta_i, \qquad
              (x G)_{b_i} = x_{b_i}\cos\theta_i - x_{a_i}\sin\theta_i,

    and leaves the last coordinate alone when ``n`` is odd.

    Parameters
    ----------
    x : Tensor, shape (..., n)
    angles : Tensor, shape (m,)
        With ``m = n // 2``.
    perm : Tensor, shape (n,), long
        A permutation of ``0..n-1``.
    inverse : Tensor, shape (n,), long, optional
        ``invert_permutation(perm)`` if already known.

    Returns
    -------
    Tensor, shape (..., n)
        Cost :math:`O(B n)`; differentiable in ``x`` and ``angles``. ``angles = 0``
        returns ``x`` exactly.

    Examples
    --------
    >>> import torch, math
    >>> x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    >>> givens_apply(x, torch.tensor([math.pi / 2], dtype=torch.float64), torch.tensor([2, 0, 1]))
    tensor([-3.,  2.,  1.], dtype=torch.float64)
    """
    m = angles.shape[-1]
    inverse = invert_permutation(perm) if inverse is None else inverse
    xp = x[..., perm]
    a, b, rest = xp[..., 0 : 2 * m : 2], xp[..., 1 : 2 * m : 2], xp[..., 2 * m :]
    c, s = torch.cos(angles), torch.sin(angles)
    rotated = torch.stack([a * c + b * s, b * c - a * s], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)[..., inverse]


def round_robin(n: int, rounds: Tensor, labels: Tensor | None = None) -> Tensor:
    r"""Pairings of ``n`` coordinates from a round-robin tournament (circle method).

    Round :math:`r` of the tournament on :math:`N = n + (n \bmod 2)` players pairs
    :math:`(r, N-1)` and :math:`((r+i) \bmod (N-1), (r-i) \bmod (N-1))` for
    :math:`1 \le i < N/2`; the :math:`N-1` rounds of a tournament pair every two coordinates
    exactly once. For odd ``n`` the coordinate paired with the missing player :math:`N-1`
    sits the round out and is listed last (as :func:`givens_apply` expects).

    Parameters
    ----------
    n : int
        Number of coordinates (at least 2).
    rounds : Tensor, shape (L,), long
        The rounds to list (taken modulo :math:`N-1`).
    labels : Tensor, shape (n,), long, optional
        A permutation that renames the coordinates (default: the identity).

    Returns
    -------
    Tensor, shape (L, n), long
        One permutation per round, the pairs adjacent: ``(p[2i], p[2i+1])``. Cost
        :math:`O(Ln)`.

    Examples
    --------
    >>> import torch
    >>> round_robin(4, torch.arange(3))
    tensor([[0, 3, 1, 2],
            [1, 3, 2, 0],
            [2, 3, 0, 1]])
    """
    players = n + n % 2
    r = torch.as_tensor(rounds, dtype=torch.long).reshape(-1, 1) % (players - 1)
    i = torch.arange(1, players // 2, device=r.device)
    ups, downs = (r + i) % (players - 1), (r - i) % (players - 1)
    others = torch.stack([ups, downs], dim=-1).flatten(-2)
    if n % 2:  # the partner of the missing player sits out, last
        perms = torch.cat([others, r], dim=-1)
    else:
        perms = torch.cat([r, torch.full_like(r, players - 1), others], dim=-1)
    return perms if labels is None else labels[perms]


def givens_layers_apply(
    x: Tensor, angles: Tensor, perms: Tensor, precision: torch.dtype | None = None
) -> Tensor:
    r"""Right-multiply vectors by ``L`` layers of rotations on disjoint coordinate pairs.

    Returns :math:`x\,G_1 G_2 \cdots G_L`, where :math:`G_l` is the layer that
    :func:`givens_apply` applies with ``angles[l]`` and ``perms[l]``. The vectors are held as
    columns; per layer one row gather takes them from the previous layer's pair order to this
    layer's (a composed index), and one batched 2×2 product rotates all pairs.

    Parameters
    ----------
    x : Tensor, shape (..., n)
    angles : Tensor, shape (L, m)
        With ``m = n // 2``.
    perms : Tensor, shape (L, n), long
        One permutation per layer (for example from :func:`round_robin`).
    precision : torch.dtype, optional
        Compute the product in this dtype and round the result into ``x``'s once (for
        example float64 for float32 tensors: each layer rounds, so the error grows with
        ``L``); the backward pass runs in ``x``'s dtype.

    Returns
    -------
    Tensor, shape (..., n)
        Cost :math:`O(BnL)` for ``B`` vectors (not BLAS-bound: forming an ``n × n`` weight
        with ``L = n - 1`` layers is an :math:`O(n^3)` elementwise pass); differentiable in
        ``x`` and ``angles``. ``angles = 0`` returns ``x`` up to signed zeros.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(5, 6, dtype=torch.float64)
    >>> angles = torch.randn(2, 3, dtype=torch.float64)
    >>> perms = round_robin(6, torch.tensor([0, 1]))
    >>> two = givens_apply(givens_apply(x, angles[0], perms[0]), angles[1], perms[1])
    >>> torch.allclose(givens_layers_apply(x, angles, perms), two)
    True
    """
    n = x.shape[-1]
    inverse = torch.argsort(perms, dim=-1)
    moves = torch.cat([perms[:1], torch.gather(inverse[:-1], 1, perms[1:])], dim=0)
    columns = x.reshape(-1, n).mT  # (n, B): the gathers move whole rows
    # in the tensors' own dtype, also under autocast (a bfloat16 product would round the
    # rotation to 3 digits; the layer's product with its input autocasts as usual)
    args = (columns, angles.to(x.dtype), moves, inverse[-1], precision)
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = _GivensLayers.apply(*args)
    else:
        out = _GivensLayers.apply(*args)
    return out.mT.reshape(x.shape)


def _rotations(angles: Tensor) -> Tensor:
    """(L, m, 2, 2): block ``[l, i]`` maps the column pair (a, b) to (a c + b s, b c − a s)."""
    c, s = torch.cos(angles), torch.sin(angles)
    return torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)


def _rotate_pairs(y: Tensor, block: Tensor) -> Tensor:
    """Apply the (m, 2, 2) blocks to the first 2m rows of ``y`` (n, B); the odd row stays."""
    m, cols = block.shape[0], y.shape[-1]
    rotated = torch.bmm(block, y[: 2 * m].reshape(m, 2, cols)).reshape(2 * m, cols)
    return rotated if y.shape[0] == 2 * m else torch.cat([rotated, y[2 * m :]], dim=0)


class _GivensLayers(Function):
    r"""Forward and hand-written backward of :func:`givens_layers_apply` on columns (n, B).

    Layer :math:`l` gathers the rows by ``moves[l]`` and rotates the row pairs by
    :math:`R_{l,i}`. The backward walks the layers from the last: with the layer's output
    pair :math:`(a', b')` and incoming gradient :math:`(\bar a, \bar b)`,
    :math:`\bar\theta = \sum (\bar a\, b' - \bar b\, a')`; the layer's input and its gradient
    are both :math:`R^T` times the output and its gradient (one batched product), then the
    gather is undone. Only the last output is kept: inputs are recovered by the inverse
    rotations (rounding grows like ``L`` machine epsilons, in the gradient only).
    """

    @staticmethod
    def forward(
        y: Tensor, angles: Tensor, moves: Tensor, last: Tensor, precision: torch.dtype | None
    ) -> Tensor:
        dtype = y.dtype
        if precision is not None:
            y, angles = y.to(precision), angles.to(precision)
        blocks = _rotations(angles)
        for layer in range(moves.shape[0]):
            y = _rotate_pairs(y.index_select(0, moves[layer]), blocks[layer])
        return y.index_select(0, last).to(dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, angles, moves, last, _ = inputs
        ctx.save_for_backward(angles, moves, last, output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        angles, moves, last, output = ctx.saved_tensors
        layers, m = angles.shape
        cols = output.shape[-1]
        blocks = _rotations(angles).mT  # the inverse rotations
        undo = torch.argsort(moves, dim=-1)
        order = torch.argsort(last)
        # outputs and their gradients side by side: every inverse rotation serves both
        both = torch.cat([output, grad], dim=-1).index_select(0, order)
        grad_angles = torch.empty_like(angles)
        for layer in range(layers - 1, -1, -1):
            pairs = both[: 2 * m].reshape(m, 2, 2 * cols)
            y, g = pairs[..., :cols], pairs[..., cols:]
            products = torch.bmm(g, y.mT)  # (m, 2, 2): [i, r, s] = sum_B g_r y_s
            grad_angles[layer] = products[:, 0, 1] - products[:, 1, 0]
            both = _rotate_pairs(both, blocks[layer]).index_select(0, undo[layer])
        grad_y = both[:, cols:] if ctx.needs_input_grad[0] else None
        return grad_y, grad_angles if ctx.needs_input_grad[1] else None, None, None, None
