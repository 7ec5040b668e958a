"""Reading and writing arrays, volumes and uncertainty maps, with voxel spacing kept.

Formats are chosen by file suffix:

========================  ==========================================  ====================
suffix                    read (``read_array``)                       spacing stored?
========================  ==========================================  ====================
``.npy``                  the array                                   no
``.npz``                  ``key``, the single array, or ``data``      yes (``spacing``,
                                                                      ``origin`` entries)
``.tif``/``.tiff``        the page or the whole stack (tifffile)      yes (JSON metadata;
                                                                      ImageJ spacing read)
``.h5``/``.hdf5``         ``key``, the single dataset, or ``data``    yes (attributes)
``.nii``/``.nii.gz``      the image (nibabel, optional)               yes (affine)
``.dcm`` or a folder      one DICOM slice or a series, in HU          yes
========================  ==========================================  ====================

Array order follows the project conventions: 3D volumes are ``(z, y, x)`` and spacing and
origin are given in that order too (``spacing_zyx``, world position of the centre of voxel
``[0, 0, 0]``). NIfTI stores ``(i, j, k) = (x, y, z)``, so arrays are transposed on the way
in and out; every other format stores our array order unchanged.

Every writer is atomic (:mod:`dip_uq.io.atomic`): a crash never leaves a half-written file
under the final name.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataFormatError
from .atomic import atomic_write
from .dicom import read_dicom_series, read_dicom_slice

__all__ = ["read_array", "read_spacing", "read_origin", "write_volume", "read_tiff"]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _require_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if not path.is_file():
        raise DataFormatError(f"{path}: expected a file, found a directory")


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_tiff(path: str | os.PathLike) -> np.ndarray:
    """One TIFF file (a single page ``(H, W)`` or a stack ``(pages, H, W)``) as stored.

    Truncated or corrupt files raise ``DataFormatError`` naming the file."""
    import tifffile

    path = Path(path).expanduser()
    _require_file(path)
    try:
        return np.asarray(tifffile.imread(path))
    except Exception as err:  # tifffile raises many types for damaged files
        raise DataFormatError(
            f"{path}: cannot read TIFF (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err


def _pick_npz(path: Path, files: Sequence[str], key: str | None) -> str:
    if key is not None:
        if key not in files:
            raise KeyError(f"{path}: no array {key!r}; available: {sorted(files)}")
        return key
    if len(files) == 1:
        return files[0]
    if "data" in files and set(files) <= {"data", "spacing", "origin"}:
        return "data"
    raise DataFormatError(f"{path}: holds several arrays {sorted(files)}; pass key= to choose one")


def _npz_entry(path: Path, name: str) -> tuple[float, ...] | None:
    """The ``spacing`` or ``origin`` entry of an ``.npz`` file (``None`` when absent)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return tuple(float(s) for s in z[name]) if name in z.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataFormatError(f"{path}: not a readable .npz file: {err}") from err


def _read_h5(path: Path, key: str | None) -> np.ndarray:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataFormatError(f"{path}: cannot open HDF5 file: {err}") from err
    with f:
        if key is None:
            names: list[str] = []
            f.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
            if not names:
                raise DataFormatError(f"{path}: the HDF5 file holds no dataset")
            if len(names) == 1:
                key = names[0]
            elif "data" in names:
                key = "data"
            else:
                raise DataFormatError(
                    f"{path}: holds several datasets {sorted(names)}; pass key= to choose one"
                )
        if key not in f or not isinstance(f[key], h5py.Dataset):
            raise KeyError(f"{path}: no dataset {key!r}")
        return np.asarray(f[key][()])


def _nibabel():
    try:
        import nibabel
    except ImportError as err:
        raise ImportError(
            "reading or writing NIfTI (.nii/.nii.gz) needs nibabel: pip install nibabel "
            "(or pip install 'dip-uq[nifti]')"
        ) from err
    return nibabel


def read_array(path: str | os.PathLike, *, key: str | None = None) -> np.ndarray:
    """Read an array from ``.npy``, ``.npz``, ``.tif``/``.tiff``, ``.h5``/``.hdf5``,
    ``.nii``/``.nii.gz``, a ``.dcm`` file or a folder holding a DICOM series.

    Args:
        path: the file, or a folder of DICOM files.
        key: array name in ``.npz`` / dataset path in HDF5 (default: the only one, or
            ``data`` as written by ``write_volume``).

    Returns:
        The array in our order: NIfTI is transposed from ``(x, y, z)`` to ``(z, y, x)``;
        DICOM is returned in Hounsfield units, a series as ``(z, y, x)`` sorted by slice
        position (see ``read_dicom_series``); other formats as stored.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return read_dicom_series(path)[0]
    _require_file(path)
    suffix = _suffix(path)
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:
            raise DataFormatError(f"{path}: not a readable .npy file: {err}") from err
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return np.asarray(z[_pick_npz(path, z.files, key)])
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            if isinstance(err, DataFormatError):
                raise
            raise DataFormatError(
                f"{path}: not a readable .npz file (truncated or corrupt?): "
                f"{type(err).__name__}: {err}"
            ) from err
    if suffix in (".tif", ".tiff"):
        return read_tiff(path)
    if suffix in (".h5", ".hdf5"):
        return _read_h5(path, key)
    if suffix in (".nii", ".nii.gz"):
        nib = _nibabel()
        img = nib.load(str(path))
        return np.asarray(img.dataobj).T.copy()
    if suffix == ".dcm":
        return read_dicom_slice(path)[0]
    raise DataFormatError(
        f"{path}: unknown suffix {suffix!r}; expected .npy, .npz, .tif, .tiff, .h5, .hdf5, "
        ".nii, .nii.gz, .dcm or a DICOM folder"
    )


def read_spacing(path: str | os.PathLike, *, key: str | None = None) -> tuple[float, ...] | None:
    """Voxel spacing in array order (``(z, y, x)`` for volumes) when the format stores it,
    else ``None`` (``.npy``, TIFF/HDF5 without spacing metadata)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return tuple(read_dicom_series(path)[1])
    _require_file(path)
    suffix = _suffix(path)
    if suffix == ".npy":
        return None
    if suffix == ".npz":
        return _npz_entry(path, "spacing")
    if suffix in (".h5", ".hdf5"):
        import h5py

        try:
            f = h5py.File(path, "r")
        except OSError as err:
            raise DataFormatError(f"{path}: cannot open HDF5 file: {err}") from err
        with f:
            name = key or ("data" if "data" in f else None)
            obj = f[name] if name is not None else f
            sp = obj.attrs.get("spacing")
            return None if sp is None else tuple(float(s) for s in np.atleast_1d(sp))
    if suffix in (".tif", ".tiff"):
        return _tiff_spacing(path)
    if suffix in (".nii", ".nii.gz"):
        img = _nibabel().load(str(path))
        ndim = len(img.shape)
        zooms = np.linalg.norm(img.affine[:3, :ndim], axis=0)
        return tuple(_f32(z) for z in zooms[::-1])
    if suffix == ".dcm":
        return tuple(read_dicom_slice(path)[1])
    raise DataFormatError(f"{path}: unknown suffix {suffix!r}")


def _f32(value: float) -> float:
    """NIfTI headers hold float32: report the shortest decimal that float32 value stands for
    (0.66, not 0.6600000262260437)."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _tiff_spacing(path: Path) -> tuple[float, ...] | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        for md in tif.shaped_metadata or ():
            if md and "spacing" in md:
                return tuple(float(s) for s in md["spacing"])
        ij = tif.imagej_metadata
        page = tif.pages[0]
        tags = page.tags
        if "XResolution" not in tags or "YResolution" not in tags:
            return None
        xr, yr = tags["XResolution"].value, tags["YResolution"].value
        dx, dy = xr[1] / xr[0], yr[1] / yr[0]
        if ij and "spacing" in ij:
            return (float(ij["spacing"]), dy, dx)
        if ij is None:
            return None  # plain resolution tags are DPI, not voxel spacing
        return (dy, dx)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor without importing torch here
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _meta(name: str, value: Any, ndim: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    if np.isscalar(value):
        value = (float(value),) * ndim
    out = tuple(float(v) for v in value)
    if len(out) != ndim:
        raise ValueError(
            f"{name} must have one entry per array axis ({ndim}, array order), got {len(out)}"
        )
    if not all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or infinite values: {out}")
    return out


def write_volume(
    path: str | os.PathLike,
    array: Any,
    *,
    spacing: float | Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
) -> Path:
    """Write an image, volume or uncertainty map; the format follows the suffix.

    Args:
        path: ``.npy``, ``.npz``, ``.tif``/``.tiff``, ``.h5``/``.hdf5``, ``.nii``/``.nii.gz``.
        array: numpy array or torch tensor, our array order (``(y, x)`` or ``(z, y, x)``).
        spacing: voxel size per axis in array order (a scalar means isotropic); physical
            units of the caller's choice (mm for patient data).
        origin: world position of the centre of voxel ``[0, ...]``, array order.

    ``.npy`` keeps no metadata (use ``.npz`` for that). ``.npz`` stores ``data``,
    ``spacing``, ``origin``; HDF5 stores dataset ``data`` with attributes; TIFF stores a JSON
    description (plus ImageJ-readable resolution tags); NIfTI builds the affine
    ``diag(spacing_xyz)`` with the origin as translation, data transposed to ``(x, y, z)``.
    The file appears atomically (temp file + ``os.replace``). Returns the path.
    """
    path = Path(path).expanduser()
    arr = _as_numpy(array)
    if arr.dtype == object or arr.ndim == 0:
        raise ValueError(f"cannot write {path}: need a numeric array, got dtype {arr.dtype}")
    sp = _meta("spacing", spacing, arr.ndim)
    org = _meta("origin", origin, arr.ndim)
    suffix = _suffix(path)

    if suffix == ".npy":

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)

    elif suffix == ".npz":

        def write(tmp: Path) -> None:
            extra = {}
            if sp is not None:
                extra["spacing"] = np.asarray(sp)
            if org is not None:
                extra["origin"] = np.asarray(org)
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, data=arr, **extra)

    elif suffix in (".h5", ".hdf5"):

        def write(tmp: Path) -> None:
            import h5py

            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset("data", data=arr)
                if sp is not None:
                    ds.attrs["spacing"] = np.asarray(sp)
                if org is not None:
                    ds.attrs["origin"] = np.asarray(org)
                ds.attrs["axes"] = "zyx"[-arr.ndim :] if arr.ndim <= 3 else ""

    elif suffix in (".tif", ".tiff"):

        def write(tmp: Path) -> None:
            import tifffile

            md: dict[str, Any] = {"axes": "ZYX"[-arr.ndim :] if arr.ndim <= 3 else None}
            if sp is not None:
                md["spacing"] = list(sp)
            if org is not None:
                md["origin"] = list(org)
            kwargs: dict[str, Any] = {}
            if sp is not None and arr.ndim >= 2:
                kwargs["resolution"] = (1.0 / sp[-1], 1.0 / sp[-2])
            tifffile.imwrite(tmp, arr, metadata=md, photometric="minisblack", **kwargs)

    elif suffix in (".nii", ".nii.gz"):
        nib = _nibabel()

        def write(tmp: Path) -> None:
            affine = np.eye(4)
            n = min(arr.ndim, 3)
            sp_xyz = (sp or (1.0,) * arr.ndim)[::-1][:n]
            org_xyz = (org or (0.0,) * arr.ndim)[::-1][:n]
            for i in range(n):
                affine[i, i] = sp_xyz[i]
                affine[i, 3] = org_xyz[i]
            img = nib.Nifti1Image(np.ascontiguousarray(arr.T), affine)
            img.header.set_xyzt_units("mm")
            nib.save(img, str(tmp))

    else:
        raise DataFormatError(
            f"{path}: cannot write suffix {suffix!r}; use .npy, .npz, .tif, .tiff, .h5, .hdf5, "
            ".nii or .nii.gz"
        )
    return atomic_write(path, write)


def read_origin(path: str | os.PathLike) -> tuple[float, ...] | None:
    """World position of voxel ``[0, ...]`` (array order) when the format stores it."""
    path = Path(path).expanduser()
    _require_file(path)
    suffix = _suffix(path)
    if suffix == ".npz":
        return _npz_entry(path, "origin")
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            org = f["data"].attrs.get("origin") if "data" in f else None
            return None if org is None else tuple(float(s) for s in np.atleast_1d(org))
    if suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            for md in tif.shaped_metadata or ():
                if md and "origin" in md:
                    return tuple(float(s) for s in md["origin"])
        return None
    if suffix in (".nii", ".nii.gz"):
        img = _nibabel().load(str(path))
        return tuple(_f32(v) for v in img.affine[: len(img.shape), 3][::-1])
    return None
