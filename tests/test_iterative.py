"""Matrix-free regularised least squares (operators.iterative) against dense linear algebra,
and the view-subset operators (operators.subset) against the full operator."""

from __future__ import annotations

import math

import pytest
import torch

from operators import FanBeam2D, Parallel3D, RayTransform, VolumeGeometry
from operators.iterative import cg_normal, discrepancy_tikhonov, multishift_cg_normal
from operators.phantoms import shepp_logan_2d
from operators.subset import ViewSubset, select_views, take_views, view_axis
from operators.testing import dot_test

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    vol = VolumeGeometry(shape=(16, 16))
    op = RayTransform(vol, FanBeam2D.default(vol, n_angles=10))
    n = 16 * 16
    A = op(torch.eye(n, dtype=torch.float64).reshape(n, 16, 16)).reshape(n, -1).T
    x = shepp_logan_2d((16, 16), dtype=torch.float64)
    y0 = op(x)
    sd = 0.05 * float(y0.abs().mean())
    y = y0 + sd * torch.randn(y0.shape, generator=g, dtype=torch.float64)
    return op, A, y, sd**2


def test_cg_normal_matches_dense_solve(problem):
    op, A, _, _ = problem
    b = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, info = cg_normal(op, b, alpha=0.3, tol=1e-10, max_iter=2000)
    M = A.T @ A + 0.3 * torch.eye(A.shape[1], dtype=torch.float64)
    ref = torch.linalg.solve(M, b.reshape(3, -1).T).T.reshape(b.shape)
    assert info.converged
    assert float((x - ref).norm() / ref.norm()) < 1e-8


def test_multishift_matches_each_shift(problem):
    op, A, y, _ = problem
    b = op.T(y)
    shifts = torch.tensor([10.0, 0.05, 1.0], dtype=torch.float64)  # any order
    xs, info = multishift_cg_normal(op, b, shifts, tol=1e-11, max_iter=3000)
    for s, x in zip(shifts, xs):
        ref = torch.linalg.solve(
            A.T @ A + s * torch.eye(A.shape[1], dtype=torch.float64), b.reshape(-1)
        )
        assert float((x.reshape(-1) - ref).norm() / ref.norm()) < 1e-6, float(s)
    assert info.converged and len(info.residual) == 3


def test_discrepancy_weight_matches_dense_curve(problem):
    op, A, y, s2 = problem
    res = discrepancy_tikhonov(y, op, s2, tol=1e-8)
    U, S, _ = torch.linalg.svd(A, full_matrices=False)
    c = U.T @ y.reshape(-1)
    outside = float(y.pow(2).sum() - c.pow(2).sum())
    f = S**2 / (S**2 + res.alpha)
    dense_misfit = (float((((1 - f) * c) ** 2).sum()) + outside) / y.numel()
    assert res.bracketed
    assert abs(dense_misfit / s2 - 1) < 0.01  # the misfit the noise predicts
    assert abs(res.misfit / dense_misfit - 1) < 1e-4  # and the solve agrees with dense


def test_discrepancy_unbracketed_reports_it(problem):
    op, _, y, s2 = problem
    res = discrepancy_tikhonov(y, op, 1e6 * s2)  # noise larger than the data: all noise
    assert not res.bracketed and res.misfit < res.target


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
    ],
)
def test_cg_normal_rejects_bad_alpha(problem, bad, match):
    op, _, _, _ = problem
    with pytest.raises(ValueError, match=match):
        cg_normal(op, torch.zeros(16, 16), **bad)


def test_iterative_rejects_bad_inputs(problem):
    op, _, y, s2 = problem
    with pytest.raises(ValueError, match="domain shape"):
        cg_normal(op, torch.zeros(15, 16), alpha=1.0)
    with pytest.raises(ValueError, match="positive"):
        multishift_cg_normal(op, torch.zeros(16, 16), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="range shape"):
        discrepancy_tikhonov(y[:3], op, s2)
    with pytest.raises(ValueError, match="noise_var"):
        discrepancy_tikhonov(y, op, 0.0)


def test_take_views_equals_selecting_views():
    vol = VolumeGeometry(shape=(12, 12))
    op = RayTransform(vol, FanBeam2D.default(vol, n_angles=9))
    x = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sub = take_views(op, [7, 1, 4])
    assert isinstance(sub, RayTransform)
    ref = select_views(op(x), [7, 1, 4], op.range_shape)
    assert torch.allclose(sub(x), ref, atol=1e-12)
    wrapped = ViewSubset(op, [7, 1, 4])  # the generic path, for operators without geometry
    assert torch.allclose(wrapped(x), ref, atol=1e-12)
    assert dot_test(wrapped, dtype=torch.float64) < 1e-10


def test_view_axis_in_3d():
    vol = VolumeGeometry(shape=(6, 8, 8))
    op = RayTransform(vol, Parallel3D.default(vol, n_angles=5))
    assert view_axis(op.range_shape) == 1
    sub = take_views(op, [0, 3])
    x = torch.rand(6, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(sub(x), op(x)[:, [0, 3]], atol=1e-12)
    with pytest.raises(IndexError, match="out of range"):
        take_views(op, [5])
    with pytest.raises(ValueError, match="repeats"):
        take_views(op, [1, 1])
    assert math.isfinite(float(sub(x).sum()))
