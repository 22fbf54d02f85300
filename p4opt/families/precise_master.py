r"""The float64 master copy of a lower-precision layer's base, for :class:`~p4opt.Invertible`.

A float32 layer registered with float64 bookkeeping keeps its base in float64 as
``precise_base``; merges update the master and round it into the layer, so float32 rounding
never accumulates. A dtype move of the layer (``model.double()``, ``.float()``) creates the
master when leaving the bookkeeping dtype and drops it when coming back.
"""

from __future__ import annotations

from typing import Any

import torch

from p4opt._typing import Tensor

__all__ = ["PreciseMaster"]


class PreciseMaster:
    """Mixin of :class:`~p4opt.Invertible`: the base :math:`A` at bookkeeping precision.

    The host provides the buffers ``precise_base`` (or ``None``) and ``inv``, ``dtype`` (the
    bookkeeping dtype), ``base``, ``_conv``, ``_as_weight``, ``_inverse_shape`` and
    ``_settle_inverse``.
    """

    precise_base: Tensor | None
    dtype: torch.dtype
    _conv: bool

    def _matrix(self) -> Tensor:
        """The base matrix :math:`A` at bookkeeping precision, shape (*, n, n)."""
        self._sync_dtype()
        if self.precise_base is not None:
            return self.precise_base
        base = self.base
        return base.reshape(self._inverse_shape) if self._conv else base

    def dtype_changed(self, old: torch.dtype, new: torch.dtype) -> None:
        if new == self.dtype and self.precise_base is not None:
            with torch.no_grad():
                self.base.copy_(self._as_weight(self.precise_base))
            self.precise_base = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._settle_inverse()  # the move takes the buffer, not the pending factors
        # leaving the bookkeeping dtype: keep the exact base as the master copy first
        if self.is_registered and "inv" in self._buffers and self.precise_base is None:
            probe = fn(torch.empty(0, dtype=self.dtype))
            base = self.base
            if probe.dtype != self.dtype and base.device.type != "meta":
                self.precise_base = self._matrix().detach().clone()
        return super()._apply(fn, recurse)  # type: ignore[return-value]
