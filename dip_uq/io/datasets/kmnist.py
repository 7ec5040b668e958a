"""KMNIST (Clanuwat et al., 2018) idx/npz files and folders of images, for the sparse-view
protocol of the linearised-DIP literature.

Images are returned as stored: row 0 is the file's first row, which picture viewers show at
the top (``imshow(origin="upper")``); under our plotting convention (row = +y,
``origin="lower"``) they appear upside down. We do not flip, so arrays match the files
byte for byte; the sparse-view statistics do not depend on the orientation.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch

from operators import Parallel2D, RayTransform, VolumeGeometry, uniform_angles

from ...errors import DataFormatError
from ..arrays import read_tiff

__all__ = ["read_idx", "load_images", "kmnist_operator", "IMAGE_SUFFIXES"]

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (``*-idx3-ubyte`` or ``.gz``): magic ``0 0 type ndim``, ``ndim`` big-endian
    uint32 sizes, then the data. Returns the array in its stored shape (``(N, 28, 28)``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: idx file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise DataFormatError(f"{path}: cannot read (corrupt gzip?): {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataFormatError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataFormatError(f"{path}: truncated idx header")
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    need = math.prod(shape) * dtype.itemsize
    if len(raw) - head != need:
        raise DataFormatError(
            f"{path}: idx header says shape {shape} ({need} bytes of data) but the file holds "
            f"{len(raw) - head} bytes (truncated?)"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="))
    )


def _read_picture(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        img = np.load(path, allow_pickle=False)
    elif suffix in (".tif", ".tiff"):
        img = read_tiff(path)
    else:
        import matplotlib.image as mpimg

        try:
            img = mpimg.imread(path)
        except Exception as err:
            raise DataFormatError(f"{path}: cannot read image: {err}") from err
    if img.ndim == 3 and img.shape[-1] in (3, 4):  # RGB(A) -> grey: mean of the colour channels
        img = (
            img[..., :3].astype(np.float64).mean(-1)
            if img.dtype.kind == "f"
            else (img[..., :3].astype(np.float64).mean(-1) / np.iinfo(img.dtype).max)
        )
    if img.ndim != 2:
        raise DataFormatError(f"{path}: expected a 2D (grey or RGB) image, got shape {img.shape}")
    return img


def _scale(arr: np.ndarray, normalize: str, where: str) -> np.ndarray:
    if normalize == "none":
        return arr.astype(np.float32)
    if normalize == "minmax":
        a = arr.astype(np.float64)
        lo = a.min(axis=(-2, -1), keepdims=True)
        span = a.max(axis=(-2, -1), keepdims=True) - lo
        return ((a - lo) / np.where(span > 0, span, 1.0)).astype(np.float32)
    if normalize != "dtype":
        raise ValueError(f"normalize must be 'dtype', 'minmax' or 'none', got {normalize!r}")
    if arr.dtype.kind in "ui":
        return (arr.astype(np.float64) / np.iinfo(arr.dtype).max).clip(0, 1).astype(np.float32)
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise DataFormatError(
            f"{where}: float values span [{arr.min():g}, {arr.max():g}], outside [0, 1]; pass "
            "normalize='minmax' to rescale each image or 'none' to keep them"
        )
    return arr.astype(np.float32)


def load_images(
    path_or_folder: str | os.PathLike,
    *,
    n: int | None = None,
    key: str | None = None,
    normalize: str = "dtype",
) -> torch.Tensor:
    """Images as float32 ``(N, H, W)`` in ``[0, 1]``.

    Accepts an idx file (``t10k-images-idx3-ubyte[.gz]``), an ``.npz`` (``kmnist-test-imgs.npz``,
    array ``key`` or ``arr_0`` or its only array), an ``.npy`` stack, or a folder of
    PNG/TIFF/NPY images of equal size (sorted by file name; RGB is averaged to grey).

    Args:
        n: keep the first ``n`` images (the protocol uses the first 50 test images).
        normalize: ``"dtype"`` (integers divided by their maximum, floats must lie in
            ``[0, 1]``), ``"minmax"`` (each image to ``[0, 1]``) or ``"none"``.
    """
    path = Path(path_or_folder).expanduser()
    if n is not None and n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} images in the folder")
        files = files[:n] if n is not None else files
        imgs = []
        for f in files:
            img = _scale(_read_picture(f), normalize, str(f))
            if imgs and img.shape != imgs[0].shape:
                raise DataFormatError(
                    f"{f}: image shape {img.shape} differs from {imgs[0].shape} of {files[0].name}"
                )
            imgs.append(img)
        return torch.from_numpy(np.stack(imgs))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file or folder not found")
    name = path.name.lower()
    if name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            k = key or (
                "arr_0" if "arr_0" in z.files else (z.files[0] if len(z.files) == 1 else None)
            )
            if k is None or k not in z.files:
                raise DataFormatError(f"{path}: pass key= to choose one of {sorted(z.files)}")
            arr = z[k]
    elif name.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
    elif "idx" in name or name.endswith(".gz"):
        arr = read_idx(path)
    else:
        arr = _read_picture(path)[None]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise DataFormatError(f"{path}: expected images (N, H, W), got shape {arr.shape}")
    arr = arr[:n] if n is not None else arr
    return torch.from_numpy(_scale(np.ascontiguousarray(arr), normalize, str(path)))


def kmnist_operator(
    n_angles: int, *, image_size: int = 28, det_count: int = 41, backend: str = "torch"
) -> RayTransform:
    """The sparse-view protocol's operator: parallel beam, ``n_angles`` angles in ``[0, pi)``
    starting at 0, ``det_count`` bins over ``+-image_size/sqrt(2)`` (the circumscribed
    circle), on the square ``[-14, 14]^2`` with unit pixels (images in our ``(y, x)`` order)."""
    vol = VolumeGeometry(shape=(image_size, image_size), voxel_size=1.0)
    half = image_size / 2 * math.sqrt(2)
    geom = Parallel2D(
        angles=uniform_angles(n_angles), det_count=det_count, det_spacing=2 * half / det_count
    )
    return RayTransform(vol, geom, backend=backend)
