"""Shape and invertibility checks shared by the square-matrix families."""

from __future__ import annotations

import math

import torch
from torch import nn

from p4opt._typing import Tensor
from p4opt.errors import ShapeError, SingularMatrixError, describe

__all__ = ["matrix_view", "check_invertible"]


def matrix_view(value: Tensor, where: str, module: nn.Module | None) -> tuple[Tensor, bool]:
    """The (*, n, n) matrices a registered tensor stands for, and whether it is a 1×1 conv.

    A convolution weight ``(c, c, 1, ...)`` of a ``torch.nn`` convolution is one ``c × c``
    channel-mixing matrix; a larger kernel is refused (it has no inverse of this form); any
    other tensor ``(*, n, n)`` is a stack of square matrices.

    Raises
    ------
    ShapeError
        Naming ``where`` and the expected shape.
    """
    is_conv = isinstance(module, nn.modules.conv._ConvNd)
    if is_conv and value.ndim >= 3 and all(s == 1 for s in value.shape[2:]):
        if value.shape[0] != value.shape[1]:
            raise ShapeError(
                f"{where} needs as many output as input channels to be invertible, but it is a "
                f"{describe(value)}"
            )
        return value.reshape(value.shape[0], value.shape[1]), True
    if is_conv:
        raise ShapeError(
            f"{where} is a convolution weight with kernel {tuple(value.shape[2:])}: only 1x1 "
            "kernels are treated, as one channel-mixing matrix (use p4opt.nn.InvertibleConv1x1); "
            "a larger kernel has no inverse of this form"
        )
    if value.ndim < 2 or value.shape[-1] != value.shape[-2]:
        raise ShapeError(
            f"{where} must be a square matrix (n, n) or a stack (*, n, n), but it is a "
            f"{describe(value)}"
        )
    return value, False


def check_invertible(
    matrix: Tensor, where: str, max_condition: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse, sign and log|det| of ``matrix`` (*, n, n); refuse singular or ill-conditioned ones.

    Cost :math:`O(n^3)` per matrix (LU).

    Raises
    ------
    SingularMatrixError
        When a matrix is singular or its 1-norm condition number exceeds ``max_condition``.
    """
    inv, info = torch.linalg.inv_ex(matrix)
    sign, logabsdet = torch.linalg.slogdet(matrix)
    cond = torch.linalg.matrix_norm(matrix, 1) * torch.linalg.matrix_norm(inv, 1)
    worst = float(torch.where(torch.isfinite(cond), cond, math.inf).amax())
    if bool((info != 0).any()) or bool((sign == 0).any()) or not math.isfinite(worst):
        raise SingularMatrixError(f"{where} is singular; an invertible matrix is needed")
    if worst > max_condition:
        raise SingularMatrixError(
            f"{where} is numerically singular (1-norm condition number {worst:.2e} > "
            f"max_condition={max_condition:.1e}); start from a better-conditioned matrix"
        )
    return inv, sign, logabsdet
