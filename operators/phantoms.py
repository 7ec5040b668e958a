"""Test images: Shepp-Logan (2D, 3D), random ellipses / ellipsoids, rectangles, point sources.

Orientation. Every phantom is defined on the normalised cube ``[-1, 1]^d`` and sampled at
voxel centres ``c_i = -1 + (2 i + 1) / n`` along each axis. Arrays are returned in the
project's array order, 2D ``(H, W) = (y, x)`` and 3D ``(D, H, W) = (z, y, x)``, and every
index increases with its coordinate: row 0 is at ``y = -1`` (the bottom). Plot 2D images
with ``imshow(img, origin="lower")`` to see them upright (the Shepp-Logan "head" then has its
three small ellipses at the bottom, as in the textbooks).

Angles rotate counter-clockwise (from +x towards +y). Random generators take a
``torch.Generator`` and draw all parameters on the CPU in float64, so a seed gives the same
phantom on every device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "shepp_logan_2d",
    "shepp_logan_3d",
    "random_ellipses",
    "random_ellipsoids",
    "textured_phantom",
    "rectangles",
    "point_sources",
]

# Shepp & Logan (1974) ellipses: (value, semi-axis a along x, b along y, x0, y0, angle deg).
_SL_2D = (
    (2.0, 0.69, 0.92, 0.0, 0.0, 0.0),
    (-0.98, 0.6624, 0.874, 0.0, -0.0184, 0.0),
    (-0.02, 0.11, 0.31, 0.22, 0.0, -18.0),
    (-0.02, 0.16, 0.41, -0.22, 0.0, 18.0),
    (0.01, 0.21, 0.25, 0.0, 0.35, 0.0),
    (0.01, 0.046, 0.046, 0.0, 0.1, 0.0),
    (0.01, 0.046, 0.046, 0.0, -0.1, 0.0),
    (0.01, 0.046, 0.023, -0.08, -0.605, 0.0),
    (0.01, 0.023, 0.023, 0.0, -0.606, 0.0),
    (0.01, 0.023, 0.046, 0.06, -0.605, 0.0),
)
# Toft's "modified" intensities (better contrast), values in [0, 1].
_SL_2D_MODIFIED_VALUES = (1.0, -0.8, -0.2, -0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1)

# Modified 3D Shepp-Logan (the Kak-Slaney ellipsoids with Toft's contrast, as popularised by
# ``phantom3d``): (value, a, b, c, x0, y0, z0, phi, theta, psi), Euler angles z-x-z in degrees.
_SL_3D_MODIFIED = (
    (1.0, 0.69, 0.92, 0.81, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (-0.8, 0.6624, 0.874, 0.78, 0.0, -0.0184, 0.0, 0.0, 0.0, 0.0),
    (-0.2, 0.11, 0.31, 0.22, 0.22, 0.0, 0.0, -18.0, 0.0, 10.0),
    (-0.2, 0.16, 0.41, 0.28, -0.22, 0.0, 0.0, 18.0, 0.0, 10.0),
    (0.1, 0.21, 0.25, 0.41, 0.0, 0.35, -0.15, 0.0, 0.0, 0.0),
    (0.1, 0.046, 0.046, 0.05, 0.0, 0.1, 0.25, 0.0, 0.0, 0.0),
    (0.1, 0.046, 0.046, 0.05, 0.0, -0.1, 0.25, 0.0, 0.0, 0.0),
    (0.1, 0.046, 0.023, 0.05, -0.08, -0.605, 0.0, 0.0, 0.0, 0.0),
    (0.1, 0.023, 0.023, 0.02, 0.0, -0.606, 0.0, 0.0, 0.0, 0.0),
    (0.1, 0.023, 0.046, 0.02, 0.06, -0.605, 0.0, 0.0, 0.0, 0.0),
)
# The original 3D contrast (Kak & Slaney): outer shell 2, brain 1.02, features +-0.01/0.02.
_SL_3D_ORIGINAL_VALUES = (2.0, -0.98, -0.02, -0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _check_shape(shape: Sequence[int] | int, ndim: int, name: str) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,) * ndim
    shape = tuple(shape)
    if len(shape) != ndim or any(int(s) != s or int(s) < 1 for s in shape):
        order = "(H, W)" if ndim == 2 else "(D, H, W)"
        raise ValueError(f"{name}: shape must be {ndim} positive integers {order}, got {shape}")
    return tuple(int(s) for s in shape)


def _check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise TypeError(f"phantoms are real-valued: dtype must be floating point, got {dtype}")


def _grid(shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Voxel-centre coordinates on [-1, 1]^d in float64, returned as ``[x, y(, z)]``
    broadcastable to ``shape`` (array order reversed: the last axis is x)."""
    axes = [(2 * torch.arange(n, dtype=torch.float64) + 1) / n - 1 for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return list(reversed(mesh))


def _rot3(phi: float, theta: float, psi: float) -> torch.Tensor:
    """z-x-z Euler rotation (radians) taking body axes to world axes."""

    def rz(t: float) -> torch.Tensor:
        c, s = math.cos(t), math.sin(t)
        return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)

    c, s = math.cos(theta), math.sin(theta)
    rx = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)
    return rz(phi) @ rx @ rz(psi)


def _snap_zero(img: torch.Tensor) -> torch.Tensor:
    """Exact zeros where cancelling values (1 - 0.8 - 0.2) leave rounding residue."""
    return torch.where(img.abs() < 1e-12, torch.zeros_like(img), img)


def _paint_ellipses(shape: tuple[int, int], params: Sequence[Sequence[float]]) -> torch.Tensor:
    """Sum of constant ellipses ``(value, a, b, x0, y0, angle_rad)`` on [-1, 1]^2 (float64)."""
    x, y = _grid(shape)
    img = torch.zeros(shape, dtype=torch.float64)
    for val, a, b, x0, y0, ang in params:
        c, s = math.cos(ang), math.sin(ang)
        dx, dy = x - x0, y - y0
        xr = c * dx + s * dy  # coordinates in the ellipse's own frame
        yr = -s * dx + c * dy
        img += val * ((xr / a) ** 2 + (yr / b) ** 2 <= 1.0).to(torch.float64)
    return _snap_zero(img)


def _paint_ellipsoids(
    shape: tuple[int, int, int], params: Sequence[Sequence[float]]
) -> torch.Tensor:
    """Sum of constant ellipsoids ``(value, a, b, c, x0, y0, z0, phi, theta, psi)`` (radians)."""
    x, y, z = _grid(shape)
    pts = torch.stack([x, y, z], -1)  # (D, H, W, 3) in (x, y, z)
    vol = torch.zeros(shape, dtype=torch.float64)
    for val, a, b, c, x0, y0, z0, phi, theta, psi in params:
        r = _rot3(phi, theta, psi)
        local = (pts - torch.tensor([x0, y0, z0], dtype=torch.float64)) @ r  # world -> body
        q = (local / torch.tensor([a, b, c], dtype=torch.float64)).pow(2).sum(-1)
        vol += val * (q <= 1.0).to(torch.float64)
    return _snap_zero(vol)


def _uniform(g: torch.Generator | None, n: int, lo: float, hi: float) -> torch.Tensor:
    """``n`` float64 draws from U(lo, hi) on the CPU, from a generator on any device."""
    dev = g.device if g is not None else torch.device("cpu")
    u = torch.rand(n, generator=g, dtype=torch.float64, device=dev).cpu()
    return lo + (hi - lo) * u


def _finish(
    img: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None
) -> torch.Tensor:
    return img.to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------
# Shepp-Logan
# ---------------------------------------------------------------------------------------


def shepp_logan_2d(
    shape: Sequence[int] | int,
    *,
    modified: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The 2D Shepp-Logan head phantom, shape ``(H, W) = (y, x)`` on ``[-1, 1]^2``.

    ``modified=True`` uses Toft's contrast (values in ``[0, 1]``: skull 1, brain 0.2);
    ``False`` the original (skull 2, brain 1.02, features +-0.01/0.02). The image is upright
    with ``imshow(img, origin="lower")`` (row index increases with y; see module docstring).
    """
    shape = _check_shape(shape, 2, "shepp_logan_2d")
    _check_dtype(dtype)
    vals = _SL_2D_MODIFIED_VALUES if modified else [p[0] for p in _SL_2D]
    params = [(v, a, b, x0, y0, math.radians(t)) for v, (_, a, b, x0, y0, t) in zip(vals, _SL_2D)]
    return _finish(_paint_ellipses(shape, params), dtype, device)


def shepp_logan_3d(
    shape: Sequence[int] | int,
    *,
    modified: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The 3D Shepp-Logan phantom (Kak-Slaney ellipsoids), shape ``(D, H, W) = (z, y, x)``.

    ``modified=True`` gives Toft's contrast with values in ``[0, 1]`` (the usual "modified"
    3D set); ``False`` the original contrast. The ellipsoids' z-x-z Euler angles follow the
    published table; each axial slice is upright with ``imshow(vol[k], origin="lower")``.
    """
    shape = _check_shape(shape, 3, "shepp_logan_3d")
    _check_dtype(dtype)
    vals = [p[0] for p in _SL_3D_MODIFIED] if modified else _SL_3D_ORIGINAL_VALUES
    params = [
        (v, *p[1:7], *(math.radians(t) for t in p[7:10])) for v, p in zip(vals, _SL_3D_MODIFIED)
    ]
    return _finish(_paint_ellipsoids(shape, params), dtype, device)


# ---------------------------------------------------------------------------------------
# Random phantoms (pretraining data)
# ---------------------------------------------------------------------------------------


def _normalise_unit(img: torch.Tensor) -> torch.Tensor:
    """Clip negatives and scale the maximum to 1 (an all-zero image stays zero)."""
    img = img.clamp_min(0.0)
    peak = img.max()
    return img / peak if peak > 0 else img


def _check_count(n: int, name: str) -> int:
    if int(n) != n or int(n) < 1:
        raise ValueError(f"{name} must be a positive integer, got {n}")
    return int(n)


def _check_range(r: tuple[float, float], name: str) -> tuple[float, float]:
    lo, hi = float(r[0]), float(r[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{name} must be a finite (low, high) pair with low <= high, got {r}")
    return lo, hi


def random_ellipses(
    shape: Sequence[int] | int,
    *,
    n_ellipses: int = 20,
    generator: torch.Generator | None = None,
    value_range: tuple[float, float] = (-0.4, 1.0),
    axis_range: tuple[float, float] = (0.03, 0.4),
    radius: float = 0.8,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A random sum of ``n_ellipses`` constant ellipses, shape ``(H, W)``, values in [0, 1].

    Each ellipse has a value ``~ U(value_range)`` (negative values cut holes), semi-axes
    ``~ U(axis_range)``, an angle ``~ U(0, pi)`` and a centre uniform in the disc of
    ``radius`` (so the object stays inside a CT field of view). The sum is clipped at 0 and
    scaled to a maximum of 1. Deterministic for a seeded ``generator``.
    """
    shape = _check_shape(shape, 2, "random_ellipses")
    _check_dtype(dtype)
    n = _check_count(n_ellipses, "n_ellipses")
    vlo, vhi = _check_range(value_range, "value_range")
    alo, ahi = _check_range(axis_range, "axis_range")
    if alo <= 0:
        raise ValueError(f"axis_range must be positive, got {axis_range}")
    vals = _uniform(generator, n, vlo, vhi)
    a = _uniform(generator, n, alo, ahi)
    b = _uniform(generator, n, alo, ahi)
    ang = _uniform(generator, n, 0.0, math.pi)
    r = radius * _uniform(generator, n, 0.0, 1.0).sqrt()  # uniform over the disc
    t = _uniform(generator, n, 0.0, 2 * math.pi)
    params = torch.stack([vals, a, b, r * t.cos(), r * t.sin(), ang], 1).tolist()
    return _finish(_normalise_unit(_paint_ellipses(shape, params)), dtype, device)


def random_ellipsoids(
    shape: Sequence[int] | int,
    *,
    n_ellipsoids: int = 20,
    generator: torch.Generator | None = None,
    value_range: tuple[float, float] = (-0.4, 1.0),
    axis_range: tuple[float, float] = (0.05, 0.4),
    radius: float = 0.7,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A random sum of constant ellipsoids, shape ``(D, H, W)``, values in [0, 1].

    Like :func:`random_ellipses` in 3D: values ``~ U(value_range)``, semi-axes
    ``~ U(axis_range)``, uniformly random orientation (z-x-z Euler angles with
    ``cos(theta) ~ U(-1, 1)``), centres uniform in the ball of ``radius``; clipped at 0 and
    scaled to a maximum of 1.
    """
    shape = _check_shape(shape, 3, "random_ellipsoids")
    _check_dtype(dtype)
    n = _check_count(n_ellipsoids, "n_ellipsoids")
    vlo, vhi = _check_range(value_range, "value_range")
    alo, ahi = _check_range(axis_range, "axis_range")
    if alo <= 0:
        raise ValueError(f"axis_range must be positive, got {axis_range}")
    vals = _uniform(generator, n, vlo, vhi)
    axes = _uniform(generator, 3 * n, alo, ahi).reshape(n, 3)
    phi = _uniform(generator, n, 0.0, 2 * math.pi)
    theta = torch.acos(_uniform(generator, n, -1.0, 1.0))
    psi = _uniform(generator, n, 0.0, 2 * math.pi)
    # centre: uniform direction times radius * U^(1/3)
    direction = torch.randn(
        n, 3, generator=generator, dtype=torch.float64, device=_gen_device(generator)
    ).cpu()
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    centre = direction * (radius * _uniform(generator, n, 0.0, 1.0).pow(1 / 3))[:, None]
    params = torch.cat(
        [vals[:, None], axes, centre, phi[:, None], theta[:, None], psi[:, None]], 1
    ).tolist()
    return _finish(_normalise_unit(_paint_ellipsoids(shape, params)), dtype, device)


def textured_phantom(
    shape: Sequence[int] | int,
    *,
    ndim: int | None = None,
    n_shapes: int = 12,
    texture: float = 0.25,
    correlation: float = 2.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random ellipses (2D) or ellipsoids (3D) with texture, values in [0, 1]: the piecewise
    constant object of :func:`random_ellipses` / :func:`random_ellipsoids` multiplied by
    ``1 + texture · g``, where ``g`` is a Gaussian random field of unit variance with a
    Gaussian correlation of ``correlation`` voxels (white noise filtered in Fourier space),
    clipped at 0 and scaled to a maximum of 1. Real anatomy has such texture inside organs;
    piecewise-constant phantoms flatter TV-regularised reconstructions. ``shape`` is
    ``(H, W)`` or ``(D, H, W)`` (an int needs ``ndim``)."""
    if isinstance(shape, int):
        if ndim not in (2, 3):
            raise ValueError("textured_phantom: an int shape needs ndim=2 or 3")
        shape = (shape,) * ndim
    nd = len(tuple(shape))
    if nd not in (2, 3):
        raise ValueError(f"textured_phantom: shape must be 2D or 3D, got {tuple(shape)}")
    if not (math.isfinite(texture) and texture >= 0 and correlation > 0):
        raise ValueError("textured_phantom needs texture >= 0 and correlation > 0")
    if nd == 2:
        base = random_ellipses(shape, n_ellipses=n_shapes, generator=generator, dtype=torch.float64)
    else:
        base = random_ellipsoids(
            shape, n_ellipsoids=n_shapes, generator=generator, dtype=torch.float64
        )
    shape = tuple(base.shape)
    white = torch.randn(
        shape, generator=generator, dtype=torch.float64, device=_gen_device(generator)
    ).cpu()
    freqs = torch.meshgrid(
        *[torch.fft.fftfreq(n, dtype=torch.float64) for n in shape], indexing="ij"
    )
    k2 = sum(f**2 for f in freqs)
    field = torch.fft.ifftn(
        torch.fft.fftn(white) * torch.exp(-2 * (math.pi * correlation) ** 2 * k2)
    ).real
    field = (field - field.mean()) / field.std().clamp_min(1e-12)
    return _finish(_normalise_unit(base * (1 + texture * field)), dtype, device)


def _gen_device(g: torch.Generator | None) -> torch.device:
    return g.device if g is not None else torch.device("cpu")


def rectangles(
    shape: Sequence[int],
    *,
    n: int = 5,
    generator: torch.Generator | None = None,
    value_range: tuple[float, float] = (0.2, 1.0),
    size_range: tuple[float, float] = (0.1, 0.6),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` random axis-aligned rectangles (2D) or boxes (3D) on ``[-1, 1]^d``.

    Boxes are painted in order (later ones cover earlier ones), so the image is piecewise
    constant with values in ``value_range`` on a zero background. Edge lengths are
    ``~ U(size_range)`` (normalised units) and every box lies inside ``[-0.9, 0.9]^d``.
    Shape ``(H, W)`` or ``(D, H, W)``.
    """
    shape_t = tuple(shape) if not isinstance(shape, int) else (shape, shape)
    if len(shape_t) not in (2, 3):
        raise ValueError(f"rectangles: shape must be (H, W) or (D, H, W), got {shape}")
    shape_t = _check_shape(shape_t, len(shape_t), "rectangles")
    _check_dtype(dtype)
    n = _check_count(n, "n")
    vlo, vhi = _check_range(value_range, "value_range")
    slo, shi = _check_range(size_range, "size_range")
    if slo <= 0 or shi > 1.8:
        raise ValueError(f"size_range must lie in (0, 1.8], got {size_range}")
    d = len(shape_t)
    coords = _grid(shape_t)  # x, y(, z)
    img = torch.zeros(shape_t, dtype=torch.float64)
    vals = _uniform(generator, n, vlo, vhi)
    sizes = _uniform(generator, n * d, slo, shi).reshape(n, d)
    u = _uniform(generator, n * d, 0.0, 1.0).reshape(n, d)
    lows = -0.9 + u * (1.8 - sizes)
    for k in range(n):
        inside = torch.ones(shape_t, dtype=torch.bool)
        for ax in range(d):
            lo, hi = float(lows[k, ax]), float(lows[k, ax] + sizes[k, ax])
            inside &= (coords[ax] >= lo) & (coords[ax] <= hi)
        img[inside] = float(vals[k])
    return _finish(img, dtype, device)


def point_sources(
    shape: Sequence[int],
    positions: Sequence[Sequence[float]] | torch.Tensor,
    *,
    mass: float | Sequence[float] = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Zero image with mass ``mass`` at each of the given voxel ``positions``.

    ``positions`` has shape ``(k, d)`` in array-index order (``(row, col)`` or
    ``(slice, row, col)``). Integer positions put the whole mass in one voxel; fractional
    positions split it multilinearly over the neighbouring voxels (the total mass and the
    centre of mass are preserved). Masses are voxel values (sums), not densities.
    """
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) not in (2, 3) or any(s < 1 for s in shape_t):
        raise ValueError(f"point_sources: shape must be (H, W) or (D, H, W), got {tuple(shape)}")
    _check_dtype(dtype)
    pos = torch.as_tensor(positions, dtype=torch.float64)
    if pos.ndim == 1:
        pos = pos[None]
    d = len(shape_t)
    if pos.ndim != 2 or pos.shape[1] != d:
        raise ValueError(
            f"positions must have shape (k, {d}) for a {d}D image, got {tuple(pos.shape)}"
        )
    if not torch.isfinite(pos).all():
        raise ValueError("positions contain NaN or infinite values")
    hi = torch.tensor(shape_t, dtype=torch.float64) - 1
    bad = ((pos < 0) | (pos > hi)).any(1)
    if bad.any():
        raise ValueError(
            f"positions {pos[bad].tolist()} lie outside the image of shape {shape_t} "
            f"(valid indices 0..n-1 per axis)"
        )
    masses = torch.as_tensor(mass, dtype=torch.float64).expand(pos.shape[0])
    img = torch.zeros(shape_t, dtype=torch.float64)
    base = pos.floor().long()
    frac = pos - base
    for corner in range(2**d):
        offs = torch.tensor([(corner >> (d - 1 - k)) & 1 for k in range(d)], dtype=torch.long)
        w = torch.prod(torch.where(offs.bool(), frac, 1 - frac), 1) * masses
        idx = base + offs
        ok = (w != 0) & (idx <= hi.long()).all(1)
        if ok.any():
            img.index_put_(tuple(idx[ok].T), w[ok], accumulate=True)
    return _finish(img, dtype, device)
