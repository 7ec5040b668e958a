"""ODL 1.0 adapters: run any linear ODL operator as a backend, convert ray transforms both ways.

ODL is an optional extra (``pip install dip-uq[odl]``) and is imported lazily.

Conventions. An ODL 2D space indexes its arrays ``(x, y)`` (ours: ``(y, x)``); a 3D space
``(x, y, z)`` (ours: ``(z, y, x)``). World coordinates mean the same in both. ODL's 2D
geometries at angle ``phi`` put the detector's reference point at ``R(phi) (0, 1)``, its axis
along ``(cos phi, sin phi)`` and a fan source at ``src_radius (sin phi, -cos phi)``: our (ASTRA's)
formulas with ``t = phi`` (parallel rays differ only in direction sign, which does not change
line integrals). ``geometry_from_odl`` builds the candidate geometry from that rule and then
*verifies* per view that every detector pixel and ray agree, raising ``GeometryError`` when
they do not (e.g. shifted or tilted detectors).

ODL adjoints are meant for ODL's weighted inner products (``<u, v> = cell_volume * sum(u v)``),
and which weights a given ODL backend applies differs (ODL 1.0's ``astra_cpu`` adjoint is the
plain transpose although its range is weighted). ``OdlBackend`` therefore calibrates the one
constant ``c`` with ``A^T = c * op.adjoint`` from a seeded random pair ``(x, y)``:
``c = <A x, y> / <x, op.adjoint y>``. The dot test on fresh pairs then checks that the adjoint
really is a scaled transpose.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import BackendUnavailable, GeometryError
from ..geometry import FanBeam2D, Parallel2D, ProjectionGeometry, VolumeGeometry

__all__ = [
    "OdlBackend",
    "from_odl",
    "geometry_from_odl",
    "to_odl",
    "odl_ray_transform",
    "import_odl",
]

_MISSING = "ODL is not installed: pip install dip-uq[odl]"


def import_odl() -> tuple[Any, Any]:
    """``(odl, odl.applications.tomo)``, or ``BackendUnavailable`` when ODL is missing."""
    try:
        import odl
        import odl.applications.tomo as tomo
    except ImportError as exc:
        raise BackendUnavailable(_MISSING) from exc
    return odl, tomo


def _space_perm(ndim: int) -> tuple[int, ...]:
    """Axis permutation between our array order and ODL's (it is its own inverse)."""
    return tuple(range(ndim))[::-1]


class OdlBackend:
    """A linear ODL operator as a backend: ``forward = op(x)``, ``adjoint = op.adjoint(y)``.

    Args:
        op: a linear ``odl.Operator`` between discretised spaces.
        volume, geometry: our description of its domain/range when it is a ray transform
            (then arrays are transposed between our order and ODL's); ``None`` for a generic
            operator, whose arrays are used in ODL's own order.
        matched: whether ``op.adjoint`` is the exact transpose; ``None`` infers it (ODL ray
            transforms with ``impl="astra_cpu"`` are matched; anything else is not assumed).

    Batches are looped in Python (ODL has no batch dimension); computation runs in the
    operator's dtype on CPU and results are cast back to the input dtype.
    """

    name = "odl"

    def __init__(
        self,
        op: Any,
        *,
        volume: VolumeGeometry | None = None,
        geometry: ProjectionGeometry | None = None,
        matched: bool | None = None,
    ) -> None:
        import_odl()
        if not getattr(op, "is_linear", False):
            raise TypeError(f"OdlBackend needs a linear ODL operator, got {op!r}")
        self.op = op
        self.volume = volume
        self.geometry = geometry
        self._perm = volume is not None
        if volume is not None and volume.ndim != 2:
            raise GeometryError(
                "OdlBackend maps 2D ray transforms (3D sinogram axes differ: ODL uses "
                f"(angles, u, v)); got a {volume.ndim}D volume"
            )
        dom_shape = tuple(op.domain.shape)
        ran_shape = tuple(op.range.shape)
        if volume is not None and tuple(volume.shape)[::-1] != dom_shape:
            raise GeometryError(
                f"volume {volume.shape} does not match the ODL domain {dom_shape} "
                "(ODL order is (x, y[, z]))"
            )
        if geometry is not None and tuple(geometry.shape) != ran_shape:
            raise GeometryError(
                f"geometry sinogram shape mismatch: expected {ran_shape} (ODL range), "
                f"got {tuple(geometry.shape)}"
            )
        self.domain_shape = tuple(volume.shape) if volume is not None else dom_shape
        self.range_shape = tuple(geometry.shape) if geometry is not None else ran_shape
        if matched is None:
            matched = getattr(op, "impl", None) == "astra_cpu"
        self.matched = bool(matched)
        self._adjoint = op.adjoint
        self._adj_scale = 1.0
        self._adj_scale = self._calibrate()

    def _calibrate(self) -> float:
        """``c`` with ``A^T = c * op.adjoint`` (module docstring), from one seeded pair."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn((1, *self.domain_shape), generator=g, dtype=torch.float64)
        y = torch.randn((1, *self.range_shape), generator=g, dtype=torch.float64)
        lhs = float((self.forward(x) * y).sum())
        rhs = float((x * self.adjoint(y)).sum())
        if rhs == 0.0 or not np.isfinite(lhs / rhs):
            raise ValueError("cannot calibrate the ODL adjoint: <x, op.adjoint(y)> is zero")
        return lhs / rhs

    def check_tensor(self, t: torch.Tensor) -> None:
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"odl backend supports float32 and float64 tensors, got {t.dtype}")
        if t.device.type != "cpu":
            raise BackendUnavailable(f"odl backend needs CPU tensors, got a tensor on {t.device}")

    def _loop(self, fn: Any, space: Any, t: torch.Tensor, perm_in: bool, scale: float):
        self.check_tensor(t)
        arr = t.detach().numpy()
        outs = []
        for k in range(arr.shape[0]):
            a = arr[k].transpose(_space_perm(arr.ndim - 1)) if perm_in else arr[k]
            a = np.ascontiguousarray(a, dtype=space.dtype)
            res = np.asarray(fn(space.element(a)).asarray(), dtype=np.float64)
            outs.append(res)
        out = np.stack(outs) * scale
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, *domain_shape) -> (N, *range_shape)``."""
        out = self._loop(self.op, self.op.domain, x, self._perm, 1.0)
        return torch.from_numpy(np.ascontiguousarray(out)).to(x.dtype)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, *range_shape) -> (N, *domain_shape)``: the Euclidean transpose."""
        out = self._loop(self._adjoint, self.op.range, y, False, self._adj_scale)
        if self._perm:
            out = out.transpose(0, *(1 + p for p in _space_perm(out.ndim - 1)))
        return torch.from_numpy(np.ascontiguousarray(out)).to(y.dtype)


def _volume_from_space(space: Any) -> VolumeGeometry:
    lo = np.asarray(space.min_pt, dtype=np.float64)[::-1]
    hi = np.asarray(space.max_pt, dtype=np.float64)[::-1]
    shape = tuple(int(s) for s in space.shape)[::-1]
    return VolumeGeometry(
        shape=shape,
        voxel_size=tuple((hi - lo) / np.asarray(shape)),
        center=tuple((hi + lo) / 2),
    )


def _odl_pixels(geom: Any) -> tuple[np.ndarray, np.ndarray]:
    """ODL's detector pixel centres ``(views, cols, 2)`` and sources or ray directions."""
    params = np.asarray(geom.det_partition.meshgrid[0]).reshape(-1)
    pix, src = [], []
    for a in np.asarray(geom.angles):
        ref = np.asarray(geom.det_refpoint(a))
        axis = np.asarray(geom.det_axis(a))
        pix.append(ref[None] + params[:, None] * axis[None])
        if hasattr(geom, "src_position"):
            src.append(np.asarray(geom.src_position(a)))
        else:
            src.append(-np.asarray(geom.det_to_src(a, 0.0)))
    return np.stack(pix), np.stack(src)


def geometry_from_odl(odl_geometry: Any, odl_space: Any) -> tuple[VolumeGeometry, Any]:
    """Our ``(VolumeGeometry, ProjectionGeometry)`` for an ODL 2D parallel or flat fan
    geometry and a 2D ``uniform_discr`` space (see the module docstring for the rules).

    Raises ``GeometryError`` when the ODL geometry is not representable (3D, curved or
    shifted detectors, ...), after checking every pixel and ray numerically.
    """
    _, tomo = import_odl()
    volume = _volume_from_space(odl_space)
    g = odl_geometry
    if g.ndim != 2 or volume.ndim != 2:
        raise GeometryError(
            f"geometry_from_odl supports 2D parallel and fan-beam geometries, got {type(g).__name__}"
        )
    dpart = g.det_partition
    if not dpart.is_uniform:
        raise GeometryError("the ODL detector partition is not uniform")
    count = int(dpart.shape[0])
    spacing = float(dpart.cell_sides[0])
    offset = float(dpart.mid_pt[0])
    angles = tuple(float(a) for a in np.asarray(g.angles))
    if isinstance(g, tomo.Parallel2dGeometry):
        ours: Any = Parallel2D(
            angles=angles, det_count=count, det_spacing=spacing, det_offset=offset
        )
    elif isinstance(g, tomo.FanBeamGeometry):
        if getattr(g, "det_curvature_radius", None) is not None:
            raise GeometryError("curved fan-beam detectors are not supported")
        ours = FanBeam2D(
            angles=angles,
            det_count=count,
            det_spacing=spacing,
            det_offset=offset,
            src_origin=float(g.src_radius),
            origin_det=float(g.det_radius),
        )
    else:
        raise GeometryError(f"unsupported ODL geometry {type(g).__name__}")
    _verify(ours, g)
    return volume, ours


def _verify(ours: ProjectionGeometry, odl_geom: Any, tol: float = 1e-6) -> None:
    """Every pixel centre on the same ray in both descriptions (else ``GeometryError``)."""
    pix_odl, src_odl = _odl_pixels(odl_geom)
    pix = ours.detector_pixels()[:, 0, :, :2]
    src = ours.sources()[:, :2]
    scale = max(1.0, float(np.abs(pix_odl).max()))
    if ours.is_cone:
        bad = np.abs(pix - pix_odl).max() > tol * scale or np.abs(src - src_odl).max() > tol * (
            scale + float(np.abs(src_odl).max())
        )
    else:
        # Same pixel up to a shift along the ray; ray directions parallel (either sign).
        diff = pix - pix_odl
        cross = diff[..., 0] * src[:, None, 1] - diff[..., 1] * src[:, None, 0]
        dirs = src[:, 0] * src_odl[:, 1] - src[:, 1] * src_odl[:, 0]
        bad = np.abs(cross).max() > tol * scale or np.abs(dirs).max() > tol
    if bad:
        raise GeometryError(
            f"the ODL geometry {type(odl_geom).__name__} has no exact equivalent here "
            "(shifted, rotated or flipped detector?)"
        )


def from_odl(odl_operator: Any, *, matched: bool | None = None):
    """A ``RayTransform`` running an ODL 2D ray transform (``odl.applications.tomo``), with
    our array orders (images ``(y, x)``) and a Euclidean adjoint."""
    from ..transform import RayTransform

    _, tomo = import_odl()
    if not isinstance(odl_operator, tomo.RayTransform):
        raise TypeError(
            f"from_odl needs an odl.applications.tomo.RayTransform, got {type(odl_operator)}; "
            "wrap other linear operators with OdlBackend directly"
        )
    volume, geometry = geometry_from_odl(odl_operator.geometry, odl_operator.domain)
    _refuse_shifted_parallel(geometry, getattr(odl_operator, "impl", None))
    backend = OdlBackend(odl_operator, volume=volume, geometry=geometry, matched=matched)
    return RayTransform(volume, geometry, backend=backend)


def to_odl(op: Any, *, impl: str = "astra_cpu", dtype: str = "float32") -> Any:
    """The ODL ray transform for a 2D ``RayTransform`` (``Parallel2D`` or ``FanBeam2D``);
    see ``odl_ray_transform``."""
    return odl_ray_transform(op.volume, op.geometry, impl=impl, dtype=dtype)


def odl_ray_transform(
    vol: VolumeGeometry,
    geom: ProjectionGeometry,
    *,
    impl: str = "astra_cpu",
    dtype: str = "float32",
) -> Any:
    """``odl.applications.tomo.RayTransform`` for our 2D volume and geometry.

    The ODL space is ``uniform_discr`` over the same box (axes ``(x, y)``); the angles become
    an ODL angle partition whose midpoints are our angles; the detector keeps count, spacing
    and offset. The result is checked pixel by pixel like ``geometry_from_odl``. ODL's
    ``astra_cpu`` implementation needs ``dtype="float32"``.
    """
    odl, tomo = import_odl()
    if impl == "astra_cpu" and vol.ndim == 2 and not np.isclose(*vol.voxel_size, rtol=1e-9):
        raise BackendUnavailable(
            f"ODL's astra_cpu needs square pixels, got voxel_size={vol.voxel_size} (y, x)"
        )
    if vol.ndim != 2 or not isinstance(geom, Parallel2D | FanBeam2D):
        raise GeometryError(
            f"to_odl supports 2D Parallel2D/FanBeam2D transforms, got {type(geom).__name__}"
        )
    lo, hi = vol.min_pt[::-1], vol.max_pt[::-1]
    space = odl.uniform_discr(list(lo), list(hi), tuple(vol.shape)[::-1], dtype=dtype)
    angles = np.asarray(geom.angles, dtype=np.float64)
    apart = _angle_partition(odl, angles)
    half = geom.det_count * geom.det_spacing / 2
    dpart = odl.uniform_partition(geom.det_offset - half, geom.det_offset + half, geom.det_count)
    if isinstance(geom, Parallel2D):
        g = tomo.Parallel2dGeometry(apart, dpart)
    else:
        g = tomo.FanBeamGeometry(apart, dpart, geom.src_origin, geom.origin_det)
    _verify(geom, g)
    _refuse_shifted_parallel(geom, impl)
    return tomo.RayTransform(space, g, impl=impl)


def _refuse_shifted_parallel(geom: ProjectionGeometry, impl: str | None) -> None:
    """ODL 1.0's ``astra_cpu`` path for ``Parallel2dGeometry`` builds a plain ASTRA ``parallel``
    geometry and drops the detector shift (a 0.3-bin offset projects 0.3 bins off), so such
    operators would silently disagree with their own geometry."""
    if impl == "astra_cpu" and isinstance(geom, Parallel2D) and geom.det_offset != 0:
        raise GeometryError(
            f"ODL's astra_cpu parallel-beam projector ignores detector offsets "
            f"(det_offset={geom.det_offset:g}); use backend='astra_cpu' or 'torch' directly, or "
            "a centred detector"
        )


def _angle_partition(odl: Any, angles: np.ndarray) -> Any:
    """A uniform ODL partition whose cell midpoints are exactly our angles (uniform angles
    keep ODL's range weighting constant); otherwise a non-uniform one."""
    n = len(angles)
    step = (angles[-1] - angles[0]) / (n - 1) if n > 1 else 2 * math.pi
    if n == 1 or np.allclose(np.diff(angles), step, rtol=0, atol=1e-12):
        lo = angles[0] - step / 2
        return odl.uniform_partition(lo, lo + n * step, n)
    return odl.nonuniform_partition(angles)
