r"""A chain of small linear layers with bent-identity activations, as one autograd node.

.. math:: z_0 = x W_0^T + b_0, \qquad z_l = f(z_{l-1}) W_l^T + b_l, \qquad y = z_{L-1}

with :math:`f` the bent identity. Autograd would record about ten nodes per
layer; the paper's flow has 200 layers of size 2, where the per-node overhead
dominates. :func:`linear_bent_chain` is one autograd node: its two sequential
loops (forward states, backward recursion) run either as two small torch kernels
per layer each way, or, when a C compiler is available, as two compiled loops
(:mod:`p4opt.nn._native`); everything that does not depend on the layer order
(the weight and bias gradients, the activation log-derivatives in the torch
path) is a single batched kernel over the stack.
"""

from __future__ import annotations

from typing import Any

import torch

from p4opt._typing import Tensor
from p4opt.errors import ShapeError, describe
from p4opt.nn import _native

__all__ = ["linear_bent_chain"]


class _LinearBentChain(torch.autograd.Function):
    r"""The chain on a transposed, preallocated state.

    State of layer ``l``: ``S_l = [z_{l-1}; h_{l-1}; 1]`` of shape ``(2n+1, B)``
    with :math:`h = \sqrt{z^2+1}`, so that
    :math:`z_l = M_l S_l` with :math:`M_l = [W_l, W_l/2, b_l - W_l 1/2]` is one
    product (the bent identity is :math:`f(z) = z + h/2 - 1/2`). ``S_0 = [x; 0; 1]``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, mt: Tensor, native: bool) -> tuple[Tensor, Tensor]:
        n_layers, n, width = mt.shape
        batch = x.shape[0]
        states = x.new_empty(n_layers + 1, width, batch)
        states[:, 2 * n].fill_(1.0)
        states[0, :n].copy_(x.mT)
        states[0, n : 2 * n].zero_()
        if native:
            ladj = x.new_empty(batch)
            _native.forward_states(mt.contiguous(), states, ladj)
            slope = None
        else:
            _eager_forward(mt, states)
            z_all, h_all = states[1:-1, :n], states[1:-1, n : 2 * n]
            slope = torch.addcdiv(torch.ones_like(z_all), z_all, h_all, value=0.5)
            ladj = slope.log().sum(dim=(0, 1))
        ctx.save_for_backward(mt, states, slope)
        ctx.native = native
        return states[-1, :n].mT.clone(), ladj

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: Tensor, grad_ladj: Tensor | None) -> tuple[Tensor, Tensor, None]:
        mt, states, slope = ctx.saved_tensors
        n_layers, n, _ = mt.shape
        grads = states.new_empty(n_layers, n, states.shape[-1])
        if grad_y is None:
            grads[-1].zero_()
        else:
            grads[-1].copy_(grad_y.mT)
        w_t = mt[:, :, :n].mT.contiguous()
        if grad_ladj is None:
            grad_ladj = states.new_zeros(states.shape[-1])
        if ctx.native:
            _native.backward_recursion(w_t, states, grad_ladj.contiguous(), grads)
        else:
            z_all, h_all = states[1:-1, :n], states[1:-1, n : 2 * n]
            # d log f'(z) / dz = f''/f' = 1 / (h^2 (2h + z)), times the per-sample grad
            extra = (h_all * h_all * (2 * h_all + z_all)).reciprocal_().mul_(grad_ladj)
            _eager_backward(w_t, slope, extra, grads)
        grad_x = (w_t[0] @ grads[0]).mT
        grad_mt = grads @ states[:-1].mT
        return grad_x, grad_mt, None


def _eager_forward(mt: Tensor, states: Tensor) -> None:
    n = mt.shape[1]
    one = states.new_ones(n, states.shape[-1])
    zs = states[:, :n].unbind(0)
    hs = states[:, n : 2 * n].unbind(0)
    mm, hypot = torch.mm, torch.hypot
    ms, ss = mt.unbind(0), states.unbind(0)
    for m, s, z, h in zip(ms[:-1], ss[:-2], zs[1:-1], hs[1:-1], strict=True):
        mm(m, s, out=z)
        hypot(z, one, out=h)
    mm(ms[-1], ss[-2], out=zs[-1])


def _eager_backward(w_t: Tensor, slope: Tensor, extra: Tensor, grads: Tensor) -> None:
    dz = grads.unbind(0)
    tmp = torch.empty_like(dz[0])
    mm, addcmul = torch.mm, torch.addcmul
    for w, dz_out, dz_prev, e, sl in zip(
        w_t.unbind(0)[:0:-1], dz[:0:-1], dz[-2::-1], extra.unbind(0)[::-1],
        slope.unbind(0)[::-1], strict=True,
    ):
        mm(w, dz_out, out=tmp)
        addcmul(e, tmp, sl, out=dz_prev)


def linear_bent_chain(
    x: Tensor, weight: Tensor, bias: Tensor, native: bool | None = None
) -> tuple[Tensor, Tensor]:
    r"""Run ``L`` linear layers with bent identities between them; return ``(y, ladj_act)``.

    Parameters
    ----------
    x : Tensor, shape (B, n)
    weight : Tensor, shape (L, n, n)
        Layer ``l`` maps :math:`a \mapsto a W_l^T + b_l`.
    bias : Tensor, shape (L, n)
    native : bool, optional
        Run the two sequential loops as compiled C (:mod:`p4opt.nn._native`,
        built once with the system C compiler) instead of ``4L`` torch kernels.
        Default: when available (CPU, float32/64, compiler found, ``P4OPT_NATIVE``
        not ``0``). Both give the same result to rounding.

    Returns
    -------
    y : Tensor, shape (B, n)
    ladj_act : Tensor, shape (B,)
        :math:`\sum_{l<L-1} \sum_i \log f'(z_{l,i})`, the activations' part of
        the log-determinant (add :math:`\sum_l \log|\det W_l|` for the whole map).

    Cost :math:`O(L B n^2)` with :math:`2L` kernels forward and :math:`2L`
    backward; differentiable once in all inputs (no double backward).

    Examples
    --------
    >>> import torch
    >>> from p4opt.nn import functional as BF
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    >>> w = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    >>> b = torch.randn(3, 2, generator=g, dtype=torch.float64)
    >>> y, ladj = linear_bent_chain(x, w, b)
    >>> a, ref = x, 0
    >>> for i in range(3):
    ...     z = a @ w[i].mT + b[i]
    ...     if i < 2:
    ...         ref = ref + BF.bent_identity_log_derivative(z).sum(-1)
    ...         z = BF.bent_identity(z)
    ...     a = z
    >>> torch.allclose(y, a), torch.allclose(ladj, ref)
    (True, True)
    """
    if x.ndim != 2 or weight.ndim != 3 or bias.ndim != 2:
        raise ShapeError(
            f"linear_bent_chain needs x (B, n), weight (L, n, n), bias (L, n); got x "
            f"{describe(x)}, weight {describe(weight)}, bias {describe(bias)}"
        )
    n_layers, n = weight.shape[0], x.shape[-1]
    if weight.shape[1:] != (n, n) or bias.shape != (n_layers, n):
        raise ShapeError(
            f"weight must be ({n_layers}, {n}, {n}) and bias ({n_layers}, {n}); got weight "
            f"{describe(weight)}, bias {describe(bias)}"
        )
    # M_l = [W_l, W_l / 2, b_l - W_l 1 / 2]; the first layer sees h = 0 and no offset
    offset = 0.5 * weight.sum(-1)
    offset = torch.cat([torch.zeros_like(offset[:1]), offset[1:]])
    mt = torch.cat([weight, 0.5 * weight, (bias - offset).unsqueeze(-1)], dim=-1)
    if native is None:
        native = _native.available(x)
    elif native and not _native.available(x):
        raise RuntimeError("the compiled chain is not available (no C compiler, or not CPU float)")
    return _LinearBentChain.apply(x, mt, native)
