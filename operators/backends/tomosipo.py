"""tomosipo adapter (3D, CUDA): for users whose pipelines already hold tomosipo operators.

tomosipo is not on PyPI and runs ASTRA's CUDA kernels only, so this backend needs both
``import tomosipo`` and a CUDA-enabled ASTRA with a visible GPU; otherwise it raises
``BackendUnavailable`` with install advice before anything native is touched.
Geometries are handed over through ASTRA dictionaries (``ts.from_astra``), which use our 3D
conventions unchanged: volumes ``(D, H, W) = (z, y, x)``, sinograms ``(rows, angles, cols)``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import BackendUnavailable
from ..geometry import ProjectionGeometry, VolumeGeometry
from .astra import ASTRA_LOCK, astra_cuda_available, astra_proj_geom_3d

__all__ = ["TomosipoBackend", "import_tomosipo"]

_INSTALL = (
    "tomosipo is not installed; it is not on PyPI: install it with "
    "`pip install git+https://github.com/ahendriksen/tomosipo` (needs a CUDA build of "
    "astra-toolbox, e.g. from conda -c astra-toolbox); backend='astra_cuda' offers the same "
    "kernels without it"
)


def import_tomosipo() -> Any:
    """The ``tomosipo`` module, or ``BackendUnavailable`` with install advice."""
    try:
        import tomosipo
    except ImportError as exc:
        raise BackendUnavailable(_INSTALL) from exc
    return tomosipo


class TomosipoBackend:
    """A ``tomosipo.operator`` on CUDA tensors (3D; not matched: ASTRA CUDA kernels)."""

    name = "tomosipo"
    matched = False

    def __init__(self, volume: VolumeGeometry, geometry: ProjectionGeometry) -> None:
        ts = import_tomosipo()
        if not astra_cuda_available():
            raise BackendUnavailable(
                "tomosipo needs ASTRA with CUDA and a visible GPU: ASTRA was built without "
                "CUDA or no GPU is visible; use backend='torch'"
            )
        if volume.ndim != 3 or geometry.ndim != 3:
            raise BackendUnavailable(
                f"the tomosipo backend is 3D only, got a {volume.ndim}D volume; use "
                "backend='astra_cuda' or 'torch' for 2D"
            )
        import tomosipo.torch_support  # noqa: F401 - registers torch tensors with tomosipo

        self.volume = volume
        self.geometry = geometry
        with ASTRA_LOCK:
            vg = ts.from_astra(volume.to_astra())
            pg = ts.from_astra(astra_proj_geom_3d(geometry))
            self.op = ts.operator(vg, pg)

    def check_tensor(self, t: torch.Tensor) -> None:
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"tomosipo supports float32 and float64 tensors, got {t.dtype}")
        if t.device.type != "cuda":
            raise BackendUnavailable(
                f"tensor is on {t.device.type}, tomosipo needs a CUDA tensor; use "
                "backend='torch' for CPU tensors"
            )

    def _loop(self, fn: Any, t: torch.Tensor) -> torch.Tensor:
        self.check_tensor(t)
        src = t.detach().to(torch.float32).contiguous()
        with ASTRA_LOCK:
            outs = [fn(src[k]) for k in range(src.shape[0])]
        return torch.stack(outs).to(t.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D, H, W) -> (N, rows, angles, cols)``."""
        return self._loop(self.op, x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, rows, angles, cols) -> (N, D, H, W)``."""
        return self._loop(self.op.T, y)
