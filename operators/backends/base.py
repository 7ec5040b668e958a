"""The one small protocol every projector backend implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..geometry import ProjectionGeometry, VolumeGeometry


@runtime_checkable
class Backend(Protocol):
    """A linear map between a volume and a sinogram, without batching or autograd logic.

    ``forward`` takes ``(N, *volume.shape)`` and returns ``(N, *geometry.shape)``; ``adjoint``
    the reverse. ``N`` is a flattened batch of leading dimensions. Both must accept any
    device/dtype the backend advertises through ``check_tensor`` and raise
    ``BackendUnavailable`` (never crash) otherwise.
    """

    name: str
    matched: bool  # adjoint is the exact transpose of forward (to float rounding)
    volume: VolumeGeometry
    geometry: ProjectionGeometry

    def check_tensor(self, t: torch.Tensor) -> None:
        """Raise ``BackendUnavailable`` or ``TypeError`` when this backend cannot take ``t``."""
        ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def adjoint(self, y: torch.Tensor) -> torch.Tensor: ...
