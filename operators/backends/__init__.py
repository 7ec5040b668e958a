"""Projector backends behind one protocol (``base.Backend``) and a name registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import BackendUnavailable
from ..geometry import ProjectionGeometry, VolumeGeometry
from .base import Backend

__all__ = ["Backend", "BackendUnavailable", "make_backend", "BACKENDS"]


def _torch(volume: VolumeGeometry, geometry: ProjectionGeometry, **kw: Any) -> Backend:
    from .torch_joseph import TorchJoseph

    return TorchJoseph(volume, geometry, **kw)


def _astra_cpu(volume: VolumeGeometry, geometry: ProjectionGeometry, **kw: Any) -> Backend:
    from .astra import AstraCPU

    return AstraCPU(volume, geometry, **kw)


def _astra_cuda(volume: VolumeGeometry, geometry: ProjectionGeometry, **kw: Any) -> Backend:
    from .astra import AstraCUDA

    return AstraCUDA(volume, geometry, **kw)


def _matrix(volume: VolumeGeometry, geometry: ProjectionGeometry, **kw: Any) -> Backend:
    from .matrix import MatrixBackend

    return MatrixBackend.build(volume, geometry, **kw)


def _odl(
    volume: VolumeGeometry, geometry: ProjectionGeometry, *, impl: str = "astra_cpu", **kw: Any
) -> Backend:
    from .odl import OdlBackend, odl_ray_transform

    op = odl_ray_transform(volume, geometry, impl=impl, **kw)
    return OdlBackend(op, volume=volume, geometry=geometry)


def _tomosipo(volume: VolumeGeometry, geometry: ProjectionGeometry, **kw: Any) -> Backend:
    from .tomosipo import TomosipoBackend

    return TomosipoBackend(volume, geometry, **kw)


BACKENDS: dict[str, Callable[..., Backend]] = {
    "torch": _torch,
    "astra_cpu": _astra_cpu,
    "astra_cuda": _astra_cuda,
    "matrix": _matrix,
    "odl": _odl,
    "tomosipo": _tomosipo,
}


def make_backend(
    name: str, volume: VolumeGeometry, geometry: ProjectionGeometry, **options: Any
) -> Backend:
    """Instantiate a backend by name; unknown names and unavailable backends raise
    ``BackendUnavailable`` with the reason."""
    if name not in BACKENDS:
        raise BackendUnavailable(
            f"unknown backend {name!r}; choose one of {sorted(BACKENDS)} or 'auto'/'astra'"
        )
    return BACKENDS[name](volume, geometry, **options)
