"""Walnut cone-beam CT (Der Sarkissian et al., Sci. Data 6:215, 2019) from a local folder.

Expected layout (one walnut, as unpacked from its Zenodo record)::

    WalnutN/Projections/tubeV{1,2,3}/scan_000000.tif ... scan_001200.tif
                                     di000000.tif           dark frame
                                     io000000.tif, io000001.tif   flat fields (before/after)
                                     scan_geom_corrected.geom     1201 rows x 12 (mm)
    WalnutN/Reconstructions/full_AGD_50_000000.tiff ... full_AGD_50_000500.tiff

Raw files are stored in the scanner's portrait read-out: each TIFF is 768 x 972 and becomes
the detector image ``(rows, cols) = (972, 768)`` after ``transpose(flipud(img))``. The data
set's own reconstruction script reads the files *in reverse order* and pairs them with the
geometry rows in forward order: file ``n - k`` goes with row ``k`` (``n = 1200``; file 1200
and file 0 are the same angle, file 0 and geometry row 1200 are unused). We do the same.

Each geometry row is ASTRA's ``cone_vec`` ``(src, d, u, v)`` in mm, which is also our
``ConeVec3D`` convention (pixel ``(i, j)`` centre at ``d + (j - (cols-1)/2) u +
(i - (rows-1)/2) v``), and the reconstruction volume is 501^3 voxels of 0.1 mm centred at
the origin, slice ``k`` of ``full_AGD_50_%06d.tiff`` being array index ``z = k``: ASTRA's 3D
volume order ``(z, y, x)`` with indices increasing along their axes is ours, so no volume
flips are needed.

Preprocessing: ``p = -log((raw - dark) / (mean(flats) - dark))`` (Beer-Lambert line integrals
in units of 1/mm times mm, i.e. dimensionless). Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from operators import ConeVec3D, RayTransform, VolumeGeometry
from operators.linear import MatrixOperator

from ...errors import DataFormatError
from ..arrays import read_tiff
from ..atomic import atomic_write
from .walnut_rays import (
    _chord_lengths,  # noqa: F401  (re-exported: tests import it here)
    _pixel_rays,
    closest_rows,
    max_fraction_rows,
)

__all__ = [
    "WALNUT_DETECTOR_SHAPE",
    "WALNUT_VOLUME",
    "WalnutProjections",
    "WalnutSlice",
    "MatrixOperator",
    "walnut_orient",
    "read_walnut_geometry",
    "resample_detector",
    "load_walnut_projections",
    "load_walnut_ground_truth",
    "walnut_slice_problem",
    "closest_rows",
    "max_fraction_rows",
    "probe_matrix",
]

#: Detector ``(rows, cols)`` after the orientation fix (raw TIFFs are 768 x 972).
WALNUT_DETECTOR_SHAPE = (972, 768)
#: The data set's reconstruction grid: 501^3 voxels of 0.1 mm, centred at the origin (mm).
WALNUT_VOLUME = VolumeGeometry(shape=(501, 501, 501), voxel_size=0.1)
#: Ground-truth values are multiplied by this in the 2D slice problem of the literature
#: (attenuation per mm of the walnut is about 0 .. 0.07, so x 14 maps it to about [0, 1]).
WALNUT_SLICE_SCALE = 14.0


def walnut_orient(img: np.ndarray) -> np.ndarray:
    """The data set's read-out fix ``transpose(flipud(img))``: a raw image of shape ``(A, B)``
    becomes ``(B, A)``, and detector pixel ``(r, c)`` is raw pixel ``(A - 1 - c, r)``."""
    return np.transpose(np.flipud(img))


def _projection_dir(root: Path, orbit: int) -> Path:
    if orbit not in (1, 2, 3):
        raise ValueError(f"orbit must be 1, 2 or 3 (tubeV1..3), got {orbit}")
    d = root / "Projections" / f"tubeV{orbit}"
    if not d.is_dir():
        raise FileNotFoundError(
            f"{d}: projection folder not found; expected WalnutN/Projections/tubeV{orbit}/ "
            "under the walnut folder you passed"
        )
    return d


def read_walnut_geometry(path: str | os.PathLike) -> np.ndarray:
    """``scan_geom_corrected.geom``: whitespace-separated rows of 12 numbers (ASTRA
    ``cone_vec``: source, detector centre, u, v; mm). Returns ``(n_rows, 12)`` float64."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: geometry file not found")
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != 12:
                raise DataFormatError(
                    f"{path}: line {lineno} has {len(parts)} columns; a cone_vec geometry row "
                    "needs 12 (src, d, u, v)"
                )
            try:
                rows.append([float(p) for p in parts])
            except ValueError as err:
                raise DataFormatError(f"{path}: line {lineno}: {err}") from err
    if len(rows) < 2:
        raise DataFormatError(
            f"{path}: {len(rows)} geometry rows; need the views plus the repeated first angle"
        )
    vecs = np.asarray(rows)
    if not np.all(np.isfinite(vecs)):
        raise DataFormatError(f"{path}: geometry contains NaN or infinite values")
    return vecs


def _axis_resample(n: int, step: int, offset: int, mode: str) -> tuple[int, float, int]:
    """New count, centre shift (old pixels) and step along one detector axis."""
    if step < 1 or offset < 0 or offset >= n:
        raise ValueError(f"need step >= 1 and 0 <= offset < {n}, got step={step}, offset={offset}")
    if mode == "subsample":
        m = len(range(offset, n, step))
        first = offset
    elif mode == "bin":
        m = (n - offset) // step
        if m < 1:
            raise ValueError(f"binning {n} pixels by {step} from offset {offset} leaves none")
        first = offset + (step - 1) / 2
    else:
        raise ValueError(f"mode must be 'subsample' or 'bin', got {mode!r}")
    # Centre of the new detector in old pixel coordinates minus the old centre.
    shift = first + step * (m - 1) / 2 - (n - 1) / 2
    return m, shift, step


def resample_detector(
    vectors: np.ndarray,
    det_shape: tuple[int, int],
    *,
    step: int | tuple[int, int] = 1,
    offset: int | tuple[int, int] = 0,
    mode: str = "subsample",
) -> tuple[np.ndarray, tuple[int, int]]:
    """Geometry of a sub-sampled or binned detector.

    ``subsample`` keeps pixels ``offset, offset + step, ...`` per axis; ``bin`` averages
    blocks of ``step`` pixels starting at ``offset`` (a remainder is dropped). With first new
    centre ``c0`` (old pixel units) and ``m`` new pixels along an axis of ``n``, the new
    detector centre is ``d + (c0 + step (m - 1)/2 - (n - 1)/2) u`` and ``u' = step u``
    (likewise rows with ``v``). Returns ``(vectors (views, 12), (rows, cols))``.
    """
    rs, cs = (step, step) if np.isscalar(step) else tuple(step)
    ro, co = (offset, offset) if np.isscalar(offset) else tuple(offset)
    rows, row_shift, _ = _axis_resample(det_shape[0], int(rs), int(ro), mode)
    cols, col_shift, _ = _axis_resample(det_shape[1], int(cs), int(co), mode)
    v = np.array(vectors, dtype=np.float64, copy=True)
    u_vec, v_vec = v[:, 6:9].copy(), v[:, 9:12].copy()
    v[:, 3:6] += col_shift * u_vec + row_shift * v_vec
    v[:, 6:9] = u_vec * cs
    v[:, 9:12] = v_vec * rs
    return v, (rows, cols)


def _resample_data(
    img: np.ndarray, step: tuple[int, int], offset: tuple[int, int], mode: str
) -> np.ndarray:
    """Apply ``resample_detector``'s pixel selection to images ``(..., rows, cols)``."""
    (rs, cs), (ro, co) = step, offset
    if mode == "subsample":
        return img[..., ro::rs, co::cs]
    m_r, m_c = (img.shape[-2] - ro) // rs, (img.shape[-1] - co) // cs
    block = img[..., ro : ro + m_r * rs, co : co + m_c * cs]
    block = block.reshape(*img.shape[:-2], m_r, rs, m_c, cs)
    return block.mean(axis=(-3, -1))


@dataclass(frozen=True)
class WalnutProjections:
    """Pre-processed Walnut projections and their geometry.

    ``projections``: float32 ``(det_rows, angles, det_cols)`` line integrals; ``geometry``:
    ``ConeVec3D`` in mm; ``volume``: the reconstruction grid; ``files``: the scan file per
    view (view order); ``geometry_rows``: the row of the ``.geom`` file per view."""

    projections: torch.Tensor
    geometry: ConeVec3D
    volume: VolumeGeometry
    files: tuple[Path, ...] = field(repr=False)
    geometry_rows: tuple[int, ...] = field(repr=False)

    def operator(self, backend: str = "auto") -> RayTransform:
        """The matching ``RayTransform`` (volume -> ``projections``' shape)."""
        return RayTransform(self.volume, self.geometry, backend=backend)


def _pair_step(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if np.isscalar(value):
        return int(value), int(value)
    out = tuple(int(v) for v in value)
    if len(out) != 2:
        raise ValueError(f"{name} must be an int or (rows, cols), got {value}")
    return out  # type: ignore[return-value]


def load_walnut_projections(
    root: str | os.PathLike,
    *,
    orbit: int = 2,
    angle_step: int = 1,
    det_step: int | tuple[int, int] = 1,
    det_offset: int | tuple[int, int] = 0,
    det_mode: str = "subsample",
    volume: VolumeGeometry | None = None,
    min_transmission: float = 1e-6,
) -> WalnutProjections:
    """Load one orbit of a walnut as line integrals with the matching cone-beam geometry.

    Args:
        root: the ``WalnutN`` folder (holding ``Projections/`` and ``Reconstructions/``).
        orbit: source height, 1..3 (folder ``tubeV{orbit}``); the literature's 2D problem
            uses orbit 2 (the middle one).
        angle_step: keep every ``angle_step``-th of the ``n = rows(geom) - 1`` angles:
            files ``n, n - step, ...`` paired with geometry rows ``0, step, ...``.
        det_step, det_offset, det_mode: detector sub-sampling or binning (see
            ``resample_detector``); data are resampled after the ``-log``.
        volume: reconstruction grid (default ``WALNUT_VOLUME``: 501^3, 0.1 mm).
        min_transmission: normalised intensities below this (dead pixels) are clipped to it
            before the log, with a warning.
    """
    root = Path(root).expanduser()
    pdir = _projection_dir(root, orbit)
    vecs_all = read_walnut_geometry(pdir / "scan_geom_corrected.geom")
    n_angles = vecs_all.shape[0] - 1
    if angle_step < 1 or angle_step > n_angles:
        raise ValueError(f"angle_step must be in 1..{n_angles}, got {angle_step}")
    geom_rows = list(range(0, n_angles, angle_step))
    files = [pdir / f"scan_{n_angles - k:06d}.tif" for k in geom_rows]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: projection file not found (needed for this angle_step)")

    dark = walnut_orient(read_tiff(pdir / "di000000.tif")).astype(np.float64)
    if dark.ndim != 2:
        raise DataFormatError(f"{pdir / 'di000000.tif'}: expected one 2D image, got {dark.shape}")
    flats = []
    for i in range(2):
        path = pdir / f"io00000{i}.tif"
        flat = walnut_orient(read_tiff(path)).astype(np.float64)
        if flat.shape != dark.shape:
            raise DataFormatError(
                f"{path}: flat field shape {flat.shape} (after the orientation fix) differs "
                f"from the dark frame's {dark.shape}"
            )
        flats.append(flat)
    denom = np.mean(flats, axis=0) - dark
    det_shape = dark.shape
    rstep, cstep = _pair_step(det_step, "det_step")
    roff, coff = _pair_step(det_offset, "det_offset")
    vecs, new_shape = resample_detector(
        vecs_all[geom_rows], det_shape, step=(rstep, cstep), offset=(roff, coff), mode=det_mode
    )

    # Written straight into (det_rows, angles, det_cols): no second full-size copy.
    out = np.empty((new_shape[0], len(files), new_shape[1]), dtype=np.float32)
    clipped = 0
    for k, f in enumerate(files):
        raw = read_tiff(f)
        if raw.ndim != 2 or raw.shape[::-1] != det_shape:
            raise DataFormatError(
                f"{f}: image shape {raw.shape}, expected {det_shape[::-1]} (raw, before the "
                "orientation fix) like the dark and flat frames"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (walnut_orient(raw).astype(np.float64) - dark) / denom
        bad = ~(t >= min_transmission)  # also catches NaN from a zero denominator
        clipped += int(bad.sum())
        t[bad] = min_transmission
        out[:, k, :] = _resample_data(-np.log(t), (rstep, cstep), (roff, coff), det_mode)
    if clipped:
        warnings.warn(
            f"{pdir}: {clipped} pixel values had transmission below {min_transmission:g} "
            "(dead pixels or flat <= dark) and were clipped before the log",
            stacklevel=2,
        )
    geometry = ConeVec3D(vectors=vecs, det_shape=new_shape)
    return WalnutProjections(
        projections=torch.from_numpy(out),
        geometry=geometry,
        volume=volume if volume is not None else WALNUT_VOLUME,
        files=tuple(files),
        geometry_rows=tuple(geom_rows),
    )


def load_walnut_ground_truth(
    root: str | os.PathLike, *, slices: int | Sequence[int] | None = None
) -> torch.Tensor:
    """The data set's reference reconstruction (AGD, 50 iterations, all orbits).

    Returns float32 ``(z, y, x)`` (or ``(y, x)`` for an int ``slices``) in 1/mm, from
    ``Reconstructions/full_AGD_50_%06d.tiff`` (file ``k`` = slice ``z = k``)."""
    rdir = Path(root).expanduser() / "Reconstructions"
    if not rdir.is_dir():
        raise FileNotFoundError(f"{rdir}: reconstruction folder not found")
    single = isinstance(slices, int | np.integer)
    if slices is None:
        idx = sorted(
            int(p.name[len("full_AGD_50_") : -len(".tiff")])
            for p in rdir.glob("full_AGD_50_*.tiff")
        )
        if not idx:
            raise FileNotFoundError(f"{rdir}: no full_AGD_50_*.tiff files")
        if idx != list(range(len(idx))):
            missing = sorted(set(range(max(idx) + 1)) - set(idx))
            raise FileNotFoundError(f"{rdir}: slices missing: {missing[:10]}")
    else:
        idx = [int(slices)] if single else [int(s) for s in slices]
    imgs = []
    for k in idx:
        img = read_tiff(rdir / f"full_AGD_50_{k:06d}.tiff")
        if img.ndim != 2 or (imgs and img.shape != imgs[0].shape):
            raise DataFormatError(
                f"{rdir / f'full_AGD_50_{k:06d}.tiff'}: slice shape {img.shape} differs "
                f"from {imgs[0].shape if imgs else 'a 2D image'}"
            )
        imgs.append(img.astype(np.float32))
    vol = torch.from_numpy(np.stack(imgs, 0))
    return vol[0] if single else vol


# --------------------------------------------------------------------------------------
# The 2D single-slice sub-problem
# --------------------------------------------------------------------------------------


def probe_matrix(op: RayTransform, *, chunk: int = 64, dtype=torch.float32) -> torch.Tensor:
    """Sparse COO matrix of a ray transform whose geometry has a 1 x 1 detector, built row by
    row with the adjoint: row ``i`` is ``A^T e_i``. Only the rays of one chunk are projected
    per call (``geometry[i0:i1]``), so the cost is ``O(chunk x rays)`` ray traversals."""
    geom, vol = op.geometry, op.volume
    n_rays = geom.n_views
    idx_r, idx_c, vals = [], [], []
    for i0 in range(0, n_rays, chunk):
        i1 = min(n_rays, i0 + chunk)
        sub = RayTransform(vol, geom[i0:i1], backend="torch")
        eye = torch.eye(i1 - i0, dtype=dtype).reshape(i1 - i0, *sub.range_shape)
        rows = sub.T(eye).reshape(i1 - i0, -1)
        r, c = rows.nonzero(as_tuple=True)
        idx_r.append(r + i0)
        idx_c.append(c)
        vals.append(rows[r, c])
    ind = torch.stack([torch.cat(idx_r), torch.cat(idx_c)])
    return torch.sparse_coo_tensor(
        ind, torch.cat(vals), (n_rays, vol.num_voxels), check_invariants=True
    ).coalesce()


@dataclass(frozen=True)
class WalnutSlice:
    """The 2D single-slice Walnut problem: ``measurements ~= operator(ground_truth)``.

    ``operator``: ``MatrixOperator`` image ``(H, W)`` -> sinogram ``(angles, cols)``;
    ``measurements``: ``(angles, cols)``; ``ground_truth``: ``(H, W)``, both times ``scale``;
    ``rows``: the detector row picked per (angle, column); ``volume``: the one-slice grid
    ``(1, H, W)`` the rays were traced through; ``rays``: their ``ConeVec3D`` (1 x 1
    detector, one view per (angle, column), angle-major)."""

    operator: MatrixOperator
    measurements: torch.Tensor
    ground_truth: torch.Tensor | None
    rows: torch.Tensor
    volume: VolumeGeometry
    rays: ConeVec3D
    scale: float


def _matrix_key(rays: ConeVec3D, slab: VolumeGeometry, dtype: torch.dtype) -> str:
    """Fingerprint of everything the probed matrix depends on."""
    h = hashlib.sha256(np.ascontiguousarray(rays.to_vec()).tobytes())
    h.update(repr((slab, str(dtype))).encode())
    return h.hexdigest()


def _load_cached_matrix(path: Path, key: str) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            ind, val, shape = z["indices"], z["values"], tuple(int(s) for s in z["shape"])
    except (OSError, ValueError, KeyError) as err:
        warnings.warn(f"{path}: unreadable matrix cache ({err}); recomputing", stacklevel=3)
        return None
    return torch.sparse_coo_tensor(
        torch.from_numpy(ind.astype(np.int64)), torch.from_numpy(val), shape, check_invariants=True
    ).coalesce()


def _save_cached_matrix(path: Path, key: str, mat: torch.Tensor) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                key=np.asarray(key),
                indices=mat.indices().numpy().astype(np.int32),  # 501^2 columns fit
                values=mat.values().numpy(),
                shape=np.asarray(mat.shape),
            )

    atomic_write(path, write)


def walnut_slice_problem(
    root: str | os.PathLike,
    *,
    orbit: int = 2,
    angle_step: int = 20,
    col_step: int = 6,
    slice_index: int = 253,
    scale: float = WALNUT_SLICE_SCALE,
    downsample: int = 1,
    volume: VolumeGeometry | None = None,
    with_ground_truth: bool = True,
    row_rule: str = "fraction",
    chunk: int = 64,
    dtype: torch.dtype = torch.float32,
    cache: str | os.PathLike | None = None,
) -> WalnutSlice:
    """The literature's 2D Walnut problem (walnut 1, orbit 2, 60 angles x 128 columns,
    slice 253, values x 14) as an explicit sparse matrix.

    For each kept (angle, column) one detector row is chosen. ``row_rule="fraction"`` (the
    literature's rule): the row whose ray spends the largest fraction of its path through the
    volume inside slice ``slice_index`` (``max_fraction_rows``); ``"axis"``: the row whose ray
    is at the slice height ``z0`` where it passes closest to the rotation axis
    (``closest_rows``). For these nearly horizontal rays both pick the same or a
    neighbouring row.
    The rays from the source to those pixel centres are traced (torch projector) through a
    one-voxel-thick grid ``(1, H, W)`` at ``z0``, i.e. the 3D ray transform restricted to the
    slice; its rows are probed into a sparse matrix. Measurements and the ground-truth slice
    are multiplied by ``scale`` (14 maps the walnut's attenuation, about 0..0.07 / mm, to
    about [0, 1], the range the DIP's sigmoid output and the literature's hyperparameters
    assume; the operator is linear, so scaling both keeps ``y = A x``).

    ``downsample`` coarsens the image grid by an integer factor (501 = 3 x 167) and
    block-averages the ground truth. ``cache``: an ``.npz`` path where the probed matrix is
    kept (written atomically) and reused when the rays, grid and dtype are the same; a
    stale file (other settings or data) is recomputed and replaced.
    """
    vol3 = volume if volume is not None else WALNUT_VOLUME
    nz, ny, nx = vol3.shape
    if not 0 <= slice_index < nz:
        raise ValueError(f"slice_index must be in 0..{nz - 1}, got {slice_index}")
    if ny % downsample or nx % downsample:
        raise ValueError(
            f"downsample={downsample} must divide the slice shape {(ny, nx)} (501 = 3 x 167)"
        )
    data = load_walnut_projections(
        root, orbit=orbit, angle_step=angle_step, det_step=(1, col_step), volume=vol3
    )
    z0 = float(vol3.coords(0)[slice_index])
    center_xy = (vol3.center[2], vol3.center[1])
    if row_rule == "axis":
        rows = closest_rows(data.geometry, z0, center_xy)  # (views, cols)
    elif row_rule == "fraction":
        rows = max_fraction_rows(data.geometry, vol3, slice_index)
    else:
        raise ValueError(f"row_rule must be 'fraction' or 'axis', got {row_rule!r}")
    views, cols = rows.shape
    rays = _pixel_rays(data.geometry, rows)
    h, w = ny // downsample, nx // downsample
    vy, vx = vol3.voxel_size[1] * downsample, vol3.voxel_size[2] * downsample
    slab = VolumeGeometry(
        shape=(1, h, w),
        voxel_size=(vol3.voxel_size[0], vy, vx),
        center=(z0, vol3.center[1], vol3.center[2]),
    )
    mat = None
    key = _matrix_key(rays, slab, dtype)
    if cache is not None:
        mat = _load_cached_matrix(Path(cache).expanduser(), key)
    if mat is None:
        mat = probe_matrix(RayTransform(slab, rays, backend="torch"), chunk=chunk, dtype=dtype)
        if cache is not None:
            _save_cached_matrix(Path(cache).expanduser(), key, mat)
    op = MatrixOperator(mat, (h, w), (views, cols))
    proj = data.projections  # (rows, views, cols)
    rows_t = torch.from_numpy(rows)
    meas = proj.permute(1, 2, 0).gather(2, rows_t[..., None]).squeeze(-1)
    gt = None
    if with_ground_truth:
        gt = load_walnut_ground_truth(root, slices=slice_index)
        if gt.shape != (ny, nx):
            raise DataFormatError(
                f"{Path(root) / 'Reconstructions'}: ground-truth slice shape {tuple(gt.shape)} "
                f"differs from the volume's {(ny, nx)}"
            )
        if downsample > 1:
            gt = gt.reshape(h, downsample, w, downsample).mean(dim=(1, 3))
        gt = (gt * scale).to(dtype)
    return WalnutSlice(
        operator=op,
        measurements=(meas * scale).to(dtype),
        ground_truth=gt,
        rows=rows_t,
        volume=slab,
        rays=rays,
        scale=float(scale),
    )
