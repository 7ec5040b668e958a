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

The package is split by job: ``common`` (angle lists, argument checks), ``volume``
(``VolumeGeometry``), ``projection`` (the ``ProjectionGeometry`` base), ``geom2d`` (2D
parallel and fan beam), ``geom3d`` (3D circular parallel and cone beam) and ``vec3d`` (3D
vector geometries). Everything is importable from here, as before the split.
"""

from __future__ import annotations

# The private helpers are re-exported (``X as X``) for code that imported them from the
# single module this package replaces.
from .common import _as_tuple as _as_tuple
from .common import _check_angles as _check_angles
from .common import _check_count as _check_count
from .common import _check_positive as _check_positive
from .common import _fmt_angles as _fmt_angles
from .common import _pair as _pair
from .common import uniform_angles
from .geom2d import FanBeam2D, Parallel2D
from .geom3d import ConeBeam3D, Parallel3D, _Circular3D
from .projection import ProjectionGeometry
from .vec3d import ConeVec3D, ParallelVec3D, _Vec3D
from .volume import VolumeGeometry
from .volume import _default_n_angles as _default_n_angles
from .volume import _fov_radius as _fov_radius

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

# The classes (and uniform_angles) keep ``operators.geometry`` as their module, as before the
# split (numpy's ``set_module`` pattern): pickles name ``operators.geometry.<Class>``, so they
# are byte-identical to those made before and load either way.
for _obj in (
    uniform_angles,
    VolumeGeometry,
    ProjectionGeometry,
    Parallel2D,
    FanBeam2D,
    _Circular3D,
    Parallel3D,
    ConeBeam3D,
    _Vec3D,
    ParallelVec3D,
    ConeVec3D,
):
    _obj.__module__ = __name__
del _obj
