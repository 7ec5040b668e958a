"""Checks for linear operators: scale-free adjointness, autograd agreement, geometry conventions.

Every check works with anything shaped like a ``RayTransform``: ``op(x)``, ``op.T(y)``,
``op.domain_shape``, ``op.range_shape``, ``op.norm()``; the convention check also needs
``op.volume`` and ``op.geometry``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import OperatorBase, power_norm

__all__ = [
    "dot_test",
    "adjoint_autograd_error",
    "point_source_check",
    "relative_error",
    "operator_norm",
]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius; ``b`` is the reference; ``||a||`` when ``b = 0``)."""
    a64, b64 = a.detach().double(), b.detach().double()
    if a64.shape != b64.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    den = float(b64.norm())
    num = float((a64 - b64).norm())
    return num / den if den > 0 else num


def operator_norm(
    op: Any,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    iterations: int = 100,
    tol: float = 1e-7,
    generator: torch.Generator | None = None,
) -> float:
    """``||A||_2`` by power iteration on ``A^T A`` with tensors on ``device``.

    On the CPU this is ``op.norm()``; elsewhere (e.g. ASTRA CUDA, which only takes CUDA
    tensors) the iteration runs on ``device`` in ``dtype``."""
    if isinstance(op, OperatorBase):  # cached, in the dtype the operator's backend takes
        return float(op.norm(device=device, iterations=iterations, tol=tol, generator=generator))
    return power_norm(
        op, iterations=iterations, tol=tol, generator=generator, device=device, dtype=dtype
    )


def dot_test(
    op: Any,
    *,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
    n: int = 1,
    device: torch.device | str = "cpu",
) -> float:
    """Scale-free adjointness error ``max |<Ax, y> - <x, A^T y>| / (||A|| ||x|| ||y||)`` over
    ``n`` Gaussian pairs ``(x, y)`` (tensors on ``device`` in ``dtype``); ``||A||`` from
    ``op.norm()`` (``operator_norm`` off the CPU). Exact transposes give float rounding
    (~1e-17 in float64); ASTRA CUDA gives ~1e-3..1e-2."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    norm = operator_norm(op, device=device, dtype=dtype)
    worst = 0.0
    for _ in range(int(n)):
        x = torch.randn(op.domain_shape, generator=g, dtype=torch.float64)
        y = torch.randn(op.range_shape, generator=g, dtype=torch.float64)
        ax = op(x.to(dtype=dtype, device=device)).double().cpu()
        aty = op.T(y.to(dtype=dtype, device=device)).double().cpu()
        lhs, rhs = float((ax * y).sum()), float((x * aty).sum())
        den = norm * float(x.norm()) * float(y.norm())
        worst = max(worst, abs(lhs - rhs) / den if den > 0 else abs(lhs - rhs))
    return worst


def adjoint_autograd_error(
    op: Any,
    *,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> float:
    """Relative error between ``op.T(y)`` and the vector-Jacobian product ``(dA/dx)^T y``.

    The VJP is taken through the backend's own forward map when that map is differentiable by
    torch (e.g. the torch projector: an independent transpose), otherwise through ``op``'s
    autograd wiring (which then checks that gradients flow and land on the right shapes)."""
    g = generator if generator is not None else torch.Generator().manual_seed(1)
    x = torch.randn(op.domain_shape, generator=g, dtype=torch.float64).to(
        dtype=dtype, device=device
    )
    y = torch.randn(op.range_shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    x.requires_grad_(True)
    out = None
    backend = getattr(op, "backend", None)
    if backend is not None:
        try:
            with torch.enable_grad():
                cand = backend.forward(x[None])[0]
            if cand.requires_grad:
                out = cand
        except Exception:
            out = None
    if out is None:
        out = op(x)
    (vjp,) = torch.autograd.grad(out, x, y)
    return relative_error(op.T(y.detach()), vjp)


def _blob(volume: Any, point_xyz: Sequence[float], sigma: float) -> tuple[torch.Tensor, list]:
    """A Gaussian blob (std ``sigma`` voxels) at a world point; returns it and its discrete
    centre of mass in world ``(x, y[, z])``."""
    idx = volume.world_to_index(point_xyz)  # array order
    axes = [torch.arange(n, dtype=torch.float64) for n in volume.shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    r2 = sum((gr - float(c)) ** 2 for gr, c in zip(grids, idx))
    img = torch.exp(-r2 / (2 * sigma**2))
    img = torch.where(img > 1e-6, img, torch.zeros_like(img))
    mass = img.sum()
    centre = []
    for ax in range(volume.ndim):
        coords = torch.as_tensor(volume.coords(ax))
        shape = [1] * volume.ndim
        shape[ax] = -1
        centre.append(float((img * coords.reshape(shape)).sum() / mass))
    return img, centre[::-1]


def point_source_check(
    op: Any,
    point_xyz: Sequence[float],
    *,
    sigma: float = 0.8,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> float:
    """Max detector-position error (pixels) of a small blob at world ``point_xyz``.

    A Gaussian blob (std ``sigma`` voxels) centred at the point is projected; per view, the
    centroid of its projection (detector columns, and rows in 3D) is compared with
    ``op.geometry.project_point`` of the blob's centre of mass. Mirrored or rotated
    conventions give errors of many pixels; correct ones well below a pixel."""
    vol, geom = op.volume, op.geometry
    img, centre = _blob(vol, point_xyz, sigma)
    sino = op(img.to(dtype=dtype, device=device)).double().cpu()
    expected = geom.project_point(centre)  # (views, 2): (row, col)
    if geom.ndim == 2:
        sino = sino[:, None, :]  # (views, 1, cols)
    else:
        sino = sino.permute(1, 0, 2)  # (views, rows, cols)
    rows = torch.arange(sino.shape[1], dtype=torch.float64)
    cols = torch.arange(sino.shape[2], dtype=torch.float64)
    mass = sino.sum((1, 2))
    if bool((mass <= 0).any()):
        raise ValueError(
            f"the blob at {tuple(point_xyz)} does not reach the detector in every view"
        )
    r = (sino * rows[None, :, None]).sum((1, 2)) / mass
    c = (sino * cols[None, None, :]).sum((1, 2)) / mass
    got = np.stack([r.numpy(), c.numpy()], 1)
    return float(np.abs(got - expected).max())
