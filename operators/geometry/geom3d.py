"""The 3D projection geometries on a circular orbit about the z axis: parallel beam
(``Parallel3D``) and cone beam with a flat detector (``ConeBeam3D``), sharing the angle
and detector fields of ``_Circular3D``, with their vector and ASTRA forms, conversion to
the per-view vector geometries and the ``default`` geometry covering a 3D volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..errors import GeometryError
from .common import _check_angles, _check_count, _check_positive, _pair, uniform_angles
from .projection import ProjectionGeometry
from .vec3d import ConeVec3D, ParallelVec3D
from .volume import VolumeGeometry, _default_n_angles, _fov_radius

__all__ = ["Parallel3D", "ConeBeam3D"]


@dataclass(frozen=True, kw_only=True, repr=False)
class _Circular3D(ProjectionGeometry):
    angles: tuple[float, ...]
    det_shape: tuple[int, int]  # (rows, cols)
    det_spacing: tuple[float, float] | float = 1.0  # (row height, col width)
    ndim = 3

    def _check_common(self) -> None:
        object.__setattr__(self, "angles", _check_angles(self.angles))
        rows, cols = _pair(self.det_shape, "det_shape", int)
        object.__setattr__(
            self, "det_shape", (_check_count("det rows", rows), _check_count("det cols", cols))
        )
        sp = _pair(self.det_spacing, "det_spacing", float)
        object.__setattr__(
            self,
            "det_spacing",
            (_check_positive("det row spacing", sp[0]), _check_positive("det col spacing", sp[1])),
        )

    @property
    def n_views(self) -> int:
        return len(self.angles)

    def _take(self, sel: Sequence[int]) -> ProjectionGeometry:
        return replace(self, angles=tuple(self.angles[i] for i in sel))


@dataclass(frozen=True, kw_only=True, repr=False)
class Parallel3D(_Circular3D):
    """3D parallel beam rotating about the z axis; detector ``(rows, cols)`` with spacing
    ``(row height, col width)``."""

    def __post_init__(self) -> None:
        self._check_common()

    def to_vec(self) -> np.ndarray:
        a = np.asarray(self.angles)
        s, c, z = np.sin(a), np.cos(a), np.zeros(len(a))
        dh, dw = self.det_spacing
        ray = np.stack([s, -c, z], 1)
        u = np.stack([c, s, z], 1) * dw
        v = np.stack([z, z, z + 1], 1) * dh
        return np.concatenate([ray, np.zeros_like(ray), u, v], 1)

    def to_astra(self) -> dict:
        import astra

        dh, dw = self.det_spacing
        rows, cols = self.det_shape
        return astra.create_proj_geom("parallel3d", dw, dh, rows, cols, np.asarray(self.angles))

    def to_vec_geometry(self) -> ParallelVec3D:
        return ParallelVec3D(vectors=self.to_vec(), det_shape=self.det_shape)

    @classmethod
    def default(cls, volume: VolumeGeometry, *, n_angles: int | None = None) -> Parallel3D:
        if volume.ndim != 3:
            raise GeometryError("Parallel3D.default needs a 3D volume")
        dz, dy, dx = volume.voxel_size
        w = min(dy, dx)
        cols = int(math.ceil(2 * _fov_radius(volume) / w))
        rows = int(math.ceil(volume.extent[0] / dz))
        return cls(
            angles=uniform_angles(n_angles or _default_n_angles(volume, False)),
            det_shape=(rows, cols),
            det_spacing=(dz, w),
        )


@dataclass(frozen=True, kw_only=True, repr=False)
class ConeBeam3D(_Circular3D):
    """3D circular cone beam with a flat detector, rotating about the z axis."""

    src_origin: float = 0.0
    origin_det: float = 0.0
    is_cone = True

    def __post_init__(self) -> None:
        self._check_common()
        object.__setattr__(self, "src_origin", _check_positive("src_origin", self.src_origin))
        object.__setattr__(self, "origin_det", float(self.origin_det))
        if self.src_origin + self.origin_det <= 0:
            raise GeometryError(
                "the detector must lie beyond the source: src_origin + origin_det > 0"
            )

    @property
    def magnification(self) -> float:
        return (self.src_origin + self.origin_det) / self.src_origin

    def to_vec(self) -> np.ndarray:
        a = np.asarray(self.angles)
        s, c, z = np.sin(a), np.cos(a), np.zeros(len(a))
        dh, dw = self.det_spacing
        src = np.stack([s, -c, z], 1) * self.src_origin
        det = np.stack([-s, c, z], 1) * self.origin_det
        u = np.stack([c, s, z], 1) * dw
        v = np.stack([z, z, z + 1], 1) * dh
        return np.concatenate([src, det, u, v], 1)

    def to_astra(self) -> dict:
        import astra

        dh, dw = self.det_spacing
        rows, cols = self.det_shape
        return astra.create_proj_geom(
            "cone", dw, dh, rows, cols, np.asarray(self.angles), self.src_origin, self.origin_det
        )

    def to_vec_geometry(self) -> ConeVec3D:
        return ConeVec3D(vectors=self.to_vec(), det_shape=self.det_shape)

    @classmethod
    def default(
        cls,
        volume: VolumeGeometry,
        *,
        n_angles: int | None = None,
        src_origin: float | None = None,
        origin_det: float | None = None,
    ) -> ConeBeam3D:
        """Full orbit; source at 4x the FOV radius, detector at 2x; detector rows and columns
        cover the magnified volume (including the cone's spread over the volume height)."""
        if volume.ndim != 3:
            raise GeometryError("ConeBeam3D.default needs a 3D volume")
        r = _fov_radius(volume)
        so = src_origin if src_origin is not None else 4 * r
        od = origin_det if origin_det is not None else 2 * r
        if so <= r:
            raise GeometryError(
                f"src_origin={so} puts the source inside the field of view (r={r:g})"
            )
        mag = (so + od) / so
        dz, dy, dx = volume.voxel_size
        w = min(dy, dx) * mag
        h = dz * mag
        half_w = (so + od) * r / math.sqrt(so * so - r * r)
        zmax = max(abs(volume.min_pt[0]), abs(volume.max_pt[0]))
        half_h = (so + od) * zmax / (so - r)  # nearest point to the source magnifies most
        return cls(
            angles=uniform_angles(n_angles or _default_n_angles(volume, True), stop=2 * math.pi),
            det_shape=(int(math.ceil(2 * half_h / h)), int(math.ceil(2 * half_w / w))),
            det_spacing=(h, w),
            src_origin=so,
            origin_det=od,
        )
