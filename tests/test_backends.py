"""Backends one by one: bad input, guards, and the CUDA/tomosipo wiring with native kernels
replaced by a CPU emulator (no CUDA call can happen in this process)."""

from __future__ import annotations

import sys
import threading
import types

import astra
import numpy as np
import pytest
import torch

from operators import (
    BackendUnavailable,
    ConeBeam3D,
    ConeVec3D,
    FanBeam2D,
    GeometryError,
    Parallel2D,
    Parallel3D,
    ParallelVec3D,
    RayTransform,
    VolumeGeometry,
    uniform_angles,
)
from operators.backends import astra as astra_backend
from operators.backends import make_backend
from operators.backends import matrix as matrix_backend
from operators.backends.astra import AstraCPU, AstraCUDA
from operators.backends.matrix import MatrixBackend
from operators.backends.torch_joseph import TorchJoseph
from operators.testing import relative_error

VOL2 = VolumeGeometry(shape=(12, 10), voxel_size=0.9, center=(0.5, -0.3))
PAR2 = Parallel2D(angles=uniform_angles(7), det_count=17, det_offset=0.3)
FAN2 = FanBeam2D.default(VOL2, n_angles=7)
VOL3 = VolumeGeometry(shape=(6, 7, 8))
CONE3 = ConeBeam3D.default(VOL3, n_angles=5)
PAR3 = Parallel3D.default(VOL3, n_angles=5)

CPU_BACKENDS = [("torch", {}), ("astra_cpu", {}), ("matrix", {}), ("odl", {})]


def _op(name: str, options: dict) -> RayTransform:
    geom = PAR2
    if name == "odl":
        pytest.importorskip("odl")
        geom = Parallel2D(angles=PAR2.angles, det_count=PAR2.det_count)  # see the ODL tests
    return RayTransform(VOL2, geom, backend=name, **options)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name, options", CPU_BACKENDS, ids=[n for n, _ in CPU_BACKENDS])
def test_bad_tensors_get_clear_errors(name, options):
    op = _op(name, options)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 12, 10\), got \(5, 5\)"):
        op(torch.zeros(5, 5))
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 7, 17\), got \(2, 17, 7\)"):
        op.T(torch.zeros(2, 17, 7))
    bad = torch.zeros(VOL2.shape)
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        op(bad)
    with pytest.raises(ValueError, match="NaN or infinite"):
        op.T(torch.full(PAR2.shape, float("inf")))
    with pytest.raises(TypeError, match="floating-point.*int64"):
        op(torch.zeros(VOL2.shape, dtype=torch.int64))
    with pytest.raises(TypeError, match="float16"):
        op(torch.zeros(VOL2.shape, dtype=torch.float16))
    with pytest.raises(TypeError, match="torch.Tensor"):
        op(np.zeros(VOL2.shape))


def test_geometry_volume_mismatch_and_empty_angles():
    with pytest.raises(GeometryError, match="2D Parallel2D cannot project a 3D volume"):
        RayTransform(VOL3, PAR2)
    with pytest.raises(GeometryError, match="mismatch"):
        MatrixBackend.build(VOL3, PAR2)
    with pytest.raises(BackendUnavailable, match="2D problems only"):
        AstraCPU(VOL3, PAR3)
    with pytest.raises(GeometryError, match="angle list is empty"):
        Parallel2D(angles=[], det_count=5)
    with pytest.raises(GeometryError, match="angle list is empty"):
        FanBeam2D(angles=(), det_count=5, src_origin=10, origin_det=5)


def test_unknown_backend_names_list_the_choices():
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'astar'.*'astra_cpu'"):
        RayTransform(VOL2, PAR2, backend="astar")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        make_backend("gpu", VOL2, PAR2)


def test_astra_cpu_refuses_devices_kernels_and_closed_projectors():
    be = AstraCPU(VOL2, PAR2)
    with pytest.raises(BackendUnavailable, match="needs CPU tensors, got a tensor on meta"):
        be.check_tensor(torch.empty(3, device="meta"))
    with pytest.raises(BackendUnavailable, match=r"'strip' does not support FanBeam2D"):
        AstraCPU(VOL2, FAN2, projector="strip")
    with pytest.raises(BackendUnavailable, match="does not support Parallel2D"):
        AstraCPU(VOL2, PAR2, projector="cuda")
    with pytest.raises(BackendUnavailable, match=r"square pixels, got voxel_size=\(0.7, 1.2\)"):
        AstraCPU(VolumeGeometry(shape=(4, 5), voxel_size=(0.7, 1.2)), PAR2)
    be.close()
    be.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        be.forward(torch.zeros(1, *VOL2.shape))
    with pytest.raises(TypeError, match="cannot be pickled"):
        be.__getstate__()


def test_astra_cpu_is_safe_from_threads():
    """Concurrent calls are serialised (ASTRA is not thread-safe): results equal serial ones."""
    op = RayTransform(VOL2, FAN2, backend="astra_cpu")
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(3, *VOL2.shape, generator=g) for _ in range(6)]
    serial = [op(x) for x in xs]
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = op(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ref in enumerate(serial):
        assert torch.equal(results[i], ref)


def test_astra_cpu_frees_its_projector(monkeypatch):
    freed = []
    be = AstraCPU(VOL2, PAR2)
    real = be._delete
    be._delete = lambda pid: (freed.append(pid), real(pid))
    pid = be._pid
    del be
    assert freed == [pid]


# ------------------------------------------------------------------------- matrix backend
def test_matrix_refusals_and_dense_access(monkeypatch):
    with pytest.raises(ValueError, match="refusing to probe a 336-voxel volume"):
        MatrixBackend.build(VOL3, CONE3, source="probe", max_voxels=100)
    with pytest.raises(ValueError, match=r"about 2\.86e\+03 non-zeros.*max_nnz=1000"):
        MatrixBackend.build(VOL2, PAR2, max_nnz=1000)
    assert MatrixBackend.build(VOL2, PAR2).nnz <= MatrixBackend.estimate_nnz(VOL2, PAR2)
    assert MatrixBackend.build(VOL3, CONE3).nnz <= MatrixBackend.estimate_nnz(VOL3, CONE3)
    with pytest.raises(ValueError, match="unknown matrix source 'svd'"):
        MatrixBackend.build(VOL2, PAR2, source="svd")
    with pytest.raises(TypeError, match="float32 or float64"):
        MatrixBackend.build(VOL2, PAR2, dtype=torch.float16)
    be = MatrixBackend.build(VOL2, PAR2)
    dense = be.to_dense()
    assert dense.shape == (7 * 17, 120) and dense.dtype == torch.float64
    x = torch.rand(2, *VOL2.shape, dtype=torch.float64)
    assert torch.allclose(be.forward(x).reshape(2, -1), x.reshape(2, -1) @ dense.T)
    y = torch.rand(2, *PAR2.shape, dtype=torch.float64)
    assert torch.allclose(be.adjoint(y).reshape(2, -1), y.reshape(2, -1) @ dense)
    monkeypatch.setattr(matrix_backend, "_DENSE_LIMIT", 100)
    with pytest.raises(ValueError, match="to_dense refused"):
        be.to_dense()
    with pytest.raises(ValueError, match=r"expected \(119, 120\)"):
        MatrixBackend(VOL2, PAR2, be.matrix.to_dense()[:5].to_sparse_csr())
    with pytest.raises(TypeError, match="sparse CSR"):
        MatrixBackend(VOL2, PAR2, dense)


def test_matrix_from_astra_equals_astra_cpu_and_float32_option():
    m = MatrixBackend.build(VOL2, FAN2, source="astra", dtype=torch.float32)
    assert m.matrix.dtype == torch.float32 and "line_fanflat" in repr(m)
    ref = AstraCPU(VOL2, FAN2)
    x = torch.rand(2, *VOL2.shape)
    assert relative_error(m.forward(x), ref.forward(x)) < 1e-6


# ------------------------------------------------------------- ASTRA CUDA wiring (stubbed)
class _VecGeom2D:
    """Minimal 2D vector geometry for the emulator (our library has no 2D vec class)."""

    ndim = 2

    def __init__(self, vectors: np.ndarray, count: int, cone: bool) -> None:
        self.vectors, self.det_shape, self.is_cone = vectors, (count,), cone

    def to_vec(self) -> np.ndarray:
        return self.vectors

    @property
    def n_views(self) -> int:
        return len(self.vectors)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_views, self.det_shape[0])


def _emulate(proj_geom: dict, vol_geom: dict) -> tuple[TorchJoseph, tuple, tuple]:
    """A CPU projector that reads ASTRA's dictionaries the way ASTRA defines them: 2D volume
    row 0 at maximum y; 3D volumes (z, y, x) increasing; vec rows in world coordinates."""
    o = vol_geom["option"]
    vec = np.asarray(proj_geom["Vectors"], dtype=np.float64)
    cone = proj_geom["type"] in ("fanflat_vec", "cone_vec")
    if "GridSliceCount" not in vol_geom:
        rows, cols = vol_geom["GridRowCount"], vol_geom["GridColCount"]
        h, w = o["WindowMaxY"] - o["WindowMinY"], o["WindowMaxX"] - o["WindowMinX"]
        # Our y is ASTRA's -y, so ASTRA's top row is our first row.
        vol = VolumeGeometry(
            shape=(rows, cols),
            voxel_size=(h / rows, w / cols),
            center=(
                -(o["WindowMinY"] + o["WindowMaxY"]) / 2,
                (o["WindowMinX"] + o["WindowMaxX"]) / 2,
            ),
        )
        vec = vec.copy()
        vec[:, 1::2] *= -1
        geom = _VecGeom2D(vec, proj_geom["DetectorCount"], cone)
    else:
        shape = (vol_geom["GridSliceCount"], vol_geom["GridRowCount"], vol_geom["GridColCount"])
        lo = [o[f"WindowMin{a}"] for a in "ZYX"]
        hi = [o[f"WindowMax{a}"] for a in "ZYX"]
        vol = VolumeGeometry(
            shape=shape,
            voxel_size=tuple((b - a) / n for a, b, n in zip(lo, hi, shape)),
            center=tuple((a + b) / 2 for a, b in zip(lo, hi)),
        )
        cls = ConeVec3D if cone else ParallelVec3D
        geom = cls(
            vectors=vec, det_shape=(proj_geom["DetectorRowCount"], proj_geom["DetectorColCount"])
        )
    return TorchJoseph(vol, geom, gather_adjoint=False), tuple(vol.shape), tuple(geom.shape)


class FakeAstra:
    """Stands in for the ``astra`` module: records calls, projects with the emulator."""

    def __init__(self) -> None:
        self.created: list[tuple] = []
        self.deleted: list[tuple] = []
        self.calls: list[str] = []
        self.emus: dict[int, tuple] = {}
        self.create_proj_geom = astra.create_proj_geom
        self.projector = types.SimpleNamespace(delete=lambda pid: self.deleted.append(("2d", pid)))
        self.projector3d = types.SimpleNamespace(
            delete=lambda pid: self.deleted.append(("3d", pid))
        )
        self.experimental = types.SimpleNamespace(
            direct_FP2D=self._fp("FP2D"),
            direct_BP2D=self._bp("BP2D"),
            direct_FP3D=self._fp("FP3D"),
            direct_BP3D=self._bp("BP3D"),
        )

    def create_projector(self, kind: str, proj_geom: dict, vol_geom: dict) -> int:
        pid = 100 + len(self.created)
        self.created.append((kind, proj_geom, vol_geom))
        self.emus[pid] = _emulate(proj_geom, vol_geom)
        return pid

    @staticmethod
    def _check(t: torch.Tensor, shape: tuple) -> None:
        assert t.dtype == torch.float32 and t.is_contiguous() and tuple(t.shape) == shape

    def _fp(self, name):
        def fp(pid, vol, proj):  # ASTRA's argument order: (projector, volume, projections)
            emu, vshape, sshape = self.emus[pid]
            self._check(vol, vshape)
            self._check(proj, sshape)
            self.calls.append(name)
            proj.copy_(emu.forward(vol[None].double())[0])

        return fp

    def _bp(self, name):
        def bp(pid, vol, proj):  # (projector, volume out, projections in)
            emu, vshape, sshape = self.emus[pid]
            self._check(vol, vshape)
            self._check(proj, sshape)
            self.calls.append(name)
            vol.copy_(emu.adjoint(proj[None].double())[0])

        return bp


@pytest.fixture
def fake_astra(monkeypatch):
    fake = FakeAstra()
    monkeypatch.setattr(astra_backend, "_import_astra", lambda: fake)
    monkeypatch.setattr(astra_backend, "astra_cuda_available", lambda: True)
    return fake


@pytest.mark.parametrize(
    "vol, geom, kind",
    [(VOL2, PAR2, "cuda"), (VOL2, FAN2, "cuda"), (VOL3, CONE3, "cuda3d"), (VOL3, PAR3, "cuda3d")],
    ids=["par2", "fan2", "cone3", "par3"],
)
def test_astra_cuda_wiring_with_stubbed_kernels(fake_astra, monkeypatch, vol, geom, kind):
    be = AstraCUDA(vol, geom)
    assert fake_astra.created[0][0] == kind and not be.matched
    # The real check refuses CPU tensors (tested below); let the emulator run on the CPU.
    with pytest.raises(BackendUnavailable, match="tensor is on cpu, astra_cuda needs a CUDA"):
        be.forward(torch.zeros(1, *vol.shape))
    monkeypatch.setattr(AstraCUDA, "check_tensor", lambda self, t: None)
    ref = TorchJoseph(vol, geom)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *vol.shape, generator=g, dtype=torch.float64)
    y = torch.rand(2, *geom.shape, generator=g, dtype=torch.float64)
    fx, by = be.forward(x), be.adjoint(y)
    assert fx.dtype == torch.float64 and fx.shape == (2, *geom.shape)
    assert relative_error(fx, ref.forward(x)) < 1e-6
    assert relative_error(by, ref.adjoint(y)) < 1e-6
    d = "2D" if vol.ndim == 2 else "3D"
    assert fake_astra.calls == [f"FP{d}"] * 2 + [f"BP{d}"] * 2
    be.close()
    assert fake_astra.deleted == [("2d" if vol.ndim == 2 else "3d", 100)]


def test_astra_is_pointed_at_the_tensors_gpu_once(monkeypatch):
    picked = []
    fake = types.SimpleNamespace(set_gpu_index=picked.append)
    monkeypatch.setattr(astra_backend, "_GPU_INDEX", [None])
    for dev in ("cuda:1", "cuda:1", "cpu", "cuda:0", "cuda:1"):
        astra_backend._select_gpu(fake, torch.device(dev))
    assert picked == [1, 0, 1]


def test_astra_cuda_guard_runs_before_any_native_call(monkeypatch):
    fake = FakeAstra()
    fake.create_projector = lambda *a: pytest.fail("native call without CUDA")
    monkeypatch.setattr(astra_backend, "_import_astra", lambda: fake)
    monkeypatch.setattr(astra_backend, "astra_cuda_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="built without CUDA or no GPU is visible"):
        AstraCUDA(VOL3, CONE3)
    with pytest.raises(BackendUnavailable, match="built without CUDA"):
        RayTransform(VOL2, PAR2, backend="astra_cuda")


def test_cpu_work_resolves_astra_to_cpu_and_auto_to_torch():
    # "astra" resolves to the CPU projector for CPU work, "auto" to torch.
    assert RayTransform(VOL2, PAR2, backend="astra").backend.name == "astra_cpu"
    assert RayTransform(VOL3, CONE3).backend.name == "torch"
    with pytest.raises(BackendUnavailable, match="2D problems only"):
        RayTransform(VOL3, CONE3, backend="astra")


# ------------------------------------------------------------------------ tomosipo guards
def test_tomosipo_missing_gives_install_advice(monkeypatch):
    monkeypatch.setitem(sys.modules, "tomosipo", None)
    with pytest.raises(BackendUnavailable, match="not on PyPI"):
        RayTransform(VOL3, CONE3, backend="tomosipo")


def test_tomosipo_without_cuda_and_wiring_with_a_fake_module(monkeypatch):
    calls = []
    fake_ts = types.ModuleType("tomosipo")
    fake_ts.from_astra = lambda d: ("geom", d["type"] if "type" in d else "vol")

    class _Op:
        def __init__(self, vg, pg):
            calls.append(("operator", vg, pg))
            self.T = lambda t: (calls.append(("bp", t.dtype)), torch.ones(VOL3.shape))[1]

        def __call__(self, t):
            calls.append(("fp", t.dtype, t.is_contiguous()))
            return torch.ones(CONE3.shape)

    fake_ts.operator = _Op
    monkeypatch.setitem(sys.modules, "tomosipo", fake_ts)
    monkeypatch.setitem(sys.modules, "tomosipo.torch_support", types.ModuleType("ts_torch"))
    monkeypatch.setattr(astra_backend, "astra_cuda_available", lambda: False)
    from operators.backends import tomosipo as ts_backend

    monkeypatch.setattr(ts_backend, "astra_cuda_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="tomosipo needs ASTRA with CUDA"):
        ts_backend.TomosipoBackend(VOL3, CONE3)
    monkeypatch.setattr(ts_backend, "astra_cuda_available", lambda: True)
    with pytest.raises(BackendUnavailable, match="3D only"):
        ts_backend.TomosipoBackend(VOL2, PAR2)
    be = ts_backend.TomosipoBackend(VOL3, CONE3)
    assert calls[0] == ("operator", ("geom", "vol"), ("geom", "cone_vec"))
    with pytest.raises(BackendUnavailable, match="tomosipo needs a CUDA tensor"):
        be.forward(torch.zeros(1, *VOL3.shape))
    monkeypatch.setattr(ts_backend.TomosipoBackend, "check_tensor", lambda self, t: None)
    out = be.forward(torch.zeros(3, *VOL3.shape, dtype=torch.float64))
    assert out.shape == (3, *CONE3.shape) and out.dtype == torch.float64
    assert calls[1:4] == [("fp", torch.float32, True)] * 3
    assert be.adjoint(torch.zeros(2, *CONE3.shape)).shape == (2, *VOL3.shape)


# ----------------------------------------------------------------------------- ODL guards
def test_odl_missing_gives_install_advice(monkeypatch):
    monkeypatch.setitem(sys.modules, "odl", None)
    with pytest.raises(
        BackendUnavailable, match=r"ODL is not installed: pip install dip-uq\[odl\]"
    ):
        RayTransform(VOL2, PAR2, backend="odl")
    from operators.backends.odl import from_odl

    with pytest.raises(BackendUnavailable, match="ODL is not installed"):
        from_odl(object())


def test_odl_geometry_round_trip_and_refusals():
    odl = pytest.importorskip("odl")
    import odl.applications.tomo as tomo

    from operators.backends.odl import OdlBackend, from_odl, geometry_from_odl, to_odl

    centred = Parallel2D(angles=PAR2.angles, det_count=PAR2.det_count)
    for geom in (centred, FAN2):
        op = RayTransform(VOL2, geom, backend="torch")
        odl_op = to_odl(op)
        vol, back = geometry_from_odl(odl_op.geometry, odl_op.domain)
        assert type(back) is type(geom) and back.angles == pytest.approx(geom.angles)
        assert np.allclose(back.to_vec(), geom.to_vec(), atol=1e-12)
        assert np.allclose(vol.min_pt, VOL2.min_pt) and vol.shape == VOL2.shape
        wrapped = from_odl(odl_op)
        x = torch.rand(VOL2.shape, dtype=torch.float64)
        assert relative_error(wrapped(x), RayTransform(VOL2, geom, backend="astra_cpu")(x)) < 1e-5
    # ODL's astra_cpu drops parallel detector shifts: the geometry converts, the operator is
    # refused (it would disagree with its own geometry by the shift).
    with pytest.raises(GeometryError, match="ignores detector offsets"):
        to_odl(RayTransform(VOL2, PAR2))
    with pytest.raises(GeometryError, match="ignores detector offsets"):
        RayTransform(VOL2, PAR2, backend="odl")
    with pytest.raises(BackendUnavailable, match="square pixels"):
        RayTransform(VolumeGeometry(shape=(4, 5), voxel_size=(0.7, 1.2)), centred, backend="odl")
    space = odl.uniform_discr([-1, -1], [1, 1], (4, 4), dtype="float32")
    apart = odl.uniform_partition(0, np.pi, 3)
    shifted = tomo.Parallel2dGeometry(apart, odl.uniform_partition(-2.2, 1.8, 5))
    _, ours = geometry_from_odl(shifted, space)
    assert ours.det_offset == pytest.approx(-0.2) and ours.det_spacing == pytest.approx(0.8)
    with pytest.raises(GeometryError, match="ignores detector offsets"):
        from_odl(tomo.RayTransform(space, shifted, impl="astra_cpu"))
    curved = tomo.FanBeamGeometry(
        apart, odl.uniform_partition(-0.5, 0.5, 5), 5, 5, det_curvature_radius=10
    )
    with pytest.raises(GeometryError, match="curved"):
        geometry_from_odl(curved, space)
    tilted = tomo.Parallel2dGeometry(apart, odl.uniform_partition(-2, 2, 5), det_pos_init=(1, 1))
    with pytest.raises(GeometryError, match="no exact equivalent"):
        geometry_from_odl(tilted, space)
    with pytest.raises(TypeError, match="linear"):
        OdlBackend(odl.PowerOperator(space, 2))
    with pytest.raises(TypeError, match="RayTransform"):
        from_odl(odl.IdentityOperator(space))
    gen = OdlBackend(odl.ScalingOperator(space, 2.0))
    assert gen.domain_shape == (4, 4) and not gen.matched
    v = torch.rand(1, 4, 4, dtype=torch.float64)
    assert torch.allclose(gen.adjoint(v), 2 * v.float().double(), atol=1e-6)
