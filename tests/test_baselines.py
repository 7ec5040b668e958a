"""Baselines and evaluate_uq on a tiny problem."""

from __future__ import annotations

import math

import pytest
import torch

from dip_uq import reconstruct_with_uncertainty
from dip_uq.baselines import dip_mcdo, dip_noise_baseline
from dip_uq.dip import UNet, UNetConfig, fit_dip
from dip_uq.metrics import backprojected_noise_delta, evaluate_uq
from operators import Parallel2D, RayTransform, VolumeGeometry, uniform_angles
from operators.noise import add_gaussian_noise
from operators.phantoms import random_ellipses

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    x = random_ellipses(12, n_ellipses=5, generator=g, dtype=torch.float64)
    op = RayTransform(
        VolumeGeometry(shape=(12, 12)), Parallel2D(angles=uniform_angles(10), det_count=17)
    )
    y, std = add_gaussian_noise(op(x), rel=0.05, generator=g)
    return x, op, y, std


def test_delta_matches_pseudoinverse(problem):
    x, op, y, std = problem
    n = x.numel()
    A = op(torch.eye(n, dtype=torch.float64).reshape(n, 12, 12)).reshape(n, -1).T
    pinv = torch.linalg.pinv(A.T @ A, rtol=1e-6)
    ref = float(pinv.diagonal().mean())
    assert backprojected_noise_delta(op, 2.0, rcond=1e-3) == pytest.approx(2 * ref, rel=1e-6)


def test_baselines_and_metrics(problem):
    x, op, y, std = problem
    g = torch.Generator().manual_seed(1)
    net = UNet(UNetConfig(channels=(4, 4), skip_channels=(0, 2)), generator=g).double()
    dip = fit_dip(
        op, y, net=net, tv_weight=1e-4, iterations=100, lr=1e-2, generator=g, progress=False
    )
    delta = backprojected_noise_delta(op, std**2)
    lin = reconstruct_with_uncertainty(
        y,
        op,
        dip=dip,
        hyper="mll",
        solver="exact",
        n_samples=64,
        keep_samples=True,
        exact_covariance=True,
        generator=g,
        progress=False,
    )
    one = dip_noise_baseline(dip.image, op, 1.0)
    assert float(one.std[0, 0]) == pytest.approx(math.sqrt(delta / std**2))
    learned = dip_noise_baseline(dip.image, op, lin.noise_var)
    m_lin = evaluate_uq(lin, x, delta=delta, patch_sizes=(1, 2, 4))
    m_one = evaluate_uq(one, x, patch_sizes=(1, 2))
    m_learned = evaluate_uq(learned, x, patch_sizes=(1, 2))
    for m in (m_lin, m_one, m_learned):
        assert math.isfinite(m["test_log_likelihood"]) and math.isfinite(m["psnr"])
        assert set(m["coverage"]) == {"0.5", "0.9", "0.95"}
    # diagonal predictive: the exact and patch scores coincide
    assert m_one["test_log_likelihood"] == pytest.approx(m_one["patch_log_likelihood"]["2"])
    # a unit noise variance is absurd at this data scale; the learned one does far better
    assert m_learned["test_log_likelihood"] > m_one["test_log_likelihood"] + 1.0
    assert m_lin["patch_log_likelihood"]["1"] == pytest.approx(
        evaluate_uq(lin, x, delta=delta, patch_sizes=(1,))["patch_log_likelihood"]["1"]
    )


def test_mcdo(problem):
    x, op, y, std = problem
    g = torch.Generator().manual_seed(2)
    res = dip_mcdo(
        y,
        op,
        tv_weight=1e-4,
        iterations=30,
        lr=1e-3,
        n_samples=16,
        generator=g,
        progress=False,
    )
    assert res.samples.shape == (16, 12, 12)
    assert float(res.std.mean()) > 0
    torch.testing.assert_close(
        res.samples.mean(0), torch.zeros(12, 12, dtype=res.samples.dtype), atol=1e-6, rtol=0
    )
    m = evaluate_uq(res, x, delta=backprojected_noise_delta(op, std**2), patch_sizes=(1, 2))
    assert math.isfinite(m["test_log_likelihood"])
    with pytest.raises(ValueError, match="dropout"):
        dip_mcdo(y, op, tv_weight=1e-4, iterations=1, dropout=0.0, progress=False)
