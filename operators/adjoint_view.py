"""``op.T`` as a module: the adjoint view shared by every operator in this package."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class AdjointView(nn.Module):
    """``op.T``: calls ``op.adjoint``; its own ``.T`` is ``op`` again. Holds ``op`` without
    registering it as a submodule, so module traversal (repr, ``.to``) has no cycle."""

    def __init__(self, op: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_op", op)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self._op.adjoint(y)

    @property
    def T(self) -> Any:  # noqa: N802 - mathematical notation
        return self._op

    @property
    def domain_shape(self) -> tuple[int, ...]:
        return self._op.range_shape

    @property
    def range_shape(self) -> tuple[int, ...]:
        return self._op.domain_shape

    def __repr__(self) -> str:
        return f"{self._op!r}.T"
