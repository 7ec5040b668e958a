"""ASTRA Toolbox backends: matched CPU projectors (2D) and CUDA projectors (2D and 3D).

Conventions. ASTRA's 2D volumes put image row 0 at *maximum* y; ours put row 0 at minimum y.
``VolumeGeometry.to_astra()`` therefore gives ASTRA the mirrored y window ``[-y_max, -y_min]``
so that our world point ``(x, y)`` is ASTRA's ``(x, -y)``. Here every 2D projection geometry is
passed as a ``parallel_vec``/``fanflat_vec`` geometry whose vectors have their y components
negated (``_mirror_y``): the data arrays are then used as they are, with no flip or copy.
ASTRA's 3D volumes index ``(z, y, x)`` with every index increasing with its coordinate, and its
3D sinograms are ``(det_rows, angles, det_cols)``, both exactly ours: 3D geometries pass through.

ASTRA is not thread-safe: every native call is serialised by one module lock.

ASTRA CUDA without a usable GPU returns zeros silently (2D) or kills the process (3D). The CUDA
backend therefore checks ``astra_cuda_available()`` and the tensor's device *before* any
native call and raises ``BackendUnavailable`` otherwise.
"""

from __future__ import annotations

import functools
import importlib
import threading
from typing import Any

import numpy as np
import torch

from ..errors import BackendUnavailable, GeometryError
from ..geometry import ProjectionGeometry, VolumeGeometry

__all__ = ["AstraCPU", "AstraCUDA", "astra_cuda_available", "ASTRA_LOCK"]

ASTRA_LOCK = threading.RLock()  # ASTRA's object manager and kernels are not thread-safe

_CPU_PARALLEL = ("linear", "line", "strip")
_CPU_FAN = ("line_fanflat",)  # the only ASTRA CPU fan kernel that accepts fanflat_vec


def _import_astra() -> Any:
    try:
        import astra
    except ImportError as exc:  # pragma: no cover - astra is a core dependency
        raise BackendUnavailable(
            "astra-toolbox is not installed: pip install astra-toolbox"
        ) from exc
    return astra


@functools.cache
def astra_cuda_available() -> bool:
    """Whether ASTRA was built with CUDA *and* sees a GPU (cached; never raises)."""
    try:
        astra = _import_astra()
        return bool(astra.use_cuda())
    except Exception:
        return False


def _mirror_y(vec: np.ndarray) -> np.ndarray:
    """2D ``(n, 6)`` vectors ``(src|ray, det, u)`` with every y component negated (ASTRA 2D)."""
    out = np.array(vec, dtype=np.float64, copy=True)
    out[:, 1::2] *= -1.0
    return out


def astra_proj_geom_2d(geometry: ProjectionGeometry) -> dict:
    """ASTRA 2D vector projection geometry for our 2D geometry, mirrored in y (module doc)."""
    astra = _import_astra()
    kind = "fanflat_vec" if geometry.is_cone else "parallel_vec"
    return astra.create_proj_geom(kind, geometry.det_shape[0], _mirror_y(geometry.to_vec()))


def astra_proj_geom_3d(geometry: ProjectionGeometry) -> dict:
    """ASTRA 3D vector projection geometry (``parallel3d_vec``/``cone_vec``); no mirroring."""
    astra = _import_astra()
    kind = "cone_vec" if geometry.is_cone else "parallel3d_vec"
    rows, cols = geometry.det_shape
    return astra.create_proj_geom(kind, rows, cols, np.asarray(geometry.to_vec(), np.float64))


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} supports float32 and float64 tensors, got {t.dtype}")


_GPU_INDEX: list[int | None] = [None]  # the GPU ASTRA was last pointed at (under ASTRA_LOCK)


def _select_gpu(astra: Any, device: torch.device) -> None:
    """Point ASTRA at the tensor's GPU (it works on one "current" GPU, default 0)."""
    if device.type != "cuda":
        return
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if _GPU_INDEX[0] != idx:
        astra.set_gpu_index(idx)
        _GPU_INDEX[0] = idx


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _AstraBase:
    """Owns one ASTRA projector id; frees it on ``close()``/garbage collection."""

    name = "astra"
    matched = False
    _pid: int | None = None
    _delete: Any = None

    def close(self) -> None:
        """Free the native ASTRA projector (idempotent)."""
        pid, self._pid = self._pid, None
        if pid is not None and self._delete is not None:
            try:
                with ASTRA_LOCK:
                    self._delete(pid)
            except Exception:  # interpreter shutdown: astra may already be gone
                pass

    def __del__(self) -> None:
        self.close()

    # Backends are rebuilt, not pickled (a projector id is process-local).
    def __getstate__(self) -> dict:
        raise TypeError(f"{type(self).__name__} holds a native ASTRA object and cannot be pickled")


class AstraCPU(_AstraBase):
    """ASTRA's CPU projectors, 2D only, matched (ASTRA's BP is the exact transpose of its FP).

    Args:
        volume: a 2D ``VolumeGeometry``.
        geometry: ``Parallel2D`` (``projector`` in ``"linear"``, ``"line"``, ``"strip"``) or
            ``FanBeam2D`` (``"line_fanflat"``; ``"linear"``, the default, is mapped to it,
            since ASTRA CPU has no linear fan kernel).
        projector: the ASTRA CPU kernel.

    ASTRA computes in float32: float64 input is rounded to float32 and the result is cast back
    to float64, so results carry float32 precision (relative error ~1e-7 per entry).
    """

    name = "astra_cpu"
    matched = True

    def __init__(
        self, volume: VolumeGeometry, geometry: ProjectionGeometry, *, projector: str = "linear"
    ) -> None:
        if volume.ndim != 2 or geometry.ndim != 2:
            raise BackendUnavailable(
                f"astra_cpu supports 2D problems only, got a {geometry.ndim}D "
                f"{type(geometry).__name__} with a {volume.ndim}D volume; use backend='torch' "
                "(CPU) or 'astra_cuda' (GPU) for 3D"
            )
        if geometry.is_cone:
            if projector == "linear":
                projector = "line_fanflat"
            allowed = _CPU_FAN
        else:
            allowed = _CPU_PARALLEL
        if projector not in allowed:
            raise BackendUnavailable(
                f"astra_cpu projector {projector!r} does not support "
                f"{type(geometry).__name__}; choose one of {list(allowed)}"
            )
        vy, vx = volume.voxel_size
        if not np.isclose(vy, vx, rtol=1e-9, atol=0):
            raise BackendUnavailable(
                f"ASTRA's CPU projectors need square pixels, got voxel_size={volume.voxel_size} "
                "(y, x); use backend='torch'"
            )
        astra = _import_astra()
        self.volume = volume
        self.geometry = geometry
        self.projector = projector
        self._vol_geom = volume.to_astra()
        self._proj_geom = astra_proj_geom_2d(geometry)
        with ASTRA_LOCK:
            try:
                self._pid = astra.create_projector(projector, self._proj_geom, self._vol_geom)
            except Exception as exc:  # ASTRA's configuration checks: report, don't crash
                raise BackendUnavailable(
                    f"ASTRA refused the {projector!r} projector: {exc}"
                ) from exc
        self._delete = astra.projector.delete
        self._fp = astra.projector.direct_FP
        self._bp = astra.projector.direct_BP
        self._matrix = astra.projector.matrix

    def check_tensor(self, t: torch.Tensor) -> None:
        _check_float(t, "astra_cpu")
        if t.device.type != "cpu":
            raise BackendUnavailable(
                f"astra_cpu needs CPU tensors, got a tensor on {t.device}; move it with "
                ".cpu() or use backend='astra_cuda'/'torch'"
            )

    def _run(self, fn: Any, src: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
        self.check_tensor(src)
        if self._pid is None:
            raise RuntimeError("this AstraCPU projector has been closed")
        a = np.ascontiguousarray(src.detach().numpy(), dtype=np.float32)
        out = np.empty((a.shape[0], *out_shape), dtype=np.float32)
        with ASTRA_LOCK:
            for k in range(a.shape[0]):  # ASTRA 2D has no batch dimension
                fn(self._pid, a[k], out=out[k])
        return torch.from_numpy(out).to(src.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, H, W) -> (N, angles, det)``."""
        return self._run(self._fp, x, tuple(self.geometry.shape))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, angles, det) -> (N, H, W)``."""
        return self._run(self._bp, y, tuple(self.volume.shape))

    def sparse_matrix(self) -> Any:
        """ASTRA's projection matrix as a ``scipy.sparse.csr_matrix`` (float32), rows = sinogram
        entries in C order of ``geometry.shape``, columns = pixels in C order of ``volume.shape``
        (the y mirroring is carried by the geometry, so no reordering is needed)."""
        astra = _import_astra()
        with ASTRA_LOCK:
            mid = self._matrix(self._pid)
            try:
                m = astra.matrix.get(mid)
            finally:
                astra.matrix.delete(mid)
        return m.tocsr()


class AstraCUDA(_AstraBase):
    """ASTRA's CUDA projectors on CUDA tensors, zero-copy through DLPack; not matched.

    2D uses a ``"cuda"`` projector with ``astra.experimental.direct_FP2D/BP2D`` (sinogram
    ``(angles, det)``); 3D a ``"cuda3d"`` projector with ``direct_FP3D/BP3D`` on volumes
    ``(D, H, W)`` and sinograms ``(det_rows, angles, det_cols)``. Inputs are made contiguous
    float32 on the same device; float64 is converted and cast back (float32 precision).
    ASTRA's adjoints are only approximately matched (about 1%).
    """

    name = "astra_cuda"
    matched = False

    def __init__(self, volume: VolumeGeometry, geometry: ProjectionGeometry) -> None:
        if volume.ndim != geometry.ndim:
            raise GeometryError(
                f"geometry/volume mismatch: a {geometry.ndim}D {type(geometry).__name__} "
                f"cannot project a {volume.ndim}D volume of shape {volume.shape}"
            )
        self.volume = volume
        self.geometry = geometry
        # Checked here, before any native object exists: no CUDA call may run without a GPU.
        self._require_cuda()
        astra = _import_astra()
        if not hasattr(astra, "experimental"):  # a submodule: no attribute until imported
            importlib.import_module("astra.experimental")
        self._astra = astra
        self._ndim = volume.ndim
        self._vol_geom = volume.to_astra()
        if self._ndim == 2:
            self._proj_geom = astra_proj_geom_2d(geometry)
            with ASTRA_LOCK:
                self._pid = astra.create_projector("cuda", self._proj_geom, self._vol_geom)
            self._delete = astra.projector.delete
        else:
            self._proj_geom = astra_proj_geom_3d(geometry)
            with ASTRA_LOCK:
                self._pid = astra.create_projector("cuda3d", self._proj_geom, self._vol_geom)
            self._delete = astra.projector3d.delete

    @staticmethod
    def _require_cuda() -> None:
        if not astra_cuda_available():
            raise BackendUnavailable(
                "astra_cuda is unavailable: ASTRA was built without CUDA or no GPU is visible; "
                "use backend='torch' (any device) or 'astra_cpu' (2D)"
            )

    def check_tensor(self, t: torch.Tensor) -> None:
        _check_float(t, "astra_cuda")
        if t.device.type != "cuda":
            raise BackendUnavailable(
                f"tensor is on {t.device.type}, astra_cuda needs a CUDA tensor; move it with "
                ".cuda() or use backend='torch'/'astra_cpu'"
            )
        self._require_cuda()

    def _run(self, kind: str, src: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
        self.check_tensor(src)  # guards before anything native is touched
        if self._pid is None:
            raise RuntimeError("this AstraCUDA projector has been closed")
        exp = self._astra.experimental
        a = src.detach().to(torch.float32).contiguous()
        # zeros, not empty: whether a direct BP overwrites or accumulates is not promised
        out = torch.zeros((a.shape[0], *out_shape), dtype=torch.float32, device=src.device)
        with ASTRA_LOCK:
            _select_gpu(self._astra, src.device)
            # ASTRA runs on its own stream: finish pending torch work on these buffers first.
            _sync(src.device)
            for k in range(a.shape[0]):
                if self._ndim == 2:
                    if kind == "fp":
                        exp.direct_FP2D(self._pid, a[k], out[k])
                    else:
                        exp.direct_BP2D(self._pid, out[k], a[k])
                elif kind == "fp":
                    exp.direct_FP3D(self._pid, a[k], out[k])
                else:
                    exp.direct_BP3D(self._pid, out[k], a[k])
            _sync(src.device)
        return out.to(src.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, *volume.shape) -> (N, *geometry.shape)``."""
        return self._run("fp", x, tuple(self.geometry.shape))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, *geometry.shape) -> (N, *volume.shape)``."""
        return self._run("bp", y, tuple(self.volume.shape))
