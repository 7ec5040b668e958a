"""Volume and projection geometries: small, immutable, printable, comparable value objects.

Conventions (the single source of truth is ``docs/conventions.md``):

* World coordinates are ``(x, y, z)`` in a physical length unit chosen by the volume
  geometry (default: one voxel = 1). Angles are in radians.
* Arrays are stored in *array order*: 2D images ``(H, W) = (y, x)``, 3D volumes
  ``(D, H, W) = (z, y, x)``. Every index increases with its world coordinate.
* Sinograms: 2D ``(angles, detector)``; 3D ``(detector_rows, angles, detector_cols)``.
* Projection geometries follow ASTRA's formulas. At angle ``theta`` the parallel ray runs
  along ``(sin t, -cos t)``, the detector's u axis is ``(cos t, sin t)``; fan and cone
  sources sit at ``src_origin * (sin t, -cos t)``, the detector centre at
  ``origin_det * (-sin t, cos t)``. Vector forms use ASTRA's ``*_vec`` row layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import GeometryError

__all__ = [
    "VolumeGeometry",
    "ProjectionGeometry",
    "Parallel2D",
    "FanBeam2D",
    "Parallel3D",
    "ConeBeam3D",
    "ParallelVec3D",
    "ConeVec3D",
    "uniform_angles",
]


def uniform_angles(n: int, *, start: float = 0.0, stop: float = math.pi) -> tuple[float, ...]:
    """``n`` equispaced angles in ``[start, stop)`` (radians), as used for a half or full orbit."""
    if int(n) < 1:
        raise GeometryError(f"need at least one angle, got n={n}")
    return tuple(float(a) for a in np.linspace(start, stop, int(n), endpoint=False))


def _as_tuple(value: Any, n: int, name: str) -> tuple[float, ...]:
    """A scalar broadcast to ``n`` floats, or a length-``n`` sequence, validated positive."""
    if np.isscalar(value):
        out = (float(value),) * n
    else:
        out = tuple(float(v) for v in value)
        if len(out) != n:
            raise GeometryError(f"{name} must have {n} entries, got {len(out)}")
    return out


def _check_angles(angles: Any) -> tuple[float, ...]:
    arr = np.asarray(angles, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise GeometryError(
            "the angle list is empty: a projection geometry needs at least one view"
        )
    if not np.all(np.isfinite(arr)):
        raise GeometryError("angles contain NaN or infinite values")
    return tuple(float(a) for a in arr)


def _fmt_angles(angles: tuple[float, ...]) -> str:
    """Angles in a form that reads like code and evaluates back to the same values:
    ``uniform_angles(...)`` when they are exactly that, else the full tuple."""
    n = len(angles)
    if n >= 2:
        step = (angles[-1] - angles[0]) / (n - 1)
        named = {math.pi: "math.pi", 2 * math.pi: "2 * math.pi"}
        for stop in (math.pi, 2 * math.pi, angles[0] + step * n):
            if stop > angles[0] and uniform_angles(n, start=angles[0], stop=stop) == angles:
                start = "" if angles[0] == 0 else f", start={angles[0]!r}"
                stop_s = "" if stop == math.pi else f", stop={named.get(stop, repr(stop))}"
                return f"uniform_angles({n}{start}{stop_s})"
    return "(" + ", ".join(repr(a) for a in angles) + ("," if n == 1 else "") + ")"


# --------------------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, repr=False)
class VolumeGeometry:
    """A regular voxel grid.

    Args:
        shape: voxels in array order, ``(H, W)`` or ``(D, H, W)``.
        voxel_size: edge lengths in array order (a scalar means cubic voxels), physical units.
        center: world position of the grid centre, in array order ``(y, x)`` / ``(z, y, x)``.
    """

    shape: tuple[int, ...]
    voxel_size: tuple[float, ...] | float = 1.0
    center: tuple[float, ...] | float = 0.0

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) not in (2, 3):
            raise GeometryError(f"volume shape must be (H, W) or (D, H, W), got {self.shape}")
        if any(s < 1 for s in shape):
            raise GeometryError(f"volume shape entries must be >= 1, got {self.shape}")
        vs = _as_tuple(self.voxel_size, len(shape), "voxel_size")
        if any(not (v > 0 and math.isfinite(v)) for v in vs):
            raise GeometryError(f"voxel_size must be positive and finite, got {self.voxel_size}")
        c = _as_tuple(self.center, len(shape), "center")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "voxel_size", vs)
        object.__setattr__(self, "center", c)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def extent(self) -> tuple[float, ...]:
        """Physical size per axis (array order)."""
        return tuple(n * v for n, v in zip(self.shape, self.voxel_size))

    @property
    def min_pt(self) -> tuple[float, ...]:
        """Lower corner in world units, array order."""
        return tuple(c - e / 2 for c, e in zip(self.center, self.extent))

    @property
    def max_pt(self) -> tuple[float, ...]:
        """Upper corner in world units, array order."""
        return tuple(c + e / 2 for c, e in zip(self.center, self.extent))

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape))

    def coords(self, axis: int) -> np.ndarray:
        """World coordinates of the voxel centres along an array axis."""
        n, v, lo = self.shape[axis], self.voxel_size[axis], self.min_pt[axis]
        return lo + (np.arange(n) + 0.5) * v

    def world_to_index(self, point_xyz: Sequence[float]) -> np.ndarray:
        """Continuous array indices (array order) of a world point given as ``(x, y[, z])``."""
        p = np.asarray(point_xyz, dtype=np.float64)[::-1][-self.ndim :]
        return (p - np.asarray(self.min_pt)) / np.asarray(self.voxel_size) - 0.5

    def to_astra(self) -> dict:
        """ASTRA volume geometry. 2D: ASTRA's row 0 is at maximum y, so the y window is mirrored
        and the ASTRA backend mirrors projection geometries to match (see ``backends/astra.py``)."""
        import astra  # local: astra is optional at import time

        if self.ndim == 2:
            h, w = self.shape
            lo_y, lo_x = self.min_pt
            hi_y, hi_x = self.max_pt
            return astra.create_vol_geom(h, w, lo_x, hi_x, -hi_y, -lo_y)
        d, h, w = self.shape
        lo, hi = self.min_pt, self.max_pt
        return astra.create_vol_geom(h, w, d, lo[2], hi[2], lo[1], hi[1], lo[0], hi[0])

    def __repr__(self) -> str:
        return (
            f"VolumeGeometry(shape={self.shape}, voxel_size={self.voxel_size!r}, "
            f"center={self.center!r})"
        )


# --------------------------------------------------------------------------------------
# Projection geometries
# --------------------------------------------------------------------------------------


class ProjectionGeometry:
    """Common behaviour: view slicing, vector form, sinogram shape.

    Subclasses are frozen keyword-only dataclasses; ``to_vec()`` returns ASTRA-ordered rows:
    2D ``(n, 6)``: ``(src or ray, det centre, u)``; 3D ``(n, 12)``: ``(src or ray, d, u, v)``.
    """

    ndim: int = 0
    is_cone: bool = False  # rays diverge from a point source (fan/cone) vs parallel

    # -- to be provided -------------------------------------------------------------
    def to_vec(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def n_views(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    # det_shape: (cols,) in 2D, (rows, cols) in 3D -- a field or a property in subclasses
    det_shape: tuple[int, ...]

    def _take(self, index: slice | Sequence[int]) -> ProjectionGeometry:  # pragma: no cover
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Sinogram shape: 2D ``(angles, det)``; 3D ``(det_rows, angles, det_cols)``."""
        if self.ndim == 2:
            return (self.n_views, self.det_shape[0])
        rows, cols = self.det_shape
        return (rows, self.n_views, cols)

    def __len__(self) -> int:
        return self.n_views

    def __getitem__(self, index: int | slice | Sequence[int]) -> ProjectionGeometry:
        """Select views: ``geom[::2]``, ``geom[10:20]``, ``geom[[0, 5]]``, ``geom[3]``."""
        if isinstance(index, int | np.integer):
            i = int(index)
            if not -self.n_views <= i < self.n_views:
                raise IndexError(f"view {i} out of range for {self.n_views} views")
            index = [i % self.n_views]
        if isinstance(index, slice):
            sel = list(range(self.n_views))[index]
        else:
            sel = [int(i) for i in index]
        if not sel:
            raise GeometryError("selection contains no views")
        return self._take(sel)

    def to_astra(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def detector_pixels(self) -> np.ndarray:
        """World positions of detector pixel centres, shape ``(n_views, rows, cols, 3)``
        (2D: rows = 1, z = 0), together with ``ray_directions()`` this defines every ray."""
        v = self.to_vec()
        if self.ndim == 2:
            n = v.shape[0]
            cols = self.det_shape[0]
            d = np.concatenate([v[:, 2:4], np.zeros((n, 1))], 1)
            u = np.concatenate([v[:, 4:6], np.zeros((n, 1))], 1)
            j = np.arange(cols) - (cols - 1) / 2
            pix = d[:, None, :] + j[None, :, None] * u[:, None, :]
            return pix[:, None]
        rows, cols = self.det_shape
        d, u, vv = v[:, 3:6], v[:, 6:9], v[:, 9:12]
        j = np.arange(cols) - (cols - 1) / 2
        i = np.arange(rows) - (rows - 1) / 2
        return (
            d[:, None, None, :]
            + j[None, None, :, None] * u[:, None, None, :]
            + i[None, :, None, None] * vv[:, None, None, :]
        )

    def sources(self) -> np.ndarray:
        """For fan/cone: source positions ``(n_views, 3)``; for parallel: ray directions."""
        v = self.to_vec()
        if self.ndim == 2:
            return np.concatenate([v[:, 0:2], np.zeros((v.shape[0], 1))], 1)
        return v[:, 0:3].copy()

    def project_point(self, point_xyz: Sequence[float]) -> np.ndarray:
        """Continuous detector coordinates ``(n_views, 2)`` = (row, col) where a world point
        projects in each view (2D: row = 0). Used by the convention checks."""
        p = np.asarray(point_xyz, dtype=np.float64)
        if p.size == 2:
            p = np.append(p, 0.0)
        v = self.to_vec()
        if self.ndim == 2:
            n = v.shape[0]
            z = np.zeros((n, 1))
            src = np.concatenate([v[:, 0:2], z], 1)
            d = np.concatenate([v[:, 2:4], z], 1)
            u = np.concatenate([v[:, 4:6], z], 1)
            vv = np.tile([0.0, 0.0, 1.0], (n, 1))
            rows, cols = 1, self.det_shape[0]
        else:
            src, d, u, vv = v[:, 0:3], v[:, 3:6], v[:, 6:9], v[:, 9:12]
            rows, cols = self.det_shape
        ray = (p[None] - src) if self.is_cone else np.broadcast_to(src, (v.shape[0], 3))
        out = np.empty((v.shape[0], 2))
        for k in range(v.shape[0]):
            # Solve base + t*ray = d + a*u + b*v for (t, a, b); base is the point itself.
            m = np.stack([ray[k], -u[k], -vv[k]], 1)
            t, a, b = np.linalg.solve(m, d[k] - p)
            out[k] = (b + (rows - 1) / 2, a + (cols - 1) / 2)
        if self.ndim == 2:
            out[:, 0] = 0.0
        return out

    def __repr__(self) -> str:
        parts = []
        for name in self.__dataclass_fields__:  # type: ignore[attr-defined]
            val = getattr(self, name)
            if name == "angles":
                parts.append(f"angles={_fmt_angles(val)}")
            elif name == "vectors":
                parts.append(f"vectors=<{len(val)} x {len(val[0])} array>")
            elif isinstance(val, float):
                parts.append(f"{name}={val!r}")
            else:
                parts.append(f"{name}={val!r}")
        return f"{type(self).__name__}(" + ", ".join(parts) + ")"


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise GeometryError(f"{name} must be positive and finite, got {value}")
    return value


def _check_count(name: str, value: int) -> int:
    if int(value) != value or int(value) < 1:
        raise GeometryError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _pair(value: Any, name: str, kind: type) -> tuple:
    if np.isscalar(value):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2:
        raise GeometryError(f"{name} must be (rows, cols), got {value}")
    return tuple(kind(v) for v in value)


def _default_n_angles(volume: VolumeGeometry, full: bool) -> int:
    # Nyquist-like: pi/2 * N views over a half orbit for an N-pixel-wide object.
    n = max(volume.shape[-1], volume.shape[-2])
    return int(math.ceil((math.pi if full else math.pi / 2) * n))


def _fov_radius(volume: VolumeGeometry) -> float:
    """Radius of the circle (around the rotation axis) enclosing the volume's xy-extent."""
    lo, hi = volume.min_pt[-2:], volume.max_pt[-2:]
    return max(math.hypot(x, y) for x in (lo[1], hi[1]) for y in (lo[0], hi[0]))


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


@dataclass(frozen=True, kw_only=True, repr=False)
class _Vec3D(ProjectionGeometry):
    vectors: tuple[tuple[float, ...], ...]
    det_shape: tuple[int, int]
    ndim = 3

    def __post_init__(self) -> None:
        arr = np.asarray(self.vectors, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 12:
            raise GeometryError(
                f"{type(self).__name__} vectors must have shape (n_views, 12), got {arr.shape}"
            )
        if arr.shape[0] == 0:
            raise GeometryError(
                "the vector list is empty: a projection geometry needs at least one view"
            )
        if not np.all(np.isfinite(arr)):
            raise GeometryError("geometry vectors contain NaN or infinite values")
        if np.any(np.linalg.norm(arr[:, 6:9], axis=1) == 0) or np.any(
            np.linalg.norm(arr[:, 9:12], axis=1) == 0
        ):
            raise GeometryError("detector pixel vectors u and v must be non-zero")
        object.__setattr__(self, "vectors", tuple(tuple(float(x) for x in row) for row in arr))
        rows, cols = _pair(self.det_shape, "det_shape", int)
        object.__setattr__(
            self, "det_shape", (_check_count("det rows", rows), _check_count("det cols", cols))
        )

    @property
    def n_views(self) -> int:
        return len(self.vectors)

    def to_vec(self) -> np.ndarray:
        return np.asarray(self.vectors, dtype=np.float64)

    def _take(self, sel: Sequence[int]) -> ProjectionGeometry:
        return replace(self, vectors=tuple(self.vectors[i] for i in sel))


@dataclass(frozen=True, kw_only=True, repr=False)
class ParallelVec3D(_Vec3D):
    """3D parallel beam, one ASTRA ``parallel3d_vec`` row per view:
    ``(rayX, rayY, rayZ, dX, dY, dZ, uX, uY, uZ, vX, vY, vZ)``."""

    def to_astra(self) -> dict:
        import astra

        rows, cols = self.det_shape
        return astra.create_proj_geom("parallel3d_vec", rows, cols, self.to_vec())


@dataclass(frozen=True, kw_only=True, repr=False)
class ConeVec3D(_Vec3D):
    """3D cone beam, one ASTRA ``cone_vec`` row per view:
    ``(srcX, srcY, srcZ, dX, dY, dZ, uX, uY, uZ, vX, vY, vZ)``."""

    is_cone = True

    def to_astra(self) -> dict:
        import astra

        rows, cols = self.det_shape
        return astra.create_proj_geom("cone_vec", rows, cols, self.to_vec())
