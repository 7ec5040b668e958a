"""The projection-geometry base class ``ProjectionGeometry``: what every 2D and 3D geometry
shares on top of its ASTRA-ordered vector form (view slicing, sinogram shape, detector
pixel and source positions, projecting a world point, the code-like repr).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import GeometryError
from .common import _fmt_angles

__all__ = ["ProjectionGeometry"]


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
