"""DICOM CT slices and series (pydicom): Hounsfield units, spacing, attenuation.

Orientation. DICOM places pixel ``(r, c)`` of a slice at
``ImagePositionPatient + c * PixelSpacing[1] * row_cosine + r * PixelSpacing[0] * col_cosine``
in the patient (LPS) frame, where ``ImageOrientationPatient = (row_cosine, col_cosine)``;
``row_cosine`` is the direction in which the *column index* grows. For the usual axial
orientation (``row_cosine = +x``, ``col_cosine = +y``) the stored rows and columns therefore
already satisfy our convention "every index increases with its world coordinate" with the
LPS axes as world axes, so **we never flip the pixel data**. Slices are stacked in increasing
order of their position along the normal ``n = row_cosine x col_cosine`` (for axial scans:
increasing z, i.e. towards the head). The result is ``(z, y, x)`` = (slice along ``n``, row,
column). Radiology viewers show row 0 at the top; with ``imshow(origin="lower")`` (our
plotting convention) the anterior side appears at the bottom. Oblique orientations are not
resampled: ``meta["orientation"]`` carries the cosines.

Units. Pixel values become HU through ``RescaleSlope`` and ``RescaleIntercept`` (per slice).
``hu_to_attenuation`` turns HU into linear attenuation per **millimetre** (DICOM spacing is in
mm, so ``RayTransform`` line integrals over a volume with mm voxels are dimensionless).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataFormatError

__all__ = ["read_dicom_slice", "read_dicom_series", "hu_to_attenuation"]


def _pydicom():
    try:
        import pydicom
    except ImportError as err:  # a core dependency, but say what to do if it is missing
        raise ImportError("reading DICOM needs pydicom: pip install pydicom") from err
    return pydicom


def _hu(ds: Any, path: Path) -> np.ndarray:
    try:
        pix = ds.pixel_array
    except Exception as err:
        raise DataFormatError(f"{path}: cannot decode DICOM pixel data: {err}") from err
    if pix.ndim != 2:
        raise DataFormatError(
            f"{path}: expected a single 2D slice, got pixel data of shape {pix.shape}"
        )
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    return (pix.astype(np.float64) * slope + intercept).astype(np.float32)


def _pixel_spacing(ds: Any, path: Path) -> tuple[float, float]:
    ps = getattr(ds, "PixelSpacing", None)
    if ps is None or len(ps) != 2:
        raise DataFormatError(f"{path}: DICOM slice lacks PixelSpacing (row, column spacing)")
    return float(ps[0]), float(ps[1])  # (between rows = y, between columns = x)


def read_dicom_slice(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float], dict]:
    """One DICOM slice: ``(hu (H, W) float32, (dy, dx) in mm, meta)``; no flips."""
    pydicom = _pydicom()
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:
        raise DataFormatError(f"{path}: not a readable DICOM file: {err}") from err
    return _hu(ds, path), _pixel_spacing(ds, path), _slice_meta(ds)


def _slice_meta(ds: Any) -> dict:
    return {
        "modality": str(getattr(ds, "Modality", "")),
        "series_uid": str(getattr(ds, "SeriesInstanceUID", "")),
        "orientation": tuple(float(v) for v in getattr(ds, "ImageOrientationPatient", ())) or None,
        "position": tuple(float(v) for v in getattr(ds, "ImagePositionPatient", ())) or None,
    }


def _scan_folder(folder: Path, pydicom: Any) -> list[tuple[Path, Any]]:
    """``(path, dataset)`` of every DICOM image file in ``folder``, sorted by path."""
    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue  # not DICOM (README, thumbnails, ...)
        except Exception as err:
            raise DataFormatError(f"{path}: damaged DICOM file: {err}") from err
        if "PixelData" not in ds:
            continue  # DICOMDIR or other non-image objects
        found.append((path, ds))
    if not found:
        raise DataFormatError(f"{folder}: no DICOM image files found")
    return found


def _select_series(
    found: list[tuple[Path, Any]], folder: Path, series_uid: str | None
) -> list[tuple[Path, Any]]:
    """The files of one series: the only one, or ``series_uid`` when given."""
    uids = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in found})
    if series_uid is None and len(uids) > 1:
        raise DataFormatError(
            f"{folder}: holds {len(uids)} series {uids}; pass series_uid= to choose one"
        )
    if series_uid is not None:
        if series_uid not in uids:
            raise DataFormatError(f"{folder}: no series {series_uid!r}; found {uids}")
        found = [
            (p, ds) for p, ds in found if str(getattr(ds, "SeriesInstanceUID", "")) == series_uid
        ]
    return found


def _slice_normal(first: Any) -> np.ndarray:
    """``row_cosine x col_cosine`` of a slice (axial when it has no orientation)."""
    iop = getattr(first, "ImageOrientationPatient", None)
    row_c = np.array([float(v) for v in iop[:3]]) if iop is not None else np.array([1.0, 0, 0])
    col_c = np.array([float(v) for v in iop[3:]]) if iop is not None else np.array([0, 1.0, 0])
    return np.cross(row_c, col_c)


def _sort_slices(
    found: list[tuple[Path, Any]], normal: np.ndarray
) -> tuple[list[tuple[Path, Any]], list[float] | None]:
    """Slices in increasing position along ``normal`` (else by ``InstanceNumber``), with
    the positions (None when a slice has no ``ImagePositionPatient``)."""

    def position(ds: Any) -> float | None:
        ipp = getattr(ds, "ImagePositionPatient", None)
        return None if ipp is None else float(np.dot(normal, [float(v) for v in ipp]))

    pos = [position(ds) for _, ds in found]
    if all(p is not None for p in pos):
        order = np.argsort(pos, kind="stable")
    else:
        nums = [int(getattr(ds, "InstanceNumber", i)) for i, (_, ds) in enumerate(found)]
        order = np.argsort(nums, kind="stable")
        pos = None
    return [found[i] for i in order], pos


def _stack_slices(found: list[tuple[Path, Any]], dy_dx: tuple[float, float]) -> np.ndarray:
    """The HU volume ``(z, y, x)``; every slice must share the shape and pixel spacing."""
    slices = []
    for path, ds in found:
        img = _hu(ds, path)
        if slices and img.shape != slices[0].shape:
            raise DataFormatError(
                f"{path}: slice shape {img.shape} differs from {slices[0].shape} of "
                f"{found[0][0].name}"
            )
        if _pixel_spacing(ds, path) != dy_dx:
            raise DataFormatError(
                f"{path}: PixelSpacing {_pixel_spacing(ds, path)} differs from {dy_dx}"
            )
        slices.append(img)
    return np.stack(slices, 0)


def _slice_spacing(
    found: list[tuple[Path, Any]], pos: list[float] | None, first: Any, folder: Path
) -> float:
    """Slice spacing in mm: the median gap of the sorted positions, else
    ``SpacingBetweenSlices`` or ``SliceThickness``; warns when the gaps are not uniform."""
    if pos is not None and len(found) > 1:
        zs = np.sort(np.asarray(pos))
        gaps = np.diff(zs)
        if np.any(gaps <= 0):
            dup = [found[i][0].name for i in np.nonzero(gaps <= 0)[0]]
            raise DataFormatError(f"{folder}: slices at the same position: {dup}")
        dz = float(np.median(gaps))
        if np.max(np.abs(gaps - dz)) > 0.01 * dz:
            warnings.warn(
                f"{folder}: slice spacing is not uniform ({gaps.min():g}..{gaps.max():g} mm); "
                f"using the median {dz:g} mm",
                stacklevel=3,  # the caller of read_dicom_series
            )
    else:
        dz = float(
            getattr(first, "SpacingBetweenSlices", None) or getattr(first, "SliceThickness", 1.0)
        )
    return dz


def read_dicom_series(
    folder: str | os.PathLike, *, series_uid: str | None = None
) -> tuple[np.ndarray, tuple[float, float, float], dict]:
    """Read every DICOM slice of one series in ``folder``.

    Args:
        folder: a directory; files that are not DICOM are skipped.
        series_uid: which series, when the folder holds several.

    Returns:
        ``(volume_hu, spacing_zyx, meta)``: ``volume_hu`` float32 ``(z, y, x)`` in HU, slices
        sorted by increasing position along the slice normal (see the module docstring);
        ``spacing_zyx`` in mm (z from the sorted slice positions, else ``SpacingBetweenSlices``
        or ``SliceThickness``); ``meta`` with ``origin_xyz`` (LPS position of voxel
        ``[0, 0, 0]``), ``orientation``, ``files`` (sorted), ``series_uid``, ``modality``.
    """
    pydicom = _pydicom()
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: DICOM folder not found")
    found = _select_series(_scan_folder(folder, pydicom), folder, series_uid)

    first_path, first = found[0]
    normal = _slice_normal(first)
    found, pos = _sort_slices(found, normal)

    dy_dx = _pixel_spacing(first, first_path)
    volume = _stack_slices(found, dy_dx)
    dz = _slice_spacing(found, pos, first, folder)
    meta = _slice_meta(found[0][1])
    meta.update(
        files=[p for p, _ in found],
        origin_xyz=meta.pop("position"),
        normal=tuple(float(v) for v in normal),
    )
    return volume, (dz, dy_dx[0], dy_dx[1]), meta


def hu_to_attenuation(
    hu: Any, *, mu_water: float = 0.0192, mu_air: float = 0.0, clip: bool = True
) -> Any:
    """Linear attenuation from Hounsfield units: ``mu = mu_water + HU (mu_water - mu_air)/1000``.

    This inverts ``HU = 1000 (mu - mu_water) / (mu_water - mu_air)``. The default
    ``mu_water = 0.0192`` per **mm** (0.192 / cm, water near a 70 keV effective energy) matches
    DICOM's millimetre spacing; pass ``mu_water`` in 1/cm or 1/m if your geometry uses those
    units. ``clip`` sets negative values (padding at -2000 or -3024 HU) to 0. Works on numpy
    arrays and torch tensors, returning the same kind.
    """
    mu = mu_water + hu * ((mu_water - mu_air) / 1000.0)
    if clip:
        mu = mu.clip(min=0.0) if hasattr(mu, "clip") else max(mu, 0.0)
    return mu
