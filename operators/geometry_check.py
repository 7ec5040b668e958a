"""Whether a fan or cone geometry can measure a volume at all.

The projectors integrate the whole line through each detector pixel and the source. That is
the measurement only when the volume lies in front of the source, and a source inside the
volume, or a detector between the source and the volume, describes a scanner that cannot
exist. :func:`check_geometry_fits` refuses both (``RayTransform`` calls it on construction):

* every corner of the volume must lie strictly in front of the source, on the detector's side
  of the plane through the source parallel to the detector (for a circular orbit about a
  centred volume: ``src_origin`` larger than the volume's reach towards the source, its corner
  radius for a full orbit);
* the volume's centre must not lie beyond the detector plane (circular: ``origin_det >= 0``;
  ``origin_det = 0`` is the usual virtual detector through the rotation centre).

Parallel geometries have no source and always pass.
"""

from __future__ import annotations

import numpy as np

from .errors import GeometryError
from .geometry import ProjectionGeometry, VolumeGeometry

__all__ = ["check_geometry_fits"]


def _frames(geometry: ProjectionGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per view: source ``s``, detector centre ``d`` and the unit detector normal ``n``
    pointing from the source towards the detector, all ``(n_views, 3)``."""
    v = geometry.to_vec()
    if geometry.ndim == 2:
        z = np.zeros((v.shape[0], 1))
        s = np.concatenate([v[:, 0:2], z], 1)
        d = np.concatenate([v[:, 2:4], z], 1)
        n = np.stack([-v[:, 5], v[:, 4], z[:, 0]], 1)  # u rotated by 90 degrees
    else:
        s, d = v[:, 0:3], v[:, 3:6]
        n = np.cross(v[:, 6:9], v[:, 9:12])
    n = n / np.linalg.norm(n, axis=1, keepdims=True)
    side = np.sign(np.einsum("ij,ij->i", d - s, n))
    if np.any(side == 0):
        k = int(np.flatnonzero(side == 0)[0])
        raise GeometryError(
            f"{type(geometry).__name__}: the source lies in the detector plane (view {k}); the "
            "source and the detector must be apart (src_origin + origin_det > 0)"
        )
    return s, d, n * side[:, None]


def _box(volume: VolumeGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The volume's centre and half-extent in world ``(x, y, z)`` (z = 0 in 2D)."""
    centre = np.zeros(3)
    half = np.zeros(3)
    k = volume.ndim
    centre[:k] = volume.center[::-1]
    half[:k] = np.asarray(volume.extent[::-1]) / 2
    return centre, half


def check_geometry_fits(volume: VolumeGeometry, geometry: ProjectionGeometry) -> None:
    """Raise :class:`~operators.errors.GeometryError` (a ``ValueError``) naming the distances
    when ``geometry``'s source lies inside ``volume`` or its detector lies between the source
    and the volume (module docstring). Parallel geometries always pass."""
    if not geometry.is_cone:
        return
    s, d, n = _frames(geometry)
    centre, half = _box(volume)
    centre_depth = np.einsum("ij,ij->i", centre[None] - s, n)  # source -> volume centre
    reach = np.abs(n) @ half  # how far the volume extends from its centre along n
    det_depth = np.einsum("ij,ij->i", d - s, n)  # source -> detector plane
    name = type(geometry).__name__
    circular = hasattr(geometry, "src_origin")
    bad = np.flatnonzero(centre_depth - reach <= 1e-9 * max(1.0, float(reach.max())))
    if bad.size:
        k = int(bad[np.argmin(centre_depth[bad] - reach[bad])])
        fix = (
            f"src_origin={geometry.src_origin:g} must exceed {float(reach.max()):.4g}"
            if circular
            else "move the source away from the volume"
        )
        raise GeometryError(
            f"{name}: the source lies inside the volume {volume.shape} (or within its reach) "
            f"at {bad.size} of {len(s)} views (view {k}: the volume centre is "
            f"{centre_depth[k]:.4g} from the source along the beam axis, but the volume "
            f"extends {reach[k]:.4g} from its centre towards the source, so part of it lies "
            f"behind the source); {fix}"
        )
    bad = np.flatnonzero(det_depth < centre_depth - 1e-9 * np.abs(centre_depth))
    if bad.size:
        k = int(bad[0])
        fix = (
            f"origin_det={geometry.origin_det:g} puts the detector on the source's side of the "
            "rotation centre; use origin_det >= 0"
            if circular
            else "the detector must be on the far side of the volume centre from the source"
        )
        raise GeometryError(
            f"{name}: the detector lies between the source and the volume at {bad.size} of "
            f"{len(s)} views (view {k}: the detector plane is {det_depth[k]:.4g} from the "
            f"source, the volume centre {centre_depth[k]:.4g}); {fix}"
        )
