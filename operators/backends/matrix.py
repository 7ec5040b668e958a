"""An explicit sparse system matrix: the exact, matched reference for small problems.

``A`` is a ``torch`` sparse CSR matrix of shape ``(n_rays, n_voxels)``: row ``i`` is sinogram
entry ``i`` in C order of ``geometry.shape``, column ``j`` is voxel ``j`` in C order of
``volume.shape``. ``forward`` is ``A x`` and ``adjoint`` is ``A^T y`` with the stored transpose,
so the adjoint is exact by construction (only float rounding of the sums differs).

The matrix comes from ASTRA's CPU projector (``astra.projector.matrix``, 2D; the y mirroring
of ``backends/astra.py`` is inside the geometry, so rows and columns need no reordering) or by
probing any backend with unit voxels (``A e_j`` in blocks, memory-bounded).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from ..errors import GeometryError
from ..geometry import ProjectionGeometry, VolumeGeometry

__all__ = ["MatrixBackend"]

_DENSE_LIMIT = 2**26  # entries: ``to_dense`` refuses above this (512 MiB in float64)


def _quiet(fn: Any, *args: Any, **kw: Any) -> Any:
    """Call ``fn`` without torch's "sparse CSR is beta" and invariant-check notices."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*", category=UserWarning)
        return fn(*args, **kw)


def _csr_from_coo(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    coo = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), vals, shape, check_invariants=True
    ).coalesce()
    return _quiet(coo.to_sparse_csr)


class MatrixBackend:
    """Sparse-matrix projector (matched). Build it with ``MatrixBackend.build``.

    Args:
        volume, geometry: the problem the matrix describes.
        matrix: sparse CSR ``(prod(geometry.shape), prod(volume.shape))``.
        source: where the matrix came from (for printing).
    """

    name = "matrix"
    matched = True

    def __init__(
        self,
        volume: VolumeGeometry,
        geometry: ProjectionGeometry,
        matrix: torch.Tensor,
        *,
        source: str = "given",
    ) -> None:
        expected = (math.prod(geometry.shape), volume.num_voxels)
        if matrix.layout != torch.sparse_csr:
            raise TypeError(f"matrix must be a sparse CSR tensor, got layout {matrix.layout}")
        if tuple(matrix.shape) != expected:
            raise ValueError(
                f"matrix shape mismatch: expected {expected} (sinogram entries, voxels), "
                f"got {tuple(matrix.shape)}"
            )
        self.volume = volume
        self.geometry = geometry
        self.source = source
        self._m = matrix
        coo = matrix.to_sparse_coo().coalesce()
        r, c = coo.indices()
        self._mt = _csr_from_coo(c, r, coo.values(), (expected[1], expected[0]))
        self._on: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        volume: VolumeGeometry,
        geometry: ProjectionGeometry,
        *,
        source: str = "auto",
        dtype: torch.dtype = torch.float64,
        probe_backend: str = "torch",
        projector: str = "linear",
        max_voxels: int = 2**16,
        max_nnz: int = 2**27,
        block_bytes: int = 64 * 2**20,
        **probe_options: Any,
    ) -> MatrixBackend:
        """Assemble the matrix.

        Args:
            source: ``"astra"`` (ASTRA CPU projector matrix, 2D; ``projector`` selects the
                kernel), ``"probe"`` (apply ``probe_backend`` to unit voxels), or ``"auto"``
                (ASTRA for 2D, probing otherwise).
            dtype: float32 or float64 (default; the reference precision).
            probe_backend: a backend name (``"torch"``, ``"astra_cpu"``, ...) for probing.
            max_voxels: refuse to probe larger volumes (one projection per voxel).
            max_nnz: refuse when the expected number of non-zeros (about two voxels per
                plane crossed, per ray) exceeds this (2**27 is ~1.5 GiB with indices).
            block_bytes: memory bound for one block of probe projections.
        """
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"matrix dtype must be float32 or float64, got {dtype}")
        if volume.ndim != geometry.ndim:
            raise GeometryError(
                f"geometry/volume mismatch: a {geometry.ndim}D {type(geometry).__name__} "
                f"cannot project a {volume.ndim}D volume of shape {volume.shape}"
            )
        est = cls.estimate_nnz(volume, geometry)
        if est > max_nnz:
            raise ValueError(
                f"refusing to build a system matrix with about {est:.3g} non-zeros for "
                f"volume {volume.shape} and sinogram {geometry.shape} (limit max_nnz={max_nnz}); "
                "use a matrix-free backend ('torch', 'astra_cpu') or raise max_nnz"
            )
        if source == "auto":
            source = "astra" if volume.ndim == 2 else "probe"
        if source == "astra":
            m, projector = cls._from_astra(volume, geometry, projector)
        elif source == "probe":
            m = cls._from_probe(
                volume, geometry, probe_backend, max_voxels, block_bytes, probe_options
            )
        else:
            raise ValueError(f"unknown matrix source {source!r}; choose 'auto', 'astra' or 'probe'")
        m = m.to(dtype)
        label = f"astra:{projector}" if source == "astra" else f"probe:{probe_backend}"
        return cls(volume, geometry, m, source=label)

    @staticmethod
    def estimate_nnz(volume: VolumeGeometry, geometry: ProjectionGeometry) -> int:
        """Rough non-zero count: each ray meets about two voxels on each of ``max(shape)``
        planes (an upper-end estimate for linear/Joseph kernels, 2-4 per plane in 3D)."""
        per_ray = (2 if volume.ndim == 2 else 4) * max(volume.shape)
        return int(math.prod(geometry.shape) * per_ray)

    @staticmethod
    def _from_astra(
        volume: VolumeGeometry, geometry: ProjectionGeometry, projector: str
    ) -> tuple[torch.Tensor, str]:
        """ASTRA's matrix as float64 CSR, and the kernel actually used."""
        from .astra import AstraCPU

        be = AstraCPU(volume, geometry, projector=projector)
        try:
            sp = be.sparse_matrix()
        finally:
            be.close()
        sp.sum_duplicates()  # also sorts column indices, as torch's CSR requires
        m = _quiet(
            torch.sparse_csr_tensor,
            torch.from_numpy(sp.indptr.astype(np.int64)),
            torch.from_numpy(sp.indices.astype(np.int64)),
            torch.from_numpy(sp.data.astype(np.float64)),
            sp.shape,
            check_invariants=True,
        )
        return m, be.projector

    @staticmethod
    def _from_probe(
        volume: VolumeGeometry,
        geometry: ProjectionGeometry,
        backend: str,
        max_voxels: int,
        block_bytes: int,
        options: dict,
    ) -> torch.Tensor:
        from . import make_backend

        n = volume.num_voxels
        if n > max_voxels:
            raise ValueError(
                f"refusing to probe a {n}-voxel volume {volume.shape} (limit max_voxels="
                f"{max_voxels}): one projection per voxel would be too slow; use a smaller "
                "problem, source='astra' (2D), or raise max_voxels"
            )
        be = make_backend(backend, volume, geometry, **options)
        m_rows = math.prod(geometry.shape)
        dtype = torch.float64
        try:
            be.check_tensor(torch.zeros((), dtype=dtype))
        except TypeError:
            dtype = torch.float32
        block = max(1, min(n, block_bytes // max(1, 8 * (m_rows + n))))
        rows, cols, vals = [], [], []
        for j0 in range(0, n, block):
            j1 = min(n, j0 + block)
            e = torch.zeros(j1 - j0, n, dtype=dtype)
            e[torch.arange(j1 - j0), torch.arange(j0, j1)] = 1.0
            cols_block = be.forward(e.reshape(j1 - j0, *volume.shape)).reshape(j1 - j0, m_rows)
            k, i = cols_block.nonzero(as_tuple=True)  # (voxel in block, sinogram entry)
            rows.append(i)
            cols.append(k + j0)
            vals.append(cols_block[k, i].to(torch.float64))
        return _csr_from_coo(torch.cat(rows), torch.cat(cols), torch.cat(vals), (m_rows, n))

    # ------------------------------------------------------------------ access
    @property
    def matrix(self) -> torch.Tensor:
        """The sparse CSR matrix ``(n_rays, n_voxels)``."""
        return self._m

    @property
    def nnz(self) -> int:
        return int(self._m.values().numel())

    def to_dense(self) -> torch.Tensor:
        """Dense copy of ``A`` (refused above 2**26 entries)."""
        size = self._m.shape[0] * self._m.shape[1]
        if size > _DENSE_LIMIT:
            raise ValueError(
                f"to_dense refused: {tuple(self._m.shape)} has {size} entries "
                f"(limit {_DENSE_LIMIT}); use .matrix (sparse)"
            )
        return self._m.to_dense()

    def check_tensor(self, t: torch.Tensor) -> None:
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"matrix backend supports float32 and float64 tensors, got {t.dtype}")

    def _mats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device.type, device.index)
        if key not in self._on:
            self._on[key] = (self._m.to(device), self._mt.to(device))
        return self._on[key]

    def _apply(self, m: torch.Tensor, x: torch.Tensor, out_shape: tuple[int, ...]):
        n = x.shape[0]
        flat = x.reshape(n, -1).to(m.dtype).T.contiguous()  # (cols, N)
        return (m @ flat).T.to(x.dtype).reshape(n, *out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, *volume.shape) -> (N, *geometry.shape)``: ``A x`` per batch entry."""
        self.check_tensor(x)
        return self._apply(self._mats(x.device)[0], x, tuple(self.geometry.shape))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, *geometry.shape) -> (N, *volume.shape)``: ``A^T y`` with the stored transpose."""
        self.check_tensor(y)
        return self._apply(self._mats(y.device)[1], y, tuple(self.volume.shape))

    def __repr__(self) -> str:
        return (
            f"MatrixBackend(shape={tuple(self._m.shape)}, nnz={self.nnz}, "
            f"dtype={self._m.dtype}, source={self.source!r})"
        )
