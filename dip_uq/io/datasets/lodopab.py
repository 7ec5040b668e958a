"""LoDoPaB-CT (Leuschner et al., Sci. Data 8:109, 2021; Zenodo 3384092) from local HDF5 files.

Layout: ``ground_truth_{part}_NNN.hdf5`` and ``observation_{part}_NNN.hdf5`` (``part`` in
train/validation/test, ``NNN`` from 000), each with a dataset ``data`` of 128 samples
(the last file of a part may hold fewer, or be zero-padded: the official lengths are used
when all files are present). Ground truth: ``(362, 362)`` attenuation normalised by
``mu_max`` on ``[-0.13, 0.13]^2`` m; observations: ``(1000, 513)`` post-log line integrals
divided by ``mu_max``.

Orientation. The data set was made with ODL, whose image arrays are indexed ``[x, y]``
(axis 0 = x); ours are ``[y, x]``. ODL's parallel-beam detector axis at angle ``t`` is
``(cos t, sin t)``, the same as ours, so **observations need no change and ground-truth
images are transposed**: ``ours = stored.T``. With that, ``lodopab_operator()(gt)`` reproduces
the observation geometry (checked against ODL itself in the tests).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from operators import Parallel2D, RayTransform, VolumeGeometry

from ...errors import DataFormatError

__all__ = [
    "LODOPAB_MU_MAX",
    "LODOPAB_N0",
    "LODOPAB_LENGTHS",
    "LoDoPaB",
    "lodopab_geometry",
    "lodopab_operator",
    "lodopab_noise",
]

LODOPAB_MU_MAX = 81.35858  # 1/m: attenuation of the densest tissue mapped to 1
LODOPAB_N0 = 4096  # mean photon count per detector pixel without attenuation
LODOPAB_LENGTHS = {"train": 35820, "validation": 3522, "test": 3553}
LODOPAB_HALF_WIDTH = 0.13  # m, image square [-0.13, 0.13]^2
LODOPAB_DET_HALF_WIDTH = 0.13 * math.sqrt(2)  # = 0.18385 m, ODL's parallel_beam_geometry rule


def lodopab_geometry(
    *, image_size: int = 362, n_angles: int = 1000, det_count: int = 513
) -> tuple[VolumeGeometry, Parallel2D]:
    """The data set's grid and parallel-beam geometry (metres).

    Angles are the midpoints of ``n_angles`` equal cells of ``[0, pi)``: ``pi/2000 +
    k pi/1000``; ``det_count`` bins cover ``+-0.13 sqrt(2) = +-0.18385`` m."""
    vol = VolumeGeometry(
        shape=(image_size, image_size), voxel_size=2 * LODOPAB_HALF_WIDTH / image_size
    )
    angles = tuple(math.pi * (k + 0.5) / n_angles for k in range(n_angles))
    geom = Parallel2D(
        angles=angles, det_count=det_count, det_spacing=2 * LODOPAB_DET_HALF_WIDTH / det_count
    )
    return vol, geom


def lodopab_operator(
    *,
    impl: str = "torch",
    downsample: int = 1,
    angle_step: int = 1,
    image_size: int | None = None,
    n_angles: int = 1000,
    det_count: int = 513,
) -> RayTransform:
    """``RayTransform`` matching LoDoPaB observations (images in our ``(y, x)`` order).

    Args:
        impl: backend name (``"torch"``, ``"astra_cpu"``, ``"matrix"``, ``"auto"``, ...).
        downsample: image grid ``362 / downsample`` over the same square (must divide 362).
        angle_step: keep every ``angle_step``-th angle (use ``observation[::angle_step]``).
        image_size, n_angles, det_count: override the grid for small experiments.
    """
    if image_size is None:
        if downsample < 1 or 362 % downsample:
            raise ValueError(f"downsample must divide 362 (1, 2, 181, 362), got {downsample}")
        image_size = 362 // downsample
    vol, geom = lodopab_geometry(image_size=image_size, n_angles=n_angles, det_count=det_count)
    if angle_step != 1:
        geom = geom[::angle_step]
    return RayTransform(vol, geom, backend=impl)


def lodopab_noise(
    sinogram: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    n0: float = LODOPAB_N0,
    mu_max: float = LODOPAB_MU_MAX,
) -> torch.Tensor:
    """LoDoPaB's noise: counts ``N ~ Poisson(n0 exp(-mu_max y))``, ``N = 0`` replaced by 0.1,
    returned as ``-log(N / n0) / mu_max`` (same shape and dtype as ``sinogram``, which holds
    noiseless line integrals of the normalised image, in metres)."""
    if not torch.is_tensor(sinogram) or not sinogram.is_floating_point():
        raise TypeError("sinogram must be a floating-point torch tensor")
    if not torch.isfinite(sinogram).all():
        raise ValueError("sinogram contains NaN or infinite values")
    rate = n0 * torch.exp(-mu_max * sinogram.double())
    counts = torch.poisson(rate, generator=generator)
    counts = torch.where(counts == 0, torch.full_like(counts, 0.1), counts)
    return (-torch.log(counts / n0) / mu_max).to(sinogram.dtype)


_NAME = re.compile(r"^(ground_truth|observation)_(train|validation|test)_(\d{3})\.hdf5$")


class LoDoPaB:
    """Random access to one part of LoDoPaB-CT: ``ds[i] -> (observation, ground_truth)``.

    ``observation``: float ``(1000, 513)``; ``ground_truth``: float ``(362, 362)`` in our
    ``(y, x)`` order (stored array transposed, see the module docstring; ``orientation="raw"``
    keeps the stored order). Files are opened lazily and kept open; the object pickles (for
    ``DataLoader`` workers) without its file handles.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        part: str = "test",
        *,
        orientation: str = "ours",
        dtype: torch.dtype = torch.float32,
        image_shape: tuple[int, int] = (362, 362),
        sinogram_shape: tuple[int, int] = (1000, 513),
    ) -> None:
        import h5py  # noqa: F401 - fail early with a clear ImportError

        if part not in LODOPAB_LENGTHS:
            raise ValueError(f"part must be one of {sorted(LODOPAB_LENGTHS)}, got {part!r}")
        if orientation not in ("ours", "raw"):
            raise ValueError(f"orientation must be 'ours' or 'raw', got {orientation!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: LoDoPaB folder not found")
        self.part, self.orientation, self.dtype = part, orientation, dtype
        self.image_shape, self.sinogram_shape = tuple(image_shape), tuple(sinogram_shape)
        idx = sorted(
            int(m.group(3))
            for p in self.root.iterdir()
            if (m := _NAME.match(p.name)) and m.group(1) == "ground_truth" and m.group(2) == part
        )
        if not idx:
            raise FileNotFoundError(f"{self.root}: no ground_truth_{part}_NNN.hdf5 files")
        if idx != list(range(len(idx))):
            missing = sorted(set(range(max(idx) + 1)) - set(idx))
            raise FileNotFoundError(
                f"{self.root}: ground_truth_{part}_NNN.hdf5 files are not consecutive from 000; "
                f"missing {[f'{m:03d}' for m in missing[:5]]}"
            )
        self._files: list[tuple[Path, Path]] = []
        counts = []
        for k in idx:
            gt = self.root / f"ground_truth_{part}_{k:03d}.hdf5"
            obs = self.root / f"observation_{part}_{k:03d}.hdf5"
            if not obs.is_file():
                raise FileNotFoundError(f"{obs}: observation file missing (pairs with {gt.name})")
            n_gt = self._check(gt, self.image_shape)
            n_obs = self._check(obs, self.sinogram_shape)
            if n_gt != n_obs:
                raise DataFormatError(
                    f"{obs}: {n_obs} samples but {gt.name} has {n_gt}; the files must pair up"
                )
            self._files.append((obs, gt))
            counts.append(n_gt)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        total = int(self._offsets[-1])
        # The last official file may be zero-padded to 128 samples: never count past the
        # official length of the part.
        self._len = min(total, LODOPAB_LENGTHS[part])
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _check(path: Path, shape: tuple[int, int]) -> int:
        import h5py

        try:
            f = h5py.File(path, "r")
        except OSError as err:
            raise DataFormatError(f"{path}: cannot open HDF5 file: {err}") from err
        with f:
            if "data" not in f:
                raise DataFormatError(f"{path}: no dataset 'data' (found {sorted(f.keys())})")
            ds_shape = f["data"].shape
        if len(ds_shape) != 3 or tuple(ds_shape[1:]) != shape:
            raise DataFormatError(
                f"{path}: dataset 'data' has shape {ds_shape}, expected (samples, {shape[0]}, "
                f"{shape[1]})"
            )
        return int(ds_shape[0])

    def __len__(self) -> int:
        return self._len

    def _read(self, path: Path, j: int) -> np.ndarray:
        import h5py

        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = h5py.File(path, "r")
        return np.asarray(f["data"][j])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not isinstance(i, int | np.integer):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if not -n <= i < n:
            last = self._files[-1][1].name
            raise IndexError(
                f"index {i} out of range: {self.root} holds {n} {self.part} samples "
                f"(ground_truth_{self.part}_000.hdf5 .. {last})"
            )
        i = int(i) % n
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        j = i - int(self._offsets[k])
        obs_path, gt_path = self._files[k]
        obs = torch.from_numpy(self._read(obs_path, j)).to(self.dtype)
        gt = torch.from_numpy(self._read(gt_path, j)).to(self.dtype)
        if self.orientation == "ours":
            gt = gt.T.contiguous()
        return obs, gt

    def close(self) -> None:
        """Close open HDF5 files (they reopen on the next access)."""
        for f in self._handles.values():
            f.close()  # type: ignore[attr-defined]
        self._handles = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __repr__(self) -> str:
        return f"LoDoPaB(root={str(self.root)!r}, part={self.part!r}, len={len(self)})"
