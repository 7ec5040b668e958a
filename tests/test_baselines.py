"""Baselines and evaluate_uq on a tiny problem."""

from __future__ import annotations

import math

import pytest
import torch

from dip_uq import reconstruct_with_uncertainty
from dip_uq.dip import UNet, UNetConfig, fit_dip
from dip_uq.uq.baselines import dip_mcdo, dip_noise_baseline
from dip_uq.uq.evaluation import backprojected_noise_delta, discrepancy_rank, evaluate_uq
from operators import MatrixOperator, Parallel2D, RayTransform, VolumeGeometry, uniform_angles
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


def _svd_operator(s: torch.Tensor, n_obs: int, seed: int = 0):
    """A = Q diag(s) Vᵀ (orthogonal Q, V): singular values known in closed form."""
    g = torch.Generator().manual_seed(seed)
    n = s.numel()
    Q = torch.linalg.qr(torch.randn(n_obs, n, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    A = Q @ torch.diag(s) @ V.T
    return MatrixOperator(A.to_sparse(), (2, n // 2), (n_obs,)), Q, V


def test_delta_closed_form_and_discrepancy_rank():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.1, 1e-4], dtype=torch.float64)
    op, Q, V = _svd_operator(s, n_obs=9)
    # δ = σ² Σ_{j≤k} s_j⁻² / n
    for k in (1, 3, 4, 6):
        want = 0.3 * float((s[:k] ** -2).sum()) / 6
        assert backprojected_noise_delta(op, 0.3, rank=k) == pytest.approx(want, rel=1e-9)
    assert backprojected_noise_delta(op, 0.3, rcond=0.1) == pytest.approx(
        0.3 * float((s[:4] ** -2).sum()) / 6, rel=1e-9
    )
    # data coefficients u_jᵀy = c_j: residual after k directions = Σ_{j>k} c_j²
    c = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    y = Q @ c
    tail = torch.flip(torch.cumsum(torch.flip(c**2, [0]), 0), [0])  # Σ_{j≥k}
    resid = torch.cat([tail[1:], torch.zeros(1, dtype=torch.float64)])  # after k = 1..6
    for k in (1, 2, 3, 4):
        # a noise level whose threshold 9 σ² falls just above the residual after k directions
        sigma2 = float(resid[k - 1]) * 1.01 / 9
        assert discrepancy_rank(y, op, sigma2) == k
    # an underestimated noise level is never reached: the numerical rank
    assert discrepancy_rank(y, op, 1e-12) == 6
    with pytest.raises(ValueError, match="exactly one of rank"):
        backprojected_noise_delta(op, 1.0)
    with pytest.raises(ValueError, match="range shape"):
        discrepancy_rank(y[:5], op, 1.0)


def test_delta_is_the_variance_of_the_truncated_reconstruction():
    """Monte Carlo: the TSVD-k reconstruction of pure white noise has mean voxel variance δ."""
    s = torch.tensor([6.0, 3.0, 1.5, 0.7, 0.05, 0.01], dtype=torch.float64)
    op, Q, V = _svd_operator(s, n_obs=8, seed=3)
    g = torch.Generator().manual_seed(4)
    sigma2, k = 0.5, 4
    eta = torch.randn(20000, 8, generator=g, dtype=torch.float64) * math.sqrt(sigma2)
    x_k = (eta @ Q[:, :k] / s[:k]) @ V[:, :k].T  # V_k S_k⁻¹ Q_kᵀ η
    mc = float(x_k.pow(2).mean())
    assert backprojected_noise_delta(op, sigma2, rank=k) == pytest.approx(mc, rel=0.03)


def test_discrepancy_delta_is_a_correction_on_the_protocol_operator():
    """On the 20-angle protocol operator the rcond=1e-3 rule keeps singular values down to
    ~0.02 and δ swamps an image in [0, 1]; the discrepancy rank keeps δ a small fraction of
    the least-squares error of the same truncated reconstruction."""
    from dip_uq.io.datasets.kmnist import kmnist_operator

    g = torch.Generator().manual_seed(0)
    op = kmnist_operator(20)
    x = random_ellipses(28, n_ellipses=8, generator=g, dtype=torch.float64)
    y, std = add_gaussian_noise(op(x), rel=0.05, generator=g)
    k = discrepancy_rank(y, op, std**2)
    assert 200 < k < 700
    loose = backprojected_noise_delta(op, std**2, rcond=1e-3)
    dp = backprojected_noise_delta(op, std**2, rank=k)
    assert loose > 0.1 and dp < 1e-3
    n = 784
    A = op(torch.eye(n, dtype=torch.float64).reshape(n, 28, 28)).reshape(n, -1).T
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    x_k = Vh[:k].T @ ((U[:, :k].T @ y.reshape(-1).double()) / s[:k])
    mse = float((x_k - x.reshape(-1)).pow(2).mean())
    assert dp < 0.5 * mse


def test_baselines_and_metrics(problem):
    x, op, y, std = problem
    g = torch.Generator().manual_seed(1)
    net = UNet(UNetConfig(channels=(4, 4), skip_channels=(0, 2)), generator=g).double()
    dip = fit_dip(
        y, op, net=net, tv_weight=1e-4, iterations=100, lr=1e-2, generator=g, progress=False
    )
    rank = discrepancy_rank(y, op, std**2)
    delta = backprojected_noise_delta(op, std**2, rank=rank)
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
    one = dip_noise_baseline(dip.image, op, 1.0, rank=rank)
    assert float(one.std[0, 0]) == pytest.approx(math.sqrt(delta / std**2))
    learned = dip_noise_baseline(dip.image, op, lin.noise_var, rank=rank)
    m_lin = evaluate_uq(lin, x, delta=delta, patch_sizes=(1, 2, 4))
    m_one = evaluate_uq(one, x, patch_sizes=(1, 2))
    m_learned = evaluate_uq(learned, x, patch_sizes=(1, 2))
    for m in (m_lin, m_one, m_learned):
        assert math.isfinite(m["test_log_likelihood"]) and math.isfinite(m["psnr"])
        assert set(m["coverage"]) == {"0.5", "0.9", "0.95"}
    # diagonal predictive: the exact and patch scores coincide
    assert m_one["test_log_likelihood"] == pytest.approx(m_one["patch_log_likelihood"]["2"])
    # N(x*, δ I) in closed form: −½ (log 2πδ + mse/δ), δ scaling with the noise variance
    for res, m, var in ((one, m_one, 1.0), (learned, m_learned, lin.noise_var)):
        d1 = delta / std**2 * var
        mse = float((dip.image.reshape(12, 12).double() - x).pow(2).mean())
        want = -0.5 * (math.log(2 * math.pi * d1) + mse / d1)
        assert m["test_log_likelihood"] == pytest.approx(want, rel=1e-6)
        assert res.diagnostics["delta"] == pytest.approx(d1, rel=1e-9)
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
    delta = backprojected_noise_delta(op, std**2, rank=discrepancy_rank(y, op, std**2))
    m = evaluate_uq(res, x, delta=delta, patch_sizes=(1, 2))
    assert math.isfinite(m["test_log_likelihood"])
    with pytest.raises(ValueError, match="dropout"):
        dip_mcdo(y, op, tv_weight=1e-4, iterations=1, dropout=0.0, progress=False)
