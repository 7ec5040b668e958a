"""The voxel grid: ``VolumeGeometry`` (shape, voxel size and centre in array order, world
coordinates of voxels, the ASTRA volume), plus the field-of-view quantities of a grid that
the projection geometries' ``default`` constructors size their detectors and angle counts from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import GeometryError
from .common import _as_tuple

__all__ = ["VolumeGeometry"]


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


def _default_n_angles(volume: VolumeGeometry, full: bool) -> int:
    # Nyquist-like: pi/2 * N views over a half orbit for an N-pixel-wide object.
    n = max(volume.shape[-1], volume.shape[-2])
    return int(math.ceil((math.pi if full else math.pi / 2) * n))


def _fov_radius(volume: VolumeGeometry) -> float:
    """Radius of the circle (around the rotation axis) enclosing the volume's xy-extent."""
    lo, hi = volume.min_pt[-2:], volume.max_pt[-2:]
    return max(math.hypot(x, y) for x in (lo[1], hi[1]) for y in (lo[0], hi[0]))
