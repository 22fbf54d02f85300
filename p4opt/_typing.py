"""Domain aliases shared by the p4opt modules."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Tensor", "StateDict"]

Tensor = torch.Tensor
StateDict = dict[str, Any]
