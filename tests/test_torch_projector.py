"""Internals of the torch Joseph projector: fast paths against the plain ones."""

import math

import pytest
import torch

from operators import (
    ConeBeam3D,
    FanBeam2D,
    Parallel2D,
    RayTransform,
    VolumeGeometry,
    uniform_angles,
)
from operators.backends.torch_joseph import TorchJoseph

PARALLEL_CASES = [
    (
        VolumeGeometry(shape=(20, 17)),
        Parallel2D.default(VolumeGeometry(shape=(20, 17)), n_angles=13),
    ),
    (
        VolumeGeometry(shape=(16, 16), voxel_size=0.7, center=(1.0, -2.0)),
        Parallel2D(
            angles=uniform_angles(11, start=0.1), det_count=25, det_spacing=0.9, det_offset=0.3
        ),
    ),
    (
        VolumeGeometry(shape=(16, 12)),
        Parallel2D(angles=uniform_angles(8, stop=2 * math.pi), det_count=9, det_spacing=2.5),
    ),
]


@pytest.mark.parametrize("vol, geom", PARALLEL_CASES)
def test_gather_adjoint_equals_scatter_adjoint(vol, geom):
    fast = TorchJoseph(vol, geom)
    plain = TorchJoseph(vol, geom, gather_adjoint=False)
    assert fast._par_plans is not None
    y = torch.randn(3, *geom.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = plain.adjoint(y)
    torch.testing.assert_close(
        fast.adjoint(y), ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max())
    )


def test_gather_adjoint_is_not_used_when_bins_are_finer_than_voxels():
    vol = VolumeGeometry(shape=(16, 16))
    geom = Parallel2D(angles=uniform_angles(6), det_count=40, det_spacing=0.5)
    assert TorchJoseph(vol, geom)._par_plans is None  # falls back to the scatter adjoint
    op = RayTransform(vol, geom)
    x = torch.randn(16, 16, dtype=torch.float64)
    y = torch.randn(geom.shape, dtype=torch.float64)
    assert abs(float((op(x) * y).sum() - (x * op.T(y)).sum())) < 1e-10 * float(x.norm() * y.norm())


@pytest.mark.parametrize(
    "vol, geom",
    [
        (
            VolumeGeometry(shape=(12, 10)),
            FanBeam2D.default(VolumeGeometry(shape=(12, 10)), n_angles=9),
        ),
        (
            VolumeGeometry(shape=(6, 7, 8)),
            ConeBeam3D.default(VolumeGeometry(shape=(6, 7, 8)), n_angles=7),
        ),
        PARALLEL_CASES[0],
    ],
)
def test_chunking_and_grid_cache_do_not_change_results(vol, geom):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *vol.shape, dtype=torch.float64, generator=g)
    y = torch.randn(2, *geom.shape, dtype=torch.float64, generator=g)
    ref = TorchJoseph(vol, geom)
    tiny = TorchJoseph(vol, geom, chunk_bytes=1, grid_cache_bytes=0)  # one view per chunk, no cache
    torch.testing.assert_close(tiny.forward(x), ref.forward(x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(tiny.adjoint(y), ref.adjoint(y), rtol=1e-13, atol=1e-13)
    # cached second call equals the first
    torch.testing.assert_close(ref.forward(x), ref.forward(x), rtol=0, atol=0)


def test_float32_matches_float64():
    vol = VolumeGeometry(shape=(6, 7, 8))
    geom = ConeBeam3D.default(vol, n_angles=5)
    op = RayTransform(vol, geom)
    x = torch.rand(vol.shape, dtype=torch.float64)
    torch.testing.assert_close(op(x.float()).double(), op(x), rtol=1e-5, atol=1e-5)


def test_rejects_low_precision_and_integer_tensors():
    op = RayTransform(VolumeGeometry(shape=(4, 4)), Parallel2D(angles=[0.0], det_count=6))
    with pytest.raises(TypeError, match="float32 and float64"):
        op(torch.zeros(4, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match="floating-point"):
        op(torch.zeros(4, 4, dtype=torch.int64))
