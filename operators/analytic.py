"""Analytic reconstructions in torch: FBP (parallel and flat fan beam) and FDK (circular cone).

Every backprojection goes through ``op.T``, so the same code serves every backend (torch,
ASTRA, sparse matrix). Results are attenuation images in the volume's units (1/length):
for data ``y = A x`` the reconstruction approximates ``x``.

Why ``op.T`` gives the right scale
----------------------------------
``A`` returns line integrals, so for a smooth detector function ``g`` the transpose satisfies
``(A^T g)(x) ~= |voxel| / s(x) * g(u(x))`` where ``s(x)`` is the spacing between neighbouring
rays measured perpendicular to the rays at ``x`` (the sum of the ray lengths through a
region equals its size divided by the ray spacing; this holds for any backend whose forward
map returns line integrals, including our ray-driven Joseph transpose).

* Parallel beam: ``s = du`` (detector spacing), so ``f = du / |voxel| * A^T(w q)``.
* Flat fan beam: rays through detector coordinate ``u`` are ``du * U / M * cos(gamma)``
  apart at ``x``, with ``U(x, beta) = (D - x . src_dir) / D`` the depth ratio,
  ``M = SDD / D`` and ``cos(gamma) = SDD / sqrt(SDD^2 + u^2)``. Pre-weighting the filtered
  data by ``cos(gamma)`` leaves a factor ``1 / U``, but the fan-beam formula needs
  ``1 / U^2``. The missing ``1 / U`` depends on pixel and view, so it is expanded in an
  exact, fast-converging Fourier series in the view angle:
  ``1 / (1 - rho cos(beta - psi)) = (1 - rho^2)^(-1/2) (1 + 2 sum_n a^n cos(n (beta - psi)))``
  with ``rho = |x| / D`` and ``a = (1 - sqrt(1 - rho^2)) / rho``. Each term is a view-only
  weight (applied to the sinogram) times a pixel-only weight (applied to the image), so
  ``2 N + 1`` backprojections (one batched ``op.T`` call) give the weighted backprojection
  with a relative weight error below ``weight_tol`` (the truncation bound is exact; for
  the default geometry, ``rho <= 1/4``, ``N = 3``).
* Flat cone beam (FDK): the ray cross-section at ``x`` is ``du dv (U / M)^2 cos(alpha)``,
  so pre-weighting by ``cos(alpha)`` yields exactly the FDK weight ``1 / U^2``: one
  ``op.T`` call.

Angular quadrature: each view gets half the angular distance to its neighbours on the circle
of period pi (parallel) or 2 pi (fan, cone; then halved for the double coverage), so any
number of views, non-uniform spacing and full orbits in parallel beam are handled;
redundant views (equal modulo the period) share their weight.

Accuracy is tested in ``tests/test_analytic.py`` (a uniform disc reconstructs to its value,
Shepp-Logan PSNR against a textbook pixel-driven FBP) and measured in
``benchmarks/README.md``. Known limitation: the ray-driven transpose samples z at
detector-row spacing, so with an even row count the two mid-plane slices (where the rows
align with voxel centres for every view) come out slightly too bright in FDK.

Filters are applied in the frequency domain on zero-padded data (length >= 2 n, a power of
two); the ramp is the Fourier transform of the spatial-domain discrete Ram-Lak kernel
(``h[0] = 1/4``, ``h[k odd] = -1 / (pi k)^2``), so its DC term is correct and the
reconstruction has no offset. Windows ``shepp-logan`` (sinc) and ``hann`` multiply it, and
``cutoff`` (a fraction of the Nyquist frequency) zeroes the band above it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from .geometry import (
    ConeBeam3D,
    FanBeam2D,
    Parallel2D,
    Parallel3D,
    ProjectionGeometry,
)
from .transform import RayTransform

__all__ = [
    "FILTERS",
    "fbp",
    "fdk",
    "analytic_reconstruction",
    "ramp_filter",
    "filter_response",
    "angular_weights",
]

FILTERS = ("ram-lak", "shepp-logan", "hann")
_FULL_ORBIT = "fan/cone-beam reconstruction assumes a full orbit (no Parker short-scan weights): "
_ALIASES = {"ramlak": "ram-lak", "ram_lak": "ram-lak", "shepp_logan": "shepp-logan"}


# ---------------------------------------------------------------------------------------
# filtering
# ---------------------------------------------------------------------------------------


def _check_filter(filter: str, cutoff: float) -> tuple[str, float]:
    if not isinstance(filter, str):
        raise TypeError(f"filter must be a string, one of {FILTERS}, got {filter!r}")
    name = _ALIASES.get(filter.lower(), filter.lower())
    if name not in FILTERS:
        raise ValueError(f"unknown filter {filter!r}: choose one of {', '.join(FILTERS)}")
    cutoff = float(cutoff)
    if not (0 < cutoff <= 1):
        raise ValueError(f"cutoff is a fraction of the Nyquist frequency in (0, 1], got {cutoff}")
    return name, cutoff


def _padded_length(n: int) -> int:
    return max(64, 1 << (2 * n - 1).bit_length())


def filter_response(
    n: int,
    *,
    filter: str = "ram-lak",
    cutoff: float = 1.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Real frequency response (``rfft`` layout, length ``P // 2 + 1``) of the windowed ramp
    for ``n`` detector bins of unit spacing, with ``P = _padded_length(n)``.

    The ramp is the DFT of the discrete Ram-Lak kernel, so it equals ``|f|`` closely except
    at DC, where it keeps the small positive value that makes the discrete convolution exact
    for band-limited data.
    """
    name, cutoff = _check_filter(filter, cutoff)
    p = _padded_length(int(n))
    k = np.fft.fftfreq(p, 1.0 / p)  # integer lags 0, 1, ..., -1
    h = np.zeros(p)
    h[k == 0] = 0.25
    odd = (k.astype(np.int64) % 2) == 1
    h[odd] = -1.0 / (np.pi * k[odd]) ** 2
    resp = np.fft.rfft(h).real
    f = np.fft.rfftfreq(p)  # cycles per sample, 0 .. 1/2
    fc = 0.5 * cutoff
    x = f / fc
    if name == "shepp-logan":
        resp = resp * np.sinc(x / 2)  # np.sinc(t) = sin(pi t) / (pi t)
    elif name == "hann":
        resp = resp * 0.5 * (1 + np.cos(np.pi * np.minimum(x, 1.0)))
    resp = np.where(f <= fc + 1e-12, resp, 0.0)
    return torch.as_tensor(resp, dtype=dtype, device=device)


def ramp_filter(
    p: torch.Tensor, *, spacing: float, filter: str = "ram-lak", cutoff: float = 1.0
) -> torch.Tensor:
    """Convolve the last axis of ``p`` with the (windowed) ramp kernel for bin ``spacing``.

    Approximates ``int p(u') h(u - u') du'`` with ``h`` the ramp's impulse response, i.e. the
    result is ``p`` filtered by ``|omega| / (2 pi)`` in physical units (1/length). Zero
    padding to ``>= 2 n`` bins prevents circular wrap-around.
    """
    n = p.shape[-1]
    resp = filter_response(n, filter=filter, cutoff=cutoff, dtype=p.dtype, device=p.device)
    size = 2 * (resp.shape[0] - 1)
    spec = torch.fft.rfft(p, n=size, dim=-1) * resp
    return torch.fft.irfft(spec, n=size, dim=-1)[..., :n] / float(spacing)


# ---------------------------------------------------------------------------------------
# angular quadrature
# ---------------------------------------------------------------------------------------


def angular_weights(
    angles: Any, period: float, *, warn_limited: bool = True, what: str = "", stacklevel: int = 2
) -> np.ndarray:
    """Quadrature weights for views at ``angles`` on a circle of length ``period``.

    Each distinct angle (modulo ``period``) gets half the gap to each neighbour; duplicates
    share their angle's weight. The weights sum to ``period``. When the largest gap exceeds
    three median gaps the data are limited-angle: that gap is not bridged (its end views get
    half a median gap) and a warning (prefixed by ``what``) is issued, since FBP then has
    missing-wedge artefacts.
    """
    a = np.mod(np.asarray(angles, dtype=np.float64).reshape(-1), period)
    n = a.size
    if n == 0:
        raise ValueError("no views: cannot build angular weights")
    order = np.argsort(a, kind="stable")
    s = a[order]
    tol = 1e-9 * period
    # cluster equal angles (including across the wrap point)
    group = np.concatenate([[0], np.cumsum(np.diff(s) > tol)])
    if n > 1 and (s[0] + period - s[-1]) <= tol:
        group[group == group[-1]] = 0
    uniq_ids = np.unique(group)
    reps = np.array([s[group == g][0] for g in uniq_ids])
    counts = np.array([np.sum(group == g) for g in uniq_ids])
    m = reps.size
    if m == 1:
        w_unique = np.array([period])
    else:
        gaps = np.diff(np.concatenate([reps, [reps[0] + period]]))  # gap after each angle
        big = int(np.argmax(gaps))
        med = float(np.median(gaps))
        if gaps[big] > 3 * med:
            if warn_limited:
                cover = period - gaps[big]
                warnings.warn(
                    f"{what}views cover about {cover:.3g} of {period:.3g} rad (largest gap "
                    f"{gaps[big]:.3g} rad): limited-angle data, expect streaks",
                    stacklevel=stacklevel,
                )
            gaps = gaps.copy()
            gaps[big] = med
        w_unique = 0.5 * (gaps + np.roll(gaps, 1))
    w_sorted = (w_unique / counts)[np.searchsorted(uniq_ids, group)]
    w = np.empty(n)
    w[order] = w_sorted
    return w


# ---------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------


def _check_inputs(op: Any, y: torch.Tensor, who: str) -> tuple[ProjectionGeometry, Any]:
    for attr in ("geometry", "volume", "T"):
        if not hasattr(op, attr):
            raise TypeError(
                f"{who}: op must be a RayTransform (with .geometry, .volume and .T), "
                f"got {type(op).__name__}"
            )
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{who}: y must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{who}: y must be float32 or float64, got {y.dtype}")
    expected = tuple(op.geometry.shape)
    k = len(expected)
    if y.ndim < k or tuple(y.shape[-k:]) != expected:
        order = "(angles, det)" if k == 2 else "(det_rows, angles, det_cols)"
        raise ValueError(
            f"{who}: sinogram shape mismatch: expected (..., {', '.join(map(str, expected))}) "
            f"= {order} for {type(op.geometry).__name__}, got {tuple(y.shape)}"
        )
    if y.numel() and not torch.isfinite(y).all():
        raise ValueError(f"{who}: sinogram contains NaN or infinite values")
    return op.geometry, op.volume


def _unsupported(geometry: ProjectionGeometry, who: str, supported: str) -> TypeError:
    return TypeError(
        f"{who}: no analytic reconstruction for {type(geometry).__name__} geometries "
        f"(supported: {supported}); use an iterative method (e.g. CGLS/SIRT) for general "
        f"vector trajectories"
    )


def _det_coords(n: int, spacing: float, offset: float, like: torch.Tensor) -> torch.Tensor:
    j = torch.arange(n, dtype=torch.float64, device=like.device)
    return (j - (n - 1) / 2) * spacing + offset


# ---------------------------------------------------------------------------------------
# FBP
# ---------------------------------------------------------------------------------------


def _fbp_parallel(op: Any, y: torch.Tensor, name: str, cutoff: float) -> torch.Tensor:
    g, vol = op.geometry, op.volume
    if isinstance(g, Parallel2D):
        du = g.det_spacing
        w = angular_weights(g.angles, math.pi, stacklevel=4)
        q = ramp_filter(y, spacing=du, filter=name, cutoff=cutoff)
        q = q * torch.as_tensor(w, dtype=y.dtype, device=y.device)[:, None]
        scale = du / float(np.prod(vol.voxel_size))
    else:  # Parallel3D: row-wise ramp filtering; sinogram (rows, views, cols)
        dh, dw = g.det_spacing
        w = angular_weights(g.angles, math.pi, stacklevel=4)
        q = ramp_filter(y, spacing=dw, filter=name, cutoff=cutoff)
        q = q * torch.as_tensor(w, dtype=y.dtype, device=y.device)[:, None]
        scale = dh * dw / float(np.prod(vol.voxel_size))
    return op.T(q) * scale


_MAX_TERMS = 100


def _inverse_depth_series(
    op: Any, tol: float, like: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray, int]:
    """Separable expansion ``1 / U(x, beta) = sum_k img_k(x) view_k(beta)`` for a fan beam.

    Returns pixel weights ``(2N+1, H, W)`` (dtype/device of ``like``), view weights
    ``(2N+1, n_views)`` and ``N``. ``U = (D - x . s(beta)) / D`` with the source direction
    ``s = (sin beta, -cos beta)``; see the module docstring for the series.
    """
    g, vol = op.geometry, op.volume
    d = g.src_origin
    ys = torch.as_tensor(vol.coords(0), dtype=torch.float64, device=like.device)
    xs = torch.as_tensor(vol.coords(1), dtype=torch.float64, device=like.device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    rho = torch.sqrt(xx**2 + yy**2) / d
    rho_max = float(rho.max())
    if rho_max >= 1:
        raise ValueError(
            f"fbp: the source (src_origin={d:g}) lies inside the reconstruction volume "
            f"(a voxel centre is {rho_max * d:g} from the rotation axis)"
        )
    a_max = (1 - math.sqrt(1 - rho_max**2)) / rho_max if rho_max > 0 else 0.0
    amp = (1 + rho_max) / math.sqrt(1 - rho_max**2)  # (1/U)_max / c0_min bound
    n = 0
    while a_max > 0 and 2 * a_max ** (n + 1) / (1 - a_max) * amp > tol and n < _MAX_TERMS:
        n += 1
    if n == _MAX_TERMS:
        bound = 2 * a_max ** (n + 1) / (1 - a_max) * amp
        warnings.warn(
            f"fbp: the source passes very close to the volume (|x|/D up to {rho_max:.3f}); "
            f"capped at {2 * n + 1} backprojections, distance-weight error up to {bound:.2g}",
            stacklevel=4,
        )
    root = torch.sqrt(1 - rho**2)
    c0 = 1 / root
    # z = a exp(i psi) with rho cos(psi) = -y / D, rho sin(psi) = x / D
    z = torch.complex(-yy, xx) / (d * (1 + root))
    imgs = [c0]
    zn = torch.ones_like(z)
    beta = np.asarray(g.angles, dtype=np.float64)
    views = [np.ones_like(beta)]
    for k in range(1, n + 1):
        zn = zn * z
        imgs += [2 * c0 * zn.real, 2 * c0 * zn.imag]
        views += [np.cos(k * beta), np.sin(k * beta)]
    return torch.stack(imgs).to(like.dtype), np.stack(views), n


def _fbp_fan(op: Any, y: torch.Tensor, name: str, cutoff: float, weight_tol: float) -> torch.Tensor:
    g, vol = op.geometry, op.volume
    sdd = g.src_origin + g.origin_det
    du = g.det_spacing
    u = _det_coords(g.det_count, du, g.det_offset, y)
    cos_g = (sdd / torch.sqrt(sdd**2 + u**2)).to(y.dtype)
    # full orbit: every ray measured twice, hence the 1/2
    w = angular_weights(g.angles, 2 * math.pi, what=_FULL_ORBIT, stacklevel=4) / 2
    q = ramp_filter(y * cos_g, spacing=du, filter=name, cutoff=cutoff) * cos_g
    imgs, views, _ = _inverse_depth_series(op, weight_tol, y)
    vw = torch.as_tensor(views * w[None], dtype=y.dtype, device=y.device)  # (K, V)
    lead = y.shape[:-2]
    qk = q.unsqueeze(0) * vw.reshape(vw.shape[0], *([1] * len(lead)), -1, 1)  # (K, ..., V, n)
    bp = op.T(qk)  # (K, ..., H, W)
    imgs = imgs.reshape(imgs.shape[0], *([1] * len(lead)), *imgs.shape[1:])
    return (bp * imgs).sum(0) * (du / float(np.prod(vol.voxel_size)))


def fbp(
    y: torch.Tensor,
    op: RayTransform,
    *,
    filter: str = "ram-lak",
    cutoff: float = 1.0,
    weight_tol: float = 1e-3,
) -> torch.Tensor:
    """Filtered backprojection for ``Parallel2D``, ``FanBeam2D`` (flat detector, full orbit)
    and ``Parallel3D`` (row by row).

    Args:
        op: a ``RayTransform`` (any backend); backprojection uses ``op.T``.
        y: sinogram ``(..., angles, det)`` (3D parallel: ``(..., rows, angles, cols)``) of
            line integrals; leading dimensions are batch/channels.
        filter: ``"ram-lak"``, ``"shepp-logan"`` or ``"hann"`` window on the ramp.
        cutoff: band limit as a fraction of the detector's Nyquist frequency, in (0, 1].
        weight_tol: fan beam only, relative accuracy of the ``1/U`` distance weight (sets
            the number of Fourier terms, ``2N + 1`` backprojections).

    Returns the image ``(..., *op.volume.shape)`` in attenuation units (1/length), dtype and
    device of ``y``. Parallel: ``f = sum_k w_k (h * p_k)(x . theta_k)``; fan:
    ``f = 1/2 sum_k w_k U^-2 M (h * (cos(gamma) p_k))(u(x))`` (Kak & Slaney, flat detector).
    """
    geom, _ = _check_inputs(op, y, "fbp")
    name, cutoff = _check_filter(filter, cutoff)
    if isinstance(geom, Parallel2D | Parallel3D):
        return _fbp_parallel(op, y, name, cutoff)
    if isinstance(geom, FanBeam2D):
        if not (0 < weight_tol < 1):
            raise ValueError(f"fbp: weight_tol must lie in (0, 1), got {weight_tol}")
        return _fbp_fan(op, y, name, cutoff, float(weight_tol))
    raise _unsupported(geom, "fbp", "Parallel2D, FanBeam2D, Parallel3D; ConeBeam3D via fdk")


# ---------------------------------------------------------------------------------------
# FDK
# ---------------------------------------------------------------------------------------


def fdk(
    y: torch.Tensor, op: RayTransform, *, filter: str = "ram-lak", cutoff: float = 1.0
) -> torch.Tensor:
    """Feldkamp-Davis-Kress reconstruction for ``ConeBeam3D`` (circular full orbit, flat
    detector).

    ``y``: sinogram ``(..., det_rows, angles, det_cols)``. Each projection is weighted by
    ``cos(alpha) = SDD / sqrt(SDD^2 + u^2 + v^2)``, ramp-filtered along the detector rows
    (``filter``/``cutoff`` as in :func:`fbp`), and backprojected with the weight
    ``1 / U^2`` over the full orbit (halved for the double coverage). Exact in the mid-plane
    for band-limited data; away from it FDK's usual cone-beam approximation applies.
    Returns ``(..., D, H, W)`` in attenuation units.
    """
    geom, vol = _check_inputs(op, y, "fdk")
    name, cutoff = _check_filter(filter, cutoff)
    if not isinstance(geom, ConeBeam3D):
        raise _unsupported(geom, "fdk", "ConeBeam3D; 2D and parallel geometries via fbp")
    sdd = geom.src_origin + geom.origin_det
    rows, cols = geom.det_shape
    dh, dw = geom.det_spacing
    u = _det_coords(cols, dw, 0.0, y)
    v = _det_coords(rows, dh, 0.0, y)
    cos_a = (sdd / torch.sqrt(sdd**2 + u[None, :] ** 2 + v[:, None] ** 2)).to(y.dtype)
    cos_a = cos_a[:, None, :]  # (rows, 1, cols) against (rows, views, cols)
    w = angular_weights(geom.angles, 2 * math.pi, what=_FULL_ORBIT, stacklevel=3) / 2
    wt = torch.as_tensor(w, dtype=y.dtype, device=y.device)[:, None]
    q = ramp_filter(y * cos_a, spacing=dw, filter=name, cutoff=cutoff) * cos_a * wt
    # 1/U^2 comes from the transpose's ray density (module docstring); M cancels with the
    # magnification of the filter's change of variables (virtual detector -> real one).
    return op.T(q) * (dh * dw / (geom.magnification * float(np.prod(vol.voxel_size))))


def analytic_reconstruction(y: torch.Tensor, op: RayTransform, **kw: Any) -> torch.Tensor:
    """FBP or FDK, chosen by the geometry: ``Parallel2D``, ``FanBeam2D`` and ``Parallel3D``
    use :func:`fbp`, ``ConeBeam3D`` :func:`fdk`. Keyword arguments are passed on.
    Vector geometries (``ParallelVec3D``, ``ConeVec3D``) have no analytic formula here and
    raise ``TypeError`` naming the geometry."""
    geom = getattr(op, "geometry", None)
    if isinstance(geom, ConeBeam3D):
        return fdk(y, op, **kw)
    if isinstance(geom, Parallel2D | FanBeam2D | Parallel3D):
        return fbp(y, op, **kw)
    if geom is None:
        raise TypeError(
            f"analytic_reconstruction: op must be a RayTransform with a .geometry, "
            f"got {type(op).__name__}"
        )
    raise _unsupported(
        geom, "analytic_reconstruction", "Parallel2D, FanBeam2D, Parallel3D, ConeBeam3D"
    )
