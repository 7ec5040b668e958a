"""The 3D vector geometries: one ASTRA-style row of 12 numbers per view (ray or source,
detector centre, u and v pixel vectors) for arbitrary trajectories, parallel
(``ParallelVec3D``) or cone beam (``ConeVec3D``), validated by their shared base ``_Vec3D``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..errors import GeometryError
from .common import _check_count, _pair
from .projection import ProjectionGeometry

__all__ = ["ParallelVec3D", "ConeVec3D"]


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
