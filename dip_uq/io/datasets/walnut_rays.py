"""Ray selection for the Walnut single-slice problem: which detector row of each (view,
column) of a ``ConeVec3D`` cone-beam geometry samples a given volume slice (nearest the slice
height at the rotation axis, or the largest fraction of the ray's path inside the slice), the
chord length of a ray through the volume box, and the 1 x 1-detector geometry of the chosen
pixels' rays. Pure geometry (numpy and the torch projector), no file access; used by
:func:`~dip_uq.io.datasets.walnut.walnut_slice_problem`, which re-exports the public names.
"""

from __future__ import annotations

import numpy as np
import torch

from operators import ConeVec3D, RayTransform, VolumeGeometry

__all__ = ["closest_rows", "max_fraction_rows"]


def closest_rows(
    geometry: ConeVec3D, z0: float, center_xy: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Per (view, column): the detector row whose ray is at height ``z0`` where it passes
    closest to the vertical axis through ``center_xy``; returns int64 ``(views, cols)``."""
    v = geometry.to_vec()
    rows, cols = geometry.det_shape
    i = (np.arange(rows) - (rows - 1) / 2)[:, None, None]
    j = (np.arange(cols) - (cols - 1) / 2)[None, :, None]
    c = np.array([center_xy[0], center_xy[1]])
    out = np.empty((v.shape[0], cols), dtype=np.int64)
    for k, (src, d, u, vv) in enumerate(zip(v[:, 0:3], v[:, 3:6], v[:, 6:9], v[:, 9:12])):
        ray = d + j * u + i * vv - src  # (rows, cols, 3), one view at a time to bound memory
        rxy = ray[..., :2]
        t = ((c - src[:2]) * rxy).sum(-1) / np.maximum((rxy * rxy).sum(-1), 1e-300)
        z = src[2] + t * ray[..., 2]
        out[k] = np.abs(z - z0).argmin(axis=0)
    return out


def _pixel_rays(geometry: ConeVec3D, rows: np.ndarray) -> ConeVec3D:
    """One 1 x 1-detector view per (view, column): source -> centre of pixel
    ``(rows[view, col], col)``; views ordered view-major (``view * cols + col``)."""
    v = geometry.to_vec()
    n_rows, cols = geometry.det_shape
    views = v.shape[0]
    j = (np.arange(cols) - (cols - 1) / 2)[None, :, None]
    off = (rows - (n_rows - 1) / 2)[..., None]
    pix = v[:, None, 3:6] + j * v[:, None, 6:9] + off * v[:, None, 9:12]
    shape = (views, rows.shape[1], 3)
    vecs = np.concatenate(
        [
            np.broadcast_to(v[:, None, 0:3], shape),
            pix,
            np.broadcast_to(v[:, None, 6:9], shape),
            np.broadcast_to(v[:, None, 9:12], shape),
        ],
        axis=-1,
    ).reshape(-1, 12)
    return ConeVec3D(vectors=vecs, det_shape=(1, 1))


def _chord_lengths(src: np.ndarray, pix: np.ndarray, volume: VolumeGeometry) -> np.ndarray:
    """Length (world units) of the chord of the line through ``src`` and ``pix`` inside the
    volume box (the whole line, as the projector integrates it), by clipping per axis;
    ``src``, ``pix`` are ``(..., 3)`` xyz."""
    d = pix - src
    lo = np.asarray(volume.min_pt[::-1])
    hi = np.asarray(volume.max_pt[::-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - src) / d, (hi - src) / d
    inside = (src >= lo) & (src <= hi)
    par = d == 0  # parallel to this axis: all t if inside the slab, none otherwise
    tmin = np.where(par, np.where(inside, -np.inf, np.inf), np.minimum(t1, t2))
    tmax = np.where(par, np.where(inside, np.inf, -np.inf), np.maximum(t1, t2))
    t_in, t_out = tmin.max(-1), tmax.min(-1)
    return np.clip(t_out - t_in, 0.0, None) * np.linalg.norm(d, axis=-1)


def max_fraction_rows(
    geometry: ConeVec3D, volume: VolumeGeometry, slice_index: int, *, band: int = 3
) -> np.ndarray:
    """Per (view, column): the detector row whose ray spends the largest fraction of its
    path through ``volume`` inside slice ``slice_index`` -- the projection of that slice's
    indicator (torch projector, so with its z-interpolation weights) divided by the ray's
    chord through the volume box. Candidates: ``band`` rows either side of
    ``closest_rows``; where no candidate touches the slice, the closest row is kept.
    Returns int64 ``(views, cols)``."""
    z0 = float(volume.coords(0)[slice_index])
    center_xy = (volume.center[2], volume.center[1])
    base = closest_rows(geometry, z0, center_xy)
    n_rows = geometry.det_shape[0]
    offsets = np.arange(-band, band + 1)
    cand = np.clip(base[..., None] + offsets, 0, n_rows - 1)  # (views, cols, 2 band + 1)
    views, cols, nc = cand.shape
    # Each view repeated once per candidate: ray (view, candidate, column) is view
    # ``view * nc + candidate``'s pixel (row, column) of the repeated geometry.
    repeated = ConeVec3D(vectors=np.repeat(geometry.to_vec(), nc, 0), det_shape=geometry.det_shape)
    rays = _pixel_rays(repeated, cand.transpose(0, 2, 1).reshape(views * nc, cols))
    slab = VolumeGeometry(
        shape=(1, volume.shape[1], volume.shape[2]),
        voxel_size=volume.voxel_size,
        center=(z0, volume.center[1], volume.center[2]),
    )
    ones = torch.ones(slab.shape, dtype=torch.float64)
    in_slice = RayTransform(slab, rays, backend="torch")(ones).reshape(views, nc, cols).numpy()
    rv = rays.to_vec()
    chord = _chord_lengths(rv[:, 0:3], rv[:, 3:6], volume).reshape(views, nc, cols)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(chord > 0, in_slice / chord, 0.0)
    best = frac.argmax(axis=1)  # (views, cols)
    rows = np.take_along_axis(cand, best[..., None], axis=2)[..., 0]
    none = frac.max(axis=1) <= 0
    rows[none] = base[none]
    return rows.astype(np.int64)
