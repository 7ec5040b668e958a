"""The matrix-free image-space noise term against its dense SVD value (docs/methods.md §6.2):
δ_i = σ² Σ_j V_ij² s_j² / (s_j² + α)², α from the discrepancy principle."""

from __future__ import annotations

import math

import pytest
import torch

from dip_uq.uq import image_noise_term
from operators import FanBeam2D, RayTransform, VolumeGeometry
from operators.phantoms import shepp_logan_2d
from operators.subset import take_views

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem():
    g = torch.Generator().manual_seed(0)
    vol = VolumeGeometry(shape=(16, 16))
    op = RayTransform(vol, FanBeam2D.default(vol, n_angles=12))
    x = shepp_logan_2d((16, 16), dtype=torch.float64)
    y0 = op(x)
    sd = 0.03 * float(y0.abs().mean())
    return op, y0 + sd * torch.randn(y0.shape, generator=g, dtype=torch.float64), sd**2


def _dense(op):
    n = math.prod(op.domain_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *op.domain_shape)
    return op(eye).reshape(n, -1).T


def test_noise_term_matches_dense_svd():
    fit_views, held_views = [v for v in range(12) if v % 4], [0, 4, 8]
    full, y, s2 = _problem()
    op, held = take_views(full, fit_views), take_views(full, held_views)
    y_fit = y[fit_views]
    K = 1200
    nt = image_noise_term(
        y_fit,
        op,
        s2,
        n_probes=K,
        batch=400,
        heldout_op=held,
        tol=1e-8,
        generator=torch.Generator().manual_seed(3),
    )
    assert nt.converged and nt.diagnostics["discrepancy_bracketed"]
    A, Ah = _dense(op), _dense(held)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    filt = s2 * S**2 / (S**2 + nt.alpha) ** 2
    dense = (Vh.T**2 * filt).sum(1).reshape(op.domain_shape)
    dense_h = ((Ah @ Vh.T) ** 2 * filt).sum(1)
    # the discrepancy weight is the dense one: the Tikhonov misfit equals the noise level
    c = U.T @ y_fit.reshape(-1)
    f = S**2 / (S**2 + nt.alpha)
    misfit = float((((1 - f) * c) ** 2).sum() + y_fit.pow(2).sum() - c.pow(2).sum()) / c.numel()
    assert abs(misfit / s2 - 1) < 0.01
    # the voxel mean within 5 % (Monte-Carlo error ~0.3 %), and voxel by voxel within what
    # K probes allow (relative sd sqrt(2/K) = 4 %: median |error| ~2.7 %)
    assert abs(float(nt.variance.mean() / dense.mean()) - 1) < 0.05
    rel = (nt.variance / dense - 1).abs()
    assert float(rel.median()) < 0.05
    assert float(rel.max()) < 6 * math.sqrt(2 / K)
    hit = dense_h > 1e-12 * float(dense_h.max())  # rays that cross the volume
    assert torch.all(nt.heldout_variance[~hit] < 1e-12 * float(dense_h.max()))
    rel_h = (nt.heldout_variance[hit] / dense_h[hit] - 1).abs()
    assert float(rel_h.median()) < 0.05


def test_noise_term_given_alpha_scales_with_noise():
    op, y, s2 = _problem()
    a = image_noise_term(
        y, op, s2, n_probes=8, alpha=2.0, generator=torch.Generator().manual_seed(0)
    )
    b = image_noise_term(
        y, op, 4 * s2, n_probes=8, alpha=2.0, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(b.variance, 4 * a.variance, rtol=1e-6)  # same draws, σ doubled
    assert a.alpha == 2.0 and "discrepancy_misfit" not in a.diagnostics


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_probes=1), "n_probes"),
        (dict(batch=0), "batch"),
        (dict(alpha=-1.0), "alpha"),
    ],
)
def test_noise_term_rejects_bad_options(kw, match):
    op, y, s2 = _problem()
    with pytest.raises(ValueError, match=match):
        image_noise_term(y, op, s2, **kw)
    with pytest.raises(ValueError, match="noise_var"):
        image_noise_term(y, op, float("nan"))
