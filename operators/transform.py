"""``RayTransform``: the differentiable CT forward operator every other layer builds on.

``op(x)`` maps volumes ``(..., *volume.shape)`` to sinograms ``(..., *geometry.shape)``;
``op.T(y)`` is the backprojection (the adjoint). Leading dimensions are batch/channels and
are flattened into one batch for the backend. Autograd uses the adjoint for the forward map
and the forward map for the adjoint, so gradients of any order are available.
"""

from __future__ import annotations

from typing import Any

import torch

from .backends import make_backend
from .backends.base import Backend
from .base import OperatorBase, check_device
from .errors import GeometryError
from .geometry import ProjectionGeometry, VolumeGeometry
from .geometry_check import check_geometry_fits

__all__ = ["RayTransform"]


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, op: RayTransform) -> torch.Tensor:
        ctx.op = op
        return op._apply_forward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Backproject.apply(grad, ctx.op), None


class _Backproject(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, op: RayTransform) -> torch.Tensor:
        ctx.op = op
        return op._apply_adjoint(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Project.apply(grad, ctx.op), None


class RayTransform(OperatorBase):
    """X-ray transform ``A`` between a voxel volume and a sinogram.

    Args:
        volume: the voxel grid (``(H, W)`` or ``(D, H, W)``, array order ``(y, x)`` /
            ``(z, y, x)``; world units set by its voxel size).
        geometry: a projection geometry of the same dimensionality.
        backend: ``"auto"`` (ASTRA CUDA for CUDA tensors when ASTRA has CUDA, else the torch
            projector), ``"torch"``, ``"astra"`` (CPU 2D or CUDA), ``"astra_cpu"``,
            ``"astra_cuda"``, ``"matrix"``, or a ready ``Backend`` object.
        **options: passed to the backend (e.g. ``projector="linear"`` for ASTRA CPU).

    ``A x`` gives line integrals in world units (a volume of ones of width ``w`` gives ``w``
    along a central ray). ``matched`` says whether ``A.T`` is the exact transpose of ``A``.

    Construction refuses a fan/cone geometry that cannot measure the volume (a source inside
    it, a detector between the source and it: :func:`~operators.geometry_check.check_geometry_fits`);
    calls refuse non-float, wrongly shaped, non-finite and ``meta`` tensors, naming them.
    """

    def __init__(
        self,
        volume: VolumeGeometry,
        geometry: ProjectionGeometry,
        backend: str | Backend = "auto",
        **options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(volume, VolumeGeometry):
            raise TypeError(f"volume must be a VolumeGeometry, got {type(volume).__name__}")
        if not isinstance(geometry, ProjectionGeometry):
            raise TypeError(f"geometry must be a ProjectionGeometry, got {type(geometry).__name__}")
        if volume.ndim != geometry.ndim:
            raise GeometryError(
                f"geometry/volume mismatch: a {geometry.ndim}D {type(geometry).__name__} "
                f"cannot project a {volume.ndim}D volume of shape {volume.shape}"
            )
        check_geometry_fits(volume, geometry)  # no source inside, no detector before the volume
        self.volume = volume
        self.geometry = geometry
        self._requested = backend if isinstance(backend, str) else backend.name
        self._options = options
        self._backends: dict[str, Backend] = {}
        if not isinstance(backend, str):
            self._backends[backend.name] = backend
        elif backend != "auto":
            # Resolve eagerly so an unavailable backend fails at construction.
            self._backend_for(torch.device("cuda") if backend == "astra_cuda" else None)

    # ------------------------------------------------------------------ properties
    @property
    def domain_shape(self) -> tuple[int, ...]:
        return tuple(self.volume.shape)

    @property
    def range_shape(self) -> tuple[int, ...]:
        return tuple(self.geometry.shape)

    @property
    def backend(self) -> Backend:
        """The backend that CPU tensors use (``auto`` resolves per call for CUDA tensors)."""
        return self._backend_for(None)

    @property
    def matched(self) -> bool:
        """Whether the adjoint is the exact transpose (for the backend CPU tensors use)."""
        return bool(self.backend.matched)

    def _backend_for(self, device: torch.device | None) -> Backend:
        name = self._requested
        if name == "auto":
            name = "torch"
            if device is not None and device.type == "cuda":
                from .backends.astra import astra_cuda_available

                if astra_cuda_available():
                    name = "astra_cuda"
        elif name == "astra":
            name = "astra_cuda" if device is not None and device.type == "cuda" else "astra_cpu"
        if name not in self._backends:
            self._backends[name] = make_backend(name, self.volume, self.geometry, **self._options)
        return self._backends[name]

    # ------------------------------------------------------------------ validation
    def _check(self, t: torch.Tensor, expected: tuple[int, ...], what: str) -> tuple[int, ...]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got dtype {t.dtype}")
        check_device(t, what, "RayTransform")
        k = len(expected)
        if t.ndim < k or tuple(t.shape[-k:]) != expected:
            raise ValueError(
                f"{what} shape mismatch: expected (..., {', '.join(map(str, expected))}), "
                f"got {tuple(t.shape)}"
            )
        if t.numel() and not torch.isfinite(t).all():
            raise ValueError(f"{what} contains NaN or infinite values")
        return tuple(t.shape[:-k])

    # ------------------------------------------------------------------ maps
    def _apply_forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = self._check(x, self.domain_shape, "volume")
        be = self._backend_for(x.device)
        be.check_tensor(x)
        flat = x.detach().reshape(-1, *self.domain_shape)
        out = be.forward(flat)
        return out.reshape(*lead, *self.range_shape)

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        lead = self._check(y, self.range_shape, "sinogram")
        be = self._backend_for(y.device)
        be.check_tensor(y)
        flat = y.detach().reshape(-1, *self.range_shape)
        out = be.adjoint(flat)
        return out.reshape(*lead, *self.domain_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward projection ``A x``: ``(..., *volume.shape) -> (..., *geometry.shape)``."""
        return _Project.apply(x, self)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Backprojection ``A^T y``: ``(..., *geometry.shape) -> (..., *volume.shape)``."""
        return _Backproject.apply(y, self)

    # deepinv-style aliases
    A = forward
    A_adjoint = adjoint

    def norm(
        self,
        *,
        iterations: int = 100,
        tol: float = 1e-7,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        recompute: bool = False,
    ) -> float:
        """Operator 2-norm ``||A||`` by power iteration on ``A^T A`` (cached per device).

        Runs in float64 where the backend supports it (float32 for ASTRA). ``device``
        defaults to CPU, or CUDA for backends that only take CUDA tensors (ASTRA CUDA,
        tomosipo)."""
        if device is None:
            device = "cuda" if self._requested in ("astra_cuda", "tomosipo") else "cpu"
        if dtype is None:
            be = self._backend_for(torch.device(device))
            astra_like = be.name.startswith("astra") or be.name == "tomosipo"
            dtype = torch.float32 if astra_like else torch.float64
        return super().norm(
            iterations=iterations, tol=tol, generator=generator, device=device, dtype=dtype,
            recompute=recompute,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"volume={self.volume!r}, geometry={self.geometry!r}, backend={self._requested!r}"

    # Projectors hold no tensors; keep state_dict round-trips trivially valid.
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_backends"] = {}  # native handles are rebuilt on demand
        return state
