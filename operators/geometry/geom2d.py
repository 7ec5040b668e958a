"""The 2D projection geometries on a circular orbit: parallel beam (``Parallel2D``) and fan
beam with a flat detector (``FanBeam2D``), with their vector and ASTRA forms and the
``default`` geometry that covers a given 2D volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..errors import GeometryError
from .common import _check_angles, _check_count, _check_positive, uniform_angles
from .projection import ProjectionGeometry
from .volume import VolumeGeometry, _default_n_angles, _fov_radius

__all__ = ["Parallel2D", "FanBeam2D"]


@dataclass(frozen=True, kw_only=True, repr=False)
class Parallel2D(ProjectionGeometry):
    """2D parallel beam: ``angles`` (radians), ``det_count`` bins of width ``det_spacing``,
    detector centre shifted by ``det_offset`` along u (physical units)."""

    angles: tuple[float, ...]
    det_count: int
    det_spacing: float = 1.0
    det_offset: float = 0.0
    ndim = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "angles", _check_angles(self.angles))
        object.__setattr__(self, "det_count", _check_count("det_count", self.det_count))
        object.__setattr__(self, "det_spacing", _check_positive("det_spacing", self.det_spacing))
        object.__setattr__(self, "det_offset", float(self.det_offset))

    @property
    def n_views(self) -> int:
        return len(self.angles)

    @property
    def det_shape(self) -> tuple[int]:
        return (self.det_count,)

    def _take(self, sel: Sequence[int]) -> Parallel2D:
        return replace(self, angles=tuple(self.angles[i] for i in sel))

    def to_vec(self) -> np.ndarray:
        a = np.asarray(self.angles)
        s, c = np.sin(a), np.cos(a)
        u = np.stack([c, s], 1) * self.det_spacing
        return np.concatenate([np.stack([s, -c], 1), u * self.det_offset / self.det_spacing, u], 1)

    def to_astra(self) -> dict:
        import astra

        if self.det_offset:
            return astra.create_proj_geom("parallel_vec", self.det_count, self.to_vec())
        return astra.create_proj_geom(
            "parallel", self.det_spacing, self.det_count, np.asarray(self.angles)
        )

    @classmethod
    def default(cls, volume: VolumeGeometry, *, n_angles: int | None = None) -> Parallel2D:
        """Detector covering the volume's diagonal at voxel-sized bins; ``n_angles`` defaults
        to ``ceil(pi/2 * N)`` over ``[0, pi)``."""
        if volume.ndim != 2:
            raise GeometryError("Parallel2D.default needs a 2D volume")
        spacing = min(volume.voxel_size)
        count = int(math.ceil(2 * _fov_radius(volume) / spacing))
        return cls(
            angles=uniform_angles(n_angles or _default_n_angles(volume, False)),
            det_count=count,
            det_spacing=spacing,
        )


@dataclass(frozen=True, kw_only=True, repr=False)
class FanBeam2D(ProjectionGeometry):
    """2D fan beam with a flat detector. ``src_origin``/``origin_det``: distances from the
    rotation centre to the source and to the detector (physical units)."""

    angles: tuple[float, ...]
    det_count: int
    src_origin: float
    origin_det: float
    det_spacing: float = 1.0
    det_offset: float = 0.0
    ndim = 2
    is_cone = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "angles", _check_angles(self.angles))
        object.__setattr__(self, "det_count", _check_count("det_count", self.det_count))
        object.__setattr__(self, "det_spacing", _check_positive("det_spacing", self.det_spacing))
        object.__setattr__(self, "src_origin", _check_positive("src_origin", self.src_origin))
        object.__setattr__(self, "origin_det", float(self.origin_det))
        object.__setattr__(self, "det_offset", float(self.det_offset))
        if self.src_origin + self.origin_det <= 0:
            raise GeometryError(
                "the detector must lie beyond the source: src_origin + origin_det > 0"
            )

    @property
    def n_views(self) -> int:
        return len(self.angles)

    @property
    def det_shape(self) -> tuple[int]:
        return (self.det_count,)

    @property
    def magnification(self) -> float:
        return (self.src_origin + self.origin_det) / self.src_origin

    def _take(self, sel: Sequence[int]) -> FanBeam2D:
        return replace(self, angles=tuple(self.angles[i] for i in sel))

    def to_vec(self) -> np.ndarray:
        a = np.asarray(self.angles)
        s, c = np.sin(a), np.cos(a)
        src = np.stack([s, -c], 1) * self.src_origin
        det = np.stack([-s, c], 1) * self.origin_det
        u = np.stack([c, s], 1) * self.det_spacing
        return np.concatenate([src, det + u * self.det_offset / self.det_spacing, u], 1)

    def to_astra(self) -> dict:
        import astra

        if self.det_offset:
            return astra.create_proj_geom("fanflat_vec", self.det_count, self.to_vec())
        return astra.create_proj_geom(
            "fanflat",
            self.det_spacing,
            self.det_count,
            np.asarray(self.angles),
            self.src_origin,
            self.origin_det,
        )

    @classmethod
    def default(
        cls,
        volume: VolumeGeometry,
        *,
        n_angles: int | None = None,
        src_origin: float | None = None,
        origin_det: float | None = None,
    ) -> FanBeam2D:
        """Source at 4x the field-of-view radius, detector at 2x, a full orbit, a detector
        wide enough for the magnified field of view at ``magnification * voxel`` bins."""
        if volume.ndim != 2:
            raise GeometryError("FanBeam2D.default needs a 2D volume")
        r = _fov_radius(volume)
        so = src_origin if src_origin is not None else 4 * r
        od = origin_det if origin_det is not None else 2 * r
        if so <= r:
            raise GeometryError(
                f"src_origin={so} puts the source inside the field of view (r={r:g})"
            )
        mag = (so + od) / so
        spacing = min(volume.voxel_size) * mag
        # Half-width of the fan at the detector: tangent from the source to the FOV circle.
        half = (so + od) * r / math.sqrt(so * so - r * r)
        count = int(math.ceil(2 * half / spacing))
        return cls(
            angles=uniform_angles(n_angles or _default_n_angles(volume, True), stop=2 * math.pi),
            det_count=count,
            det_spacing=spacing,
            src_origin=so,
            origin_det=od,
        )
